package pinhole

import (
	"errors"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/pinholetest"
	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/ruleset"
)

func TestMain(m *testing.M) {
	pinholetest.Serve()
	os.Exit(m.Run())
}

// nextEvent reads events until want comes; a kernel that never sends it
// fails the test when the test binary's -timeout ends.
func nextEvent(t *testing.T, events <-chan Event, kind Kind, proto perimeter.Proto, port uint16) Event {
	t.Helper()
	for e := range events {
		if e.Kind == kind && e.Proto == proto && e.Local.Port() == port {
			return e
		}
		t.Logf("skipped event %s", e)
	}
	t.Fatalf("event stream ended before %s %s %d", kind, proto, port)
	return Event{}
}

// kernelRig is the pinhole programs on a test cgroup subtree (cg) whose
// child cgroup appDir is the dynamic app 7 (binding), and a test network
// namespace; everything goes with the test.
type kernelRig struct {
	k          *Kernel
	cg, appDir string
	binding    Binding
	ns         string
}

func newKernelRig(tb testing.TB, in *ruleset.Inbound, log *slog.Logger) kernelRig {
	tb.Helper()
	nstest.RequireRoot(tb)
	r := kernelRig{cg: nstest.Cgroup(tb)}
	r.appDir = nstest.ChildCgroup(tb, r.cg, "app")
	r.ns = nstest.NetNS(tb)
	var err error
	if r.k, err = OpenKernel(nstest.BPFFS(tb), r.cg, log); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { r.k.Close() })
	id, err := cgroups.ID(r.appDir)
	if err != nil {
		tb.Fatal(err)
	}
	r.binding = Binding{AppID: 7, CgroupID: id, Inbound: in}
	if err := r.k.SetApps([]Binding{r.binding}); err != nil {
		tb.Fatal(err)
	}
	return r
}

func TestKernelObservesAndGuards(t *testing.T) {
	in := &ruleset.Inbound{Control: []ruleset.PortRange{{Lo: 2121, Hi: 2121}}, Ports: []ruleset.PortRange{{Lo: 40000, Hi: 40010}}, Proto: ruleset.Both}
	r := newKernelRig(t, in, slog.Default())
	k, appDir, ns := r.k, r.appDir, r.ns
	other := nstest.ChildCgroup(t, r.cg, "other")
	events := make(chan Event, 64)
	go func() {
		defer close(events)
		for {
			e, err := k.Read()
			if err != nil {
				return
			}
			events <- e
		}
	}()

	// A process outside the app binding the same ports is not seen.
	bystander := pinholetest.Start(t, other, ns)
	bystander.Do("listen 40005")
	bystander.Do("bind 40005")

	srv := pinholetest.Start(t, appDir, ns)
	pid := srv.Do("pid")
	srv.Do("control 2121")
	c, err := nstest.DialIn(ns, "tcp", "127.0.0.1:2121", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctl := nextEvent(t, events, ControlOpen, perimeter.TCP, 2121)
	if want := c.LocalAddr().(interface{ AddrPort() netip.AddrPort }); ctl.Remote != want.AddrPort() || ctl.AppID != 7 || ctl.Local.Addr() != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("control open %s: want remote %s, app 7, local 127.0.0.1", ctl, want.AddrPort())
	}
	if got := ctl.TGID; itoa(got) != pid {
		t.Errorf("control open tgid %d, want the server's pid %s", got, pid)
	}

	srv.Do("listen 40001")
	tcpAux := nextEvent(t, events, AuxOpen, perimeter.TCP, 40001)
	srv.Do("bind 40002")
	udpAux := nextEvent(t, events, AuxOpen, perimeter.UDP, 40002)
	if itoa(tcpAux.TGID) != pid || itoa(udpAux.TGID) != pid {
		t.Errorf("aux opens %s, %s: want tgid %s", tcpAux, udpAux, pid)
	}

	// A restarted agent finds the sockets still there.
	var snap []Event
	if err := nstest.InNS(t, ns, func() (err error) { snap, err = k.Snapshot(); return err }); err != nil {
		t.Fatal(err)
	}
	for _, want := range []Event{ctl, tcpAux, udpAux} {
		if !slices.ContainsFunc(snap, func(e Event) bool {
			return e.Kind == want.Kind && e.Cookie == want.Cookie && e.Proto == want.Proto && e.Local.Port() == want.Local.Port() &&
				e.Remote == want.Remote && e.TGID == want.TGID && e.AppID == 7
		}) {
			t.Errorf("snapshot %v lacks %s", snap, want)
		}
	}
	if len(snap) != 3 {
		t.Errorf("snapshot %v: want the control connection and the two aux sockets only", snap)
	}

	// The host guard: nobody gets in before a hole, the hole's peer after.
	for _, tt := range []struct{ network, addr string }{{"tcp", "127.0.0.1:40001"}, {"udp", "127.0.0.1:40002"}} {
		if out, err := pinholetest.Exchange(ns, tt.network, tt.addr, 300*time.Millisecond); err == nil {
			t.Errorf("%s %s answered %q without a hole", tt.network, tt.addr, out)
		}
	}
	drops, err := k.Drops()
	if err != nil || drops == 0 {
		t.Errorf("host guard drops = %d, %v; want some", drops, err)
	}
	lo := netip.MustParseAddr("127.0.0.1")
	for _, h := range []perimeter.Key{{Peer: lo, Proto: perimeter.TCP, Host: lo, Port: 40001}, {Peer: lo, Proto: perimeter.UDP, Host: lo, Port: 40002}} {
		if err := k.Allow(h); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct{ network, addr, want string }{{"tcp", "127.0.0.1:40001", "data\n"}, {"udp", "127.0.0.1:40002", "ping\n"}} {
		if out, err := pinholetest.Exchange(ns, tt.network, tt.addr, 5*time.Second); err != nil || out != tt.want {
			t.Errorf("%s %s through the hole: %q, %v; want %q", tt.network, tt.addr, out, err, tt.want)
		}
	}
	// The socket view of use: a connection accepted on an auxiliary port
	// and still open is its peer's use; a listener or an unconnected UDP
	// socket alone is nobody's.
	held := perimeter.Key{Peer: lo, Proto: perimeter.TCP, Host: lo, Port: 40003}
	if err := k.Allow(held); err != nil {
		t.Fatal(err)
	}
	srv.Do("keep 40003")
	nextEvent(t, events, AuxOpen, perimeter.TCP, 40003)
	hc, err := nstest.DialIn(ns, "tcp", "127.0.0.1:40003", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	if _, err := hc.Read(make([]byte, 8)); err != nil { // accepted: the server wrote
		t.Fatal(err)
	}
	srv.Do("connect 40004 127.0.0.2:9")
	nextEvent(t, events, AuxOpen, perimeter.UDP, 40004)
	var uses []Use
	if err := nstest.InNS(t, ns, func() (err error) { uses, err = k.Uses(); return err }); err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(uses, func(x, y Use) int { return int(x.Port) - int(y.Port) })
	if want := []Use{{Proto: perimeter.TCP, Peer: lo, Port: 40003}, {Proto: perimeter.UDP, Peer: netip.MustParseAddr("127.0.0.2"), Port: 40004}}; !slices.Equal(uses, want) {
		t.Errorf("uses %v, want %v (the held connection and the connected UDP socket only)", uses, want)
	}
	if err := nstest.InNS(t, ns, func() (err error) { snap, err = k.Snapshot(); return err }); err != nil || len(snap) != 5 {
		t.Errorf("snapshot with a held connection: %v, %v; want the control connection and four aux sockets", snap, err)
	}
	srv.Do("close 40004")
	nextEvent(t, events, AuxClose, perimeter.UDP, 40004)

	// A policy without the app (or the port) leaves its sockets unguarded.
	udpHole := perimeter.Key{Peer: lo, Proto: perimeter.UDP, Host: lo, Port: 40002}
	if err := k.Revoke(udpHole); err != nil {
		t.Fatal(err)
	}
	if out, err := pinholetest.Exchange(ns, "udp", "127.0.0.1:40002", 300*time.Millisecond); err == nil {
		t.Errorf("udp answered %q after the hole was revoked", out)
	}
	if err := k.SetApps(nil); err != nil {
		t.Fatal(err)
	}
	if out, err := pinholetest.Exchange(ns, "udp", "127.0.0.1:40002", 5*time.Second); err != nil || out != "ping\n" {
		t.Errorf("udp of an app no longer dynamic: %q, %v; want it unguarded", out, err)
	}
	if err := k.SetApps([]Binding{r.binding}); err != nil {
		t.Fatal(err)
	}

	// The bystander's sockets are not guarded.
	if out, err := pinholetest.Exchange(ns, "tcp", "127.0.0.1:40005", 5*time.Second); err != nil {
		t.Errorf("bystander's port: %q, %v", out, err)
	}

	srv.Do("close 40001")
	if e := nextEvent(t, events, AuxClose, perimeter.TCP, 40001); e.Cookie != tcpAux.Cookie {
		t.Errorf("aux close cookie %d, want the listen's %d", e.Cookie, tcpAux.Cookie)
	}
	srv.Kill() // a crash releases the rest, in no particular order
	want := map[uint64]Kind{udpAux.Cookie: AuxClose, ctl.Cookie: ControlClose}
	for e := range events {
		if want[e.Cookie] == e.Kind {
			delete(want, e.Cookie)
			if len(want) == 0 {
				break
			}
			continue
		}
		t.Logf("skipped event %s", e)
	}
	if len(want) > 0 {
		t.Errorf("no close events for %v", want)
	}
}

func itoa(v uint32) string { return strconv.FormatUint(uint64(v), 10) }

// TestKernelClose: Close ends a Read that waits and waits for the calls
// in flight; a call after it fails with ErrClosed instead of using a
// closed handle (the daemon's API and metrics may still read counters
// while it stops, the agent's reader may read once more).
func TestKernelClose(t *testing.T) {
	in := &ruleset.Inbound{Control: []ruleset.PortRange{{Lo: 2121, Hi: 2121}}, Ports: []ruleset.PortRange{{Lo: 40000, Hi: 40010}}, Proto: ruleset.Both}
	r := newKernelRig(t, in, slog.Default())
	k := r.k
	read := make(chan error, 1)
	go func() {
		_, err := k.Read()
		read <- err
	}()
	counting := make(chan error, 1)
	go func() {
		for {
			if _, err := k.Drops(); err != nil {
				counting <- err
				return
			}
		}
	}()
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-read; err == nil {
		t.Error("a Read waiting when Close came returned an event")
	}
	if err := <-counting; !errors.Is(err, ErrClosed) {
		t.Errorf("Drops in a loop through Close ended with %v, want ErrClosed", err)
	}
	lo := netip.MustParseAddr("127.0.0.1")
	hole := perimeter.Key{Peer: lo, Proto: perimeter.TCP, Host: lo, Port: 40001}
	for _, c := range []struct {
		name string
		call func() error
	}{
		{"Read", func() error { _, err := k.Read(); return err }},
		{"SetApps", func() error { return k.SetApps([]Binding{r.binding}) }},
		{"Allow", func() error { return k.Allow(hole) }},
		{"Revoke", func() error { return k.Revoke(hole) }},
		{"Reset", k.Reset},
		{"Release", func() error { return k.Release(r.binding.AppID, 1) }},
		{"Held", func() error { _, err := k.Held(); return err }},
		{"Drops", func() error { _, err := k.Drops(); return err }},
		{"Snapshot", func() error { _, err := k.Snapshot(); return err }},
		{"Uses", func() error { _, err := k.Uses(); return err }},
	} {
		if err := c.call(); !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", c.name, err)
		}
	}
	if err := k.Close(); err != nil {
		t.Errorf("a second Close: %v", err)
	}
}

// TestKernelRestartDeletesStale: a restarted daemon's kernel starts from
// the ports and apps the last run left pinned, so its first SetApps
// deletes those its policy no longer lists (a port left listed stays
// guarded, its peers dropped, for ever).
func TestKernelRestartDeletesStale(t *testing.T) {
	nstest.RequireRoot(t)
	first := &ruleset.Inbound{Control: []ruleset.PortRange{{Lo: 2121, Hi: 2121}}, Ports: []ruleset.PortRange{{Lo: 40000, Hi: 40001}}, Proto: ruleset.Both}
	moved := &ruleset.Inbound{Control: []ruleset.PortRange{{Lo: 2121, Hi: 2121}}, Ports: []ruleset.PortRange{{Lo: 41000, Hi: 41000}}, Proto: ruleset.UDP}
	for _, tc := range []struct {
		name string
		now  *ruleset.Inbound // nil: the app is no longer dynamic
		// ports and apps are what the pinned maps must hold after the
		// restart's first SetApps.
		ports, apps int
	}{
		{name: "app gone", now: nil, ports: 0, apps: 0},
		{name: "ports moved", now: moved, ports: 2, apps: 1},
		{name: "unchanged", now: first, ports: 5, apps: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cg := nstest.Cgroup(t)
			id, err := cgroups.ID(nstest.ChildCgroup(t, cg, "app"))
			if err != nil {
				t.Fatal(err)
			}
			bpfDir := nstest.BPFFS(t)
			log := slog.New(slog.DiscardHandler)
			k, err := OpenKernel(bpfDir, cg, log)
			if err != nil {
				t.Fatal(err)
			}
			if err := k.SetApps([]Binding{{AppID: 7, CgroupID: id, Inbound: first}}); err != nil {
				t.Fatal(err)
			}
			k.Close()

			k, err = OpenKernel(bpfDir, cg, log)
			if err != nil {
				t.Fatal(err)
			}
			defer k.Close()
			var now []Binding
			if tc.now != nil {
				now = []Binding{{AppID: 7, CgroupID: id, Inbound: tc.now}}
			}
			if err := k.SetApps(now); err != nil {
				t.Fatal(err)
			}
			pinned := Kernel{objs: k.objs}
			if err := pinned.readPinned(); err != nil {
				t.Fatal(err)
			}
			if len(pinned.ports) != tc.ports || !maps.Equal(pinned.ports, k.ports) {
				t.Errorf("pinhole_ports holds %v; want the %d the policy lists: %v", pinned.ports, tc.ports, k.ports)
			}
			if len(pinned.apps) != tc.apps || !maps.Equal(pinned.apps, k.apps) {
				t.Errorf("pinhole_apps holds %v; want the %d the policy lists: %v", pinned.apps, tc.apps, k.apps)
			}
		})
	}
}
