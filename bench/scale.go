package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/daemon"
)

// The scale phase runs the real `procgate daemon` at ScaleSize prefixes
// (and as many grants) and measures what a reload there costs and what it
// does to everything else the daemon does meanwhile:
//   - the load of the large policy (a rename over the small one, picked up
//     by the daemon's watch) and ScaleReloads `procgate reload`s of it: wall
//     time and the daemon's peak RSS (VmHWM) in each;
//   - during each reload but the first (which has the daemon to itself),
//     `procgate status`, `explain` and `run` called one after the other
//     without pause, each timed from the command's start to its exit (what
//     a user waits), against the same calls while the daemon is idle;
//   - audit: a client of app1 sends to a destination app1 is denied about
//     once a millisecond from before the reloads with calls to after them;
//     every attempt must come out as an event (`procgate events`). The
//     kernel's ring buffer holds a few seconds of them: a daemon that stops
//     reading it for a reload loses the rest.

const phaseScale = "scale"

// scaleResult is what the scale phase measured.
type scaleResult struct {
	Prefixes    int     `json:"prefixes"`
	PolicyBytes int64   `json:"policy_bytes"`
	LoadSeconds float64 `json:"load_s"` // rename to "policy loaded" (settle delay included)
	// LoadCPU is the daemon's CPU time (user+system, all threads) over
	// LoadSeconds: the machine's other load moves it less than the wall
	// time.
	LoadCPU float64 `json:"load_cpu_s"`
	Loaded  procMem `json:"loaded"`
	// Reloads are the `procgate reload`s, each with the calls made while it
	// ran.
	Reloads []scaleReload `json:"reloads"`
	// Idle are the same calls with no reload going on.
	Idle map[string]callStats `json:"idle_calls"`
	// Busy are the calls made during the reloads, all reloads together.
	Busy map[string]callStats `json:"busy_calls"`
	// Peak is the daemon's VmHWM at the end: its largest RSS since the
	// last reset, before the last reload.
	Peak procMem `json:"peak"`
	// Audit: denied attempts of the client, the events the daemon has of
	// them, the kernel's count of app1's events it could not send (ring
	// full or rate limit) and the daemon's of events it read and dropped,
	// meanwhile.
	AuditAttempts    int64 `json:"audit_attempts"`
	AuditEvents      int64 `json:"audit_events"`
	AuditDrops       int64 `json:"audit_kernel_drops"`
	AuditDaemonDrops int64 `json:"audit_daemon_drops"`
}

type scaleReload struct {
	Seconds float64 `json:"seconds"`
	// CPUSeconds is the daemon's CPU time over Seconds (with calls, the
	// calls' share included).
	CPUSeconds float64 `json:"cpu_s"`
	// After: VmHWM is the peak of this reload alone (reset before it).
	After procMem `json:"after"`
	// Calls: status, explain and run were called during it.
	Calls bool `json:"calls"`
}

// resetPeak resets pid's VmHWM to its RSS now (clear_refs 5).
func resetPeak(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// callStats are the wall times of one command, milliseconds.
type callStats struct {
	N      int     `json:"n"`
	Errors int     `json:"errors"`
	P50    float64 `json:"p50_ms"`
	P99    float64 `json:"p99_ms"`
	Max    float64 `json:"max_ms"`
	// FirstErr is the first failed call's output.
	FirstErr string `json:"first_error,omitempty"`
}

// scaleCalls are the commands timed, by name.
func scaleCalls(explainDest string) map[string][]string {
	return map[string][]string{
		"status":  {"status"},
		"explain": {"explain", "--app", appName(0), explainDest},
		"run":     {"run", "--app", appName(0), "--", "true"},
	}
}

var scaleCallNames = []string{"status", "explain", "run"}

func (b *bench) scalePhase(ctx context.Context) error {
	bin, err := procgateBinary()
	if err != nil {
		return err
	}
	nsg := netnsGroup{h: b.host}
	defer nsg.close()
	ns, err := nsg.localNS("scale")
	if err != nil {
		return err
	}
	small, err := newPolicy(b.cfg.MatrixSize)
	if err != nil {
		return err
	}
	dir, err := b.phaseDir("scale")
	if err != nil {
		return err
	}
	policyPath := filepath.Join(dir, "policy.yaml")
	if _, err := writePolicyYAML(policyPath, small, scaleAuditRate); err != nil {
		return err
	}
	d, err := b.startDaemon(bin, dir, ns, policyPath, "scale")
	if err != nil {
		return err
	}
	defer d.stop()
	res := &scaleResult{Prefixes: b.cfg.ScaleSize}
	b.res.Scale = res

	big, err := newPolicy(b.cfg.ScaleSize)
	if err != nil {
		return err
	}
	explainDest := netip.AddrPortFrom(hostIn(big.grants[0][len(big.grants[0])/2]), servicePort).String() + "/tcp"
	denied := netip.AddrPortFrom(hostIn(big.grants[0][0]), servicePort) // internal, not app1's
	next := filepath.Join(dir, "policy.next.yaml")
	if res.PolicyBytes, err = writePolicyYAML(next, big, scaleAuditRate); err != nil {
		return err
	}
	big = nil // the daemon's memory is measured, not the bench's
	cpu0, err := processTicks(d.pid)
	if err != nil {
		return err
	}
	t0 := time.Now()
	if err := d.swapPolicy(ctx, next, policyPath, b.cfg.ScaleSize); err != nil {
		return err
	}
	res.LoadSeconds = round3(time.Since(t0).Seconds())
	cpu1, err := processTicks(d.pid)
	if err != nil {
		return err
	}
	res.LoadCPU = ticksSeconds(cpu1 - cpu0)
	if res.Loaded, err = readProcMem(d.pid); err != nil {
		return err
	}
	b.log.Info("daemon loaded the large policy", "prefixes", b.cfg.ScaleSize, "took", res.LoadSeconds, "cpu_s", res.LoadCPU, "rss_kib", res.Loaded.RSS, "hwm_kib", res.Loaded.HWM)

	busy := map[string][]time.Duration{}
	busyErrs := map[string][]string{}
	calls := scaleCalls(explainDest)
	// reload times one `procgate reload`, with the peak RSS of it alone;
	// calling: one caller makes the calls in turn while it runs (only
	// calls started before the reload returned count).
	reload := func(calling bool) error {
		// The peak of this reload alone.
		if err := resetPeak(d.pid); err != nil {
			return err
		}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var mu sync.Mutex
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; calling; i++ {
				select {
				case <-stop:
					return
				default:
				}
				name := scaleCallNames[i%len(scaleCallNames)]
				took, err := d.timed(calls[name])
				mu.Lock()
				busy[name] = append(busy[name], took)
				busyErrs[name] = appendErr(busyErrs[name], err)
				mu.Unlock()
			}
		}()
		time.Sleep(50 * time.Millisecond) // the caller is calling
		cpu0, cerr0 := processTicks(d.pid)
		start := time.Now()
		_, rerr := d.command("reload")
		secs := time.Since(start).Seconds()
		cpu1, cerr1 := processTicks(d.pid)
		close(stop)
		wg.Wait()
		if err := errors.Join(rerr, cerr0, cerr1); err != nil {
			return err
		}
		m, err := readProcMem(d.pid)
		if err != nil {
			return err
		}
		cpu := ticksSeconds(cpu1 - cpu0)
		res.Reloads = append(res.Reloads, scaleReload{Seconds: round3(secs), CPUSeconds: cpu, After: m, Calls: calling})
		b.log.Info("daemon reload", "prefixes", b.cfg.ScaleSize, "took", round3(secs), "cpu_s", cpu, "calls", calling, "rss_kib", m.RSS, "hwm_kib", m.HWM)
		return nil
	}
	// The first reload has the daemon to itself, right after the load.
	if err := reload(false); err != nil {
		return err
	}
	res.Idle = map[string]callStats{}
	for _, name := range scaleCallNames {
		var times []time.Duration
		var errs []string
		for range scaleIdleCalls {
			took, err := d.timed(calls[name])
			times, errs = append(times, took), appendErr(errs, err)
		}
		res.Idle[name] = statsOf(times, errs)
	}

	// The audit client: one denied datagram a millisecond, from now until
	// after the last reload.
	kernel0, daemon0, err := d.auditDrops(appName(1))
	if err != nil {
		return err
	}
	cl, err := startClient("scale/app1", filepath.Join(d.cgroupRoot, daemon.AppsDir, appName(1)), ns, 0, false)
	if err != nil {
		return err
	}
	defer cl.close()
	since := time.Now().UTC()
	if err := cl.send(request{Op: opVerify, Checks: []check{{Dest: denied, Proto: udp, Must: mustDeny}}, Pause: time.Millisecond}); err != nil {
		return err
	}
	time.Sleep(time.Second) // events before the reloads, to compare with
	for range b.cfg.ScaleReloads - 1 {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := reload(true); err != nil {
			return err
		}
	}
	time.Sleep(time.Second)
	if err := cl.send(request{Op: opStop}); err != nil {
		return err
	}
	resp, err := cl.receive()
	if err != nil {
		return err
	}
	res.AuditAttempts = resp.Attempts
	res.Busy = map[string]callStats{}
	for _, name := range scaleCallNames {
		res.Busy[name] = statsOf(busy[name], busyErrs[name])
	}
	// The daemon writes events as it reads them: give the last ones time.
	time.Sleep(time.Second)
	out, err := d.command("events", "--app", appName(1), "--verdict", "deny", "--since", since.Format(time.RFC3339Nano), "--last", "0", "--json")
	if err != nil {
		return err
	}
	res.AuditEvents = int64(strings.Count(out, "\n"))
	kernel1, daemon1, err := d.auditDrops(appName(1))
	if err != nil {
		return err
	}
	res.AuditDrops, res.AuditDaemonDrops = int64(kernel1-kernel0), int64(daemon1-daemon0)
	if res.Peak, err = readProcMem(d.pid); err != nil {
		return err
	}
	return d.stop()
}

const (
	// scaleAuditRate is the policies' audit rate: above the audit
	// client's, so that the kernel's rate limit drops none of its events.
	scaleAuditRate = 5000
	// scaleIdleCalls is how often each command is timed while idle.
	scaleIdleCalls = 3
)

// swapPolicy renames next over path and waits until the daemon logged the
// policy of size prefixes loaded.
func (d *daemonProc) swapPolicy(ctx context.Context, next, path string, size int) error {
	loaded := fmt.Sprintf("internal=%d", size)
	mark := len(d.out.String())
	if err := os.Rename(next, path); err != nil {
		return err
	}
	for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(10 * time.Millisecond) {
		if err := ctx.Err(); err != nil {
			return err
		}
		logged := d.out.String()[mark:]
		if strings.Contains(logged, "policy rejected") {
			return fmt.Errorf("daemon rejected the policy: %s", logged)
		}
		if line := lineWith(logged, "policy loaded"); strings.Contains(line, loaded) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("policy of %d prefixes not loaded after 5 min: %s", size, logged)
		}
	}
}

// timed runs a procgate command and returns its wall time.
func (d *daemonProc) timed(args []string) (time.Duration, error) {
	t0 := time.Now()
	_, err := d.command(args...)
	return time.Since(t0), err
}

// auditDrops is the kernel's count of app's audit events it could not
// send, and the daemon's of events it read and dropped.
func (d *daemonProc) auditDrops(app string) (kernel, daemon uint64, err error) {
	out, err := d.command("status", "--json")
	if err != nil {
		return 0, 0, err
	}
	var st api.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return 0, 0, fmt.Errorf("procgate status --json: %w", err)
	}
	for _, a := range st.Apps {
		if a.Name == app {
			return a.Counters.AuditDrops, st.Audit.Dropped, nil
		}
	}
	return 0, 0, fmt.Errorf("status lists no app %s", app)
}

func appendErr(errs []string, err error) []string {
	if err == nil {
		return errs
	}
	return append(errs, err.Error())
}

// statsOf sums up the wall times of one command.
func statsOf(times []time.Duration, errs []string) callStats {
	s := callStats{N: len(times), Errors: len(errs)}
	if len(errs) > 0 {
		s.FirstErr = errs[0]
	}
	if len(times) == 0 {
		return s
	}
	times = slices.Clone(times)
	slices.Sort(times)
	ms := func(d time.Duration) float64 { return round3(float64(d) / 1e6) }
	s.P50 = ms(times[len(times)/2])
	s.P99 = ms(times[min(len(times)-1, len(times)*99/100)])
	s.Max = ms(times[len(times)-1])
	return s
}
