package bpf

import (
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

func TestMain(m *testing.M) {
	probe.MaybeServe()
	os.Exit(m.Run())
}

// world is a test cgroup with the enforcer attached, a cgroup per app name,
// and a network namespace in which every address is local.
type world struct {
	t       *testing.T
	root    string
	netns   string
	mount   string
	e       *Enforcer
	cgroups map[string]string // app name -> the cgroup its prober runs in
}

func newWorld(t *testing.T, apps ...string) *world {
	t.Helper()
	nstest.RequireRoot(t)
	mount, err := cgroups.Mount()
	if err != nil {
		t.Fatal(err)
	}
	w := &world{t: t, root: nstest.Cgroup(t), netns: nstest.NetNS(t), mount: mount, cgroups: map[string]string{}}
	nstest.AnyIPLoopback(t, w.netns)
	for i, app := range apps {
		dir := nstest.ChildCgroup(t, w.root, app)
		w.cgroups[app] = dir
		if i%2 == 1 {
			// Every other app's processes run two levels below the app
			// cgroup: the principal is found among the ancestors.
			dir = nstest.ChildCgroup(t, nstest.ChildCgroup(t, dir, "worker"), "deeper")
		}
		w.cgroups[app+"/run"] = dir
	}
	w.cgroups["/unbound"] = nstest.ChildCgroup(t, w.root, "unbound")
	bpffs := nstest.BPFFS(t)
	w.e, err = Open(Options{BPFDir: filepath.Join(bpffs, "procgate"), CgroupDir: w.root, Log: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		w.e.Close()
		if _, err := Uninstall(filepath.Join(bpffs, "procgate")); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	return w
}

// apply binds every app of rs that has a cgroup in the world and installs it,
// after opts had their say on the generation.
func (w *world) apply(rs *ruleset.Ruleset, opts ...func(*Generation)) uint32 {
	w.t.Helper()
	g := Generation{Rules: rs, AppIDs: appIDs(rs)}
	for _, a := range rs.Apps {
		dir, ok := w.cgroups[a.Name]
		if !ok {
			continue
		}
		id, err := cgroups.ID(dir)
		if err != nil {
			w.t.Fatal(err)
		}
		level, err := cgroups.Level(w.mount, dir)
		if err != nil {
			w.t.Fatal(err)
		}
		g.Bindings = append(g.Bindings, Binding{App: a.Name, CgroupID: id, Level: level})
	}
	for _, a := range rs.Apps {
		for _, x := range a.Exe {
			if id, err := FileIDOf(x.Path); err == nil {
				if g.Exes == nil {
					g.Exes = map[string][]FileID{}
				}
				g.Exes[a.Name] = append(g.Exes[a.Name], id)
			}
		}
	}
	for _, o := range opts {
		o(&g)
	}
	gen, err := w.e.Apply(g)
	if err != nil {
		w.t.Fatalf("apply: %v", err)
	}
	return gen
}

// allowPing lets every group of the world's namespace open ping sockets,
// which are off by default.
func (w *world) allowPing() {
	w.t.Helper()
	if err := nstest.InNS(w.t, w.netns, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ping_group_range", []byte("0 2147483647"), 0o644)
	}); err != nil {
		w.t.Fatal(err)
	}
}

func (w *world) prober(app string) *probe.Prober {
	w.t.Helper()
	dir := w.cgroups["/unbound"]
	if app != "" {
		dir = w.cgroups[app+"/run"]
	}
	p, err := probe.Start(dir, w.netns, nil)
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { p.Close() })
	return p
}

// methodsFor lists the syscall paths that reach a destination: connect for
// both protocols, sendto for UDP, and the IPv4-mapped forms for IPv4.
func methodsFor(d ruleset.Dest) []probe.Method {
	ms := []probe.Method{probe.Connect}
	if d.Proto == ruleset.UDP {
		ms = append(ms, probe.SendTo)
	}
	if d.Addr.Unmap().Is4() {
		ms = append(ms, probe.Mapped)
		if d.Proto == ruleset.UDP {
			ms = append(ms, probe.MappedSend)
		}
	}
	return ms
}

// TestKernelMatchesDecide is the decision equivalence test: on random
// policies and destinations, the verdict a real connect()/sendto() gets from
// the kernel equals ruleset.Decide (which `explain` uses) and the Go model of
// the encoding; for an app in audit mode, the attempt passes where they
// deny (Decision.Passes).
func TestKernelMatchesDecide(t *testing.T) {
	apps := []string{"appa", "appb", "appc"}
	w := newWorld(t, apps...)
	probers := map[string]*probe.Prober{"": w.prober("")}
	for _, a := range apps {
		probers[a] = w.prober(a)
	}
	// Processes in no app cgroup, of the uids randomRuleset's user apps
	// match (60000 + the app's index).
	byUID := map[uint32]*probe.Prober{}
	for i := range apps {
		byUID[uint32(60000+i)] = w.proberAs("/unbound", 60000+i)
	}
	// Before any policy, generation 0 means "no policy": fail closed.
	if v, err := probers["appa"].Try(ruleset.Dest{Addr: netip.MustParseAddr("192.0.2.1"), Proto: ruleset.TCP, Port: 80}, probe.Connect); err != nil || v != probe.Allowed {
		// Not attached yet: nothing enforces, so this must pass.
		t.Fatalf("before attach: %v %v", v, err)
	}
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	if v, err := probers["appa"].Try(ruleset.Dest{Addr: netip.MustParseAddr("192.0.2.1"), Proto: ruleset.TCP, Port: 80}, probe.Connect); err != nil || v != probe.Denied {
		t.Fatalf("attached without a policy: got %v %v, want denied (fail closed)", v, err)
	}

	rng := rand.New(rand.NewPCG(7, 11))
	const policies, dests = 50, 1000
	var checked, allowed, wouldDeny, binds int
	for p := range policies {
		rs := randomRuleset(rng, 1+rng.IntN(3))
		w.apply(rs)
		model := modelOf(t, rs, 0)
		for range dests {
			d := randomDest(rng)
			who := rng.IntN(len(apps) + 1 + len(byUID))
			var app string
			var pr *probe.Prober
			if who <= len(apps) {
				app = []string{"", "appa", "appb", "appc"}[who]
				pr = probers[app]
			} else {
				uid := uint32(60000 + who - len(apps) - 1)
				app, pr = rs.Principal("", uid, ""), byUID[uid]
			}
			ms := methodsFor(d)
			m := ms[rng.IntN(len(ms))]
			got, err := pr.Try(d, m)
			if err != nil {
				t.Fatal(err)
			}
			want := rs.Decide(app, d)
			if modelAllow, _ := model.decide(app, d); modelAllow != want.Allow || (modelAllow || model.auditOnly(app)) != want.Passes() {
				t.Fatalf("policy %d: model and Decide disagree on %s for %q", p, d, app)
			}
			if (got == probe.Allowed) != want.Passes() {
				t.Fatalf("policy %d, app %q, %s via %s: kernel %s, Decide %s\npolicy: %+v", p, app, d, m, got, want, rs)
			}
			checked++
			switch want.Verdict() {
			case ruleset.VerdictAllow:
				allowed++
			case ruleset.VerdictWouldDeny:
				wouldDeny++
			}
			// A bind to a port of 0-15 on loopback, one in ten attempts.
			if rng.IntN(10) == 0 {
				port := d.Port % 16
				b := ruleset.Dest{Addr: netip.MustParseAddr("127.0.0.1"), Proto: d.Proto, Port: port}
				bm := []probe.Method{probe.Bind, probe.MappedBind}[rng.IntN(2)]
				got, err := probers[app].Try(b, bm)
				if err != nil {
					t.Fatal(err)
				}
				want := rs.DecideBind(app, port)
				if mb := model.bind(app, port); mb != want.Allow || (mb || model.auditOnly(app)) != want.Passes() {
					t.Fatalf("policy %d: model and DecideBind disagree on a bind to %d for %q", p, port, app)
				}
				if (got == probe.Allowed) != want.Passes() {
					t.Fatalf("policy %d, app %q, bind %s via %s: kernel %s, DecideBind %s\npolicy: %+v", p, app, b, bm, got, want, rs)
				}
				binds++
			}
		}
	}
	t.Logf("%d attempts and %d binds on %d policies agreed (%d attempts allowed, %d would-deny, %d denied)",
		checked, binds, policies, allowed, wouldDeny, checked-allowed-wouldDeny)
	if allowed == 0 || wouldDeny == 0 || allowed+wouldDeny == checked {
		t.Fatalf("the random cases are one-sided (%d of %d allowed, %d would-deny): the test would not catch a constant verdict", allowed, checked, wouldDeny)
	}
}

// TestReloadIsAtomic reloads many times with unrelated changes while an
// allowed and a denied app connect in loops: no attempt may see anything but
// the verdict both generations agree on.
func TestReloadIsAtomic(t *testing.T) {
	w := newWorld(t, "granted", "other")
	target := ruleset.Dest{Addr: netip.MustParseAddr("10.9.0.1"), Proto: ruleset.TCP, Port: 5432}
	base := func(extra int) *ruleset.Ruleset {
		rs := &ruleset.Ruleset{
			Internal: []ruleset.InternalPrefix{{Prefix: netip.MustParsePrefix("10.0.0.0/8")}},
			Apps: []ruleset.App{
				{Name: "granted", Grants: []ruleset.Grant{{Prefix: netip.MustParsePrefix("10.9.0.0/24"), Proto: ruleset.TCP, Ports: []ruleset.PortRange{{Lo: 5432, Hi: 5432}}}}},
				{Name: "other"},
			},
		}
		// Unrelated changes: more internal prefixes and grants elsewhere.
		for i := range extra {
			pfx := netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 16, byte(i / 256), byte(i)}), 32)
			rs.Internal = append(rs.Internal, ruleset.InternalPrefix{Prefix: pfx})
			rs.Apps[1].Grants = append(rs.Apps[1].Grants, ruleset.Grant{Index: int32(i), Prefix: pfx, Proto: ruleset.Both, Ports: []ruleset.PortRange{{Lo: 1, Hi: 1000}}})
		}
		return rs
	}
	w.apply(base(0))
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	type loop struct {
		app   string
		want  probe.Verdict
		tries atomic.Int64
		wrong atomic.Int64
	}
	loops := []*loop{{app: "granted", want: probe.Allowed}, {app: "other", want: probe.Denied}, {app: "", want: probe.Denied}}
	var stop atomic.Bool
	var wg sync.WaitGroup
	for _, l := range loops {
		p := w.prober(l.app)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				v, err := p.Try(target, probe.Connect)
				if err != nil {
					t.Error(err)
					return
				}
				l.tries.Add(1)
				if v != l.want {
					l.wrong.Add(1)
				}
			}
		}()
	}
	const reloads = 1000
	for i := range reloads {
		w.apply(base(i % 50))
	}
	stop.Store(true)
	wg.Wait()
	for _, l := range loops {
		t.Logf("app %q: %d attempts during %d reloads, %d wrong", l.app, l.tries.Load(), reloads, l.wrong.Load())
		if l.wrong.Load() != 0 {
			t.Errorf("app %q saw %d wrong verdicts", l.app, l.wrong.Load())
		}
		if l.tries.Load() < reloads/10 {
			t.Errorf("app %q made only %d attempts: the loop did not overlap the reloads", l.app, l.tries.Load())
		}
	}
}

// TestMillionPrefixes checks the maps hold a policy of 1,000,000 internal
// prefixes and 100,000 grants, that it decides right, and that a reload of
// it replaces it whole.
func TestMillionPrefixes(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: large policy")
	}
	w := newWorld(t, "big")
	rs := &ruleset.Ruleset{Apps: []ruleset.App{{Name: "big"}}}
	for i := range 1_000_000 {
		// 10.x.y.z/32 for i in [0, 1M): 10.0.0.0 .. 10.15.66.63
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		rs.Internal = append(rs.Internal, ruleset.InternalPrefix{Prefix: netip.PrefixFrom(a, 32)})
		if i%10 == 0 {
			rs.Apps[0].Grants = append(rs.Apps[0].Grants, ruleset.Grant{Index: int32(i / 10), Prefix: netip.PrefixFrom(a, 32), Proto: ruleset.TCP, Ports: []ruleset.PortRange{{Lo: 443, Hi: 443}}})
		}
	}
	start := time.Now()
	w.apply(rs)
	t.Logf("applied 1,000,000 prefixes and 100,000 grants in %v", time.Since(start))
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	big, unbound := w.prober("big"), w.prober("")
	for _, tc := range []struct {
		p    *probe.Prober
		addr string
		port uint16
		want probe.Verdict
	}{
		{big, "10.0.0.10", 443, probe.Allowed},
		{big, "10.15.66.54", 443, probe.Allowed}, // i = 999,990
		{big, "10.15.66.61", 443, probe.Denied},  // internal, no grant
		{big, "10.0.0.10", 444, probe.Denied},
		{big, "10.15.66.64", 443, probe.Allowed}, // past the last internal prefix
		{unbound, "10.7.7.7", 443, probe.Denied},
	} {
		d := ruleset.Dest{Addr: netip.MustParseAddr(tc.addr), Proto: ruleset.TCP, Port: tc.port}
		if got, err := tc.p.Try(d, probe.Connect); err != nil || got != tc.want {
			t.Errorf("%s: got %v %v, want %v", d, got, err, tc.want)
		}
	}
	// Reload to a small policy: the big one must be gone, not merged.
	start = time.Now()
	w.apply(&ruleset.Ruleset{Internal: []ruleset.InternalPrefix{{Prefix: netip.MustParsePrefix("192.168.0.0/16")}}, Apps: []ruleset.App{{Name: "big"}}})
	w.apply(&ruleset.Ruleset{Internal: []ruleset.InternalPrefix{{Prefix: netip.MustParsePrefix("192.168.0.0/16")}}, Apps: []ruleset.App{{Name: "big"}}})
	t.Logf("replaced it twice with a small policy in %v", time.Since(start))
	if got, _ := unbound.Try(ruleset.Dest{Addr: netip.MustParseAddr("10.7.7.7"), Proto: ruleset.TCP, Port: 443}, probe.Connect); got != probe.Allowed {
		t.Errorf("old internal prefix still enforced after reload: %v", got)
	}
	if got, _ := unbound.Try(ruleset.Dest{Addr: netip.MustParseAddr("192.168.1.1"), Proto: ruleset.TCP, Port: 443}, probe.Connect); got != probe.Denied {
		t.Errorf("new internal prefix not enforced: %v", got)
	}
}

// testLogger sends the enforcer's log to the test log.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// TestBackstops tries the paths around connect() and UDP sendmsg(): ping
// sockets, raw sockets, another IP protocol, packet sockets. The egress
// backstop must stop what reaches an internal destination without a grant,
// sock_create must refuse raw and packet sockets inside app cgroups, and
// nothing may change for external destinations or accepted connections.
// Where BPF LSM loads, TUN devices are refused inside app cgroups as well.
func TestBackstops(t *testing.T) {
	w := newWorld(t, "granted", "other")
	w.allowPing()
	w.apply(&ruleset.Ruleset{
		Internal: []ruleset.InternalPrefix{{Prefix: netip.MustParsePrefix("10.0.0.0/8")}, {Prefix: netip.MustParsePrefix("fd00::/8")}},
		Apps: []ruleset.App{
			{Name: "granted", Grants: []ruleset.Grant{
				{Prefix: netip.MustParsePrefix("10.1.0.0/16"), Proto: ruleset.Both, Ports: []ruleset.PortRange{ruleset.AllPorts}},
				{Prefix: netip.MustParsePrefix("fd00:1::/64"), Proto: ruleset.Both, Ports: []ruleset.PortRange{ruleset.AllPorts}},
			}},
			{Name: "other"},
		},
	})
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	unbound, granted := w.prober(""), w.prober("granted")
	d := func(s string) ruleset.Dest { return ruleset.Dest{Addr: netip.MustParseAddr(s), Proto: ruleset.TCP} }
	for _, tc := range []struct {
		name string
		p    *probe.Prober
		m    probe.Method
		dest ruleset.Dest
		want probe.Verdict
	}{
		{"ping socket, unbound, internal", unbound, probe.Ping, d("10.1.2.3"), probe.Denied},
		{"ping socket, unbound, internal v6", unbound, probe.Ping, d("fd00:1::3"), probe.Denied},
		{"ping socket, unbound, external", unbound, probe.Ping, d("192.0.2.7"), probe.Allowed},
		{"ping socket, granted app: no grant covers ICMP", granted, probe.Ping, d("10.1.2.3"), probe.Denied},
		{"raw ICMP, unbound root, internal", unbound, probe.RawICMP, d("10.1.2.3"), probe.Denied},
		{"raw ICMPv6, unbound root, internal", unbound, probe.RawICMP, d("fd00:1::3"), probe.Denied},
		{"raw ICMP, unbound root, external", unbound, probe.RawICMP, d("192.0.2.7"), probe.Allowed},
		{"raw protocol 253, unbound root, internal", unbound, probe.RawProto, d("10.1.2.3"), probe.Denied},
		{"raw protocol 253, unbound root, external", unbound, probe.RawProto, d("192.0.2.7"), probe.Allowed},
		{"raw socket inside an app cgroup", granted, probe.RawICMP, d("192.0.2.7"), probe.Denied},
		{"packet socket inside an app cgroup", granted, probe.Packet, d("192.0.2.7"), probe.Denied},
		{"packet socket outside app cgroups", unbound, probe.Packet, d("192.0.2.7"), probe.Allowed},
		{"XDP socket inside an app cgroup", granted, probe.XDP, d("192.0.2.7"), probe.Denied},
		{"XDP socket outside app cgroups", unbound, probe.XDP, d("192.0.2.7"), probe.Allowed},
		{"TUN device inside an app cgroup", granted, probe.TUN, d("192.0.2.7"), probe.Denied},
		{"TUN device outside app cgroups", unbound, probe.TUN, d("192.0.2.7"), probe.Allowed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			guard := map[probe.Method]string{probe.Packet: "packet-sockets", probe.XDP: "packet-sockets", probe.TUN: "tun-devices"}[tc.m]
			if guard != "" && tc.want == probe.Denied {
				for _, g := range w.e.Guards() {
					if g.Name == guard && !g.Active {
						t.Skipf("kernel feature missing: BPF LSM programs do not load here (%s)", g.Why)
					}
				}
			}
			got, err := tc.p.Try(tc.dest, tc.m)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}

	t.Run("an unbound server answers a client at an internal address", func(t *testing.T) {
		// The server's SYN-ACK and data go to an internal address from a
		// socket of no app: an answer, not an attempt.
		// The server listens on an internal address; the (granted) client's
		// source address is then that address too, so every answer of the
		// unbound server goes to an internal destination.
		addr, wait, err := probe.StartServer(w.cgroups["/unbound"], w.netns, "10.1.9.9:0")
		if err != nil {
			t.Fatal(err)
		}
		ap := netip.MustParseAddrPort(addr)
		if got, err := granted.Try(ruleset.Dest{Addr: ap.Addr(), Proto: ruleset.TCP, Port: ap.Port()}, probe.Banner); err != nil || got != probe.Allowed {
			t.Fatalf("connect to the server: %v %v", got, err)
		}
		if err := wait(); err != nil {
			t.Fatalf("server: %v", err)
		}
	})
}

// TestExePinning: in an app with exe:, only processes running one of those
// binaries hold the grants; the same code from another file does not.
func TestExePinning(t *testing.T) {
	w := newWorld(t, "pinned", "elsewhere")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	grant := []ruleset.Grant{{Prefix: netip.MustParsePrefix("10.1.0.0/16"), Proto: ruleset.Both, Ports: []ruleset.PortRange{ruleset.AllPorts}}}
	w.apply(&ruleset.Ruleset{
		Internal: []ruleset.InternalPrefix{{Prefix: netip.MustParsePrefix("10.0.0.0/8")}},
		Apps: []ruleset.App{
			{Name: "pinned", Exe: []ruleset.Exe{{Path: self}}, Grants: grant},
			{Name: "elsewhere", Exe: []ruleset.Exe{{Path: "/bin/true"}}, Grants: grant},
		},
	})
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	// A copy of this binary: the same code, another file.
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	copyPath := filepath.Join(t.TempDir(), "prober-copy")
	if err := os.WriteFile(copyPath, data, 0o755); err != nil {
		t.Fatal(err)
	}
	copied, err := probe.StartExe(copyPath, w.cgroups["pinned/run"], w.netns, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer copied.Close()
	internal := ruleset.Dest{Addr: netip.MustParseAddr("10.1.2.3"), Proto: ruleset.TCP, Port: 443}
	external := ruleset.Dest{Addr: netip.MustParseAddr("192.0.2.1"), Proto: ruleset.TCP, Port: 443}
	for _, tc := range []struct {
		name string
		p    *probe.Prober
		d    ruleset.Dest
		want probe.Verdict
	}{
		{"the pinned binary holds the grant", w.prober("pinned"), internal, probe.Allowed},
		{"another binary in the same app cgroup does not", copied, internal, probe.Denied},
		{"an app pinned to another binary does not", w.prober("elsewhere"), internal, probe.Denied},
		{"outside internal prefixes exe does not matter", copied, external, probe.Allowed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, m := range []probe.Method{probe.Connect, probe.Mapped} {
				got, err := tc.p.Try(tc.d, m)
				if err != nil {
					t.Fatal(err)
				}
				if got != tc.want {
					t.Fatalf("%s via %s: got %s, want %s", tc.d, m, got, tc.want)
				}
			}
		})
	}
}

// TestVerdictCachesFollowGenerations: the egress backstop reuses verdicts
// (the hooks' handoff, a connected UDP socket's last datagram) only within
// the generation that made them. A connected UDP socket's datagrams pass no
// hook, so after a reload that revokes its grant (and no sweep) only the
// backstop stands between them and the destination.
func TestVerdictCachesFollowGenerations(t *testing.T) {
	w := newWorld(t, "granted", "other")
	const granted = "version: 1\ninternal:\n  prefixes: [10.0.0.0/8, fd00::/8]\napps:\n  - name: granted\n    allow:\n      - to: 10.1.0.0/16\n      - to: fd00:1::/64\n  - name: other\n"
	revoked := strings.Replace(granted, "      - to: 10.1.0.0/16\n      - to: fd00:1::/64\n", "      - to: 10.9.0.0/16\n", 1)
	// A peer for the datagrams: without one, ICMP port unreachable would
	// fail the next send on a connected socket.
	startServers(t, w.netns, []string{"[::]:5432"}, []string{"[::]:5000"})
	w.apply(mustPolicy(t, granted))
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	h := w.holder(w.cgroups["granted/run"])
	for _, dest := range []string{"10.1.2.3:5000/udp", "[fd00:1::3]:5000/udp", "[::ffff:10.1.2.4]:5000/udp"} {
		method := probe.Connect
		if strings.Contains(dest, "::ffff:") {
			method = probe.Mapped
			dest = "10.1.2.4:5000/udp"
		}
		mustOpen(t, h, dest, dest, method, 2)
	}
	send := func(when string, wantSent int, wantDenied int) {
		t.Helper()
		for _, group := range []string{"10.1.2.3:5000/udp", "[fd00:1::3]:5000/udp", "10.1.2.4:5000/udp"} {
			// Twice: the first datagram of a generation is decided in
			// full, the next one may come from the socket's cache.
			for range 2 {
				r, err := h.Send(group)
				if err != nil {
					t.Fatal(err)
				}
				if r.Sent != wantSent || r.Errors["EPERM"] != wantDenied {
					t.Fatalf("%s, %s: sent %d, errors %v; want %d sent, %d EPERM", when, group, r.Sent, r.Errors, wantSent, wantDenied)
				}
			}
		}
	}
	send("granted", 2, 0)
	w.apply(mustPolicy(t, revoked))
	send("after the revoking reload", 0, 2)
	w.apply(mustPolicy(t, granted))
	send("granted again", 2, 0)

	// TCP: the connect hook hands its verdict to the backstop for the SYN;
	// a new generation's verdicts are the new generation's.
	p := w.prober("granted")
	d := ruleset.Dest{Addr: netip.MustParseAddr("10.1.2.3"), Proto: ruleset.TCP, Port: 5432}
	for i, rs := range []string{granted, revoked, granted, revoked} {
		w.apply(mustPolicy(t, rs))
		want := probe.Allowed
		if i%2 == 1 {
			want = probe.Denied
		}
		for _, m := range []probe.Method{probe.Connect, probe.Mapped} {
			got, err := p.Try(d, m)
			if err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Fatalf("policy %d, %s: got %s, want %s", i, m, got, want)
			}
		}
	}
}

// TestPrincipalCacheFollowsGenerations: a process below its app's cgroup
// has its principal found by the ancestor walk, which is cached per cgroup
// for one generation (principal_cache), and by the hooks per CPU
// (principal_memo: the prober is pinned to one CPU). A reload that binds a cgroup
// between the app's and the process' to another app makes the process that
// app's at once, one that unbinds the app's cgroup makes it unbound, and one
// that restores the policy makes it the app's again: a cache that outlived
// its generation would keep the first answer.
func TestPrincipalCacheFollowsGenerations(t *testing.T) {
	w := newWorld(t, "top", "deep") // deep's prober runs two levels below its cgroup
	const policy = "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: top\n  - name: deep\n    allow:\n      - {to: 10.1.0.0/16, proto: tcp, ports: [5432]}\n"
	rs := mustPolicy(t, policy)
	startServers(t, w.netns, []string{"[::]:5432"}, nil)
	w.apply(rs)
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	p := w.prober("deep")
	pinToCPU0(t, p.Pid())
	d := ruleset.Dest{Addr: netip.MustParseAddr("10.1.2.3"), Proto: ruleset.TCP, Port: 5432}
	unbindDeep := func(g *Generation) {
		var keep []Binding
		for _, b := range g.Bindings {
			if b.App != "deep" {
				keep = append(keep, b)
			}
		}
		g.Bindings = keep
	}
	// The cgroup between deep's and the prober's bound to top (no grant):
	// the deepest app cgroup wins, so the prober becomes top's.
	worker := filepath.Join(w.cgroups["deep"], "worker")
	workerID, err := cgroups.ID(worker)
	if err != nil {
		t.Fatal(err)
	}
	workerLevel, err := cgroups.Level(w.mount, worker)
	if err != nil {
		t.Fatal(err)
	}
	workerToTop := func(g *Generation) {
		g.Bindings = append(g.Bindings, Binding{App: "top", CgroupID: workerID, Level: workerLevel})
	}
	for i, step := range []struct {
		opts []func(*Generation)
		want probe.Verdict
	}{
		{nil, probe.Allowed},
		{[]func(*Generation){workerToTop}, probe.Denied},
		{nil, probe.Allowed},
		{[]func(*Generation){unbindDeep}, probe.Denied},
		{nil, probe.Allowed},
	} {
		if i > 0 {
			w.apply(rs, step.opts...)
		}
		for range 2 { // the second attempt may come from the cache
			got, err := p.Try(d, probe.Connect)
			if err != nil {
				t.Fatal(err)
			}
			if got != step.want {
				t.Fatalf("step %d: connect from below deep's cgroup: %s, want %s", i, got, step.want)
			}
		}
	}
}

// TestSlotHoldsItsRules: a slot keeps the rules of the generation before the
// one in force, and Apply writes only what differs (diffRules): after each
// Apply, whatever the slot held before, and after a restart that adopts
// the pinned maps, the slot in force holds exactly its generation's rules.
func TestSlotHoldsItsRules(t *testing.T) {
	w := newWorld(t)
	rng := rand.New(rand.NewPCG(7, 14))
	policies := []*ruleset.Ruleset{randomRuleset(rng, 4), randomRuleset(rng, 4), randomRuleset(rng, 3)}
	for step, i := range []int{0, 1, 0, 2, 2, 1, -1, 0, 2} {
		if i < 0 {
			// A restart: the new enforcer knows nothing of the slots.
			if err := w.e.Close(); err != nil {
				t.Fatal(err)
			}
			var err error
			if w.e, err = Open(Options{BPFDir: w.e.opts.BPFDir, CgroupDir: w.root, Log: testLogger(t)}); err != nil {
				t.Fatal(err)
			}
			continue
		}
		rs := policies[i]
		w.apply(rs)
		// The trie is walked key by key: a walk while the background
		// refill inserts may see an entry twice.
		if err := w.e.waitClear(); err != nil {
			t.Fatal(err)
		}
		info, _, err := w.e.current()
		if err != nil {
			t.Fatal(err)
		}
		want, err := encode(Generation{Rules: rs, AppIDs: appIDs(rs)}, info.Slot)
		if err != nil {
			t.Fatal(err)
		}
		slotRules := func(slot uint32) []ruleEntry {
			var got []ruleEntry
			var k procgateRuleKey
			var v procgateRuleValue
			it := w.e.objs.Rules.Iterate()
			for it.Next(&k, &v) {
				if tagOrder(&k)>>31 == slot {
					got = append(got, ruleEntry{k, v})
				}
			}
			if err := it.Err(); err != nil {
				t.Fatal(err)
			}
			sortRules(got)
			return got
		}
		if got := slotRules(info.Slot); !slices.Equal(got, want.rules) {
			t.Fatalf("step %d (policy %d, slot %d): the slot holds %d entries, its generation %d:\n got %v\nwant %v",
				step, i, info.Slot, len(got), len(want.rules), got, want.rules)
		}
		// Once the background refill is done, the idle slot holds the
		// same rules (but the first generation's, which has no slot
		// before it to refill).
		if step == 0 {
			continue
		}
		idle := info.Slot ^ 1
		wantIdle := make([]ruleEntry, len(want.rules))
		for j, r := range want.rules {
			wantIdle[j] = ruleEntry{withSlot(r.key, idle), r.value}
		}
		if got := slotRules(idle); !slices.Equal(got, wantIdle) {
			t.Fatalf("step %d (policy %d): the idle slot %d holds %d entries after its refill, want %d:\n got %v\nwant %v",
				step, i, idle, len(got), len(wantIdle), got, wantIdle)
		}
	}
}

func TestDiffRules(t *testing.T) {
	e := func(tag uint32, last byte, tcp uint32) ruleEntry {
		k := ruleKey(0, tag, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, 0, last}), 32))
		return ruleEntry{key: k, value: procgateRuleValue{TcpCount: tcp}}
	}
	for _, tc := range []struct {
		name     string
		old, new []ruleEntry
		del      []procgateRuleKey
		put      []ruleEntry
	}{
		{name: "empty"},
		{name: "fresh", new: []ruleEntry{e(0, 1, 0), e(1, 1, 1)}, put: []ruleEntry{e(0, 1, 0), e(1, 1, 1)}},
		{name: "same", old: []ruleEntry{e(0, 1, 0), e(1, 1, 1)}, new: []ruleEntry{e(0, 1, 0), e(1, 1, 1)}},
		{name: "all gone", old: []ruleEntry{e(0, 1, 0), e(1, 1, 1)}, del: []procgateRuleKey{e(0, 1, 0).key, e(1, 1, 1).key}},
		{
			// A refilled slot shares the other slot's entries.
			name: "same, other slot's keys",
			old:  []ruleEntry{e(0, 1, 0), e(1, 1, 1)},
			new:  []ruleEntry{{withSlot(e(0, 1, 0).key, 1), e(0, 1, 0).value}, {withSlot(e(1, 1, 1).key, 1), e(1, 1, 1).value}},
		},
		{
			name: "changed value, one gone, one new",
			old:  []ruleEntry{e(0, 1, 0), e(0, 2, 0), e(1, 1, 1), e(2, 9, 1)},
			new:  []ruleEntry{e(0, 1, 0), e(1, 1, 2), e(1, 3, 1), e(2, 9, 1)},
			del:  []procgateRuleKey{e(0, 2, 0).key},
			put:  []ruleEntry{e(1, 1, 2), e(1, 3, 1)},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var del []procgateRuleKey
			var put []ruleEntry
			diffRules(tc.old, tc.new, func(e ruleEntry, d bool) {
				if d {
					del = append(del, e.key)
				} else {
					put = append(put, e)
				}
			})
			if !slices.Equal(del, tc.del) || !slices.Equal(put, tc.put) {
				t.Errorf("got delete %v, write %v; want %v, %v", del, put, tc.del, tc.put)
			}
		})
	}
}
