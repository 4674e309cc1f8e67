package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/procgate/procgate/daemon"
)

// The daemon phase runs the real `procgate daemon` (bin/procgate) on a
// cgroup subtree, state dir, bpffs dir and socket of the bench's own and
// measures what the daemon process itself costs and how fast the `revoke`
// command takes hold:
//   - revocation through the CLI: a client in app0's cgroup sends to a
//     granted destination while `procgate revoke --app app0` runs; the time
//     from starting the command to the first denial, and whether that came
//     before the command returned (matrix policy);
//   - cost: the policy file grows to DaemonSize prefixes (picked up by the
//     daemon's watch of the file, as an edit would be); the daemon's RSS
//     after that, its CPU over an idle window, and CPU, time and memory
//     per `procgate reload` of that policy; the kernel memory of its maps.

const phaseDaemon = "daemon"

// daemonResult is what the daemon phase measured.
type daemonResult struct {
	Prefixes    int   `json:"prefixes"`
	PolicyBytes int64 `json:"policy_bytes"`
	// Start is the daemon's memory with the matrix policy in force.
	Start procMem `json:"start"`
	// LoadSeconds is from the rename of the large policy into place until
	// the daemon logged it loaded (its settle delay, or in older runs up
	// to one poll interval, included); LoadCPU the daemon's CPU time
	// meanwhile.
	LoadSeconds float64 `json:"load_s"`
	LoadCPU     float64 `json:"load_cpu_s"`
	Loaded      procMem `json:"loaded"`
	// IdleSeconds of nothing but the daemon's own timers (the poll of
	// pinned binaries every second; in older runs of the policy file and
	// routes too), IdleCPU its CPU time in them.
	IdleSeconds float64          `json:"idle_window_s"`
	IdleCPU     float64          `json:"idle_cpu_s"`
	Idle        procMem          `json:"after_idle"`
	Reloads     []daemonReload   `json:"reloads"`
	MapMemory   map[string]int64 `json:"map_memlock_bytes"`
	// PollSeconds is the daemon's poll interval of the policy file, in
	// runs from before it followed the file by inotify; SettleSeconds is
	// the quiet time it waits for after a change, since.
	PollSeconds   float64 `json:"poll_s"`
	SettleSeconds float64 `json:"settle_s,omitempty"`
	// RevokePrefixes is the policy size of the CLI revocations.
	RevokePrefixes int         `json:"cli_revoke_prefixes"`
	CLIRevokes     []cliRevoke `json:"cli_revokes"`
}

// procMem is a process's memory from /proc/PID/status, KiB.
type procMem struct {
	RSS int64 `json:"vmrss_kib"`
	HWM int64 `json:"vmhwm_kib"`
}

// daemonReload is one `procgate reload` of the large policy (unchanged:
// a full parse, compile and generation switch).
type daemonReload struct {
	Seconds float64 `json:"seconds"` // the command's wall time
	// CPUSeconds is the daemon's user+system time from the command's start
	// until reloadSettle after it returned (the garbage collection the
	// reload leaves behind included).
	CPUSeconds float64 `json:"cpu_s"`
	After      procMem `json:"after"`
}

// cliRevoke is one `procgate revoke --app app0` under a client that sends
// to one of app0's granted destinations without pause; times are from just
// before the command was started (CLOCK_MONOTONIC in both processes).
type cliRevoke struct {
	CommandMs     float64 `json:"command_ms"`      // until the command exited
	FirstDenialMs float64 `json:"first_denial_ms"` // until the first denied attempt returned
	LastAllowedMs float64 `json:"last_allowed_ms"` // until the last allowed attempt started
	Attempts      int64   `json:"attempts"`
}

// reloadSettle is how long after a reload its CPU is still counted.
const reloadSettle = time.Second

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat
// (100 on every Linux architecture Go supports).
const clockTicks = 100

func (b *bench) daemonPhase(ctx context.Context) error {
	bin, err := procgateBinary()
	if err != nil {
		return err
	}
	nsg := netnsGroup{h: b.host}
	defer nsg.close()
	ns, err := nsg.localNS("daemon")
	if err != nil {
		return err
	}
	srv, err := startServers(ns, true)
	if err != nil {
		return err
	}
	defer srv.close()

	small, err := newPolicy(b.cfg.MatrixSize)
	if err != nil {
		return err
	}
	dir, err := b.phaseDir("daemon")
	if err != nil {
		return err
	}
	policyPath := filepath.Join(dir, "policy.yaml")
	if _, err := writePolicyYAML(policyPath, small, 100); err != nil {
		return err
	}
	d, err := b.startDaemon(bin, dir, ns, policyPath, "daemon")
	if err != nil {
		return err
	}
	defer d.stop()
	res := &daemonResult{Prefixes: b.cfg.DaemonSize, RevokePrefixes: small.size, SettleSeconds: daemon.DefaultSettle.Seconds()}
	b.res.Daemon = res
	if res.Start, err = readProcMem(d.pid); err != nil {
		return err
	}
	if err := b.cliRevocations(ctx, d, ns, small, res); err != nil {
		return fmt.Errorf("revocation through the CLI: %w", err)
	}
	if err := b.daemonCost(ctx, d, dir, policyPath, res); err != nil {
		return fmt.Errorf("daemon cost at %d prefixes: %w", b.cfg.DaemonSize, err)
	}
	return d.stop()
}

// cliRevocations times `procgate revoke --app app0` against a client of
// app0 sending to its first granted destination, then restores the grants.
func (b *bench) cliRevocations(ctx context.Context, d *daemonProc, ns string, pol *benchPolicy, res *daemonResult) error {
	cl, err := startClient("daemon/app0", filepath.Join(d.cgroupRoot, daemon.AppsDir, appName(0)), ns, 0, false)
	if err != nil {
		return err
	}
	defer cl.close()
	dest := netip.AddrPortFrom(hostIn(pol.grants[0][0]), servicePort)
	// The client must be allowed before the first revoke: else the policy
	// or the client's cgroup is not what the measurement assumes.
	if resp, err := cl.do(request{Op: opUntilDenied, Dests: []netip.AddrPort{dest}, Duration: 50 * time.Millisecond}); err != nil {
		return err
	} else if resp.FirstDenied != 0 {
		return fmt.Errorf("app0 denied %s before any revoke", dest)
	}
	for range b.cfg.CLIRevokes {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := cl.send(request{Op: opUntilDenied, Dests: []netip.AddrPort{dest}, Duration: 10 * time.Second}); err != nil {
			return err
		}
		time.Sleep(20 * time.Millisecond) // the client is sending, and allowed
		t0 := monotonic()
		out, err := d.command("revoke", "--app", appName(0))
		t1 := monotonic()
		if err != nil {
			return err
		}
		resp, err := cl.receive()
		if err != nil {
			return err
		}
		if resp.FirstDenied == 0 {
			return fmt.Errorf("%s still allowed 10 s after `procgate revoke` (%s)", dest, out)
		}
		rv := cliRevoke{CommandMs: msOf(t1 - t0), FirstDenialMs: msOf(resp.FirstDenied - t0), Attempts: resp.Attempts}
		if resp.LastAllowed > 0 {
			rv.LastAllowedMs = msOf(resp.LastAllowed - t0)
		}
		res.CLIRevokes = append(res.CLIRevokes, rv)
		if _, err := d.command("revoke", "--app", appName(0), "--restore"); err != nil {
			return err
		}
	}
	return nil
}

// daemonCost grows the policy to DaemonSize prefixes and measures the
// daemon's memory, idle CPU and reloads there.
func (b *bench) daemonCost(ctx context.Context, d *daemonProc, dir, policyPath string, res *daemonResult) error {
	big, err := newPolicy(b.cfg.DaemonSize)
	if err != nil {
		return err
	}
	next := filepath.Join(dir, "policy.next.yaml")
	if res.PolicyBytes, err = writePolicyYAML(next, big, 100); err != nil {
		return err
	}
	big = nil // the daemon's memory is measured, not the bench's
	cpu0, err := processTicks(d.pid)
	if err != nil {
		return err
	}
	t0 := time.Now()
	if err := d.swapPolicy(ctx, next, policyPath, b.cfg.DaemonSize); err != nil {
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
	b.log.Info("daemon loaded the large policy", "prefixes", b.cfg.DaemonSize, "took", res.LoadSeconds, "rss_kib", res.Loaded.RSS)

	// Idle: the reload's garbage is collected first, then nothing happens
	// but the daemon's own timers.
	time.Sleep(reloadSettle)
	cpu0, err = processTicks(d.pid)
	if err != nil {
		return err
	}
	t0 = time.Now()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(b.cfg.DaemonIdle):
	}
	cpu1, err = processTicks(d.pid)
	if err != nil {
		return err
	}
	res.IdleSeconds, res.IdleCPU = round3(time.Since(t0).Seconds()), ticksSeconds(cpu1-cpu0)
	if res.Idle, err = readProcMem(d.pid); err != nil {
		return err
	}

	for range b.cfg.DaemonReloads {
		if err := ctx.Err(); err != nil {
			return err
		}
		cpu0, err := processTicks(d.pid)
		if err != nil {
			return err
		}
		t0 := time.Now()
		if _, err := d.command("reload"); err != nil {
			return err
		}
		secs := time.Since(t0).Seconds()
		time.Sleep(reloadSettle)
		cpu1, err := processTicks(d.pid)
		if err != nil {
			return err
		}
		m, err := readProcMem(d.pid)
		if err != nil {
			return err
		}
		res.Reloads = append(res.Reloads, daemonReload{Seconds: round3(secs), CPUSeconds: ticksSeconds(cpu1 - cpu0), After: m})
		b.log.Info("daemon reload", "prefixes", b.cfg.DaemonSize, "took", round3(secs), "rss_kib", m.RSS)
	}
	res.MapMemory, err = mapMemoryIn(d.bpfDir)
	return err
}

// daemonProc is a running procgate daemon of the bench.
type daemonProc struct {
	bin, socket, bpfDir, cgroupRoot string
	pid                             int
	cmd                             *exec.Cmd
	out                             *lockedBuf
	exited                          chan struct{}
	stopped                         bool
}

// startDaemon starts procgate daemon in the namespace ns, in a cgroup of
// its own (so that its CPU and memory are its alone and cleanup can kill
// it), enforcing policyPath on the subtree name of the bench's cgroup with
// its maps pinned below name, and waits until it answers on its socket.
// extra are further daemon flags.
func (b *bench) startDaemon(bin, dir, ns, policyPath, name string, extra ...string) (*daemonProc, error) {
	root, err := b.host.mkCgroup(name)
	if err != nil {
		return nil, err
	}
	procDir, err := b.host.mkCgroup(name + "-process")
	if err != nil {
		return nil, err
	}
	cg, err := os.Open(procDir)
	if err != nil {
		return nil, err
	}
	defer cg.Close()
	d := &daemonProc{bin: bin, socket: filepath.Join(dir, "procgate.sock"), bpfDir: filepath.Join(b.host.bpffs, name),
		cgroupRoot: root, out: &lockedBuf{}, exited: make(chan struct{})}
	// nsenter enters the namespace and execs the daemon in its place: the
	// pid is the daemon's.
	args := append([]string{"--net=" + ns, bin, "daemon", "--policy", policyPath, "--cgroup-root", root,
		"--state-dir", filepath.Join(dir, "state"), "--bpf-dir", d.bpfDir, "--socket", d.socket}, extra...)
	d.cmd = exec.Command("nsenter", args...)
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	d.cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start procgate daemon: %w", err)
	}
	d.pid = d.cmd.Process.Pid
	go func() { d.cmd.Wait(); close(d.exited) }()
	b.host.undo.push(d.stop)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		select {
		case <-d.exited:
			return nil, fmt.Errorf("daemon exited at start: %s", d.out.String())
		default:
		}
		if exec.Command(bin, "--socket", d.socket, "status").Run() == nil {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("daemon not up after 30s: %s", d.out.String())
		}
	}
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", d.pid)); err != nil || exe != bin {
		return nil, fmt.Errorf("pid %d runs %q, not the daemon %s: %v", d.pid, exe, bin, err)
	}
	return d, nil
}

// command runs a procgate client command against the daemon.
func (d *daemonProc) command(args ...string) (string, error) {
	out, err := exec.Command(d.bin, append([]string{"--socket", d.socket}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("procgate %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// stop ends the daemon and removes what it pinned; safe to call again.
func (d *daemonProc) stop() error {
	if d.stopped {
		return nil
	}
	d.stopped = true
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		d.cmd.Process.Kill()
		<-d.exited
	}
	if out, err := exec.Command(d.bin, "uninstall", "--bpf-dir", d.bpfDir).CombinedOutput(); err != nil {
		return fmt.Errorf("procgate uninstall: %w: %s", err, out)
	}
	return nil
}

// writePolicyYAML writes pol as a policy file (one flow-style grant per
// line: the daemon's parser, not Format's node tree, is what is measured),
// with audit events at auditRate per second and app, and returns its size.
func writePolicyYAML(path string, pol *benchPolicy, auditRate int) (int64, error) {
	f, err := os.Create(path)
	if err != nil {
		return 0, err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	fmt.Fprintf(w, "version: 1\ninternal:\n  prefixes:\n")
	for _, p := range pol.internal {
		fmt.Fprintf(w, "    - %s\n", p)
	}
	var ports []string
	for _, r := range grantPorts {
		if r.Lo == r.Hi {
			ports = append(ports, strconv.Itoa(int(r.Lo)))
		} else {
			ports = append(ports, fmt.Sprintf("%d-%d", r.Lo, r.Hi))
		}
	}
	portList := strings.Join(ports, ", ")
	fmt.Fprintf(w, "audit:\n  rate: %d\napps:\n", auditRate)
	for a, gs := range pol.grants {
		fmt.Fprintf(w, "  - name: %s\n    allow:\n", appName(a))
		for _, p := range gs {
			fmt.Fprintf(w, "      - {to: %s, ports: [%s]}\n", p, portList)
		}
	}
	err = w.Flush()
	st, serr := f.Stat()
	if cerr := f.Close(); err == nil {
		err = errors.Join(serr, cerr)
	}
	if err != nil {
		return 0, fmt.Errorf("write %s: %w", path, err)
	}
	return st.Size(), nil
}

// readProcMem reads VmRSS and VmHWM of pid.
func readProcMem(pid int) (procMem, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return procMem{}, err
	}
	var m procMem
	for line := range strings.Lines(string(data)) {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		var dst *int64
		switch k {
		case "VmRSS":
			dst = &m.RSS
		case "VmHWM":
			dst = &m.HWM
		default:
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
		if err != nil {
			return procMem{}, fmt.Errorf("/proc/%d/status %s: %w", pid, k, err)
		}
		*dst = n
	}
	if m.RSS == 0 {
		return procMem{}, fmt.Errorf("/proc/%d/status has no VmRSS", pid)
	}
	return m, nil
}

// processTicks is pid's utime+stime (all its threads) in clock ticks.
func processTicks(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// comm may hold spaces: the fields after it start at the last ')'.
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected %q", pid, data)
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected %q", pid, data)
	}
	// f[0] is field 3 (state): utime and stime are fields 14 and 15.
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return ut + st, nil
}

func ticksSeconds(t int64) float64 { return round3(float64(t) / clockTicks) }

// lineWith is the last line of s containing sub, or "".
func lineWith(s, sub string) string {
	i := strings.LastIndex(s, sub)
	if i < 0 {
		return ""
	}
	start := strings.LastIndexByte(s[:i], '\n') + 1
	end := strings.IndexByte(s[i:], '\n')
	if end < 0 {
		return s[start:]
	}
	return s[start : i+end]
}
