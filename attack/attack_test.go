package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/daemon"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/nsthread"
	"github.com/procgate/procgate/launch"
	"github.com/procgate/procgate/policy"
	"github.com/procgate/procgate/ruleset"
)

// The test binary doubles as the attack program: re-executed with
// envAsMain it runs main() (run, one, holder).
const envAsMain = "PROCGATE_ATTACK_AS_MAIN"

// envOnly, a regexp, runs only the techniques it matches (and the
// controls): for debugging one technique, or a run under -race, where each
// technique's process takes a second.
const envOnly = "PROCGATE_ATTACK_ONLY"

func TestMain(m *testing.M) {
	if os.Getenv(envAsMain) == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// attackPolicy is the world's policy. The internal prefixes cover every
// address form the techniques aim at: the targets, the directed broadcast
// of 10/8, link-local IPv4 and IPv6, multicast, the limited broadcast.
// nogrant's, svc's and backup's processes may bind only port 7000 and an
// ephemeral port (the listen techniques try 7001; other techniques bind
// port 0 before they connect): a bind to an unlisted port by a launched, a
// unit and a user principal; strict's only port 7000, not even an
// ephemeral one (listen() without bind() must not get one); sandbox (outside: deny) is granted only the control addresses, so
// the controls prove the target hears it while its targets, on the
// internet, must stay out of reach. Every app is granted the name
// db.corp.example, which only the daemon's DNS proxy can give addresses:
// the dns techniques forge answers naming their targets, from an address
// that is not the resolver everyone may ask.
const attackPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8, fd00::/8, 169.254.0.0/16, fe80::/10, 224.0.0.0/4, 255.255.255.255/32, ff00::/8]
everyone:
  allow:
    - to: 10.0.0.53
      proto: udp
      ports: [53]
apps:
  - name: granted
    allow:
      - to: db.corp.example
        proto: tcp
        ports: [5432]
      - to: 10.1.2.3/32
        proto: tcp
        ports: [5432]
      - to: 10.1.2.3/32
        proto: udp
        ports: [5353]
      - to: fd00:1::3/128
        ports: [5432, 5353]
  - name: nogrant
    listen: [0, 7000]
    allow:
      - to: 10.9.9.9/32
        proto: tcp
        ports: [80]
      - to: db.corp.example
        proto: tcp
        ports: [5432]
  - name: strict
    listen: [7000]
  - name: sandbox
    outside: deny
    allow:
      - to: 198.51.100.7
      - to: 2001:db8:ff::7
      - to: db.corp.example
        proto: tcp
        ports: [5432]
  - name: svc
    match: {unit: attack.service}
    listen: [0, 7000]
    allow:
      - to: db.corp.example
        proto: tcp
        ports: [5432]
      - to: 10.1.2.3/32
        proto: tcp
        ports: [5432]
      - to: 10.1.2.3/32
        proto: udp
        ports: [5353]
      - to: fd00:1::3/128
        ports: [5432, 5353]
  - name: backup
    match: {user: 65531}
    listen: [0, 7000]
    allow:
      - to: db.corp.example
        proto: tcp
        ports: [5432]
      - to: 10.1.2.3/32
        proto: tcp
        ports: [5432]
      - to: 10.1.2.3/32
        proto: udp
        ports: [5353]
      - to: fd00:1::3/128
        ports: [5432, 5353]
`

const (
	holderApp = "granted" // the app the holder runs as
	nobody    = 65534
	// backupUID is the uid of the match.user app backup.
	backupUID = 65531
	// guardGID is the daemon's and launcher's trace guard gid: not 65534,
	// nobody's own group, which would leave nobody's apps unguarded.
	guardGID = 65533
)

// role is one way the attack program runs.
type role struct {
	name string
	app  string // "" for unbound
	uid  int
	// target4 and target6 are the destinations attacked; the granted role
	// attacks its own grant (grantable techniques must reach it) and, as
	// granted-other, another internal host (nothing may).
	target4, target6 string
	ownGrant         bool
	// launcher: started as `procgate run` starts an app (launch.Start:
	// capabilities dropped, loader variables scrubbed) rather than placed in
	// the cgroup directly, as a systemd unit or a container runtime would.
	launcher bool
	// reachable are prefixes outside the internal ones where an arrival
	// still counts as reached: a sandbox's internet.
	reachable []string
	// cgroup, when set, is where the role runs instead of its app's
	// cgroup or the unbound one, below the daemon's cgroup root: a tree
	// laid out as systemd's, for the unit app svc (attack.service).
	cgroup string
	// setuidTo, when set, runs the attack program from a set-user-ID copy
	// owned by that uid: the effective uid is setuidTo, the real uid the
	// role's.
	setuidTo int
	// only, a regexp, limits the role to the techniques it matches (and
	// the controls).
	only string
}

var roles = []role{
	{name: "unbound", uid: nobody, target4: "10.1.2.3", target6: "fd00:1::3"},
	{name: "app-nogrant", app: "nogrant", uid: nobody, target4: "10.1.2.3", target6: "fd00:1::3"},
	{name: "root-in-app", app: "nogrant", uid: 0, target4: "10.1.2.3", target6: "fd00:1::3"},
	{name: "root-via-run", app: "nogrant", uid: 0, target4: "10.1.2.3", target6: "fd00:1::3", launcher: true},
	{name: "granted", app: "granted", uid: nobody, target4: "10.1.2.3", target6: "fd00:1::3", ownGrant: true},
	{name: "granted-other", app: "granted", uid: nobody, target4: "10.1.2.4", target6: "fd00:1::4"},
	// An outside: deny app attacking internet addresses it has no grant for.
	{name: "sandboxed", app: "sandbox", uid: nobody, target4: "198.51.100.9", target6: "2001:db8:ff::9",
		reachable: []string{"198.51.100.0/24", "2001:db8:ff::/48"}},
	// Principals beyond launched apps: a unit app's processes, a process of
	// the unit's user outside the unit's cgroup, a user app's process, and
	// a process that takes the user app's uid as its effective uid only
	// (a set-user-ID binary), which does not make it the user's.
	{name: "unit", app: "svc", uid: nobody, cgroup: unitCgroup, target4: "10.1.2.3", target6: "fd00:1::3", ownGrant: true},
	{name: "unit-user-outside", uid: nobody, cgroup: "system.slice/other.service", target4: "10.1.2.3", target6: "fd00:1::3"},
	{name: "user-app", app: "backup", uid: backupUID, target4: "10.1.2.3", target6: "fd00:1::3", ownGrant: true},
	{name: "setuid-to-user", uid: nobody, setuidTo: backupUID, target4: "10.1.2.3", target6: "fd00:1::3"},
	// An app whose listen: has no port 0: its binds only (the rest is
	// app-nogrant's).
	{name: "strict-listen", app: "strict", uid: nobody, target4: "10.1.2.3", target6: "fd00:1::3", only: "^(bind|uring-bind|listen-)"},
}

// unitCgroup is svc's cgroup below the daemon's cgroup root, as systemd
// lays out attack.service.
const unitCgroup = "system.slice/attack.service"

// world is the test's network, cgroups, daemon, target and holder.
type world struct {
	bin string // the test binary, executable by nobody
	// binSetuid is a copy of bin, set-user-ID backupUID.
	binSetuid string
	dir       string // world-readable scratch dir
	sockDir   string // world-writable, for the holder's socket
	cgroup    string
	apps      string // <cgroup>/procgate.apps
	unbound   string
	nsA, nsT  string // attacker's host, target's network
	spawner   *nsthread.Thread
	target    *target
	oracle    string
	holder    string
	rs        *ruleset.Ruleset
	// apps by nonce, for records of earlier runs that arrive late.
	nonceApp map[string]string
	// guards are the daemon's guards (procgate status) by name: active or
	// not, for the known gaps a guard closes where it is active.
	guards map[string]bool
}

func TestAttackSuite(t *testing.T) {
	nstest.RequireRoot(t)
	w := newWorld(t)
	gaps, err := loadKnownGaps("known-gaps.txt")
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range gaps {
		if findTechnique(g.technique) == nil {
			t.Errorf("known-gaps.txt:%d: no technique %q", g.line, g.technique)
		}
		if !slices.ContainsFunc(roles, func(r role) bool { return r.name == g.role }) {
			t.Errorf("known-gaps.txt:%d: no role %q", g.line, g.role)
		}
		for _, guard := range g.without {
			if _, ok := w.guards[guard]; !ok {
				t.Errorf("known-gaps.txt:%d: no guard %q", g.line, guard)
			}
		}
	}
	table := map[string]map[string]string{}
	for _, r := range roles {
		t.Run(r.name, func(t *testing.T) {
			results := w.runRole(t, r, gaps)
			for _, res := range results {
				if table[res.Technique] == nil {
					table[res.Technique] = map[string]string{}
				}
				table[res.Technique][r.name] = res.Result
			}
		})
	}
	t.Logf("results (R reached, - blocked, u unavailable), roles %s:\n%s", roleNames(), formatTable(table))
}

func roleNames() string {
	var names []string
	for _, r := range roles {
		names = append(names, r.name)
	}
	return strings.Join(names, ", ")
}

func formatTable(table map[string]map[string]string) string {
	var b strings.Builder
	for _, tech := range techniques {
		fmt.Fprintf(&b, "  %-40s %-10s", tech.name, tech.class)
		for _, r := range roles {
			c := map[string]string{Reached: "R", Blocked: "-", Unavailable: "u"}[table[tech.name][r.name]]
			if c == "" {
				c = "?"
			}
			fmt.Fprintf(&b, " %s", c)
		}
		b.WriteByte('\n')
	}
	return b.String()
}

func newWorld(t *testing.T) *world {
	t.Helper()
	w := &world{nonceApp: map[string]string{"holder": holderApp}}
	var err error
	if w.rs, _, err = policy.Parse("attack-policy.yaml", []byte(attackPolicy)); err != nil {
		t.Fatal(err)
	}
	w.dir, err = os.MkdirTemp("", "procgate-attack-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(w.dir) })
	w.sockDir = filepath.Join(w.dir, "sock")
	if err := os.Mkdir(w.sockDir, 0o777); err != nil {
		t.Fatal(err)
	}
	// Mkdir applies the umask; the modes must be exactly these.
	for dir, mode := range map[string]os.FileMode{w.dir: 0o755, w.sockDir: 0o1777} {
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
	}
	w.bin = copyExecutable(t, w.dir)
	w.oracle = filepath.Join(w.dir, "oracle.sock")
	w.holder = filepath.Join(w.sockDir, "holder.sock")

	w.buildNetwork(t)
	w.spawner = nstest.Thread(t, w.nsA)
	w.cgroup = nstest.Cgroup(t)
	w.apps = filepath.Join(w.cgroup, daemon.AppsDir)
	w.unbound = nstest.ChildCgroup(t, w.cgroup, "unbound")
	slice := nstest.ChildCgroup(t, w.cgroup, "system.slice")
	for _, r := range roles {
		if r.cgroup != "" {
			nstest.ChildCgroup(t, slice, filepath.Base(r.cgroup))
		}
	}
	w.binSetuid = setuidCopy(t, w.dir, w.bin, backupUID)
	w.startDaemon(t)
	w.startTarget(t)
	w.startHolder(t)
	return w
}

// setuidCopy copies bin as a set-user-ID program of uid.
func setuidCopy(t *testing.T, dir, bin string, uid int) string {
	t.Helper()
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, fmt.Sprintf("attack-setuid-%d", uid))
	if err := os.WriteFile(out, data, 0o755); err != nil {
		t.Fatal(err)
	}
	// chown clears the set-user-ID bit: chmod after it.
	if err := os.Chown(out, uid, uid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(out, 0o4755); err != nil {
		t.Fatal(err)
	}
	return out
}

// copyExecutable copies the test binary where user nobody may run it.
func copyExecutable(t *testing.T, dir string) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "attack")
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// buildNetwork makes the attacker's host (nsA) and the target's network
// (nsT), joined by the veth pair pga/pgt. nsA routes everything to nsT;
// nsT holds the internal prefixes and the control addresses as local, so
// that connections to them complete, and the capture on pgt sees
// everything nsA sends.
func (w *world) buildNetwork(t *testing.T) {
	t.Helper()
	w.nsA, w.nsT = nstest.NetNS(t), nstest.NetNS(t)
	nstest.Veth(t, w.nsA, "pga", w.nsT, "pgt")
	side := func(ns, link string, addrs []string, routes func(h *netlink.Handle, l netlink.Link) error) {
		h := nsHandle(t, ns)
		defer h.Close()
		l, err := h.LinkByName(link)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range addrs {
			addr, err := netlink.ParseAddr(a)
			if err != nil {
				t.Fatal(err)
			}
			// No duplicate address detection: the addresses are usable at
			// once, and nobody else is on this link.
			addr.Flags = unix.IFA_F_NODAD
			if err := h.AddrAdd(l, addr); err != nil {
				t.Fatalf("add %s to %s: %v", a, link, err)
			}
		}
		if err := routes(h, l); err != nil {
			t.Fatalf("routes in %s: %v", ns, err)
		}
	}
	side(w.nsA, "pga", []string{"198.18.0.1/24", "2001:db8:77::1/64", "fe80::1/64"}, func(h *netlink.Handle, l netlink.Link) error {
		for _, gw := range []string{"198.18.0.2", "2001:db8:77::2"} {
			if err := h.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: net.ParseIP(gw)}); err != nil {
				return fmt.Errorf("default via %s: %w", gw, err)
			}
		}
		return nil
	})
	side(w.nsT, "pgt", []string{"198.18.0.2/24", "2001:db8:77::2/64", "fe80::2/64"}, func(h *netlink.Handle, _ netlink.Link) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		for _, p := range []string{"10.0.0.0/8", "169.254.0.0/16", "198.51.100.0/24", "fd00::/8", "2001:db8:ff::/48", "::/96", "64:ff9b::/96"} {
			_, dst, _ := net.ParseCIDR(p)
			r := &netlink.Route{LinkIndex: lo.Attrs().Index, Dst: dst, Type: unix.RTN_LOCAL, Table: unix.RT_TABLE_LOCAL, Scope: netlink.SCOPE_HOST}
			if err := h.RouteAdd(r); err != nil {
				return fmt.Errorf("local %s: %w", p, err)
			}
		}
		return nil
	})
	// Ping sockets for everyone on the attacker's host, so that path is
	// tried rather than refused for the group.
	if err := nstest.InNS(t, w.nsA, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ping_group_range", []byte("0 2147483647"), 0)
	}); err != nil {
		t.Fatal(err)
	}
}

func nsHandle(t *testing.T, path string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// startDaemon runs daemon.Run in this process. In-process rather than a
// re-executed procgate binary: cmd/procgate is a main package this test
// cannot import, building it would need the toolchain at test time, and the
// daemon's state (programs, maps, links) is pinned in the bpffs either way,
// so nothing about enforcement depends on which process loaded it.
func (w *world) startDaemon(t *testing.T) {
	t.Helper()
	policyPath := filepath.Join(w.dir, "policy.yaml")
	if err := os.WriteFile(policyPath, []byte(attackPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	bpfDir := filepath.Join(nstest.BPFFS(t), "procgate")
	var logBuf bytes.Buffer
	var logMu sync.Mutex
	logw := lockedWriter{mu: &logMu, b: &logBuf}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- daemon.Run(ctx, daemon.Config{
			PolicyPath:   policyPath,
			CgroupRoot:   w.cgroup,
			StateDir:     filepath.Join(w.dir, "state"),
			BPFDir:       bpfDir,
			Socket:       filepath.Join(w.dir, "procgate.sock"),
			PollInterval: time.Second,
			GuardGID:     guardGID,
			// As `procgate daemon` runs by default (--tcp-handover=auto).
			TrustTraceGuard: true,
			Log:             slog.New(slog.NewTextHandler(logw, &slog.HandlerOptions{Level: slog.LevelDebug})),
			Ready:           func() { close(ready) },
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("daemon: %v", err)
		}
		if _, err := bpf.Uninstall(bpfDir); err != nil {
			t.Errorf("uninstall: %v", err)
		}
		if t.Failed() {
			logMu.Lock()
			t.Logf("daemon log:\n%s", logBuf.String())
			logMu.Unlock()
		}
	})
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("daemon: %v\n%s", err, logBuf.String())
	}
	logMu.Lock()
	for _, line := range strings.Split(logBuf.String(), "\n") {
		if strings.Contains(line, "guard") {
			t.Log(line)
		}
	}
	logMu.Unlock()
	resp, err := api.Client{Socket: filepath.Join(w.dir, "procgate.sock")}.Do(api.Request{Op: api.OpStatus})
	if err != nil {
		t.Fatalf("daemon status: %v", err)
	}
	if resp.Status == nil {
		t.Fatalf("daemon status: no status in %+v", resp)
	}
	w.guards = map[string]bool{}
	for _, g := range resp.Status.Guards {
		w.guards[g.Name] = g.Active
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// startTarget runs the target in this process, its sockets in nsT.
func (w *world) startTarget(t *testing.T) {
	t.Helper()
	err := nstest.InNS(t, w.nsT, func() error {
		var err error
		w.target, err = startTarget(targetConfig{Ifname: "pgt", TCPPort: 5432, UDPPort: 5353, Oracle: w.oracle})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.target.Close() })
}

// startHolder starts the holder as user nobody in the granted app, in nsA,
// as `procgate run` run by nobody has the daemon start it: capabilities
// dropped and under the trace guard.
func (w *world) startHolder(t *testing.T) {
	t.Helper()
	app := w.rs.App(holderApp)
	if app == nil {
		t.Fatalf("no app %q in the policy", holderApp)
	}
	out, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	errR, errW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	var errMu sync.Mutex
	var errBuf bytes.Buffer
	go func() { _, _ = io.Copy(lockedWriter{mu: &errMu, b: &errBuf}, errR); errR.Close() }()
	proc, err := launch.Start(launch.Spec{
		App: *app, CgroupDir: filepath.Join(w.apps, holderApp), Argv: []string{w.bin, "holder", "-listen", w.holder},
		Env: append(os.Environ(), envAsMain+"=1"), Dir: w.dir, Stdio: [3]*os.File{nil, outW, errW}, NetNS: w.nsA,
		Cred: &launch.Cred{UID: nobody, GID: nobody}, GuardGID: guardGID,
	})
	outW.Close()
	errW.Close()
	if err != nil {
		t.Fatalf("launch the holder: %v", err)
	}
	if guarded, why := proc.Guarded(); !guarded {
		t.Fatalf("the holder runs without the trace guard: %s", why)
	}
	t.Cleanup(func() {
		_ = proc.Signal(syscall.SIGTERM)
		_, _ = proc.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "ready" {
		errMu.Lock()
		defer errMu.Unlock()
		t.Fatalf("holder did not start (%v): %s", err, errBuf.String())
	}
}

// start runs the test binary as the attack program with args, in nsA, as
// uid, placed in cgroupDir from its first instruction (clone3 into the
// cgroup).
func (w *world) start(t *testing.T, cmd *exec.Cmd, cgroupDir string, uid int) {
	t.Helper()
	cg, err := os.Open(cgroupDir)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	cmd.Env = append(os.Environ(), envAsMain+"=1")
	cmd.Dir = w.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	if uid != 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}
	}
	w.spawner.Do(func() { err = cmd.Start() })
	if err != nil {
		t.Fatalf("start %v in %s: %v", cmd.Args[1:], cgroupDir, err)
	}
}

// launch runs the attack program with args as root through the launcher,
// as `procgate run --app APP` run by root does, in nsA, and waits for it.
func (w *world) launch(t *testing.T, r role, args []string, stdout, stderr *bytes.Buffer) {
	t.Helper()
	app := w.rs.App(r.app)
	if app == nil {
		t.Fatalf("no app %q in the policy", r.app)
	}
	var files [3]*os.File
	readers := make([]*os.File, 2)
	for i := range readers {
		rd, wr, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer rd.Close()
		readers[i], files[i+1] = rd, wr
	}
	proc, err := launch.Start(launch.Spec{
		App: *app, CgroupDir: w.cgroupOf(r), Argv: append([]string{w.bin}, args...),
		Env: append(os.Environ(), envAsMain+"=1"), Dir: w.dir, Stdio: files, NetNS: w.nsA, GuardGID: guardGID,
	})
	files[1].Close()
	files[2].Close()
	if err != nil {
		t.Fatalf("launch as %s: %v", r.name, err)
	}
	done := make(chan error, 1)
	go func() { _, err := io.Copy(stderr, readers[1]); done <- err }()
	if _, err := io.Copy(stdout, readers[0]); err != nil {
		t.Fatal(err)
	}
	<-done
	exit, err := proc.Wait()
	if err != nil || exit != (launch.Exit{}) {
		t.Fatalf("attack as %s: %v %+v\nstderr:\n%s", r.name, err, exit, stderr.String())
	}
}

func (w *world) cgroupOf(r role) string {
	if r.cgroup != "" {
		return filepath.Join(w.cgroup, r.cgroup)
	}
	if r.app == "" || r.app == "backup" {
		return w.unbound
	}
	return filepath.Join(w.apps, r.app)
}

// violation is a record at an internal destination that the policy does not
// allow its sender.
type violation struct {
	technique string
	rec       record
	why       string
}

// runRole runs the attack program as r and checks what the target saw.
func (w *world) runRole(t *testing.T, r role, gaps []knownGap) []result {
	nonce := strings.ReplaceAll(r.name, "-", "") + fmt.Sprint(time.Now().UnixNano()%1e6)
	w.nonceApp[nonce] = r.app
	mark := w.target.Mark()
	args := []string{"run",
		"-role", r.name, "-nonce", nonce, "-oracle", w.oracle, "-holder", w.holder,
		"-target4", r.target4, "-target6", r.target6, "-ifname", "pga",
		"-internal", strings.Join(append([]string{internalFlag(w.rs)}, r.reachable...), ",")}
	ran := techniques
	var filters []*regexp.Regexp
	for _, only := range []string{os.Getenv(envOnly), r.only} {
		if only == "" {
			continue
		}
		re, err := regexp.Compile(only)
		if err != nil {
			t.Fatalf("techniques %q: %v", only, err)
		}
		filters = append(filters, re)
	}
	if filters != nil {
		// The controls always run: without them no result means anything.
		ran = slices.DeleteFunc(slices.Clone(techniques), func(tech technique) bool {
			return !strings.HasPrefix(tech.name, "control-") &&
				slices.ContainsFunc(filters, func(re *regexp.Regexp) bool { return !re.MatchString(tech.name) })
		})
		names := make([]string, len(ran))
		for i, tech := range ran {
			names[i] = regexp.QuoteMeta(tech.name)
		}
		args = append(args, "-only", "^("+strings.Join(names, "|")+")$")
	}
	var stdout, stderr bytes.Buffer
	if r.launcher {
		w.launch(t, r, args, &stdout, &stderr)
	} else {
		bin := w.bin
		if r.setuidTo != 0 {
			bin = w.binSetuid
		}
		cmd := exec.Command(bin, args...)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		w.start(t, cmd, w.cgroupOf(r), r.uid)
		if err := cmd.Wait(); err != nil {
			t.Fatalf("attack as %s: %v\nstderr:\n%s", r.name, err, stderr.String())
		}
	}
	results, sum, err := parseRun(stdout.Bytes())
	if err != nil {
		t.Fatalf("attack output: %v\n%s", err, stdout.String())
	}
	if sum.Total != len(ran) || len(results) != len(ran) {
		t.Fatalf("%d results (summary %d), want one per technique (%d)", len(results), sum.Total, len(ran))
	}
	t.Logf("%s: %d techniques, %d reached, %d blocked, %d unavailable", r.name, sum.Total, sum.Reached, sum.Blocked, sum.Unavailable)
	byName := map[string]result{}
	for _, res := range results {
		byName[res.Technique] = res
		line, _ := json.Marshal(res)
		t.Log(string(line))
	}

	// Controls prove that the target hears this role at all.
	for _, tech := range ran {
		if tech.class == classControl && byName[tech.name].Result != Reached {
			t.Errorf("control %s did not reach the target: nothing this role sends would be seen (%s)", tech.name, byName[tech.name].Detail)
		}
	}
	// A role attacking its own grant proves each ordinary path works.
	if r.ownGrant {
		for _, tech := range ran {
			if res := byName[tech.name]; tech.grantable && res.Result == Blocked {
				t.Errorf("%s is granted %s but %s did not reach it: the technique or the target is broken (%s)", r.name, res.Dest, tech.name, res.Detail)
			}
		}
	}

	// The target's records are the truth: the attacker's own verdicts are
	// checked against them, not trusted.
	viol, seen := w.violations(r, nonce, results, w.target.Since(mark))
	found := map[string]bool{}
	for _, v := range viol {
		if found[v.technique] {
			continue // one report per technique: its first record
		}
		found[v.technique] = true
		if g := w.openGap(gaps, v.technique, r.name); g != nil {
			t.Logf("KNOWN GAP: %s as %s reached %s (%s) — known-gaps.txt:%d: %s", v.technique, r.name, v.rec, v.why, g.line, g.reason)
			continue
		}
		t.Errorf("UNEXPECTED REACH: %s as %s reached %s (%s); attacker said %s: %s", v.technique, r.name, v.rec, v.why, byName[v.technique].Result, byName[v.technique].Detail)
	}
	w.checkListen(t, r, ran, byName, gaps, found)
	for _, g := range gaps {
		if _, tried := byName[g.technique]; g.role != r.name || found[g.technique] || !tried {
			continue
		}
		if guard := g.closedBy(w.guards); guard != "" {
			t.Logf("KNOWN GAP closed here by guard %s: %s as %s did not reach (%s) — known-gaps.txt:%d", guard, g.technique, r.name, byName[g.technique].Detail, g.line)
			continue
		}
		if byName[g.technique].Result == Unavailable {
			t.Logf("KNOWN GAP not exercised here: %s as %s is unavailable (%s)", g.technique, r.name, byName[g.technique].Detail)
			continue
		}
		t.Errorf("known gap %s as %s no longer reaches (%s): remove it from known-gaps.txt (line %d)", g.technique, r.name, byName[g.technique].Detail, g.line)
	}
	for _, res := range results {
		if res.Result == Reached && res.Class != classControl && res.Class != classListen && !seen[res.Technique] {
			t.Errorf("%s: the attacker says reached (%s) but the target has no record of it at an internal address", res.Technique, res.Seen)
		}
	}
	return results
}

// violations returns the records of a run at internal destinations that the
// policy does not allow the sender: a token names the sender's role (and so
// its app); a SYN without a token is matched to a technique by its 4-tuple
// (see flow); anything else internal is unattributed and must be allowed to some
// app that could have sent it (the role's or the holder's). It also returns
// the techniques of this run with a record at an internal address.
func (w *world) violations(r role, nonce string, results []result, recs []record) ([]violation, map[string]bool) {
	var out []violation
	seen := map[string]bool{}
	for _, rec := range recs {
		d := ruleset.Dest{Addr: rec.Dst, Port: rec.Dport, Proto: protoOf(rec.Proto)}
		// Outside the internal prefixes only a sandbox's arrivals count.
		if w.rs.Decide("", d).Reason == ruleset.ReasonNotInternal && !inAny(rec.Dst, r.reachable) {
			continue
		}
		app, technique, attributed := "", "unattributed", false
		if rec.Token != "" {
			n, _, tech, ok := parseToken(rec.Token)
			if a, known := w.nonceApp[n]; ok && known {
				app, technique, attributed = a, tech, true
				if n != nonce && n != "holder" {
					technique = "late record of run " + n + ": " + tech
				}
			}
		} else if tech, ok := synTechnique(results, rec); ok {
			app, technique, attributed = r.app, tech, true
		}
		if attributed {
			seen[technique] = true
			if dec := w.rs.Decide(app, d); !dec.Allow {
				out = append(out, violation{technique: technique, rec: rec, why: dec.String()})
			}
			continue
		}
		if !w.rs.Decide(r.app, d).Allow && !w.rs.Decide(holderApp, d).Allow {
			out = append(out, violation{technique: technique, rec: rec, why: "no token, no known port, allowed to nobody here"})
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].technique < out[j].technique })
	return out, seen
}

// synTechnique is the technique whose attempt sent rec, a SYN without a
// token, by its 4-tuple.
func synTechnique(results []result, rec record) (string, bool) {
	for _, res := range results {
		if synOf(res.Flows, rec) {
			return res.Technique, true
		}
	}
	return "", false
}

func inAny(a netip.Addr, prefixes []string) bool {
	for _, p := range prefixes {
		if netip.MustParsePrefix(p).Contains(a.Unmap()) {
			return true
		}
	}
	return false
}

// checkListen checks the binds of the listen techniques against the
// role's app: with listen:, only listed ports may be bound (what else
// binds must be a known gap); without, every bind goes through.
func (w *world) checkListen(t *testing.T, r role, ran []technique, byName map[string]result, gaps []knownGap, found map[string]bool) {
	t.Helper()
	var listen *ruleset.Listen
	if a := w.rs.App(r.app); a != nil {
		listen = a.Listen
	}
	for _, tech := range ran {
		res := byName[tech.name]
		if tech.class != classListen || res.Result == Unavailable {
			continue
		}
		port, _ := listenPort(tech.name)
		listed := listen != nil && listen.Allows(port)
		switch {
		case listen == nil || listed:
			if res.Result != Reached {
				t.Errorf("%s as %s: the bind was refused, but %s (%s)", tech.name, r.name, map[bool]string{true: "the port is listed", false: "the app has no listen:"}[listed], res.Detail)
			}
		case res.Result == Reached:
			found[tech.name] = true
			if g := w.openGap(gaps, tech.name, r.name); g != nil {
				t.Logf("KNOWN GAP: %s as %s bound a port %s does not list (%s) — known-gaps.txt:%d: %s", tech.name, r.name, listen, res.Detail, g.line, g.reason)
				continue
			}
			t.Errorf("UNEXPECTED BIND: %s as %s bound a port %s does not list: %s", tech.name, r.name, listen, res.Detail)
		}
	}
}

func protoOf(p string) ruleset.Proto {
	switch p {
	case "tcp":
		return ruleset.TCP
	case "udp", "udplite":
		return ruleset.UDP
	}
	return 0
}

func internalFlag(rs *ruleset.Ruleset) string {
	var ps []string
	for _, p := range rs.Internal {
		ps = append(ps, p.Prefix.String())
	}
	return strings.Join(ps, ",")
}

// parseRun reads the attack program's output: result lines, then a summary.
func parseRun(out []byte) ([]result, summary, error) {
	var results []result
	var sum summary
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Bytes()
		if bytes.Contains(line, []byte(`"summary":true`)) {
			if err := json.Unmarshal(line, &sum); err != nil {
				return nil, sum, err
			}
			continue
		}
		var r result
		if err := json.Unmarshal(line, &r); err != nil {
			return nil, sum, fmt.Errorf("line %q: %w", line, err)
		}
		results = append(results, r)
	}
	if !sum.Summary {
		return nil, sum, errors.New("no summary line")
	}
	return results, sum, sc.Err()
}

// knownGap is a line of known-gaps.txt: a technique that reaches, for a
// role, with the reason it still does; without lists the guards that
// close it where the kernel has them (bpf.Guards names).
type knownGap struct {
	technique, role, reason string
	without                 []string
	line                    int
}

// closedBy is the guard of g's without list active here, or "": where one
// is, the gap is closed and its technique must not reach.
func (g *knownGap) closedBy(guards map[string]bool) string {
	for _, name := range g.without {
		if guards[name] {
			return name
		}
	}
	return ""
}

// loadKnownGaps reads "TECHNIQUE ROLE [without=GUARD,...] REASON..." lines;
// # starts a comment.
func loadKnownGaps(path string) ([]knownGap, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var gaps []knownGap
	seen := map[[2]string]int{}
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 3 {
			return nil, fmt.Errorf("%s:%d: want TECHNIQUE ROLE REASON, got %q", path, i+1, line)
		}
		key := [2]string{f[0], f[1]}
		if prev, dup := seen[key]; dup {
			return nil, fmt.Errorf("%s:%d: %s %s already listed on line %d", path, i+1, f[0], f[1], prev)
		}
		seen[key] = i + 1
		g := knownGap{technique: f[0], role: f[1], line: i + 1}
		if guards, ok := strings.CutPrefix(f[2], "without="); ok {
			g.without = strings.Split(guards, ",")
			if len(f) < 4 {
				return nil, fmt.Errorf("%s:%d: no reason after %s", path, i+1, f[2])
			}
			f = f[1:]
		}
		g.reason = strings.Join(f[2:], " ")
		gaps = append(gaps, g)
	}
	return gaps, nil
}

// openGap is the known gap of technique as role, unless a guard active
// here closes it.
func (w *world) openGap(gaps []knownGap, technique, role string) *knownGap {
	g := findGap(gaps, technique, role)
	if g == nil || g.closedBy(w.guards) != "" {
		return nil
	}
	return g
}

func findGap(gaps []knownGap, technique, role string) *knownGap {
	for i := range gaps {
		if gaps[i].technique == technique && gaps[i].role == role {
			return &gaps[i]
		}
	}
	return nil
}

// The unit tests below need no root.

func TestParseFrame(t *testing.T) {
	src4, dst4 := netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("10.1.2.3")
	src6, dst6 := netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("fd00::3")
	tok := []byte("xxPGATK/n/r/t|yy")
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	frame := func(src, dst netip.Addr, proto uint8, l4 []byte) []byte {
		et := uint16(unix.ETH_P_IP)
		if dst.Is6() {
			et = unix.ETH_P_IPV6
		}
		return ethFrame(broadcastMAC, mac, et, ipPacket(src, dst, proto, l4))
	}
	syn := make([]byte, 20)
	syn[2], syn[3], syn[13] = 0x15, 0x38, 0x02
	synAck := slices.Clone(syn)
	synAck[13] = 0x12
	tests := []struct {
		name  string
		frame []byte
		want  []record
	}{
		{"udp4 with token", frame(src4, dst4, unix.IPPROTO_UDP, udpDatagram(src4, dst4, 1, 5353, tok)),
			[]record{{Src: src4, Dst: dst4, Proto: "udp", Sport: 1, Dport: 5353, Token: "PGATK/n/r/t|"}}},
		{"udp6 without token", frame(src6, dst6, unix.IPPROTO_UDP, udpDatagram(src6, dst6, 1, 53, nil)),
			[]record{{Src: src6, Dst: dst6, Proto: "udp", Sport: 1, Dport: 53}}},
		{"tcp syn", frame(src4, dst4, unix.IPPROTO_TCP, syn),
			[]record{{Src: src4, Dst: dst4, Proto: "tcp", Dport: 5432, SYN: true}}},
		{"tcp syn-ack is no attempt", frame(src4, dst4, unix.IPPROTO_TCP, synAck), nil},
		{"icmp echo", frame(src4, dst4, unix.IPPROTO_ICMP, []byte{8, 0, 0, 0, 0, 0, 0, 0}),
			[]record{{Src: src4, Dst: dst4, Proto: "icmp", Echo: true}}},
		{"icmpv6 neighbour solicitation is no attempt", frame(src6, dst6, unix.IPPROTO_ICMPV6, []byte{135, 0, 0, 0}), nil},
		{"two tokens", frame(src4, dst4, 253, []byte("PGATK/a/b/c|PGATK/d/e/f|")),
			[]record{{Src: src4, Dst: dst4, Proto: "ip253", Token: "PGATK/a/b/c|"}, {Src: src4, Dst: dst4, Proto: "ip253", Token: "PGATK/d/e/f|"}}},
		{"hop-by-hop then udp", ethFrame(broadcastMAC, mac, unix.ETH_P_IPV6,
			ipPacket(src6, dst6, 0, append([]byte{unix.IPPROTO_UDP, 0, 0, 0, 0, 0, 0, 0}, udpDatagram(src6, dst6, 7, 8, nil)...))),
			[]record{{Src: src6, Dst: dst6, Proto: "udp", Sport: 7, Dport: 8}}},
		{"arp", ethFrame(broadcastMAC, mac, 0x0806, make([]byte, 28)), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := parseFrame(tt.frame)
			if !slices.Equal(got, tt.want) {
				t.Errorf("parseFrame:\n got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestTokens(t *testing.T) {
	cfg := &config{nonce: "abc", role: "unbound"}
	tok := tokenFor(cfg, "tcp4-connect")
	n, r, tech, ok := parseToken(tok)
	if !ok || n != "abc" || r != "unbound" || tech != "tcp4-connect" {
		t.Errorf("parseToken(%q) = %q %q %q %v", tok, n, r, tech, ok)
	}
	for _, bad := range []string{"PGATK/a/b|", "PGATK/a/b/c", "XPGATK/a/b/c|"} {
		if _, _, _, ok := parseToken(bad); ok {
			t.Errorf("parseToken(%q) accepted", bad)
		}
	}
	if got := findTokens([]byte("..PGATK/x|..PGATK/" + strings.Repeat("y", 300) + "|..PGATK/z|")); !slices.Equal(got, []string{"PGATK/x|", "PGATK/z|"}) {
		t.Errorf("findTokens = %q", got)
	}
}

func TestJudge(t *testing.T) {
	cfg := &config{nonce: "n", role: "r", internal: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}}
	tech := &technique{name: "t", class: classAddress}
	ctl := &technique{name: "c", class: classControl}
	in, out := netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("198.51.100.7")
	tok := tokenFor(cfg, "t")
	src, dst := netip.MustParseAddrPort("10.0.0.2:40000"), netip.MustParseAddrPort("10.1.2.3:5432")
	other := netip.MustParseAddrPort("10.1.2.4:5432")
	src6, dst6 := netip.MustParseAddr("fd00:2::2"), netip.MustParseAddrPort("[fd00:1::3]:5432")
	loop6, loopDst6 := netip.MustParseAddrPort("[::1]:51628"), netip.MustParseAddrPort("[::]:5432")
	failed6 := netip.MustParseAddrPort("[::]:51628") // what getsockname says after ECONNREFUSED
	tests := []struct {
		name string
		tech *technique
		a    attempt
		recs []record
		want string
	}{
		{"token at internal", tech, attempt{}, []record{{Dst: in, Proto: "udp", Token: tok}}, Reached},
		{"syn of the flow", tech, attempt{Flows: []flow{{src, dst}}}, []record{syn(src, dst)}, Reached},
		{"syn of the flow, v4-mapped", tech, attempt{Flows: []flow{{src, dst}}}, []record{syn(mappedAP(src), mappedAP(dst))}, Reached},
		{"syn of another port", tech, attempt{Flows: []flow{{src, dst}}}, []record{syn(netip.AddrPortFrom(src.Addr(), 4001), dst)}, Blocked},
		// What made the suite flaky: tcp6-unspecified-:: connects ::1 to
		// ::1, and the holder's SYN to the grant, or another technique's,
		// may leave from the same port number.
		{"same port from another address", tech, attempt{Flows: []flow{{loop6, loopDst6}}}, []record{syn(netip.AddrPortFrom(src6, loop6.Port()), dst6)}, Blocked},
		{"same port, source unknown, another destination", tech, attempt{Flows: []flow{{failed6, loopDst6}}}, []record{syn(netip.AddrPortFrom(src6, failed6.Port()), dst6)}, Blocked},
		{"syn of a failed connect (source unknown)", tech, attempt{Flows: []flow{{netip.AddrPortFrom(netip.IPv4Unspecified(), src.Port()), dst}}}, []record{syn(src, dst)}, Reached},
		{"same port and address, another destination", tech, attempt{Flows: []flow{{src, other}}}, []record{syn(src, dst)}, Blocked},
		{"same 4-tuple, not a SYN", tech, attempt{Flows: []flow{{src, dst}}}, []record{{Src: src.Addr(), Sport: src.Port(), Dst: dst.Addr(), Dport: dst.Port(), Proto: "tcp"}}, Blocked},
		{"token elsewhere", tech, attempt{}, []record{{Dst: out, Proto: "udp", Token: tok}}, Blocked},
		{"another technique's token", tech, attempt{}, []record{{Dst: in, Proto: "udp", Token: tokenFor(cfg, "u")}}, Blocked},
		{"nothing, unavailable", tech, attempt{Unavailable: true}, nil, Unavailable},
		{"control at external", ctl, attempt{}, []record{{Dst: out, Proto: "udp", Token: tokenFor(cfg, "c")}}, Reached},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := judge(cfg, tt.tech, tt.a, tt.recs); got.Result != tt.want {
				t.Errorf("judge = %s (%s), want %s", got.Result, got.Detail, tt.want)
			}
		})
	}
}

func syn(src, dst netip.AddrPort) record {
	return record{Src: src.Addr(), Sport: src.Port(), Dst: dst.Addr(), Dport: dst.Port(), Proto: "tcp", SYN: true}
}

func mappedAP(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(mapped(ap.Addr()), ap.Port())
}

// TestSYNAttribution checks the test's own attribution of token-less SYNs
// (violations), which must not take another socket's SYN for an attempt's.
func TestSYNAttribution(t *testing.T) {
	results := []result{
		{Technique: "tcp6-unspecified-::", Flows: []flow{{netip.MustParseAddrPort("[::]:51628"), netip.MustParseAddrPort("[::]:5432")}}},
		{Technique: "tcp4-connect", Flows: []flow{{netip.MustParseAddrPort("10.0.0.2:40000"), netip.MustParseAddrPort("10.1.2.3:5432")}}},
		{Technique: "tcp4-refused", Flows: []flow{{netip.MustParseAddrPort("0.0.0.0:40002"), netip.MustParseAddrPort("10.1.2.3:5432")}}},
	}
	tests := []struct {
		name string
		rec  record
		want string
	}{
		{"the holder's SYN on a port an attempt had towards ::1", syn(netip.MustParseAddrPort("10.0.0.2:51628"), netip.MustParseAddrPort("10.1.2.3:5432")), ""},
		{"an attempt's own SYN", syn(netip.MustParseAddrPort("10.0.0.2:40000"), netip.MustParseAddrPort("10.1.2.3:5432")), "tcp4-connect"},
		{"the SYN of a failed connect", syn(netip.MustParseAddrPort("10.0.0.2:40002"), netip.MustParseAddrPort("10.1.2.3:5432")), "tcp4-refused"},
		{"its SYN as an IPv4-mapped record", syn(mappedAP(netip.MustParseAddrPort("10.0.0.2:40000")), netip.MustParseAddrPort("10.1.2.3:5432")), "tcp4-connect"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got, _ := synTechnique(results, tt.rec); got != tt.want {
				t.Errorf("synTechnique = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestTechniquesAreWellFormed(t *testing.T) {
	if len(techniques) < 60 {
		t.Errorf("%d techniques, issue 4 asks for at least 60", len(techniques))
	}
	seen := map[string]bool{}
	for _, tech := range techniques {
		if seen[tech.name] {
			t.Errorf("technique %s listed twice", tech.name)
		}
		seen[tech.name] = true
		if strings.ContainsAny(tech.name, "/| ") {
			t.Errorf("technique %q: name must not contain '/', '|' or spaces (tokens)", tech.name)
		}
		if tech.try == nil || tech.class == "" {
			t.Errorf("technique %s has no function or class", tech.name)
		}
	}
	gaps, err := loadKnownGaps("known-gaps.txt")
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range gaps {
		if !seen[g.technique] {
			t.Errorf("known-gaps.txt:%d: no technique %q", g.line, g.technique)
		}
	}
}
