package bpf

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

const handoverPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8, fd00::/8]
apps:
  - name: db
    allow:
      - {to: 10.1.2.3, proto: tcp, ports: [5432, 5433]}
      - {to: "fd00:1::3", proto: tcp, ports: [5432]}
      - {to: 10.1.2.3, proto: udp, ports: [5353]}
  - name: other
    allow:
      - {to: 10.1.2.3, proto: tcp, ports: [5432]}
  - name: broker
    handover: allow
    allow:
      - {to: 10.1.2.3, proto: tcp, ports: [5432]}
      - {to: 10.1.2.3, proto: udp, ports: [5353]}
`

// TestHandoverGuard: a TCP connection or a connected UDP socket an app
// opened to an internal destination takes data from the app's processes
// only. For TCP: a TCP connection an app opened to an internal
// destination takes data from the app's processes only. Passed by
// SCM_RIGHTS to a process of no app or of another app, even one with the
// same grant, a write to it fails with EACCES, nothing is sent, and from
// then on the connection takes no data from anyone, the app included (the
// kernel keeps an sk_msg verdict of "drop" for the socket): a leaked
// connection is cut. The app's own processes, wherever in its cgroup tree,
// keep writing, and connections to external destinations are anyone's, as
// are those of an app whose policy says handover: allow. For UDP each
// datagram of a process outside the app is refused (EACCES by the BPF LSM
// socket_sendmsg program where the kernel loads it, else EPERM at the egress
// backstop) and the socket stays the app's.
func TestHandoverGuard(t *testing.T) {
	w := newWorld(t, "db", "other", "broker")
	rs := mustPolicy(t, handoverPolicy)
	gen := w.apply(rs)
	rd := w.attachWithEvents()
	ids := appIDs(rs)
	udpGuard := ""
	for _, g := range w.e.Guards() {
		// A kernel without a helper the programs call (6.1, 6.12) is a
		// missing feature; any other reason is a failure.
		missing := strings.Contains(g.Why, "unknown func") || strings.Contains(g.Why, "cannot use helper")
		switch {
		case g.Name == "tcp-handover" && !g.Active && missing:
			t.Skipf("kernel feature missing: %s", g.Why)
		case g.Name == "tcp-handover" && !g.Active:
			t.Fatalf("handover guard not active: %s", g.Why)
		case g.Name == "udp-handover" && !g.Active && missing:
			udpGuard = g.Why
		case g.Name == "udp-handover" && !g.Active:
			t.Fatalf("UDP handover guard not active: %s", g.Why)
		}
	}
	startServers(t, w.netns, []string{"[::]:5432", "0.0.0.0:80"}, []string{"[::]:5353"})
	db := w.holder(w.cgroups["db/run"])
	broker := w.holder(w.cgroups["broker/run"])
	receivers := map[string]*probe.Holder{
		"unbound":        w.holder(w.cgroups["/unbound"]),
		"other app":      w.holder(w.cgroups["other/run"]),
		"same app":       w.holder(w.cgroups["db/run"]),
		"app cgroup top": w.holder(w.cgroups["db"]),
	}
	dir := t.TempDir()
	tests := []struct {
		from           string // "": db
		receiver, dest string
		m              probe.Method
		n              int
		refused        bool
		app            uint32 // the writer's app in the audit event
	}{
		{"", "unbound", "10.1.2.3:5432/tcp", probe.Connect, 2, true, 0},
		{"", "unbound", "10.1.2.3:5432/tcp", probe.Mapped, 1, true, 0},
		{"", "unbound", "[fd00:1::3]:5432/tcp", probe.Connect, 1, true, 0},
		{"", "unbound", "192.0.2.10:80/tcp", probe.Connect, 1, false, 0},
		// Marked by a connect to an internal port that refused, then
		// connected to an external host: no app's internal connection.
		{"", "unbound", "10.1.2.3:5433/tcp>192.0.2.10:80/tcp", probe.Reconnect, 1, false, 0},
		{"", "other app", "10.1.2.3:5432/tcp", probe.Connect, 2, true, ids["other"]},
		{"", "same app", "10.1.2.3:5432/tcp", probe.Connect, 2, false, 0},
		{"", "same app", "[fd00:1::3]:5432/tcp", probe.Connect, 1, false, 0},
		{"", "app cgroup top", "10.1.2.3:5432/tcp", probe.Connect, 2, false, 0},
		{"broker", "unbound", "10.1.2.3:5432/tcp", probe.Connect, 2, false, 0},
		{"", "unbound", "10.1.2.3:5353/udp", probe.Connect, 2, true, 0},
		// An AF_INET6 socket connected to an IPv4-mapped address sends
		// through the IPv4 path with the address: sendmsg4 decides the
		// sender itself (see the event check below).
		{"", "unbound", "10.1.2.3:5353/udp", probe.Mapped, 1, true, 0},
		{"", "other app", "10.1.2.3:5353/udp", probe.Connect, 1, true, ids["other"]},
		{"", "same app", "10.1.2.3:5353/udp", probe.Connect, 1, false, 0},
		{"", "app cgroup top", "10.1.2.3:5353/udp", probe.Connect, 1, false, 0},
		{"broker", "unbound", "10.1.2.3:5353/udp", probe.Connect, 1, false, 0},
	}
	marked := 0 // connections the guard must watch at the end
	for i, tc := range tests {
		if tc.from == "" && strings.HasSuffix(tc.dest, "/tcp") && !strings.Contains(tc.dest, "192.0.2.") {
			marked += tc.n
		}
		t.Run(tc.from+"/"+tc.receiver+"/"+string(tc.m)+"/"+tc.dest, func(t *testing.T) {
			// The mapped form is refused by sendmsg4, with or without the
			// egress backstop's check.
			if udpGuard != "" && tc.refused && strings.HasSuffix(tc.dest, "/udp") && tc.m != probe.Mapped {
				t.Skipf("kernel feature missing: the UDP handover guard is not active here: %s", udpGuard)
			}
			group := fmt.Sprintf("c%d", i)
			db := db
			if tc.from == "broker" {
				db = broker
			}
			mustOpen(t, db, group, tc.dest, tc.m, tc.n)
			if res, err := db.Send(group); err != nil || res.Sent != tc.n {
				t.Fatalf("the app writing on its own connections: %+v %v", res, err)
			}
			r := receivers[tc.receiver]
			path := filepath.Join(dir, group)
			handOver(t, db, r, group, path, tc.n)
			drainEvents(t, rd)
			res, err := r.Send(group)
			if err != nil {
				t.Fatal(err)
			}
			after, err := db.Send(group)
			if err != nil {
				t.Fatal(err)
			}
			udp := strings.HasSuffix(tc.dest, "/udp")
			if tc.refused {
				errno, hook, reason := "EACCES", HookTCPSend, ruleset.ReasonHandover
				switch {
				case udp && w.e.udpMarks():
					// 6.1, 6.12: the BPF LSM program refuses the write,
					// before sendmsg4 for the mapped form.
					hook = HookUDPSend
				case udp && tc.m == probe.Mapped:
					errno, hook, reason = "EPERM", HookSendmsg4, ruleset.ReasonUnbound
				case udp:
					errno, hook = "EPERM", HookEgress4
				}
				if res.Sent != 0 || res.Errors[errno] != tc.n {
					t.Errorf("%s writing on the app's sockets: %+v, want all %d refused with %s", tc.receiver, res, tc.n, errno)
				}
				switch {
				// tcp_bpf keeps sk_msg's drop verdict for the socket (so on
				// 6.18): the connection is cut for everyone. A kernel that
				// ran the program again would let the app go on; either
				// way, all or nothing.
				case !udp && after.Sent != tc.n && after.Errors["EACCES"] != tc.n:
					t.Errorf("the app writing after %s tried: %+v, want all %d cut (EACCES) or all sent", tc.receiver, after, tc.n)
				case udp && after.Sent != tc.n:
					t.Errorf("the app writing after %s tried: %+v, want all %d sent: a UDP socket stays the app's", tc.receiver, after, tc.n)
				}
				// One event per connection: later writes meet the
				// kept verdict, not the program.
				want, _ := ruleset.ParseDest(tc.dest)
				n := 0
				evs := drainEvents(t, rd)
				for _, ev := range evs {
					if ev.Hook == hook && ev.Reason == reason && ev.AppID == tc.app && !ev.Allowed &&
						ev.Generation == gen && ev.Dest.Addr == want.Addr.Unmap() && ev.Dest.Port == want.Port {
						n++
					}
				}
				if n != tc.n {
					t.Errorf("%d %s events of hook %s for %s, want %d, among %+v", n, reason, hook, tc.dest, tc.n, evs)
				}
				return
			}
			if res.Sent != tc.n || after.Sent != tc.n {
				t.Errorf("%s writing: %+v, then the app: %+v; want all %d sent by both", tc.receiver, res, after, tc.n)
			}
		})
	}
	// Off host-wide (--udp-handover=false): the unbound process sends on
	// the app's connected UDP socket again.
	w.apply(rs, func(g *Generation) { g.NoUDPHandover = true })
	t.Run("udp check off/unbound", func(t *testing.T) {
		path := filepath.Join(dir, "off")
		mustOpen(t, db, "off", "10.1.2.3:5353/udp", probe.Connect, 1)
		r := receivers["unbound"]
		handOver(t, db, r, "off", path, 1)
		if res, err := r.Send("off"); err != nil || res.Sent != 1 {
			t.Errorf("unbound writing on the app's connected UDP socket with the check off: %+v %v, want sent", res, err)
		}
	})

	// One marked connection was established elsewhere (the reconnect).
	// The BPF LSM guard keeps no sockhash to count.
	st, ok, err := w.e.Handover()
	if want := (HandoverStats{Guarded: marked, Unmatched: 1}); w.e.lsmHandover.GuardHandoverLSM == nil && (err != nil || !ok || st != want) {
		t.Errorf("Handover() = %+v, %v, %v; want %+v", st, ok, err, want)
	}

	// --tcp-handover=auto (TrustTraceGuard): a connection of a process
	// under the trace guard (real gid apart from effective and saved) is
	// left to it, and takes anyone's data; one of a process open to
	// tracing (root's equal ids here, in an app with traceable: true,
	// which keeps the tracker attached: TestHandoverTracker) is guarded as
	// before.
	traceable := *rs
	traceable.Apps = slices.Clone(rs.Apps)
	traceable.Apps[0].Traceable = true // db
	w.apply(&traceable, func(g *Generation) { g.TrustTraceGuard = true })
	guarded, err := probe.StartHolderEnv(w.cgroups["db/run"], w.netns, probe.EnvRealGID+"=64999")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { guarded.Close() })
	for i, tc := range []struct {
		name    string
		from    *probe.Holder
		refused bool
	}{{"trace guarded", guarded, false}, {"open to tracing", db, true}} {
		t.Run("trust trace guard/"+tc.name, func(t *testing.T) {
			group, path := fmt.Sprintf("trust%d", i), filepath.Join(dir, fmt.Sprintf("trust%d", i))
			mustOpen(t, tc.from, group, "10.1.2.3:5432/tcp", probe.Connect, 1)
			r := receivers["unbound"]
			handOver(t, tc.from, r, group, path, 1)
			res, err := r.Send(group)
			switch {
			case err != nil:
				t.Fatal(err)
			case tc.refused && res.Errors["EACCES"] != 1:
				t.Errorf("unbound writing on the connection of a db process %s: %+v, want refused (EACCES)", tc.name, res)
			case !tc.refused && res.Sent != 1:
				t.Errorf("unbound writing on the connection of a db process %s: %+v, want sent (left to the trace guard)", tc.name, res)
			}
		})
	}
}

// TestUserAppHandover: a match.user app's processes share their cgroup
// with other users' processes, so the handover guard's shortcut for a
// writer in the socket's own cgroup must not pass them: a TCP connection
// the user's process opened to an internal destination takes data from
// another process of the same uid in that cgroup, and none from a process
// of another uid there (EACCES).
func TestUserAppHandover(t *testing.T) {
	w := newWorld(t)
	w.apply(unitPolicy())
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	for _, g := range w.e.Guards() {
		if g.Name == "tcp-handover" && !g.Active {
			t.Skipf("kernel feature missing: %s", g.Why)
		}
	}
	startServers(t, w.netns, []string{"0.0.0.0:80"}, nil)
	user := w.holderAs(w.cgroups["/unbound"], userUID)
	for i, tc := range []struct {
		name    string
		uid     int
		refused bool
	}{
		{"same uid", userUID, false},
		{"another uid", otherUID, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := w.holderAs(w.cgroups["/unbound"], tc.uid)
			group := fmt.Sprintf("user%d", i)
			// Abstract: no file another uid would need permission on;
			// both holders are in the world's network namespace.
			path := fmt.Sprintf("@procgate-test-handover-%d-%s", os.Getpid(), group)
			mustOpen(t, user, group, unitDests["backup"].String(), probe.Connect, 1)
			handOver(t, user, r, group, path, 1)
			res, err := r.Send(group)
			switch {
			case err != nil:
				t.Fatal(err)
			case tc.refused && (res.Sent != 0 || res.Errors["EACCES"] != 1):
				t.Errorf("a process of uid %d in the user app's cgroup writing on its connection: %+v, want refused (EACCES)", tc.uid, res)
			case !tc.refused && res.Sent != 1:
				t.Errorf("a process of the user app's uid writing on its connection: %+v, want sent", res)
			}
		})
	}
}

// handOver passes from's sockets of group to to by SCM_RIGHTS through
// the unix socket at path, and waits until to holds all n.
func handOver(t *testing.T, from, to *probe.Holder, group, path string, n int) {
	t.Helper()
	if err := to.Take(group, path); err != nil {
		t.Fatal(err)
	}
	if err := from.Give(group, path); err != nil {
		t.Fatal(err)
	}
	if err := to.Await(group, n); err != nil {
		t.Fatal(err)
	}
}
