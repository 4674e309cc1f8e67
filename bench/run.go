package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/ruleset"
)

const (
	phaseLatency    = "latency"
	phaseScaling    = "scaling"
	phaseReload     = "reload"
	phaseThroughput = "throughput"
	phaseRevocation = "revocation"
)

var allPhases = []string{phaseLatency, phaseScaling, phaseReload, phaseThroughput, phaseRevocation, phasePinhole, phaseDaemon, phaseScale, phaseRoutes, phasePrincipals, phaseOutsider, phaseDNS, phaseFleet}

type options struct {
	quick   bool
	out     string
	phases  []string
	verbose bool
	// from is a results.json to write the report from, measuring nothing.
	from string
	// sizes replace the mode's scaling sizes when given.
	sizes []int
	// merge: put the results of the phases run into the results.json in
	// out, keeping the other phases' results there.
	merge bool
	// tiny shrinks every count to a smoke test's (set by the test only).
	tiny bool
}

// config is how much of everything a run does.
type config struct {
	Mode       string `json:"mode"`
	MatrixSize int    `json:"matrix_prefixes"`
	Sizes      []int  `json:"scaling_prefixes"`
	// Attempts per point and variant, over all rounds; a round makes Batch
	// of them on every variant in turn, after Warmup untimed ones.
	Attempts int `json:"attempts_per_point"`
	Batch    int `json:"batch"`
	Warmup   int `json:"warmup_per_batch"`
	// Reloads and ReloadAttempts are the reload phase's goals; it stops at
	// ReloadLimit if the attempts take longer.
	ReloadSize     int           `json:"reload_prefixes"`
	Reloads        int           `json:"reload_goal"`
	ReloadAttempts int64         `json:"reload_attempts_goal"`
	ReloadLimit    time.Duration `json:"reload_time_limit_ns"`
	ReloadTimings  int           `json:"reload_timings_per_size"`
	TputRounds     int           `json:"throughput_rounds"`
	TputDuration   time.Duration `json:"throughput_batch_ns"`
	// The pinhole phase: holes opened one at a time for the latency; the
	// batch sizes, set sizes and time per size of the update rates; the
	// transfer's size and rounds.
	PinholeOpens   int           `json:"pinhole_opens"`
	UpdateBatches  []int         `json:"pinhole_update_batches"`
	UpdateExisting []int         `json:"pinhole_update_existing"`
	UpdateDuration time.Duration `json:"pinhole_update_ns"`
	TransferBytes  int64         `json:"pinhole_transfer_bytes"`
	TransferRounds int           `json:"pinhole_transfer_rounds"`
	// The revocation phase: revocations timed under a sending client, and
	// the live-socket counts of the sweeps.
	Revokes      int   `json:"revokes"`
	SweepSockets []int `json:"sweep_sockets"`
	// The daemon phase: `procgate revoke` runs timed, the policy size of
	// the daemon's cost, its idle window and the reloads timed there.
	CLIRevokes    int           `json:"cli_revokes"`
	DaemonSize    int           `json:"daemon_prefixes"`
	DaemonIdle    time.Duration `json:"daemon_idle_ns"`
	DaemonReloads int           `json:"daemon_reloads"`
	// The scale phase: the policy size and the reloads timed there.
	ScaleSize    int `json:"scale_prefixes"`
	ScaleReloads int `json:"scale_reloads"`
	// The routes phase: routes added (and removed) via an internal
	// interface, each timed to enforcement.
	RouteAdds int `json:"route_adds"`
	// The dns phase: names resolved, each answer timed to the app.
	DNSAnswers int `json:"dns_answers"`
	// The fleet phase: simulated hosts and pushes to them, holes written
	// through etcd, gateway failover rounds.
	FleetHosts     int `json:"fleet_hosts"`
	FleetPushes    int `json:"fleet_pushes"`
	FleetHoles     int `json:"fleet_holes"`
	FleetFailovers int `json:"fleet_failovers"`
	// Spawns per block of fork+exec+exit (set-up, around Attach).
	Spawns int `json:"spawns"`
}

func configFor(o options) config {
	switch {
	case o.tiny:
		return config{Mode: "smoke", MatrixSize: 100, Sizes: []int{10, 1000}, Attempts: 400, Batch: 200, Warmup: 10,
			ReloadSize: 100, Reloads: 20, ReloadAttempts: 1000, ReloadLimit: 5 * time.Second, ReloadTimings: 2,
			TputRounds: 1, TputDuration: 200 * time.Millisecond,
			PinholeOpens: 30, UpdateBatches: []int{1, 100}, UpdateExisting: []int{0}, UpdateDuration: 50 * time.Millisecond,
			TransferBytes: 8 << 20, TransferRounds: 2, Revokes: 2, SweepSockets: []int{10},
			CLIRevokes: 2, DaemonSize: 1000, DaemonIdle: time.Second, DaemonReloads: 2, RouteAdds: 10, DNSAnswers: 20,
			FleetHosts: 50, FleetPushes: 2, FleetHoles: 512, FleetFailovers: 1, Spawns: 20,
			ScaleSize: 1000, ScaleReloads: 1}
	case o.quick:
		return config{Mode: "quick", MatrixSize: 100, Sizes: []int{10, 1000, 5000, 100000}, Attempts: 6000, Batch: 500, Warmup: 50,
			ReloadSize: 1000, Reloads: 200, ReloadAttempts: 500_000, ReloadLimit: 10 * time.Second, ReloadTimings: 3,
			TputRounds: 6, TputDuration: 200 * time.Millisecond,
			PinholeOpens: 300, UpdateBatches: []int{1, 100, 1000}, UpdateExisting: []int{0}, UpdateDuration: 200 * time.Millisecond,
			TransferBytes: 100 << 20, TransferRounds: 40, Revokes: 5, SweepSockets: []int{10, 1000, 10000},
			CLIRevokes: 5, DaemonSize: 100_000, DaemonIdle: 3 * time.Second, DaemonReloads: 2, RouteAdds: 50, DNSAnswers: 200,
			FleetHosts: 2000, FleetPushes: 3, FleetHoles: 4096, FleetFailovers: 2, Spawns: 300,
			ScaleSize: 100_000, ScaleReloads: 2}
	}
	return config{Mode: "full", MatrixSize: 100, Sizes: []int{10, 100, 1000, 5000, 100000, 1000000}, Attempts: 200_000, Batch: 2000, Warmup: 100,
		ReloadSize: 1000, Reloads: 1000, ReloadAttempts: 10_000_000, ReloadLimit: 70 * time.Second, ReloadTimings: 3,
		TputRounds: 20, TputDuration: 250 * time.Millisecond,
		PinholeOpens: 2000, UpdateBatches: []int{1, 10, 100, 1000, 10_000}, UpdateExisting: []int{0, 100_000}, UpdateDuration: time.Second,
		TransferBytes: 100 << 20, TransferRounds: 200, Revokes: 20, SweepSockets: []int{10, 1000, 10000},
		CLIRevokes: 20, DaemonSize: 1_000_000, DaemonIdle: 10 * time.Second, DaemonReloads: 3, RouteAdds: 200, DNSAnswers: 1000,
		FleetHosts: 10_000, FleetPushes: 5, FleetHoles: 20_480, FleetFailovers: 3, Spawns: 2000,
		ScaleSize: 1_000_000, ScaleReloads: 2}
}

// bench is one run.
type bench struct {
	// ctx ends with an interrupt; long set-ups check it between steps.
	ctx      context.Context
	cfg      config
	log      *slog.Logger
	host     *host
	enf      *bpf.Enforcer
	applies  *applyLog // the enforcer's log, which remembers the slowest Apply
	variants []*variant
	res      *results
}

func (b *bench) appCgroup(variant string, app int) string {
	return filepath.Join(b.host.cgroup, variant, appName(app))
}

func (b *bench) cgroupLevel(dir string) (int, error) { return cgroups.Level(b.host.mount, dir) }

func run(o options) (err error) {
	if o.from != "" {
		return rewrite(o.from, o.out)
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root: it makes network namespaces, cgroups and BPF programs")
	}
	for _, p := range o.phases {
		if !slices.Contains(allPhases, p) {
			return fmt.Errorf("unknown phase %q (have %v)", p, allPhases)
		}
	}
	level := slog.LevelInfo
	if o.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	b := &bench{ctx: ctx, cfg: configFor(o), log: log, variants: allVariants()}
	if len(o.sizes) > 0 {
		for _, n := range o.sizes {
			if n < 2 || n > maxPolicy {
				return fmt.Errorf("policy size %d outside 2..%d", n, maxPolicy)
			}
		}
		b.cfg.Sizes = o.sizes
	}
	b.res = newResults(b.cfg, b.variants)
	start := time.Now()
	if b.host, err = newHost(log); err != nil {
		return err
	}
	defer func() {
		if cerr := b.host.close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", cerr))
		}
	}()
	// An interrupt ends the clients at once (a batch may run for seconds);
	// the phase then fails and every cleanup runs on the way out.
	stopKill := context.AfterFunc(ctx, func() {
		log.Warn("interrupted: ending clients and cleaning up")
		_ = os.WriteFile(filepath.Join(b.host.cgroup, "cgroup.kill"), []byte("1"), 0)
	})
	defer stopKill()
	if err := b.setup(); err != nil {
		return err
	}
	phases := map[string]func(context.Context) error{
		phaseLatency:    b.latencyPhase,
		phaseScaling:    b.scalingPhase,
		phaseReload:     b.reloadPhase,
		phaseThroughput: b.throughputPhase,
		phaseRevocation: b.revocationPhase,
		phasePinhole:    b.pinholePhase,
		phaseDaemon:     b.daemonPhase,
		phaseScale:      b.scalePhase,
		phaseRoutes:     b.routesPhase,
		phasePrincipals: b.principalsPhase,
		phaseOutsider:   b.outsiderPhase,
		phaseDNS:        b.dnsPhase,
		phaseFleet:      b.fleetPhase,
	}
	for _, p := range allPhases {
		if !slices.Contains(o.phases, p) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		t0 := time.Now()
		log.Info("phase start", "phase", p)
		if err := phases[p](ctx); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("phase %s: %w", p, ctx.Err())
			}
			return fmt.Errorf("phase %s: %w", p, err)
		}
		b.res.Meta.PhaseSeconds[p] = round3(time.Since(t0).Seconds())
		log.Info("phase done", "phase", p, "took", time.Since(t0).Round(time.Millisecond))
	}
	b.res.Meta.TotalSeconds = round3(time.Since(start).Seconds())
	b.res.Meta.LoadAvg = append(b.res.Meta.LoadAvg, loadAvg())
	if o.merge {
		return b.res.merge(o.out, o.phases)
	}
	return b.res.write(o.out)
}

// setup makes every variant's app cgroups and opens procgate on its own.
func (b *bench) setup() error {
	for _, v := range b.variants {
		for a := range maxApps {
			if _, err := b.host.mkCgroup(filepath.Join(v.Name, appName(a))); err != nil {
				return err
			}
		}
	}
	dir := filepath.Join(b.host.bpffs, "procgate")
	b.applies = newApplyLog(b.log.Handler())
	enf, err := bpf.Open(bpf.Options{BPFDir: dir, CgroupDir: filepath.Join(b.host.cgroup, vProcgate),
		Log: slog.New(b.applies).With("component", "bpf")})
	if err != nil {
		return err
	}
	b.enf = enf
	b.host.undo.push(func() error {
		enf.Close()
		_, err := bpf.Uninstall(dir)
		return err
	})
	// A policy before attaching: an attached enforcer without one denies
	// everything below it.
	pol, err := newPolicy(b.cfg.MatrixSize)
	if err != nil {
		return err
	}
	if _, err := b.applyProcgate(pol.ruleset(), pol); err != nil {
		return err
	}
	if err := b.spawnBefore(); err != nil {
		return err
	}
	if err := enf.Attach(); err != nil {
		return err
	}
	if err := b.spawnAfter(); err != nil {
		return err
	}
	for _, v := range b.variants {
		if v.pinned != nil {
			if err := b.attachPinned(dir, v); err != nil {
				return err
			}
		}
		if v.empty {
			if err := b.attachFloor(v, nil); err != nil {
				return err
			}
		}
		if v.minimal {
			if err := b.attachMinimal(v, pol); err != nil {
				return err
			}
		}
	}
	for _, g := range enf.Guards() {
		b.res.Meta.ProcgateGuards = append(b.res.Meta.ProcgateGuards, fmt.Sprintf("%s: active=%v", g.Name, g.Active))
	}
	return nil
}

// pinnedAttach is how each program the enforcer pins attaches.
var pinnedAttach = map[string]ebpf.AttachType{
	"connect4": ebpf.AttachCGroupInet4Connect, "connect6": ebpf.AttachCGroupInet6Connect,
	"sendmsg4": ebpf.AttachCGroupUDP4Sendmsg, "sendmsg6": ebpf.AttachCGroupUDP6Sendmsg,
	"bind4": ebpf.AttachCGroupInet4Bind, "bind6": ebpf.AttachCGroupInet6Bind,
	"sock_create": ebpf.AttachCGroupInetSockCreate, "egress": ebpf.AttachCGroupInetEgress,
	"handover": ebpf.AttachCGroupSockOps,
}

// attachPinned attaches the enforcer's programs that v names (pinned in
// dir for inspection) to v's cgroup, and nothing else: the same maps, so
// the same policy, with only those guards. A program the enforcer did not
// attach on this kernel (an optional guard it lacks) is left out.
func (b *bench) attachPinned(dir string, v *variant) error {
	cg := filepath.Join(b.host.cgroup, v.Name)
	for _, name := range v.pinned {
		attach, ok := pinnedAttach[name]
		if !ok {
			return fmt.Errorf("variant %s: no attach type for program %s", v.Name, name)
		}
		prog, err := ebpf.LoadPinnedProgram(filepath.Join(dir, "prog_"+name), nil)
		if errors.Is(err, os.ErrNotExist) && name == "handover" {
			continue // BPF LSM guards handovers here, or the guard is missing: Guards says which
		}
		if err != nil {
			return fmt.Errorf("load pinned %s program: %w", name, err)
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: attach, Program: prog})
		prog.Close()
		if err != nil {
			return fmt.Errorf("attach %s to %s: %w", name, cg, err)
		}
		b.host.undo.push(l.Close)
	}
	return nil
}

// applyProcgate installs rs (derived from pol) with app i bound to app
// cgroup i of both procgate variants, and returns what it cost: wall time of
// Apply and the process's CPU time meanwhile.
func (b *bench) applyProcgate(rs *ruleset.Ruleset, pol *benchPolicy) (loadStats, error) {
	// As the daemon applies it by default (--tcp-handover=auto).
	g := bpf.Generation{Rules: rs, AppIDs: pol.appIDs(), AuditRate: 100, TrustTraceGuard: true}
	for a := range pol.apps {
		for _, v := range b.variants {
			if !v.procgateLike() || v.unbound {
				continue
			}
			dir := b.appCgroup(v.Name, a)
			id, err := cgroups.ID(dir)
			if err != nil {
				return loadStats{}, err
			}
			level, err := b.cgroupLevel(dir)
			if err != nil {
				return loadStats{}, err
			}
			g.Bindings = append(g.Bindings, bpf.Binding{App: appName(a), CgroupID: id, Level: level})
		}
	}
	cpu0 := processCPU()
	t0 := time.Now()
	if _, err := b.enf.Apply(g); err != nil {
		return loadStats{}, fmt.Errorf("procgate apply of %d prefixes: %w", pol.size, err)
	}
	return loadStats{Seconds: time.Since(t0).Seconds(), CPUSeconds: processCPU() - cpu0}, nil
}

// processCPU is this process's user+system CPU time so far, in seconds.
func processCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return tvSeconds(ru.Utime) + tvSeconds(ru.Stime)
}
