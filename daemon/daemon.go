// Package daemon wires procgate together: it loads the policy, keeps the
// kernel's generation in step with it (reload on change and SIGHUP, keep the
// old one when the new one is invalid), creates app cgroups, reads audit
// events, and serves the local API.
package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"runtime/debug"
	"runtime/metrics"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/containers"
	"github.com/procgate/procgate/fleet"
	"github.com/procgate/procgate/internal/sdnotify"
	"github.com/procgate/procgate/internal/version"
	"github.com/procgate/procgate/launch"
	"github.com/procgate/procgate/policy"
	"github.com/procgate/procgate/ruleset"
)

// Defaults of the installed layout (README.md, the table under Install).
const (
	DefaultStateDir = "/var/lib/procgate"
	// DefaultPolicyPath is where `make install` and the packages put the
	// policy, and where procgate.service's daemon reads it.
	DefaultPolicyPath = "/etc/procgate/policy.yaml"
	DefaultBPFDir     = "/sys/fs/bpf/procgate"
	// DefaultGuardGroup is the trace guard's group when no gid is given:
	// a system group of procgate's own (the package creates it, and the
	// daemon when it is missing), nobody's primary group. nogroup (65534),
	// the old default, is the primary group of nobody and of many service
	// accounts, whose apps then ran unguarded.
	DefaultGuardGroup = "procgate-guard"
	// DefaultPinholeIdle is Config.PinholeIdle when 0.
	DefaultPinholeIdle = 5 * time.Minute
	// AppsDir is the directory below the cgroup root holding app cgroups.
	AppsDir = "procgate.apps"
)

// Config is the daemon's command line.
type Config struct {
	PolicyPath  string
	CgroupRoot  string // "" means the whole cgroup2 hierarchy
	StateDir    string
	BPFDir      string
	Socket      string
	MetricsAddr string
	// PollInterval is how often pinned binaries are checked for changes,
	// and the policy file and the routes of internal.interfaces where their
	// events (inotify, netlink) are not to be had.
	PollInterval time.Duration
	// Settle is how long the policy's directories must be quiet after a
	// change before the policy is read (DefaultSettle when 0).
	Settle time.Duration
	Log    *slog.Logger
	// Ready, if set, is called once the daemon enforces and serves.
	Ready func()
	// GatewayURL turns the pinhole agent on: apps with inbound: dynamic
	// get holes at this perimeter gateway (https://HOST:PORT), asked with
	// the client certificate GatewayCert/GatewayKey, the gateway checked
	// against GatewayCA. Several URLs, comma-separated, are the gateways
	// of one site in order of preference: the agent fails over.
	GatewayURL                         string
	GatewayCA, GatewayCert, GatewayKey string
	// PinholeIdle is how long a hole's gateway counters may stand still,
	// with no connection of its peer on the port, before the agent closes
	// it as stale; 0: DefaultPinholeIdle, negative: never (a hole nobody
	// uses then stays open as long as its app holds the port).
	PinholeIdle time.Duration
	// NoUDPHandover turns the UDP handover check off host-wide: for hosts
	// whose NFQUEUE firewall (an IPS, OpenSnitch) reinjects apps' internal
	// UDP, which the check would take for sends of the firewall's task.
	NoUDPHandover bool
	// TrustTraceGuard leaves out of the TCP handover guard the connections
	// of app processes the trace guard covers (bpf.Generation); the zero
	// value guards every app connection (--tcp-handover=all).
	TrustTraceGuard bool
	// ContainerSockets are the container runtimes' API sockets asked
	// where match.container apps run; nil: containers.DefaultSockets.
	ContainerSockets []string
	// GuardGID is the real gid launched app processes run with, so that
	// no process without CAP_SYS_PTRACE can trace them (launch.Spec); 0:
	// the gid of GuardGroup. The daemon refuses to start with a gid that is
	// some user's primary group: that user's apps could not be guarded.
	GuardGID uint32
	// GuardGroup is the guard's group when GuardGID is 0, created as a
	// system group when missing; "": DefaultGuardGroup.
	GuardGroup string
	// NoTraceGuard turns the trace guard off: apps run with their user's
	// gid and can be traced by other processes of that user.
	NoTraceGuard bool
	// DNSGrace is how long an address a DNS answer gave an app for a name
	// grant stays allowed past the answer's TTL (--dns-grace): resolvers
	// and apps cache answers a little longer than they should. 0: none.
	DNSGrace time.Duration
	// Fleet, when set, takes the policy from etcd instead of PolicyPath
	// (--policy-store etcd).
	Fleet *FleetConfig
	// NameCap is how many addresses one name may hold for an app at once
	// (--dns-cap); answers past it are not learned, and an audit record
	// says so. 0: bpf.DefaultNameCap.
	NameCap int
	// AuditSinks are where audit records go (--audit-sink): SinkFile, the
	// state dir's audit.jsonl, which `events` and `learn` read back, and
	// SinkJournald, journald with structured fields. nil: SinkFile.
	AuditSinks []string
	// JournalSocket is journald's native socket for SinkJournald; "":
	// audit.DefaultJournalSocket.
	JournalSocket string
}

// The audit sinks of Config.AuditSinks.
const (
	SinkFile     = "file"
	SinkJournald = "journald"
)

// auditLog is the audit log's path, "" when the file sink is off.
func (c *Config) auditLog() string {
	if !slices.Contains(c.AuditSinks, SinkFile) {
		return ""
	}
	return filepath.Join(c.StateDir, "audit.jsonl")
}

// journal is journald's socket, "" when the journald sink is off.
func (c *Config) journal() string {
	if !slices.Contains(c.AuditSinks, SinkJournald) {
		return ""
	}
	return c.JournalSocket
}

// checkAuditSinks refuses unknown sinks, and a journald sink without
// journald: its records would all be lost.
func (c *Config) checkAuditSinks() error {
	if len(c.AuditSinks) == 0 {
		c.AuditSinks = []string{SinkFile}
	}
	for _, s := range c.AuditSinks {
		if s != SinkFile && s != SinkJournald {
			return fmt.Errorf("--audit-sink %q: want file, journald, or both (file,journald)", s)
		}
	}
	if c.JournalSocket == "" {
		c.JournalSocket = audit.DefaultJournalSocket
	}
	if j := c.journal(); j != "" {
		if fi, err := os.Stat(j); err != nil || fi.Mode().Type() != fs.ModeSocket {
			return fmt.Errorf("--audit-sink journald: no journald socket at %s (is systemd-journald running? --journal-socket names another)", j)
		}
	}
	return nil
}

// Daemon is a running procgate daemon.
type Daemon struct {
	cfg Config
	log *slog.Logger
	enf Enforcer
	// adopted: enforcement was pinned by an earlier run and taken over.
	adopted bool
	appDirs cgroups.AppDirs
	mount   string
	auditor *audit.Auditor
	// netns: the DNS proxies in other network namespaces (dnsnetns.go),
	// nil while none may start.
	netns atomic.Pointer[netnsProxies]

	// state is the published State: readers load it, only the
	// reconciler stores it (State).
	state atomic.Pointer[State]
	// applying is the generation being applied, nil between Applies.
	applying atomic.Pointer[pendingGen]
	// calls are the API's changes (reload, revoke), run on the
	// reconciler in turn with the watch events (call); stopped is closed
	// when the reconciler returns.
	calls   chan func()
	stopped chan struct{}

	// The reconciler's own: the goroutine that runs Run's loop (and,
	// before it, Run's start) is the only one to read or write the
	// fields below, so they need no lock.
	ids     *appIDs
	revoked *revocations
	// fleetRevoked are the fleet-wide revocations from etcd (revoke
	// --fleet), in force with the local ones; nil without etcd.
	fleetRevoked *revocations
	// policyStamp is the policy files' identity when they were last read:
	// the policy is read (and hashed) only when it changed, which at
	// 1,000,000 prefixes (80 MB) would otherwise cost a tenth of a CPU a
	// poll. seenHash is the hash of the files last read, good or bad:
	// bad bytes are not parsed again at every poll.
	policyStamp policyStamp
	seenHash    string
	// exeStates is what was last said of each app's pinned path (key
	// app NUL path); exeHashes the hashes of their files' versions,
	// exeWatch the watch on their directories (nil: polled only).
	exeStates map[string]exeState
	// exeRecords are audit records of hash checks, appended once the
	// generation that follows them is applied.
	exeRecords []audit.Record
	exeHashes  *exeHashes
	exeWatch   *exeWatch
	// containerWatch follows the runtimes' events while the policy has
	// match.container apps (nil before Run starts it).
	containerWatch *containerWatch

	// bindApp, when set, stands in for bind's cgroups (tests).
	bindApp func(app string) (bpf.Binding, error)

	// Set before the API serves, read-only after.
	// ph is the pinhole agent (nil without --gateway).
	ph *pinholes
	// fleet is the etcd policy source; nil with the policy file.
	fleet *fleetSource
}

func (c *Config) setDefaults() error {
	if c.PolicyPath == "" {
		c.PolicyPath = DefaultPolicyPath
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.BPFDir == "" {
		c.BPFDir = DefaultBPFDir
	}
	if c.Socket == "" {
		c.Socket = api.DefaultSocket
	}
	if c.PollInterval == 0 {
		c.PollInterval = time.Second
	}
	if c.Settle <= 0 {
		c.Settle = DefaultSettle
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
	if c.GuardGroup == "" {
		c.GuardGroup = DefaultGuardGroup
	}
	if c.PinholeIdle == 0 {
		c.PinholeIdle = DefaultPinholeIdle
	}
	if err := c.checkAuditSinks(); err != nil {
		return err
	}
	if c.GatewayURL != "" && (c.GatewayCA == "" || c.GatewayCert == "" || c.GatewayKey == "") {
		return errors.New("--gateway needs --gateway-ca, --gateway-cert and --gateway-key (the agent's mTLS certificate)")
	}
	if c.GatewayURL != "" {
		if _, err := gatewayURLs(c.GatewayURL); err != nil {
			return err
		}
	}
	return nil
}

// Run enforces the policy until ctx ends. Enforcement outlives it: the
// programs, maps and links stay pinned in BPFDir.
func Run(ctx context.Context, cfg Config) error {
	if err := cfg.setDefaults(); err != nil {
		return err
	}
	if err := resolveGuard(&cfg, cfg.Log); err != nil {
		return err
	}
	d := newDaemon(cfg)
	mount, err := cgroups.Mount()
	if err != nil {
		return err
	}
	d.mount = mount
	if cfg.CgroupRoot == "" {
		cfg.CgroupRoot = mount
		d.cfg.CgroupRoot = mount
	}
	if err := checkCgroupDir(cfg.CgroupRoot); err != nil {
		return err
	}
	d.appDirs = cgroups.AppDirs{Base: filepath.Join(cfg.CgroupRoot, AppsDir)}
	if err := d.openStateDir(); err != nil {
		return err
	}
	// The first policy is parsed and applied as a reload's is: under the
	// reload's GC bound, its garbage given back once it is in force
	// (install). A daemon started on 1,000,000 prefixes otherwise stayed
	// at 745 MB resident until its first reload (373 MB after it).
	restoreGC := lowerGC()
	defer restoreGC()
	// An invalid policy at start is fatal; whatever is pinned keeps
	// enforcing the last good generation meanwhile.
	var rs *ruleset.Ruleset
	var hash string
	var dropins []string
	var first fleet.Snapshot
	if cfg.Fleet != nil {
		rs, hash, dropins, first, err = d.openFleet(ctx)
	} else {
		rs, hash, dropins, err = loadPolicy(cfg.PolicyPath, d.log)
	}
	if err != nil {
		return err
	}

	if err := mountBPFFS(cfg.BPFDir, d.log); err != nil {
		return err
	}
	enf, err := bpf.Open(bpf.Options{BPFDir: cfg.BPFDir, CgroupDir: cfg.CgroupRoot, Log: d.log})
	if err != nil {
		return err
	}
	defer enf.Close()
	d.enf, d.adopted = enf, enf.Adopted
	if d.adopted {
		gen, _ := enf.Generation()
		d.log.Info("adopting pinned enforcement", "bpf_dir", cfg.BPFDir, "generation", gen)
	}
	// Pinned binaries are hashed before the first generation: one built
	// while they are hashed would take adopted running apps' binaries out
	// of app_exes.
	for _, app := range rs.Apps {
		for _, p := range pinnedPaths(app) {
			if p.sums != nil {
				d.exeHashes.hashNow(p.path)
			}
		}
	}
	// The first generation goes in before the hooks are attached, so a fresh
	// install never has a moment of "no policy" (which denies everything).
	if err := d.install(rs, hash, dropins); err != nil {
		return err
	}
	restoreGC()
	if d.fleet != nil {
		d.publish(func(s *State) { s.fleetRevision, s.fleetFromDisk = d.fleet.firstRevision, d.fleet.firstFromDisk })
	}
	if err := enf.Attach(); err != nil {
		return err
	}
	if on, why := bpf.UDPHandover(cfg.NoUDPHandover); !on {
		d.log.Warn("guard NOT active", "guard", "udp-handover", "why", why+": processes outside an app may send on its connected UDP sockets")
	}
	if what, active, why := launch.TraceGuard(cfg.GuardGID); active {
		d.log.Info("guard active", "guard", "app-tracing", "what", what, "guard_gid", cfg.GuardGID)
	} else {
		d.log.Warn("guard NOT active", "guard", "app-tracing", "what", what, "why", why)
	}
	policyName := cfg.PolicyPath
	if d.fleet != nil {
		policyName = "etcd " + fleet.PolicyPrefix
	}
	d.log.Info("enforcing", "version", version.Get().String(), "policy", policyName, "generation", d.generation(), "cgroup_root", cfg.CgroupRoot, "bpf_dir", cfg.BPFDir)

	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	// Before the wait: on a return before the reconciler's, the
	// goroutines started so far end with ctx.
	defer cancel()

	events, err := enf.Events()
	if err != nil {
		return err
	}
	d.auditor, err = audit.New(events, audit.Options{
		LogPath:  cfg.auditLog(),
		Journal:  cfg.journal(),
		Annotate: d.annotate,
		Log:      d.log,
	})
	if err != nil {
		events.Close()
		return err
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := d.auditor.Run(ctx); err != nil && ctx.Err() == nil {
			d.log.Error("audit reader stopped", "err", err)
		}
	}()
	defer events.Close()

	wg.Add(1)
	go func() {
		defer wg.Done()
		d.exeHashes.run(ctx)
	}()
	if xw, err := newExeWatch(cfg.Settle, d.log); err != nil {
		d.log.Warn("cannot watch pinned binaries; polling them", "every", cfg.PollInterval, "err", err)
	} else {
		d.exeWatch = xw
		xw.watch(exeDirs(d.current().effective()))
		wg.Add(1)
		go func() {
			defer wg.Done()
			xw.run(ctx)
		}()
		// A change between the first generation and the watch.
		d.refreshExes()
	}

	cw := watchContainers(ctx, &wg, d.containerSockets(), cfg.PollInterval, d.log)
	d.containerWatch = cw
	cw.want(hasContainerApps(d.current().effective()))

	stopPinholes, err := d.startPinholes(ctx, &wg)
	if err != nil {
		return err
	}
	defer stopPinholes()
	d.expireNames(ctx, &wg)
	defer d.startDNSProxy(ctx, &wg)()
	// The first Apply came before the proxies could start: the matched
	// cgroups' processes running already get theirs now.
	d.proxyMatchedNetns(d.current().effective())

	ln, err := listen(cfg.Socket)
	if err != nil {
		return err
	}
	defer os.Remove(cfg.Socket)
	// Deferred after the pinhole agent's, the DNS proxies' and the
	// enforcer's ends: the handlers are done before those close.
	defer d.serveAPI(ctx, ln)()

	if cfg.MetricsAddr != "" {
		stopMetrics, err := d.serveMetrics(cfg.MetricsAddr)
		if err != nil {
			return err
		}
		defer stopMetrics()
	}

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	in := inputs{hup: hup}
	if d.fleet != nil {
		d.runFleet(ctx, &wg, first)
	} else if in.policy, err = watchPolicy(ctx, &wg, cfg.PolicyPath, cfg.Settle, d.log); err != nil {
		d.log.Warn("cannot watch the policy file; polling it", "every", cfg.PollInterval, "err", err)
	}
	in.routes = watchRoutes(ctx, &wg, d.policyInterfaces, cfg.PollInterval, d.log)
	// A change between the first read and the watch would wait for the
	// next one.
	if d.fleet == nil {
		_, _ = d.reload(false)
	}
	// Programs attached, policy applied, socket serving: what
	// procgate.service's Type=notify waits for before network-pre.target.
	d.notify(sdnotify.Ready)
	if cfg.Ready != nil {
		cfg.Ready()
	}
	tick := time.NewTicker(cfg.PollInterval)
	defer tick.Stop()
	in.tick = tick.C
	d.reconcile(ctx, in)
	d.notify(sdnotify.Stopping)
	d.log.Info("stopping; enforcement stays pinned", "bpf_dir", cfg.BPFDir, "generation", d.generation())
	ln.Close()
	return nil
}

// newDaemon is the daemon of cfg (defaults set) before it opens anything.
func newDaemon(cfg Config) *Daemon {
	return &Daemon{cfg: cfg, log: cfg.Log, calls: make(chan func()), stopped: make(chan struct{}),
		exeStates: map[string]exeState{}, exeHashes: newExeHashes(cfg.Log)}
}

// openStateDir reads what earlier runs left in the state dir: app ids
// (kernel counters and audit records stay with their app) and
// revocations (they hold across restarts).
func (d *Daemon) openStateDir() (err error) {
	if err := os.MkdirAll(d.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("create state dir %s: %w", d.cfg.StateDir, err)
	}
	if d.ids, err = loadAppIDs(filepath.Join(d.cfg.StateDir, "app-ids.json")); err != nil {
		return err
	}
	d.revoked, err = loadRevocations(filepath.Join(d.cfg.StateDir, "revocations.json"))
	return err
}

// inputs are the reconciler's sources of change besides the API's calls;
// a nil one never fires.
type inputs struct {
	hup    <-chan os.Signal
	policy *policyWatch
	routes *routeWatch
	tick   <-chan time.Time
}

// reconcile is the reconciler: the one goroutine that changes the
// daemon's state. It takes every input in turn (policy files or etcd,
// SIGHUP and the API's reload, revoke, routes, pinned binaries, unit and
// container cgroups), builds the next generation without holding any
// lock, applies it through the Enforcer and publishes its State. Readers
// go on with the State in force meanwhile. It returns when ctx ends.
func (d *Daemon) reconcile(ctx context.Context, in inputs) {
	defer close(d.stopped)
	for {
		select {
		case <-ctx.Done():
			return
		case f := <-d.calls:
			f()
		case <-in.hup:
			d.log.Info("SIGHUP: reloading policy", "policy", d.cfg.PolicyPath)
			d.notify(sdnotify.Reloading)
			_, _ = d.reload(true)
			d.notify(sdnotify.Ready)
		case <-in.policy.events():
			_, _ = d.reload(false)
		case snap := <-d.fleetUpdates():
			d.applyFleet(snap)
		case <-in.routes.events():
			d.refreshRoutes()
		case <-d.exeWatch.events():
			d.refreshExes()
		case <-d.exeHashes.done:
			d.refreshExes()
		case <-d.containerWatch.events():
			d.refreshContainers()
		case <-in.tick:
			if d.fleet == nil && !in.policy.watching() {
				in.policy.resync()
				_, _ = d.reload(false)
			}
			if !in.routes.watching() {
				d.refreshRoutes()
			}
			d.refreshExes()
			d.refreshContainers()
		}
	}
}

// notify tells systemd (Type=notify) a state; outside systemd it does
// nothing, and a failure only costs systemd's view of the service.
func (d *Daemon) notify(state func() error) {
	if err := state(); err != nil {
		d.log.Warn("cannot notify systemd", "err", err)
	}
}

// policyInterfaces is internal.interfaces of the policy in force.
func (d *Daemon) policyInterfaces() []string {
	if p := d.current().policy; p != nil {
		return p.Interfaces
	}
	return nil
}

// generation is the generation in force.
func (d *Daemon) generation() uint32 { return d.current().gen }

// loadPolicy reads and compiles the policy file and its drop-ins, hashes
// their bytes and lists the drop-ins.
func loadPolicy(path string, log *slog.Logger) (*ruleset.Ruleset, string, []string, error) {
	files, err := policy.ReadFiles(path)
	if err != nil {
		return nil, "", nil, err
	}
	rs, warnings, check, err := policy.ParseFilesForHost(files)
	if err != nil {
		return nil, "", nil, err
	}
	for _, w := range warnings {
		log.Warn("policy", "warning", w.String())
	}
	go logHostWarnings(log, check)
	return rs, policy.Hash(files), dropinPaths(files), nil
}

// dropinPaths are the paths of files' drop-ins (all but the first).
func dropinPaths(files []policy.File) []string {
	var out []string
	for _, f := range files[1:] {
		out = append(out, f.Path)
	}
	return out
}

// logHostWarnings logs what the policy names and this host lacks or leaves
// open (users, groups, binaries), as validate prints it. It runs apart:
// a directory server that is slow to answer must not hold a reload.
func logHostWarnings(log *slog.Logger, check policy.HostCheck) {
	for _, w := range check() {
		log.Warn("policy", "warning", w.String())
	}
}

// Reload re-reads the policy file and its drop-ins, on the reconciler:
// safe from any goroutine, it waits for the changes before it. Unless
// force is set, unchanged files (same bytes) are left alone. An invalid
// policy leaves the generation in force and is reported once per change
// of the files.
func (d *Daemon) Reload(ctx context.Context, force bool) (gen uint32, err error) {
	if cerr := d.call(ctx, func() { gen, err = d.reload(force) }); cerr != nil {
		return d.generation(), cerr
	}
	return gen, err
}

// reload is Reload on the reconciler. The files are read, hashed and
// parsed holding no lock; readers keep the State in force until the new
// generation is applied and published.
func (d *Daemon) reload(force bool) (uint32, error) {
	if d.fleet != nil {
		// From etcd: read every document again; the snapshot comes back
		// through the loop like any change.
		d.fleet.agent.Resync()
		return d.generation(), nil
	}
	// Stamped before the read: a change after it shows at the next event
	// or poll.
	stamp := stampPolicy(d.cfg.PolicyPath)
	if !force && stamp.valid() && slices.Equal(stamp, d.policyStamp) {
		return d.generation(), nil
	}
	files, readErr := policy.ReadFiles(d.cfg.PolicyPath)
	if readErr == nil && !force && !slices.Equal(stampPolicy(d.cfg.PolicyPath), stamp) {
		// Written to while read: the write's own event (or the next
		// poll) brings it back once it is done.
		return d.generation(), nil
	}
	var hash string
	if readErr == nil {
		hash = policy.Hash(files)
	}
	d.policyStamp = stamp
	cur := d.current()
	if readErr == nil && hash == d.seenHash && !force {
		return cur.gen, nil
	}
	if readErr != nil && !force && cur.lastErr != "" {
		return cur.gen, nil // already reported
	}
	// Remember the bytes, bad ones too, so the poller does not parse
	// them again each tick.
	if readErr == nil {
		d.seenHash = hash
	}
	defer lowerGC()()
	var rs *ruleset.Ruleset
	err := readErr
	// What the rest needs of the files is taken before the parse: their
	// bytes (80 MB at 1,000,000 prefixes) are then garbage during Apply.
	var dropins []string
	nfiles := len(files)
	if err == nil {
		dropins = dropinPaths(files)
		var warnings []policy.Warning
		var check policy.HostCheck
		rs, warnings, check, err = policy.ParseFilesForHost(files)
		for _, w := range warnings {
			d.log.Warn("policy", "warning", w.String())
		}
		if check != nil {
			go logHostWarnings(d.log, check)
		}
	}
	if err == nil {
		err = d.install(rs, hash, dropins)
	}
	if err != nil {
		if cur.lastErr != err.Error() || force {
			d.log.Error("policy rejected; the previous generation stays in force", "policy", d.cfg.PolicyPath, "generation", cur.gen, "err", err)
		}
		d.publish(func(s *State) { s.lastErr = err.Error() })
		return cur.gen, err
	}
	st := d.current()
	d.log.Info("policy loaded", "policy", d.cfg.PolicyPath, "dropins", nfiles-1, "generation", st.gen, "apps", len(rs.Apps), "internal", len(rs.Internal), "sockets_ended", st.ended)
	return st.gen, nil
}

// reloadGCPercent is the garbage collector's GOGC while a policy is
// parsed and applied. A reload holds two generations at once and the
// parse makes garbage of several times the policy's size; with the
// default of 100 the heap grows to twice what is live at the reload's
// peak, 1.4 GiB at 1,000,000 prefixes where 670 MB were live. Collecting
// sooner keeps the peak near what is live, for some more CPU.
const reloadGCPercent = 30

// gcBound is the GOGC of reloads under way (lowerGC): the first one in
// lowers it, the last one out restores the operator's.
var gcBound struct {
	mu      sync.Mutex
	holders int
	// operator is GOGC before the first holder; lowered: it was set to
	// reloadGCPercent.
	operator int
	lowered  bool
}

// lowerGC sets GOGC to reloadGCPercent, unless the operator's is lower or
// off already, and returns what restores it (idempotent: it may be both
// deferred and called). Reloads may overlap (one per Daemon, and tests
// run several in a process): GOGC is restored when the last one ends,
// not to what another set meanwhile. The operator's GOGC is read, not
// set and set back, so that a lower one, or off, never runs higher for a
// moment.
func lowerGC() (restore func()) {
	gcBound.mu.Lock()
	defer gcBound.mu.Unlock()
	if gcBound.holders == 0 {
		gcBound.operator = gcPercent()
		gcBound.lowered = gcBound.operator > reloadGCPercent
		if gcBound.lowered {
			debug.SetGCPercent(reloadGCPercent)
		}
	}
	gcBound.holders++
	var once sync.Once
	return func() {
		once.Do(func() {
			gcBound.mu.Lock()
			defer gcBound.mu.Unlock()
			gcBound.holders--
			if gcBound.holders == 0 && gcBound.lowered {
				debug.SetGCPercent(gcBound.operator)
			}
		})
	}
}

// gcPercent is GOGC as set now (negative: off), read without setting it
// (the metric is in every Go since 1.21).
func gcPercent() int {
	s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
	metrics.Read(s)
	// Off is -1, read as a uint64.
	return int(int64(s[0].Value.Uint64()))
}

// policyStamp is the stamps of the policy file, of its policy.d directory
// (whose own times change when a drop-in comes, goes or is renamed) and
// of each drop-in.
type policyStamp []fileStamp

func stampPolicy(path string) policyStamp {
	s := policyStamp{stampOf(path), stampOf(filepath.Join(filepath.Dir(path), policy.DropinDir))}
	dropins, _ := policy.Dropins(path)
	for _, p := range dropins {
		s = append(s, stampOf(p))
	}
	return s
}

// valid: the policy file itself could be stamped.
func (s policyStamp) valid() bool { return len(s) > 0 && s[0].valid() }

// fileStamp tells whether a file changed without reading it: a rename over
// it changes the inode, a write the size or the modification and change
// times (nanoseconds).
type fileStamp struct {
	dev, ino     uint64
	size         int64
	mtime, ctime syscall.Timespec
}

// stampOf is path's stamp (following symlinks, as the read does); the zero
// stamp, never equal to a valid one, when it cannot be had.
func stampOf(path string) fileStamp {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileStamp{}
	}
	return fileStamp{dev: uint64(st.Dev), ino: st.Ino, size: st.Size, mtime: st.Mtim, ctime: st.Ctim}
}

func (s fileStamp) valid() bool { return s.ino != 0 }

// install makes rs (minus revocations, plus the routes of its interfaces)
// the generation in force, and publishes it as the policy in force, with
// its hash and drop-ins. Reconciler only.
func (d *Daemon) install(rs *ruleset.Ruleset, hash string, dropins []string) error {
	routes, err := interfaceRoutes(rs.Interfaces)
	if err != nil {
		return err
	}
	d.seenHash = hash
	_, err = d.applyEffective(withRoutes(d.withRevoked(rs), routes), func(s *State) {
		s.policy, s.policyHash, s.policyDropins, s.loadedAt, s.routes = rs, hash, dropins, time.Now(), routes
		s.lastErr = ""
	})
	if err == nil {
		// The parse's garbage and the previous generation are freed
		// pages the runtime would keep for a while (VmRSS stayed at a
		// reload's peak, 2 GiB at 1,000,000 prefixes) and the next
		// reload would grow from: give them back now, apart. For every
		// new policy: at start, from the file, from etcd.
		go debug.FreeOSMemory()
	}
	return err
}

// refreshExes follows pinned binaries that were replaced (upgrades write a
// new file) or written: the new file holds the grants from the next
// generation on, for a pin with sha256 once it is hashed and matches
// (resolveExes). Called at each watch event, finished hash and poll.
// Reconciler only.
func (d *Daemon) refreshExes() {
	defer d.flushExeRecords()
	cur := d.current()
	if cur.effective() == nil {
		return
	}
	now := d.resolveExes(cur.effective())
	if reflect.DeepEqual(now, cur.exes) {
		d.publishExeKinds()
		return
	}
	gen, err := d.applyEffective(cur.effective(), nil)
	if err != nil {
		d.log.Error("pinned binaries changed, but applying them failed", "err", err)
		return
	}
	d.log.Info("pinned binaries changed on disk", "generation", gen)
}

// publishExeKinds publishes what was last said of the pinned paths when
// it changed without a new generation (a hash came out as it was).
func (d *Daemon) publishExeKinds() {
	kinds := d.exeKinds()
	if !maps.Equal(kinds, d.current().exeKinds) {
		d.publish(func(s *State) { s.exeKinds = kinds })
	}
}

// refreshRoutes follows internal.interfaces: when the routes via them
// change, a new generation with the new internal set goes in.
// Reconciler only.
func (d *Daemon) refreshRoutes() {
	cur := d.current()
	if cur.policy == nil || len(cur.policy.Interfaces) == 0 {
		return
	}
	routes, err := interfaceRoutes(cur.policy.Interfaces)
	if err != nil {
		d.log.Error("cannot read routes of internal interfaces; keeping the last known ones", "interfaces", cur.policy.Interfaces, "err", err)
		return
	}
	if samePrefixes(routes, cur.routes) {
		return
	}
	gen, err := d.applyEffective(withRoutes(d.withRevoked(cur.policy), routes), func(s *State) { s.routes = routes })
	if err != nil {
		d.log.Error("routes via internal interfaces changed, but applying them failed", "err", err)
		return
	}
	d.log.Info("routes via internal interfaces changed", "interfaces", cur.policy.Interfaces, "routes", len(routes), "generation", gen)
}

// resolveContainers returns eff with each match.container app's Path set
// to where its container runs now, below the cgroup root (the cgroup of
// its init, or for a stopped one the scope its runtime will make); a
// container no runtime knows matches no cgroup, and misses says why for
// the log of the caller that applies the result. eff itself is not
// changed.
func (d *Daemon) resolveContainers(eff *ruleset.Ruleset) (out *ruleset.Ruleset, misses []containerMiss) {
	if !hasContainerApps(eff) {
		return eff, nil
	}
	out = eff.Derive()
	r := containers.Resolver{Sockets: d.containerSockets()}
	for i := range out.Apps {
		if m := out.Apps[i].Match; m == nil || m.Kind != ruleset.MatchContainer {
			continue
		}
		// A match of its own: eff's is shared (ruleset.Derive).
		m := *out.Apps[i].Match
		out.Apps[i].Match = &m
		m.Path = ""
		c, err := r.Lookup(context.Background(), m.Value)
		if err != nil {
			misses = append(misses, containerMiss{app: out.Apps[i].Name, container: m.Value, err: err})
			continue
		}
		m.Path = c.ScopeName()
		if c.Pid != 0 {
			dir, err := cgroups.OfPID(c.Pid)
			rel, relErr := filepath.Rel(d.cfg.CgroupRoot, dir)
			if err != nil || relErr != nil || rel == "." || strings.HasPrefix(rel, "..") {
				misses = append(misses, containerMiss{app: out.Apps[i].Name, container: m.Value, pid: c.Pid, err: err})
				m.Path = ""
				continue
			}
			m.Path = filepath.ToSlash(rel)
		}
	}
	return out, misses
}

// containerMiss is a match.container app that resolveContainers left
// matching no cgroup: its container not found, or (pid set) running
// outside the cgroup root.
type containerMiss struct {
	app, container string
	pid            int
	err            error
}

func (d *Daemon) warnMisses(misses []containerMiss) {
	for _, m := range misses {
		if m.pid == 0 {
			d.log.Warn("container not found; the app matches no cgroup until it is", "app", m.app, "container", m.container, "err", m.err)
		} else {
			d.log.Warn("container runs outside the cgroup root; the app matches no cgroup", "app", m.app, "container", m.container, "pid", m.pid, "err", m.err)
		}
	}
}

func hasContainerApps(eff *ruleset.Ruleset) bool {
	return eff != nil && slices.ContainsFunc(eff.Apps, func(a ruleset.App) bool { return a.Kind() == ruleset.MatchContainer })
}

// containerSockets are the runtimes' API sockets to ask.
func (d *Daemon) containerSockets() []string {
	if d.cfg.ContainerSockets == nil {
		return containers.DefaultSockets
	}
	return d.cfg.ContainerSockets
}

// refreshContainers follows match.container apps to where their
// containers run now (a container made again has a new id and cgroup).
// Reconciler only.
func (d *Daemon) refreshContainers() {
	eff := d.current().effective()
	if eff == nil {
		return
	}
	// Asked once: what they answered is what goes in, and the misses are
	// said only when it does (a missing container would be said at
	// every poll).
	now, misses := d.resolveContainers(eff)
	if now == eff || reflect.DeepEqual(now.Apps, eff.Apps) {
		// Nothing moved (the poll, or a container started where its
		// scope was foretold, bound at its mkdir): the processes now
		// in the matched cgroups get their namespaces' proxies.
		d.proxyMatchedNetns(eff)
		return
	}
	d.warnMisses(misses)
	gen, err := d.applyResolved(now, nil)
	if err != nil {
		d.log.Error("containers moved, but applying them failed", "err", err)
		return
	}
	d.log.Info("containers of match.container apps moved", "generation", gen)
}

// applyEffective resolves eff's containers and applies it (applyResolved).
// Reconciler only.
func (d *Daemon) applyEffective(eff *ruleset.Ruleset, edit func(s *State)) (uint32, error) {
	eff, misses := d.resolveContainers(eff)
	d.warnMisses(misses)
	return d.applyResolved(eff, edit)
}

// applyResolved builds the bindings for eff, whose containers are
// resolved, applies it and publishes it, with edit's changes (nil: none)
// in the same State. Reconciler only.
func (d *Daemon) applyResolved(eff *ruleset.Ruleset, edit func(s *State)) (uint32, error) {
	g := bpf.Generation{Rules: eff, AppIDs: map[string]uint32{}, AuditRate: eff.AuditRate, Exes: d.resolveExes(eff),
		NoUDPHandover: d.cfg.NoUDPHandover, TrustTraceGuard: d.cfg.TrustTraceGuard}
	var dynamic []dynamicBinding
	for _, app := range eff.Apps {
		id, err := d.ids.get(app.Name)
		if err != nil {
			return 0, err
		}
		g.AppIDs[app.Name] = id
		if app.Match != nil {
			// Not launched: the kernel finds a user app's processes by
			// uid, and the enforcer binds a unit's or glob's cgroups
			// (existing ones when it applies, new ones when made). The
			// pinhole programs find them by the same lookup.
			if app.Inbound != nil {
				dynamic = append(dynamic, dynamicBinding{app: app, id: id})
			}
			continue
		}
		b, err := d.bind(app.Name)
		if err != nil {
			return 0, fmt.Errorf("app %s: %w", app.Name, err)
		}
		g.Bindings = append(g.Bindings, b)
		if app.Inbound != nil {
			dynamic = append(dynamic, dynamicBinding{app: app, id: id, cgroupID: b.CgroupID})
		}
	}
	if err := d.ids.save(); err != nil {
		return 0, err
	}
	ids, names := d.ids.snapshot()
	// Before the kernel binds eff's cgroups: their processes' queries are
	// redirected from the first one that is the app's, and whoever waits
	// for the State finds the proxies running.
	d.proxyMatchedNetns(eff)
	// Events of the new generation may come before its State does.
	index := ruleset.NewIndex(eff)
	d.applying.Store(&pendingGen{rules: index, appNames: names})
	defer d.applying.Store(nil)
	gen, err := d.enf.Apply(g)
	d.flushExeRecords()
	if err != nil {
		return 0, fmt.Errorf("apply generation: %w", err)
	}
	d.exeWatch.watch(exeDirs(eff))
	d.containerWatch.want(hasContainerApps(eff))
	if err := d.setPinholeApps(dynamic); err != nil {
		d.log.Error("dynamic apps not given to the pinhole agent", "err", err)
	}
	revoked := d.describeRevoked()
	kinds := d.exeKinds()
	matched := d.enf.Matched()
	// Published before the sweep, which may take a while: the kernel
	// decides by gen already.
	d.publish(func(s *State) {
		s.gen, s.exes, s.exeKinds, s.bindings, s.matched = gen, g.Exes, kinds, dynamic, matched
		s.appIDs, s.appNames, s.revoked, s.byGen = ids, names, revoked, rememberGen(s.byGen, gen, index)
		if edit != nil {
			edit(s)
		}
		s.counted = countApps(s.policy, s.appIDs) // after edit, which may bring the policy
	})
	ended := d.sweep(gen)
	d.publish(func(s *State) { s.ended = ended })
	return gen, nil
}

// bind makes the cgroup of a launched app (if missing) and says where it
// is. Reconciler only.
func (d *Daemon) bind(app string) (bpf.Binding, error) {
	if d.bindApp != nil {
		return d.bindApp(app)
	}
	dir, err := d.appDirs.Ensure(app)
	if err != nil {
		return bpf.Binding{}, err
	}
	cgID, err := cgroups.ID(dir)
	if err != nil {
		return bpf.Binding{}, err
	}
	level, err := cgroups.Level(d.mount, dir)
	if err != nil {
		return bpf.Binding{}, err
	}
	return bpf.Binding{App: app, CgroupID: cgID, Level: level}, nil
}

// annotate names the app and the rule of a kernel event from the ruleset of
// the generation that decided it. It runs on the audit reader and never
// waits for the reconciler.
func (d *Daemon) annotate(e bpf.Event) (string, string) {
	st := d.current()
	ix, names := st.byGen[e.Generation], st.appNames
	if p := d.applying.Load(); ix == nil && p != nil && e.Generation > st.gen {
		// Decided by the generation being applied.
		ix, names = p.rules, p.appNames
	}
	if ix == nil {
		ix = st.index()
	}
	app := names[e.AppID]
	if ix == nil {
		return app, ""
	}
	rule := ""
	if e.Hook == bpf.HookBind4 || e.Hook == bpf.HookBind6 || e.Hook == bpf.HookListen {
		if a := ix.Ruleset().App(app); a != nil && a.Listen != nil {
			rule = a.Listen.String()
			if src := a.Listen.Source.String(); src != "" {
				rule += " [" + src + "]"
			}
		}
		return app, rule
	}
	dec := ix.Decide(app, e.Dest)
	if e.Reason == ruleset.ReasonName {
		dec = ix.DecideLearned(app, e.Dest, d.enf.Learned(), time.Now())
	}
	if len(dec.Grants) > 0 {
		rule = "grant " + dec.Grants[0].String()
	} else if len(dec.Names) > 0 {
		rule = "grant " + dec.Names[0].Grant.String() + " by answer: " + dec.Names[0].Learned.String()
	} else if len(dec.Everyone) > 0 {
		rule = "everyone grant " + dec.Everyone[0].String()
	} else if dec.Reason == ruleset.ReasonOutside {
		rule = "outside: deny"
	} else if dec.Reason == ruleset.ReasonLoopback {
		rule = "outside: deny, loopback: deny"
	} else if dec.Internal != nil {
		rule = "internal " + dec.Internal.Prefix.String()
		if s := dec.Internal.Source.String(); s != "" {
			rule += " [" + s + "]"
		}
	}
	return app, rule
}

// serveMetrics serves /metrics on addr until stop. stop, which Run calls
// before it closes the enforcer, waits for the scrapes in flight (they
// read its counters) for apiStopGrace at most, as the API's stop does.
func (d *Daemon) serveMetrics(addr string) (stop func(), err error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(audit.NewCollector(d.counterSource, d.auditor))
	reg.MustRegister(handoverMetrics{d.enf})
	if d.ph != nil {
		reg.MustRegister(d.ph.metrics)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for metrics on %s: %w", addr, err)
	}
	var inFlight atomic.Int64
	h := audit.Handler(reg)
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		inFlight.Add(1)
		defer inFlight.Add(-1)
		h.ServeHTTP(w, r)
	})}
	go srv.Serve(ln)
	d.log.Info("serving metrics", "addr", ln.Addr().String())
	return func() {
		if n := inFlight.Load(); n > 0 {
			d.log.Info("stopping: waiting for the metrics scrapes in flight", "scrapes", n, "grace", apiStopGrace)
		}
		// Close would return at once, the handlers still running.
		ctx, cancel := context.WithTimeout(context.Background(), apiStopGrace)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			srv.Close()
		}
	}, nil
}

// counterSource reads the kernel's counters per app name ("" unbound),
// of the apps of the State in force.
func (d *Daemon) counterSource() (map[string][bpf.NumCounts]uint64, error) {
	return d.counters(d.current())
}

// counters reads the kernel's counters per app name of st's policy.
func (d *Daemon) counters(st *State) (map[string][bpf.NumCounts]uint64, error) {
	c := st.counted
	if c.ids == nil {
		c = countApps(nil, nil) // no generation yet
	}
	raw, err := d.enf.Counters(c.ids)
	if err != nil {
		return nil, err
	}
	out := make(map[string][bpf.NumCounts]uint64, len(c.ids))
	for i, id := range c.ids {
		out[c.names[i]] = raw[id]
	}
	return out, nil
}

// mountBPFFS mounts the system's bpffs at /sys/fs/bpf when the pin dir is
// below it and nothing is mounted there yet (as systemd does at boot). Other
// locations are the operator's to mount.
func mountBPFFS(pinDir string, log *slog.Logger) error {
	const sysBPF = "/sys/fs/bpf"
	if filepath.Dir(filepath.Clean(pinDir)) != sysBPF {
		return nil
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(sysBPF, &fs); err != nil || fs.Type == unix.BPF_FS_MAGIC {
		return nil // bpf.Open explains a missing directory
	}
	if err := unix.Mount("bpf", sysBPF, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs on %s: %w", sysBPF, err)
	}
	log.Info("mounted bpffs", "path", sysBPF)
	return nil
}

func checkCgroupDir(dir string) error {
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return fmt.Errorf("cgroup root %s: %w", dir, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("cgroup root %s is not a cgroup2 directory", dir)
	}
	return nil
}

// listen opens the API socket, replacing a stale one but never a live one.
func listen(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket dir: %w", err)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("another daemon is serving %s", path)
	}
	_ = os.Remove(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	// Anyone may connect: each request is checked against the peer's
	// credentials (run: the app's users; revoke, reload, events: root).
	if err := os.Chmod(path, 0o666); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return ln, nil
}

// appIDs keeps app ids stable across reloads and restarts, so that kernel
// counters and audit records stay with their app.
type appIDs struct {
	path   string
	mu     sync.Mutex
	ByName map[string]uint32 `json:"by_name"`
}

func loadAppIDs(path string) (*appIDs, error) {
	a := &appIDs{path: path, ByName: map[string]uint32{}}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return a, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read app ids: %w", err)
	}
	if err := json.Unmarshal(data, a); err != nil {
		return nil, fmt.Errorf("parse app ids %s: %w", path, err)
	}
	if a.ByName == nil {
		a.ByName = map[string]uint32{}
	}
	return a, nil
}

func (a *appIDs) get(name string) (uint32, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if id, ok := a.ByName[name]; ok {
		return id, nil
	}
	used := map[uint32]bool{}
	for _, id := range a.ByName {
		used[id] = true
	}
	for id := uint32(1); id < bpf.MaxApps; id++ {
		if !used[id] {
			a.ByName[name] = id
			return id, nil
		}
	}
	return 0, fmt.Errorf("no free app id for %q (%d apps known)", name, len(a.ByName))
}

// snapshot is a copy of the ids, by name and by id, for a State.
func (a *appIDs) snapshot() (byName map[string]uint32, byID map[uint32]string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	byID = make(map[uint32]string, len(a.ByName))
	for n, id := range a.ByName {
		byID[id] = n
	}
	return maps.Clone(a.ByName), byID
}

func (a *appIDs) save() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return writeJSON(a.path, a)
}

// revocations are withdrawals made with `procgate revoke`; they hold across
// reloads and restarts until `revoke --restore`.
type revocations struct {
	path   string
	Apps   map[string]bool  `json:"apps"`
	Grants map[string][]int `json:"grants"`
}

func loadRevocations(path string) (*revocations, error) {
	r := &revocations{path: path}
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("read revocations: %w", err)
	}
	if err == nil {
		if err := json.Unmarshal(data, r); err != nil {
			return nil, fmt.Errorf("parse revocations %s: %w", path, err)
		}
	}
	if r.Apps == nil {
		r.Apps = map[string]bool{}
	}
	if r.Grants == nil {
		r.Grants = map[string][]int{}
	}
	return r, nil
}

// withRevoked is rs without the grants revoked here or fleet-wide.
// Reconciler only.
func (d *Daemon) withRevoked(rs *ruleset.Ruleset) *ruleset.Ruleset {
	return d.revoked.apply(d.fleetRevoked.apply(rs))
}

// describeRevoked is describeAll of the local and the fleet-wide
// revocations, the fleet's marked "fleet:". Reconciler only.
func (d *Daemon) describeRevoked() map[string][]string {
	out := d.revoked.describeAll()
	if d.fleetRevoked != nil {
		for app, what := range d.fleetRevoked.describeAll() {
			for _, w := range what {
				out[app] = append(out[app], "fleet:"+w)
			}
		}
	}
	return out
}

// apply returns rs without the revoked grants (rs itself when none of
// its apps has any).
// An app revoked whole is enforced whatever its mode: `revoke --app` cuts
// an app off, and in audit mode (mode: audit) its attempts would still
// pass. One revoked grant of an app in audit mode only makes its attempts
// would-deny, as the policy without the grant would.
//
// The result shares what it does not change with rs (ruleset.Derive): a
// policy of 1,000,000 grants is not copied for the few apps revoked, nor
// at all when none is.
func (r *revocations) apply(rs *ruleset.Ruleset) *ruleset.Ruleset {
	if r == nil || !slices.ContainsFunc(rs.Apps, func(a ruleset.App) bool { return r.Apps[a.Name] || len(r.Grants[a.Name]) > 0 }) {
		return rs
	}
	out := rs.Derive()
	for i := range out.Apps {
		a := &out.Apps[i]
		if r.Apps[a.Name] {
			a.Grants, a.AuditOnly = nil, false
			continue
		}
		if gs := r.Grants[a.Name]; len(gs) > 0 {
			// A new slice: the grants' array is the policy's.
			var kept []ruleset.Grant
			for _, g := range a.Grants {
				if !slices.Contains(gs, int(g.Index)) {
					kept = append(kept, g)
				}
			}
			a.Grants = kept
		}
	}
	return out
}

func (r *revocations) describe(app string) []string {
	if r.Apps[app] {
		return []string{"all"}
	}
	var out []string
	for _, g := range r.Grants[app] {
		out = append(out, fmt.Sprintf("#%d", g))
	}
	return out
}

// describeAll is describe of every app with revocations, for a State.
func (r *revocations) describeAll() map[string][]string {
	out := map[string][]string{}
	for app := range r.Apps {
		out[app] = r.describe(app)
	}
	for app := range r.Grants {
		if d := r.describe(app); len(d) > 0 {
			out[app] = d
		}
	}
	return out
}

func (r *revocations) save() error { return writeJSON(r.path, r) }

// same: r and o revoke the same grants.
func (r *revocations) same(o *revocations) bool {
	if r == nil || o == nil {
		return r == o
	}
	return maps.Equal(r.Apps, o.Apps) && maps.EqualFunc(r.Grants, o.Grants, slices.Equal[[]int])
}

// writeJSON replaces path atomically, so a crash never leaves half a file.
func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("replace %s: %w", path, err)
	}
	return nil
}
