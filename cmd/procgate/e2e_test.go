package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/demo"
	"github.com/procgate/procgate/internal/etcdtest"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/pinholetest"
	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/internal/version"
	"github.com/procgate/procgate/ruleset"
)

// The test binary doubles as procgate: re-executed with envAsMain it runs
// main(), so the tests drive the real CLI and a real daemon process.
const envAsMain = "PROCGATE_TEST_AS_MAIN"

func TestMain(m *testing.M) {
	etcdtest.MaybeServe() // the members of etcdtest.StartCluster
	// The prober first: a prober child may inherit envAsMain from the
	// re-executed procgate that launched it. It is served by the test
	// binary only; the shipped procgate has no prober (dist/check).
	probe.MaybeServe()
	if os.Getenv(envAsMain) == "1" {
		os.Args = append([]string{"procgate"}, os.Args[1:]...)
		main()
		os.Exit(0)
	}
	pinholetest.Serve()
	os.Exit(m.Run())
}

// e2e is one daemon with its own cgroup subtree, bpffs, state, socket and
// a network namespace where every address is local.
type e2e struct {
	t       *testing.T
	bin     string // a copy of the test binary any user may execute
	dir     string // world-readable scratch dir (socket, policy)
	policy  string
	socket  string
	state   string
	bpfDir  string
	cgroup  string
	netns   string
	daemon  *exec.Cmd
	inNetns bool
	// daemonFlags are added to the daemon's command line (later flags win).
	daemonFlags []string
	// daemonFiles are descriptors the daemon inherits (3, 4, ...), as from
	// a unit's socket or a shell's redirection.
	daemonFiles []*os.File
	dlog        *bytes.Buffer
	dlogMu      sync.Mutex
	stopped     chan struct{}
}

func newE2E(t *testing.T, policyYAML string) *e2e {
	t.Helper()
	return newE2EWith(t, policyYAML, false)
}

// newE2EWith starts the daemon inside the test's network namespace when
// inNetns is set, so that it sees the namespace's links and routes, and with
// extra daemon flags.
func newE2EWith(t *testing.T, policyYAML string, inNetns bool, daemonFlags ...string) *e2e {
	t.Helper()
	nstest.RequireRoot(t)
	ns := nstest.NetNS(t)
	nstest.AnyIPLoopback(t, ns)
	return newE2EIn(t, policyYAML, ns, inNetns, daemonFlags...)
}

// newE2EIn is newE2EWith in the network namespace ns, which the caller
// made (and set up: links, routes).
func newE2EIn(t *testing.T, policyYAML, ns string, inNetns bool, daemonFlags ...string) *e2e {
	t.Helper()
	return newE2EInheriting(t, policyYAML, ns, inNetns, nil, daemonFlags...)
}

// newE2EInheriting is newE2EIn with a daemon that inherits files (3, 4, ...).
func newE2EInheriting(t *testing.T, policyYAML, ns string, inNetns bool, files []*os.File, daemonFlags ...string) *e2e {
	t.Helper()
	nstest.RequireRoot(t)
	dir, err := os.MkdirTemp("", "procgate-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// Other users (the launcher tests run as nobody) must reach the socket
	// and execute the binary.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "procgate")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	e := &e2e{
		t: t, bin: bin, dir: dir,
		policy: filepath.Join(dir, "policy.yaml"),
		socket: filepath.Join(dir, "procgate.sock"),
		state:  filepath.Join(dir, "state"),
		bpfDir: filepath.Join(nstest.BPFFS(t), "procgate"),
		cgroup: nstest.Cgroup(t),
		netns:  ns,
	}
	e.inNetns, e.daemonFlags, e.daemonFiles = inNetns, daemonFlags, files
	e.writePolicy(policyYAML)
	e.startDaemon()
	t.Cleanup(func() {
		e.stopDaemon(syscall.SIGTERM)
		if _, err := os.Stat(e.bpfDir); err == nil {
			if out, err := e.procgate("uninstall", "--bpf-dir", e.bpfDir); err != nil {
				t.Errorf("uninstall: %v\n%s", err, out)
			}
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", e.daemonLog())
		}
	})
	return e
}

func (e *e2e) writePolicy(y string) {
	e.t.Helper()
	// Write and rename, as editors and config management do, so the
	// daemon never reads half a file.
	tmp := e.policy + ".tmp"
	if err := os.WriteFile(tmp, []byte(y), 0o644); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Rename(tmp, e.policy); err != nil {
		e.t.Fatal(err)
	}
}

// waitGeneration waits until the daemon is past generation before.
func (e *e2e) waitGeneration(before uint32, why string) {
	e.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for e.status().Generation == before {
		if time.Now().After(deadline) {
			e.t.Fatalf("%s did not make a new generation within 5s:\n%s", why, e.daemonLog())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitApp waits until the daemon's status of app satisfies ok.
func (e *e2e) waitApp(app, what string, ok func(api.AppStatus) bool) {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		st := e.status()
		if i := slices.IndexFunc(st.Apps, func(a api.AppStatus) bool { return a.Name == app }); i >= 0 && ok(st.Apps[i]) {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("no %s within 30s (generation %d):\n%s", what, st.Generation, e.daemonLog())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (e *e2e) policyText() string {
	e.t.Helper()
	b, err := os.ReadFile(e.policy)
	if err != nil {
		e.t.Fatal(err)
	}
	return string(b)
}

func (e *e2e) daemonLog() string {
	e.dlogMu.Lock()
	defer e.dlogMu.Unlock()
	return e.dlog.String()
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (e *e2e) startDaemon() {
	e.t.Helper()
	if e.dlog == nil {
		e.dlog = &bytes.Buffer{}
	}
	args := []string{e.bin, "daemon", "--policy", e.policy, "--cgroup-root", e.cgroup,
		"--state-dir", e.state, "--bpf-dir", e.bpfDir, "--socket", e.socket, "--poll", "100ms", "--log-level", "debug"}
	args = append(args, e.daemonFlags...)
	if e.inNetns {
		args = append([]string{"nsenter", "--net=" + e.netns}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), envAsMain+"=1")
	cmd.Stdout = lockedWriter{&e.dlogMu, e.dlog}
	cmd.Stderr = cmd.Stdout
	cmd.ExtraFiles = e.daemonFiles
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.daemon = cmd
	e.stopped = make(chan struct{})
	go func() {
		cmd.Wait()
		close(e.stopped)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := (api.Client{Socket: e.socket}).Do(api.Request{Op: api.OpStatus}); err == nil {
			return
		}
		select {
		case <-e.stopped:
			e.t.Fatalf("daemon exited at start:\n%s", e.daemonLog())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("daemon did not serve %s within 30s:\n%s", e.socket, e.daemonLog())
		}
	}
}

func (e *e2e) stopDaemon(sig syscall.Signal) {
	if e.daemon == nil {
		return
	}
	_ = e.daemon.Process.Signal(sig)
	select {
	case <-e.stopped:
	case <-time.After(30 * time.Second):
		e.t.Errorf("daemon did not stop on %v", sig)
		_ = e.daemon.Process.Kill()
		<-e.stopped
	}
	e.daemon = nil
}

// procgate runs the CLI as root and returns its combined output.
func (e *e2e) procgate(args ...string) (string, error) {
	return e.procgateAs(nil, nil, args...)
}

// procgateAs runs the CLI with credentials (nil: root) and extra env.
func (e *e2e) procgateAs(cred *syscall.Credential, env []string, args ...string) (string, error) {
	cmd := exec.Command(e.bin, append([]string{"--socket", e.socket}, args...)...)
	cmd.Env = append(append(os.Environ(), envAsMain+"=1"), env...)
	cmd.Dir = e.dir
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (e *e2e) status() *api.Status {
	e.t.Helper()
	resp, err := (api.Client{Socket: e.socket}).Do(api.Request{Op: api.OpStatus})
	if err != nil {
		e.t.Fatal(err)
	}
	return resp.Status
}

// prober starts a prober in app's cgroup ("" for an unbound process in a
// sibling cgroup of the apps').
func (e *e2e) prober(app string) *probe.Prober {
	e.t.Helper()
	dir := filepath.Join(e.cgroup, "procgate.apps", app)
	if app == "" {
		dir = nstest.ChildCgroup(e.t, e.cgroup, fmt.Sprintf("unbound-%d", time.Now().UnixNano()))
	}
	p, err := probe.Start(dir, e.netns, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { p.Close() })
	return p
}

func mustTry(t *testing.T, p *probe.Prober, dest string, want probe.Verdict) {
	t.Helper()
	d, err := ruleset.ParseDest(dest)
	if err != nil {
		t.Fatal(err)
	}
	got, err := p.Try(d, probe.Connect)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("%s: got %s, want %s", dest, got, want)
	}
}

const basePolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8, fd00::/8]
apps:
  - name: db
    users: [nobody]
    allow:
      - to: 10.1.2.0/24
        proto: tcp
        ports: [5432]
      - to: fd00:1::/64
        ports: [443, 8000-8100]
  - name: other
    allow:
      - to: 10.9.0.0/16
        proto: udp
        ports: [53]
`

func TestDaemonEnforcesReloadsAndRevokes(t *testing.T) {
	e := newE2E(t, basePolicy)
	db, other, unbound := e.prober("db"), e.prober("other"), e.prober("")

	t.Run("verdicts", func(t *testing.T) {
		for _, tc := range []struct {
			p    *probe.Prober
			dest string
			want probe.Verdict
		}{
			{db, "10.1.2.3:5432/tcp", probe.Allowed},
			{db, "10.1.2.3:5433/tcp", probe.Denied},
			{db, "10.1.3.3:5432/tcp", probe.Denied},
			{db, "[fd00:1::7]:8080/tcp", probe.Allowed},
			{db, "192.0.2.1:5432/tcp", probe.Allowed}, // not internal
			{other, "10.1.2.3:5432/tcp", probe.Denied},
			{unbound, "10.1.2.3:5432/tcp", probe.Denied},
			{unbound, "198.51.100.7:443/tcp", probe.Allowed},
		} {
			mustTry(t, tc.p, tc.dest, tc.want)
		}
	})

	t.Run("explain agrees", func(t *testing.T) {
		out, err := e.procgate("explain", "--app", "db", "10.1.2.3:5432/tcp")
		if err != nil || !strings.Contains(out, "allow (granted)") || !strings.Contains(out, "policy.yaml:") {
			t.Fatalf("explain: %v\n%s", err, out)
		}
		out, err = e.procgate("explain", "--pid", fmt.Sprint(unbound.Pid()), "10.1.2.3:5432/tcp")
		if err != nil || !strings.Contains(out, "deny (unbound)") {
			t.Fatalf("explain --pid: %v\n%s", err, out)
		}
	})

	t.Run("status", func(t *testing.T) {
		out, err := e.procgate("status")
		if err != nil {
			t.Fatalf("status: %v\n%s", err, out)
		}
		for _, want := range []string{"daemon " + version.Get().String(), "+connect4 +connect6 +sendmsg4 +sendmsg6", "db", "other", "(unbound)"} {
			if !strings.Contains(out, want) {
				t.Errorf("status lacks %q:\n%s", want, out)
			}
		}
		st := e.status()
		if st.Version != version.Get() {
			t.Errorf("status version %+v, want this build's %+v", st.Version, version.Get())
		}
		if st.Unbound.Deny == 0 {
			t.Errorf("unbound deny counter is 0 after a denial")
		}
	})

	t.Run("events show the denial", func(t *testing.T) {
		waitEvent(t, e, `"dest":"10.1.2.3:5432/tcp"`, `"reason":"unbound"`, `"verdict":"deny"`)
	})

	t.Run("events filters and learn", func(t *testing.T) {
		waitEvent(t, e, `"dest":"10.1.3.3:5432/tcp"`, `"app":"db"`)
		lines := func(cred *syscall.Credential, args ...string) []string {
			t.Helper()
			out, err := e.procgateAs(cred, nil, append([]string{"events", "--json", "--last", "0"}, args...)...)
			if err != nil {
				t.Fatalf("events %v: %v\n%s", args, err, out)
			}
			var got []string
			for _, l := range strings.Split(out, "\n") {
				if l != "" {
					got = append(got, l)
				}
			}
			return got
		}
		db := lines(nil, "--app", "db", "--verdict", "deny")
		if len(db) != 2 || !strings.Contains(db[0], `"dest":"10.1.2.3:5433/tcp"`) || !strings.Contains(db[1], `"dest":"10.1.3.3:5432/tcp"`) {
			t.Errorf("events --app db --verdict deny: %q, want db's two denials", db)
		}
		if got := lines(nil, "--dest", "10.1.3.0/24"); len(got) != 1 || !strings.Contains(got[0], `"10.1.3.3:5432/tcp"`) {
			t.Errorf("events --dest 10.1.3.0/24: %q", got)
		}
		if got := lines(nil, "--app", "db", "--last", "1"); len(got) != 1 || !strings.Contains(got[0], "10.1.3.3") {
			t.Errorf("events --app db --last 1: %q, want the last of db's", got)
		}
		if got := lines(nil, "--since", time.Now().Add(time.Hour).UTC().Format(time.RFC3339)); len(got) != 0 {
			t.Errorf("events --since an hour ahead: %q", got)
		}
		// The probers run as root: nobody sees none of their events, and
		// of the apps only db, which it may run.
		if got := lines(nobody); len(got) != 0 {
			t.Errorf("events as nobody: %q, want none of root's", got)
		}
		out, err := e.procgateAs(nobody, nil, "status", "--json")
		var st api.Status
		if err != nil || json.Unmarshal([]byte(out), &st) != nil || len(st.Apps) != 1 || st.Apps[0].Name != "db" || st.Unbound.Deny != 0 {
			t.Errorf("status as nobody: %v: want the db row only\n%s", err, out)
		}
		out, err = e.procgate("learn", "--app", "db")
		if err != nil || !strings.Contains(out, "- to: 10.1.2.3/32\n        proto: tcp\n        ports: [5433]\n") ||
			!strings.Contains(out, "- to: 10.1.3.3/32\n") {
			t.Errorf("learn --app db: %v\n%s", err, out)
		}
	})

	t.Run("explain equals the kernel", func(t *testing.T) {
		// The daemon's explain (ruleset.Decide on the generation it gave the
		// kernel) against real attempts, on destinations around the grants.
		rng := rand.New(rand.NewPCG(3, 5))
		probers := map[string]*probe.Prober{"db": db, "other": other, "": unbound}
		c := api.Client{Socket: e.socket}
		for range 300 {
			var d ruleset.Dest
			if rng.IntN(3) == 0 {
				a := [16]byte{0xfd, 0, 0, byte(rng.IntN(3))}
				a[15] = byte(rng.IntN(256))
				d.Addr = netip.AddrFrom16(a)
			} else {
				d.Addr = netip.AddrFrom4([4]byte{10, byte(rng.IntN(10)), byte(rng.IntN(4)), byte(rng.IntN(256))})
			}
			d.Proto = ruleset.Proto(1 + rng.IntN(2))
			d.Port = []uint16{53, 443, 5432, 5433, 8000, 8100, 8101}[rng.IntN(7)]
			app := []string{"db", "other", ""}[rng.IntN(3)]
			req := api.Request{Op: api.OpExplain, App: app, Dest: d.String()}
			if app == "" {
				req = api.Request{Op: api.OpExplain, PID: unbound.Pid(), Dest: d.String()}
			}
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			m := probe.Connect
			if d.Proto == ruleset.UDP && rng.IntN(2) == 0 {
				m = probe.SendTo
			}
			got, err := probers[app].Try(d, m)
			if err != nil {
				t.Fatal(err)
			}
			if (got == probe.Allowed) != resp.Explain.Allow {
				t.Fatalf("app %q %s via %s: kernel %s, explain %s", app, d, m, got, resp.Explain.Decision)
			}
		}
	})

	t.Run("events --follow streams new events", func(t *testing.T) {
		cmd := exec.Command(e.bin, "--socket", e.socket, "events", "--follow", "--json", "--last", "0")
		cmd.Env = append(os.Environ(), envAsMain+"=1")
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}()
		lines := make(chan string)
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				lines <- sc.Text()
			}
			close(lines)
		}()
		// Denials are repeated: the explain test above may have used up
		// this second's audit budget of the app (kernel rate limit).
		timeout := time.After(5 * time.Second)
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
				mustTry(t, other, "10.7.7.7:7777/tcp", probe.Denied)
			case l, ok := <-lines:
				if !ok {
					t.Fatal("events --follow ended")
				}
				if strings.Contains(l, `"dest":"10.7.7.7:7777/tcp"`) && strings.Contains(l, `"app":"other"`) {
					return
				}
			case <-timeout:
				t.Fatal("no live event within 5s")
			}
		}
	})

	t.Run("bad policies keep the old one", func(t *testing.T) {
		good := e.status().Generation
		for _, tc := range []struct {
			name, policy, want string
		}{
			{"malformed yaml", "version: 1\ninternal: [\n", "policy.yaml:"},
			{"missing app name", "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - allow: []\n", "policy.yaml:5"},
			{"bad prefix", "version: 1\ninternal:\n  prefixes: [10.0.0.300/8]\n", "policy.yaml:3"},
			{"port 70000", strings.Replace(basePolicy, "[5432]", "[70000]", 1), "policy.yaml:10"},
			{"unreadable file", "", "read policy"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				if tc.policy == "" {
					os.Remove(e.policy)
				} else {
					e.writePolicy(tc.policy)
				}
				out, err := e.procgate("reload")
				if err == nil || !strings.Contains(out, tc.want) {
					t.Fatalf("reload of a bad policy: err=%v, want message with %q:\n%s", err, tc.want, out)
				}
				st := e.status()
				if st.Generation != good || st.LastError == "" {
					t.Fatalf("generation %d (want %d kept), last error %q", st.Generation, good, st.LastError)
				}
				mustTry(t, db, "10.1.2.3:5432/tcp", probe.Allowed)
				mustTry(t, unbound, "10.1.2.3:5432/tcp", probe.Denied)
			})
		}
		e.writePolicy(basePolicy)
		if out, err := e.procgate("reload"); err != nil {
			t.Fatalf("reload good policy: %v\n%s", err, out)
		}
	})

	t.Run("file change reloads", func(t *testing.T) {
		before := e.status().Generation
		e.writePolicy(strings.Replace(basePolicy, "[5432]", "[5432, 6432]", 1))
		e.waitGeneration(before, "policy file change")
		mustTry(t, db, "10.1.2.3:6432/tcp", probe.Allowed)
	})

	t.Run("revoke and restore", func(t *testing.T) {
		out, err := e.procgate("revoke", "--app", "db")
		if err != nil {
			t.Fatalf("revoke: %v\n%s", err, out)
		}
		// Denied as soon as revoke has returned.
		mustTry(t, db, "10.1.2.3:5432/tcp", probe.Denied)
		mustTry(t, db, "[fd00:1::7]:8080/tcp", probe.Denied)
		if out, err := e.procgate("revoke", "--app", "db", "--restore"); err != nil {
			t.Fatalf("restore: %v\n%s", err, out)
		}
		mustTry(t, db, "10.1.2.3:5432/tcp", probe.Allowed)
		if out, err := e.procgate("revoke", "--app", "db", "--grant", "1"); err != nil {
			t.Fatalf("revoke grant: %v\n%s", err, out)
		}
		mustTry(t, db, "10.1.2.3:5432/tcp", probe.Allowed)
		mustTry(t, db, "[fd00:1::7]:8080/tcp", probe.Denied)
		if out, err := e.procgate("revoke", "--app", "nosuch"); err == nil || !strings.Contains(out, "no app") {
			t.Fatalf("revoke of an unknown app: %v\n%s", err, out)
		}
		if out, err := e.procgate("revoke", "--app", "db", "--restore"); err != nil {
			t.Fatalf("restore: %v\n%s", err, out)
		}
	})

	t.Run("daemon killed: enforcement holds; restart adopts without a gap", func(t *testing.T) {
		type loop struct {
			p          *probe.Prober
			dest       string
			want       probe.Verdict
			tries, bad atomic.Int64
		}
		loops := []*loop{
			{p: db, dest: "10.1.2.3:5432/tcp", want: probe.Allowed},
			{p: unbound, dest: "10.1.2.3:5432/tcp", want: probe.Denied},
		}
		var stop atomic.Bool
		var wg sync.WaitGroup
		for _, l := range loops {
			d, _ := ruleset.ParseDest(l.dest)
			wg.Add(1)
			go func() {
				defer wg.Done()
				for !stop.Load() {
					v, err := l.p.Try(d, probe.Connect)
					if err != nil {
						t.Error(err)
						return
					}
					l.tries.Add(1)
					if v != l.want {
						l.bad.Add(1)
					}
				}
			}()
		}
		e.stopDaemon(syscall.SIGKILL)
		time.Sleep(200 * time.Millisecond) // attempts with no daemon at all
		e.startDaemon()
		time.Sleep(200 * time.Millisecond)
		stop.Store(true)
		wg.Wait()
		for _, l := range loops {
			if l.bad.Load() != 0 || l.tries.Load() == 0 {
				t.Errorf("%s: %d wrong of %d attempts across kill and restart", l.dest, l.bad.Load(), l.tries.Load())
			}
		}
		if st := e.status(); !st.Adopted {
			t.Errorf("restarted daemon did not adopt the pinned state: %+v", st)
		}
	})

	t.Run("uninstall detaches", func(t *testing.T) {
		e.stopDaemon(syscall.SIGTERM)
		mustTry(t, unbound, "10.1.2.3:5432/tcp", probe.Denied) // still pinned after a clean stop
		if out, err := e.procgate("uninstall", "--bpf-dir", e.bpfDir); err != nil {
			t.Fatalf("uninstall: %v\n%s", err, out)
		}
		mustTry(t, unbound, "10.1.2.3:5432/tcp", probe.Allowed)
	})
}

// nobody is the unprivileged caller of the launcher tests (Debian's uid 65534).
var nobody = &syscall.Credential{Uid: 65534, Gid: 65534}

// TestSecondDaemonExits: a daemon that finds another serving its socket
// says so and exits. It finds out after it started goroutines (the audit
// reader, the hasher, the watches), which must end with it: a daemon
// that waits for them forever fails the test at the test binary's
// -timeout.
func TestSecondDaemonExits(t *testing.T) {
	e := newE2E(t, basePolicy)
	cmd := exec.Command("nsenter", "--net="+e.netns, e.bin, "daemon", "--policy", e.policy, "--cgroup-root", nstest.Cgroup(t),
		"--state-dir", t.TempDir(), "--bpf-dir", filepath.Join(nstest.BPFFS(t), "procgate"), "--socket", e.socket)
	cmd.Env = append(os.Environ(), envAsMain+"=1")
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "another daemon is serving "+e.socket) {
		t.Errorf("second daemon on %s: %v; want it to exit saying another daemon serves it:\n%s", e.socket, err, out)
	}
}

func TestRunLauncher(t *testing.T) {
	// Guard gid 65533: nobody's own group, the default 65534, would leave
	// nobody unguarded.
	e := newE2EWith(t, `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: shell
    users: [nobody]
    allow:
      - to: 10.1.2.0/24
        ports: [22]
  - name: rootonly
    allow: []
  - name: pinned
    users: [nobody]
    exe: [/usr/bin/env]
  - name: vpn
    keep_caps: [net_admin]
    allow: []
  - name: debug
    users: [nobody]
    traceable: true
`, false, "--guard-gid", "65533")
	// real, effective, saved and filesystem gids, tab-separated.
	gids := []string{"grep", "^Gid:", "/proc/self/status"}
	// Bits 12 (net_admin) and 13 (net_raw) of the bounding set.
	bset := []string{"sh", "-c", `b=$(grep CapBnd /proc/self/status | cut -f2); echo "bits=$(( (0x$b >> 12) & 1 ))$(( (0x$b >> 13) & 1 ))"`}
	for _, tc := range []struct {
		name     string
		cred     *syscall.Credential
		env      []string
		args     []string
		wantCode int
		want     []string // in the output
		wantNot  []string
	}{
		{"nobody runs a listed app, in its cgroup", nobody, nil,
			[]string{"run", "--app", "shell", "--", "cat", "/proc/self/cgroup"}, 0,
			[]string{"procgate.apps/shell"}, nil},
		{"the child runs as the caller", nobody, nil,
			[]string{"run", "--app", "shell", "--", "id", "-u"}, 0, []string{"65534"}, nil},
		{"user not listed is refused", nobody, nil,
			[]string{"run", "--app", "rootonly", "--", "true"}, 125, []string{"nobody", "rootonly"}, nil},
		{"wrong binary is refused", nobody, nil,
			[]string{"run", "--app", "pinned", "--", "/bin/true"}, 126, []string{"/usr/bin/env"}, nil},
		{"pinned binary runs", nobody, nil,
			[]string{"run", "--app", "pinned", "--", "/usr/bin/env"}, 0, []string{"PATH="}, nil},
		{"loader variables are scrubbed", nobody, []string{"LD_PRELOAD=/tmp/evil.so", "LD_LIBRARY_PATH=/tmp", "GCONV_PATH=/tmp", "KEEP_ME=1"},
			[]string{"run", "--app", "pinned", "--", "/usr/bin/env"}, 0, []string{"KEEP_ME=1"}, []string{"\nLD_PRELOAD=", "\nLD_LIBRARY_PATH=", "\nGCONV_PATH="}},
		{"exit code relayed", nobody, nil,
			[]string{"run", "--app", "shell", "--", "sh", "-c", "exit 7"}, 7, nil, nil},
		{"root runs directly", nil, nil,
			[]string{"run", "--app", "rootonly", "--", "sh", "-c", "cat /proc/self/cgroup; exit 3"}, 3, []string{"procgate.apps/rootonly"}, nil},
		{"root launched: net_admin and net_raw out of the bounding set", nil, nil,
			append([]string{"run", "--app", "rootonly", "--"}, bset...), 0, []string{"bits=00"}, nil},
		{"keep_caps keeps net_admin", nil, nil,
			append([]string{"run", "--app", "vpn", "--"}, bset...), 0, []string{"bits=10"}, nil},
		{"launched for a user by the daemon: dropped too", nobody, nil,
			append([]string{"run", "--app", "shell", "--"}, bset...), 0, []string{"bits=00"}, nil},
		{"launched for a user: real gid is the guard's", nobody, nil,
			append([]string{"run", "--app", "shell", "--"}, gids...), 0, []string{"Gid:\t65533\t65534\t65534\t65534\n"}, nil},
		{"launched by root: real gid is the guard's", nil, nil,
			append([]string{"run", "--app", "rootonly", "--"}, gids...), 0, []string{"Gid:\t65533\t0\t0\t0\n"}, nil},
		{"traceable: no guard", nobody, nil,
			append([]string{"run", "--app", "debug", "--"}, gids...), 0, []string{"Gid:\t65534\t65534\t65534\t65534\n"}, nil},
		{"unknown app", nobody, nil,
			[]string{"run", "--app", "nosuch", "--", "true"}, 125, []string{"no app \"nosuch\""}, nil},
		// The launcher's own failures are 125, 126 and 127, apart from the
		// app's statuses.
		{"command not found: 127", nobody, nil,
			[]string{"run", "--app", "shell", "--", "no-such-command"}, 127, []string{"no-such-command"}, nil},
		{"command not found, as root: 127", nil, nil,
			[]string{"run", "--app", "rootonly", "--", "./no-such-command"}, 127, []string{"no-such-command"}, nil},
		{"not executable: 126", nobody, nil,
			[]string{"run", "--app", "shell", "--", "/etc/passwd"}, 126, []string{"/etc/passwd"}, nil},
		{"not executable, as root: 126", nil, nil,
			[]string{"run", "--app", "rootonly", "--", "/etc/passwd"}, 126, []string{"/etc/passwd"}, nil},
		{"bad flag: 125", nobody, nil,
			[]string{"run", "--no-such-flag", "--app", "shell", "--", "true"}, 125, []string{"no-such-flag"}, nil},
		{"no --app: 125", nobody, nil,
			[]string{"run", "--", "true"}, 125, []string{"--app"}, nil},
		{"no command: 125", nobody, nil,
			[]string{"run", "--app", "shell"}, 125, []string{"no command"}, nil},
		{"daemon unreachable: 125", nobody, nil,
			[]string{"--socket", "/nonexistent/procgate.sock", "run", "--app", "shell", "--", "true"}, 125, []string{"/nonexistent/procgate.sock"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := e.procgateAs(tc.cred, tc.env, tc.args...)
			code := 0
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tc.wantCode {
				t.Fatalf("exit code %d, want %d; output:\n%s", code, tc.wantCode, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			for _, w := range tc.wantNot {
				if strings.Contains(out, w) {
					t.Errorf("output has %q:\n%s", w, out)
				}
			}
		})
	}

	t.Run("signals relayed", func(t *testing.T) {
		for _, cred := range []*syscall.Credential{nobody, nil} {
			cmd := exec.Command(e.bin, "--socket", e.socket, "run", "--app", "shell", "--",
				"sh", "-c", `trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.05; done`)
			cmd.Env = append(os.Environ(), envAsMain+"=1")
			if cred != nil {
				cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
			}
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 6)
			if _, err := io.ReadFull(stdout, buf); err != nil || string(buf) != "ready\n" {
				t.Fatalf("child did not start: %q %v", buf, err)
			}
			_ = cmd.Process.Signal(syscall.SIGTERM)
			rest, _ := io.ReadAll(stdout)
			err = cmd.Wait()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 42 || !strings.Contains(string(rest), "got-term") {
				t.Fatalf("as %v: SIGTERM not relayed: %v, output %q", cred, err, rest)
			}
		}
	})

	t.Run("killed by a signal is relayed as that signal", func(t *testing.T) {
		out, err := e.procgateAs(nobody, nil, "run", "--app", "shell", "--", "sh", "-c", "kill -USR1 $$")
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("want the client killed by SIGUSR1, got %v\n%s", err, out)
		}
		ws := ee.Sys().(syscall.WaitStatus)
		if !ws.Signaled() || ws.Signal() != syscall.SIGUSR1 {
			t.Fatalf("client status %v, want killed by SIGUSR1\n%s", ws, out)
		}
	})

	t.Run("app processes hold the grant", func(t *testing.T) {
		// The launched process is what the kernel decides for: run the
		// dial command inside the app and outside, in the test netns.
		for _, tc := range []struct {
			app  string
			want string
		}{
			{"shell", "connection refused"}, // allowed: nothing listens, RST
			{"rootonly", "denied"},
		} {
			// Launched from the test's namespace: the launcher drops
			// CAP_SYS_ADMIN, so nothing in the app can enter one itself.
			var out string
			if err := nstest.InNS(t, e.netns, func() error {
				out, _ = e.procgateAs(nil, nil, "run", "--app", tc.app, "--", e.bin, "dial", "--timeout", "1s", "10.1.2.3:22")
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(out, tc.want) {
				t.Errorf("app %s dialing 10.1.2.3:22: want %q in:\n%s", tc.app, tc.want, out)
			}
		}
	})
}

// TestInterfaceRoutesAreInternal follows internal.interfaces: routes via the
// link are internal as soon as they appear, and no longer once removed or
// once the link goes. The poll is an hour away: only route and link events
// can meet the deadline.
func TestInterfaceRoutesAreInternal(t *testing.T) {
	// The daemon starts before wg0 exists, as when the VPN comes up later.
	e := newE2EWith(t, `version: 1
internal:
  prefixes: [10.0.0.0/8]
  interfaces: [wg0]
apps:
  - name: vpn-app
    allow:
      - to: 100.70.0.0/16
        ports: [443]
`, true, "--poll", "1h")
	ns := e.netns
	route := func(add bool, dst string) {
		t.Helper()
		args := []string{"--net=" + ns, "ip", "route", "add", dst, "dev", "wg0"}
		if !add {
			args[3] = "del"
		}
		if out, err := exec.Command("nsenter", args...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	for _, args := range [][]string{
		{"ip", "link", "add", "wg0", "type", "veth", "peer", "name", "wg0peer"},
		{"ip", "link", "set", "wg0", "up"},
		{"ip", "link", "set", "wg0peer", "up"},
	} {
		if out, err := exec.Command("nsenter", append([]string{"--net=" + ns}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	route(true, "100.70.0.0/16")
	unbound, app := e.prober(""), e.prober("vpn-app")
	waitVerdict := func(p *probe.Prober, dest string, want probe.Verdict) {
		t.Helper()
		d, _ := ruleset.ParseDest(dest)
		deadline := time.Now().Add(eventDeadline)
		for {
			got, err := p.Try(d, probe.Connect)
			if err != nil {
				t.Fatal(err)
			}
			if got == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: still %s after %v, want %s\n%s", dest, got, eventDeadline, want, e.daemonLog())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitVerdict(unbound, "100.70.1.1:443/tcp", probe.Denied)
	waitVerdict(app, "100.70.1.1:443/tcp", probe.Allowed)
	waitVerdict(unbound, "100.80.1.1:443/tcp", probe.Allowed)
	route(true, "100.80.0.0/16")
	waitVerdict(unbound, "100.80.1.1:443/tcp", probe.Denied)
	route(false, "100.70.0.0/16")
	waitVerdict(unbound, "100.70.1.1:443/tcp", probe.Allowed)
	out, err := e.procgate("status")
	if err != nil || !strings.Contains(out, "100.80.0.0/16") {
		t.Fatalf("status does not list the route's prefix as internal: %v\n%s", err, out)
	}
	// Routes go with their link.
	if out, err := exec.Command("nsenter", "--net="+ns, "ip", "link", "del", "wg0").CombinedOutput(); err != nil {
		t.Fatalf("ip link del wg0: %v\n%s", err, out)
	}
	waitVerdict(unbound, "100.80.1.1:443/tcp", probe.Allowed)
}

// restartLine is the demo's line for web.service's restart: the cgroup's
// id before and after.
var restartLine = regexp.MustCompile(`cgroup id [0-9]+ -> [0-9]+`)

// TestDemo runs `procgate demo` and checks it tells the story: the granted
// app reaches the internal service, the others are denied, a unit's
// service reaches its grant also after a restart, a name grant reaches
// what DNS answered for its name, the internet stays open,
// the events show the denials, and nothing is left behind.
func TestDemo(t *testing.T) {
	nstest.RequireRoot(t)
	t.Setenv(envAsMain, "1") // the demo re-executes this binary as procgate
	var out bytes.Buffer
	if err := demo.Run(context.Background(), &out); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	text := out.String()
	// Columns are compared with runs of spaces as one: a wider WHO must not
	// fail the story.
	spaces := regexp.MustCompile(` +`)
	flat := spaces.ReplaceAllString(text, " ")
	for _, want := range []string{
		"corp-db internal db 10.20.0.10:5432/tcp ALLOWED internal-db: hello 100.64.0.2",
		"corp-db internal db v6 [fd20::10]:5432/tcp ALLOWED",
		"corp-db internet web 198.51.100.10:80/tcp ALLOWED internet-web: hello",
		"browser internal db 10.20.0.10:5432/tcp DENIED EPERM",
		"browser internet web 198.51.100.10:80/tcp ALLOWED",
		// The service principal: its unit's process reaches its grant and
		// only that, a process of the same user (root) outside it is
		// denied, and after a restart (a new cgroup) the new process
		// reaches the grant at once.
		"unit web.service internal db 10.20.0.10:5432/tcp ALLOWED internal-db: hello 100.64.0.2",
		"unit web.service internal dns 10.20.0.10:5353/udp DENIED EPERM",
		"shell (no app) internal db 10.20.0.10:5432/tcp DENIED EPERM",
		// A name grant: reports reaches what the internal DNS answered it
		// for db.corp.example; browser, asking the same server, does not.
		"reports internal db db.corp.example:5432/tcp ALLOWED (10.20.0.10) internal-db: hello 100.64.0.2",
		"browser internal db db.corp.example:5432/tcp DENIED EPERM",
		"; unit web.service internal db 10.20.0.10:5432/tcp ALLOWED internal-db: hello 100.64.0.2",
		"web enforce unit web.service 1 ",
		"corp-db internal db 10.20.0.10:5432/tcp DENIED",
		"deny app=browser",
		"deny app=web ",
		"deny app=- ",
		"enforcing generation 1 on the cgroup subtree",
		"cleaned up",
	} {
		if !strings.Contains(flat, want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	if before, after, ok := strings.Cut(restartLine.FindString(text), " -> "); !ok || before == after {
		t.Errorf("demo output lacks the unit's new cgroup id after its restart (%q)", restartLine.FindString(text))
	}
	if t.Failed() {
		t.Logf("demo output:\n%s", text)
	}
	mount, err := cgroups.Mount()
	if err != nil {
		t.Fatal(err)
	}
	if left, _ := filepath.Glob(filepath.Join(mount, "procgate-demo-*")); len(left) > 0 {
		t.Errorf("demo left cgroups behind: %v", left)
	}
	if left, _ := filepath.Glob(filepath.Join(demo.BaseDir, "*")); len(left) > 0 {
		t.Errorf("demo left namespaces behind: %v", left)
	}
}

// TestAuditAndAPI checks what the audit trail and the API promise: allowed
// attempts logged for `audit: all`, a kernel rate limit per app, root-only
// operations refused to others, SIGHUP reloads, and /metrics.
func TestAuditAndAPI(t *testing.T) {
	metricsAddr := freeLoopbackPort(t)
	e := newE2EWith(t, `version: 1
internal:
  prefixes: [10.0.0.0/8]
audit:
  rate: 5
apps:
  - name: logged
    audit: all
    allow:
      - to: 10.1.0.0/16
        proto: tcp
        ports: [443]
  - name: noisy
    allow: []
`, false, "--metrics-addr", metricsAddr, "--poll", "1h")
	logged, noisy := e.prober("logged"), e.prober("noisy")

	t.Run("audit all logs allowed attempts", func(t *testing.T) {
		mustTry(t, logged, "10.1.2.3:443/tcp", probe.Allowed)
		waitEvent(t, e, `"verdict":"allow"`, `"app":"logged"`, `"dest":"10.1.2.3:443/tcp"`)
	})

	t.Run("kernel rate limit per app", func(t *testing.T) {
		for range 200 {
			mustTry(t, noisy, "10.1.2.3:443/tcp", probe.Denied)
		}
		st := e.status()
		var c api.Counters
		for _, a := range st.Apps {
			if a.Name == "noisy" {
				c = a.Counters
			}
		}
		// 200 denials in well under a few seconds at 5 events/s: most
		// must have been suppressed in the kernel, and counted.
		if c.Deny != 200 || c.AuditDrops < 150 {
			t.Fatalf("noisy: %d denials, %d audit events suppressed; want 200 and at least 150", c.Deny, c.AuditDrops)
		}
	})

	t.Run("root-only operations refuse other users", func(t *testing.T) {
		for _, args := range [][]string{
			{"revoke", "--app", "logged"},
			{"reload"},
		} {
			out, err := e.procgateAs(nobody, nil, args...)
			if err == nil || !strings.Contains(out, "needs root") {
				t.Errorf("%v as nobody: %v\n%s", args, err, out)
			}
		}
		if out, err := e.procgateAs(nobody, nil, "status"); err != nil {
			t.Errorf("status as nobody: %v\n%s", err, out)
		}
	})

	t.Run("SIGHUP reloads", func(t *testing.T) {
		// An edit is taken on its own (TestPolicyFollowsFileEvents); a
		// SIGHUP re-reads the file even when it did not change.
		y := strings.Replace(e.policyText(), "[443]", "[443, 8443]", 1)
		e.writePolicy(y)
		e.waitPolicy(sha(y), "an edit")
		before := e.status().Generation
		_ = e.daemon.Process.Signal(syscall.SIGHUP)
		e.waitGeneration(before, "SIGHUP")
		mustTry(t, logged, "10.1.2.3:8443/tcp", probe.Allowed)
	})

	t.Run("metrics", func(t *testing.T) {
		resp, err := http.Get("http://" + metricsAddr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		for _, want := range []string{
			`procgate_decisions_total{app="noisy",verdict="deny"} 200`,
			`procgate_decisions_total{app="logged",verdict="allow"}`,
			`procgate_audit_dropped_total{app="noisy",where="kernel"}`,
			"procgate_handover_guarded_connections ",
			"procgate_handover_unguarded_total 0",
			"procgate_handover_unmatched_total 0",
		} {
			if !strings.Contains(string(body), want) {
				t.Errorf("/metrics lacks %q:\n%s", want, body)
			}
		}
	})
}

func waitEvent(t *testing.T, e *e2e, wants ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, err := e.procgate("events", "--json", "--last", "0")
		if err != nil {
			t.Fatalf("events: %v\n%s", err, out)
		}
		for _, line := range strings.Split(out, "\n") {
			all := true
			for _, w := range wants {
				all = all && strings.Contains(line, w)
			}
			if all {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no event with %q in:\n%s", wants, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func freeLoopbackPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestExePinnedApp: the kernel and explain agree that only the app's
// binaries hold its grants.
func TestExePinnedApp(t *testing.T) {
	nstest.RequireRoot(t)
	// The policy pins the copy of the test binary that newE2E makes; the
	// original test binary is "another binary".
	e := newE2E(t, "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: pinned\n    exe: [/nonexistent/pin]\n    allow:\n      - to: 10.1.0.0/16\n")
	e.writePolicy(strings.Replace(e.policyText(), "/nonexistent/pin", e.bin, 1))
	if out, err := e.procgate("reload"); err != nil {
		t.Fatalf("reload: %v\n%s", err, out)
	}
	cg := filepath.Join(e.cgroup, "procgate.apps", "pinned")
	pinned, err := probe.StartExe(e.bin, cg, e.netns, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Close()
	other := e.prober("pinned") // the original test binary
	for _, tc := range []struct {
		name    string
		p       *probe.Prober
		want    probe.Verdict
		explain string
	}{
		{"pinned binary", pinned, probe.Allowed, "allow (granted)"},
		{"another binary in the app's cgroup", other, probe.Denied, "deny (exe-not-pinned)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mustTry(t, tc.p, "10.1.2.3:22/tcp", tc.want)
			out, err := e.procgate("explain", "--pid", fmt.Sprint(tc.p.Pid()), "10.1.2.3:22/tcp")
			if err != nil || !strings.Contains(out, tc.explain) {
				t.Fatalf("explain --pid: %v, want %q in:\n%s", err, tc.explain, out)
			}
		})
	}
	waitEvent(t, e, `"reason":"exe-not-pinned"`, `"app":"pinned"`)
}

const livePolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8, fd00::/8]
apps:
  - name: db
    allow:
      - to: 10.1.2.0/24
        proto: tcp
        ports: [5432]
      - to: fd00:1::/64
        ports: [443, 53]
      - to: 10.9.0.0/16
        proto: udp
        ports: [53]
  - name: other
    allow:
      - to: 10.1.2.0/24
        proto: tcp
        ports: [5432, 7000]
  - name: gone
    allow:
      - to: 10.0.0.0/8
`

// TestLiveSocketRevocation: revoke (a grant, all grants) and reloads (a
// grant removed, an app removed) end exactly the live sockets of the app
// whose destinations the new generation denies, TCP and connected UDP, IPv4,
// IPv6 and IPv4-mapped; the owner reads ECONNABORTED. External connections,
// connections the app accepted, and other apps' and non-apps' sockets stay;
// the CLI reports the count.
func TestLiveSocketRevocation(t *testing.T) {
	// The sweep walks the daemon's network namespace: run it in the test's.
	// No polling: each reload below is the one the CLI asks for.
	e := newE2EWith(t, livePolicy, true, "--poll", "1h")
	holder := func(dir string) *probe.Holder {
		t.Helper()
		h, err := probe.StartHolder(dir, e.netns)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.Close() })
		return h
	}
	open := func(h *probe.Holder, group, dest string, m probe.Method, n int) {
		t.Helper()
		if err := h.Open(group, dest, m, n); err != nil {
			t.Fatal(err)
		}
	}
	// Servers: a process of no app (outside procgate.apps), so that its
	// accepted connections are nobody's to lose.
	servers := holder(nstest.ChildCgroup(t, e.cgroup, "servers"))
	for _, a := range []string{"0.0.0.0:5432", "[::]:443", "0.0.0.0:80", "[::]:53/udp"} {
		if _, err := servers.Listen("serve", a); err != nil {
			t.Fatal(err)
		}
	}
	app := func(name string) string { return filepath.Join(e.cgroup, "procgate.apps", name) }
	db, other, gone := holder(app("db")), holder(app("other")), holder(app("gone"))
	open(db, "tcp4", "10.1.2.3:5432/tcp", probe.Connect, 3)
	open(db, "mapped", "10.1.2.4:5432/tcp", probe.Mapped, 1)
	open(db, "tcp6", "[fd00:1::5]:443/tcp", probe.Connect, 2)
	open(db, "udp4", "10.9.0.1:53/udp", probe.Connect, 2)
	open(db, "udp6", "[fd00:1::6]:53/udp", probe.Connect, 1)
	open(db, "external", "192.0.2.10:80/tcp", probe.Connect, 1)
	// other connects to a server db runs: db's side was accepted, not
	// made by db, and stays whatever db loses.
	bound, err := db.Listen("accepted", "10.1.2.3:7000")
	if err != nil {
		t.Fatal(err)
	}
	open(other, "todb", bound+"/tcp", probe.Connect, 2)
	if err := db.Await("accepted", 2); err != nil {
		t.Fatal(err)
	}
	open(other, "tcp4", "10.1.2.3:5432/tcp", probe.Connect, 2)
	open(gone, "tcp4", "10.1.2.3:5432/tcp", probe.Connect, 2)

	type group struct {
		h     *probe.Holder
		name  string
		n     int
		ended bool
	}
	groups := []*group{
		{h: db, name: "tcp4", n: 3}, {h: db, name: "mapped", n: 1}, {h: db, name: "tcp6", n: 2},
		{h: db, name: "udp4", n: 2}, {h: db, name: "udp6", n: 1}, {h: db, name: "external", n: 1},
		{h: db, name: "accepted", n: 2}, {h: other, name: "todb", n: 2}, {h: other, name: "tcp4", n: 2},
		{h: gone, name: "tcp4", n: 2},
	}
	check := func(when string) {
		t.Helper()
		for _, g := range groups {
			if err := g.h.Expect(g.name, g.n, g.ended); err != nil {
				t.Errorf("%s: %v", when, err)
			}
		}
	}
	end := func(h *probe.Holder, names ...string) {
		for _, g := range groups {
			if g.h == h && slices.Contains(names, g.name) {
				g.ended = true
			}
		}
	}
	check("before any revocation")

	for _, step := range []struct {
		name string
		do   func() (string, error)
		ends func()
		want string
	}{
		{
			name: "revoke --grant 0",
			do:   func() (string, error) { return e.procgate("revoke", "--app", "db", "--grant", "0") },
			ends: func() { end(db, "tcp4", "mapped") },
			want: "db: grant #0; generation 2 in force; 4 live sockets ended\n",
		},
		{
			name: "reload without grant #1",
			do: func() (string, error) {
				e.writePolicy(strings.Replace(livePolicy, "      - to: fd00:1::/64\n        ports: [443, 53]\n", "", 1))
				return e.procgate("reload")
			},
			ends: func() { end(db, "tcp6", "udp6") },
			want: "policy loaded: generation 3 in force; 3 live sockets ended\n",
		},
		{
			name: "revoke all of db",
			do:   func() (string, error) { return e.procgate("revoke", "--app", "db") },
			ends: func() { end(db, "udp4") },
			want: "db: all grants; generation 4 in force; 2 live sockets ended\n",
		},
		{
			name: "reload without the app gone",
			do: func() (string, error) {
				p := strings.Replace(livePolicy, "      - to: fd00:1::/64\n        ports: [443, 53]\n", "", 1)
				e.writePolicy(strings.Replace(p, "  - name: gone\n    allow:\n      - to: 10.0.0.0/8\n", "", 1))
				return e.procgate("reload")
			},
			ends: func() { end(gone, "tcp4") },
			want: "policy loaded: generation 5 in force; 2 live sockets ended\n",
		},
		{
			name: "restore db",
			do:   func() (string, error) { return e.procgate("revoke", "--app", "db", "--restore") },
			ends: func() {},
			want: "db: restored all grants; generation 6 in force; 0 live sockets ended\n",
		},
	} {
		out, err := step.do()
		if err != nil {
			t.Fatalf("%s: %v\n%s", step.name, err, out)
		}
		if out != step.want {
			t.Errorf("%s: said %q, want %q", step.name, out, step.want)
		}
		step.ends()
		check(step.name)
	}
	if log := e.daemonLog(); !strings.Contains(log, "live sockets ended") || !strings.Contains(log, "sockets_ended=3") {
		t.Errorf("the daemon did not log the sweeps:\n%s", log)
	}
}
