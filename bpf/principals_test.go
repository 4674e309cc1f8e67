package bpf

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

// everyonePolicy grants everyone DNS at one internal resolver per family.
const everyonePolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8, fd00::/8]
everyone:
  allow:
    - to: 10.0.0.53
      proto: udp
      ports: [53]
    - to: fd00::53
      proto: udp
      ports: [53]
apps:
  - name: granted
    allow:
      - to: 10.1.0.0/16
  - name: other
`

// tryAll checks one destination by every syscall path that reaches it.
func tryAll(t *testing.T, p *probe.Prober, dest string, want probe.Verdict) {
	t.Helper()
	d, err := ruleset.ParseDest(dest)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range methodsFor(d) {
		got, err := p.Try(d, m)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("%s via %s: got %s, want %s", dest, m, got, want)
		}
	}
}

// TestEveryone: a process of no app, and an app's process without a grant
// of its own, reach an everyone grant and only it; connected UDP sockets
// (whose datagrams only the egress backstop sees) too, within the
// generation that grants it.
func TestEveryone(t *testing.T) {
	w := newWorld(t, "granted", "other")
	startServers(t, w.netns, nil, []string{"[::]:53"})
	w.apply(mustPolicy(t, everyonePolicy))
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	unbound, granted, other := w.prober(""), w.prober("granted"), w.prober("other")
	for _, tc := range []struct {
		name string
		p    *probe.Prober
		dest string
		want probe.Verdict
	}{
		{"unbound reaches the everyone grant", unbound, "10.0.0.53:53/udp", probe.Allowed},
		{"unbound reaches the everyone grant, v6", unbound, "[fd00::53]:53/udp", probe.Allowed},
		{"unbound: not another protocol", unbound, "10.0.0.53:53/tcp", probe.Denied},
		{"unbound: not another port", unbound, "10.0.0.53:54/udp", probe.Denied},
		{"unbound: not another internal address", unbound, "10.0.0.54:53/udp", probe.Denied},
		{"unbound: not another internal address, v6", unbound, "[fd00::54]:53/udp", probe.Denied},
		{"an app without grants reaches it", other, "10.0.0.53:53/udp", probe.Allowed},
		{"an app without grants: nothing else", other, "10.1.2.3:53/udp", probe.Denied},
		{"an app with grants reaches it too", granted, "10.0.0.53:53/udp", probe.Allowed},
		{"and its own grants", granted, "10.1.2.3:443", probe.Allowed},
		{"external stays open", unbound, "192.0.2.1:443", probe.Allowed},
	} {
		t.Run(tc.name, func(t *testing.T) { tryAll(t, tc.p, tc.dest, tc.want) })
	}

	// A resolver's connected UDP socket: only the first datagram passes a
	// hook, the next ones only the egress backstop. When a reload moves
	// the grant elsewhere, both the lookup cache (dest_lookups, under
	// everyone's id) and the backstop's verdict caches must follow the
	// generation: the next datagram is refused.
	moved := strings.Replace(everyonePolicy, "to: 10.0.0.53\n", "to: 10.0.0.54\n", 1)
	moved = strings.Replace(moved, "to: fd00::53\n", "to: fd00::54\n", 1)
	h := w.holder(w.cgroups["/unbound"])
	for _, dest := range []string{"10.0.0.53:53/udp", "[fd00::53]:53/udp"} {
		mustOpen(t, h, dest, dest, probe.Connect, 1)
	}
	send := func(when string, wantSent, wantDenied int) {
		t.Helper()
		for _, group := range []string{"10.0.0.53:53/udp", "[fd00::53]:53/udp"} {
			for range 2 { // the first of a generation decided in full, the next maybe from a cache
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
	send("granted to everyone", 1, 0)
	w.apply(mustPolicy(t, moved))
	send("after the grant moved", 0, 1)
	tryAll(t, unbound, "10.0.0.53:53/udp", probe.Denied)
	tryAll(t, unbound, "10.0.0.54:53/udp", probe.Allowed)
	w.apply(mustPolicy(t, everyonePolicy))
	send("granted again", 1, 0)
	tryAll(t, unbound, "10.0.0.53:53/udp", probe.Allowed)
	tryAll(t, unbound, "10.0.0.54:53/udp", probe.Denied)
}

// TestEveryoneEncoded: everyone grants go under the reserved app id, and
// the generation flag that lets the kernel ask them is set only when there
// are some.
func TestEveryoneEncoded(t *testing.T) {
	rs := mustPolicy(t, everyonePolicy)
	tb, err := encode(Generation{Rules: rs, AppIDs: appIDs(rs)}, 1)
	if err != nil {
		t.Fatal(err)
	}
	if tb.info.Flags&genEveryone == 0 {
		t.Fatal("a generation with everyone grants lacks GEN_EVERYONE")
	}
	if _, ok := tb.rule(ruleKey(1, everyoneID, netip.MustParsePrefix("10.0.0.53/32"))); !ok {
		t.Fatal("everyone grant 10.0.0.53 not under the reserved app id")
	}
	rs.Everyone = nil
	if tb, _ = encode(Generation{Rules: rs, AppIDs: appIDs(rs)}, 1); tb.info.Flags&genEveryone != 0 {
		t.Fatal("GEN_EVERYONE without everyone grants: every denial would pay a lookup")
	}
}

// sandboxPolicy has a sandbox with grants inside and outside internal
// prefixes, one without loopback, and an app left outside: allow.
const sandboxPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8, fd00::/8]
everyone:
  allow:
    - to: 10.0.0.53
      proto: udp
      ports: [53]
apps:
  - name: box
    outside: deny
    allow:
      - to: 192.0.2.10
        ports: [443]
      - to: 2001:db8::10
        ports: [443]
      - to: 10.1.0.0/16
        proto: tcp
        ports: [5432]
  - name: sealed
    outside: deny
    loopback: deny
  - name: free
`

// TestSandbox: an outside: deny app reaches its grants wherever they
// point, everyone's, loopback unless loopback: deny, and nothing else, by
// every path: connect, sendto, IPv4-mapped IPv6, ping sockets and a
// connected UDP socket's datagrams (which only the egress backstop sees).
func TestSandbox(t *testing.T) {
	w := newWorld(t, "box", "sealed", "free")
	w.allowPing()
	startServers(t, w.netns, nil, []string{"[::]:443"})
	w.apply(mustPolicy(t, sandboxPolicy))
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	box, sealed, free := w.prober("box"), w.prober("sealed"), w.prober("free")
	for _, tc := range []struct {
		name string
		p    *probe.Prober
		dest string
		want probe.Verdict
	}{
		{"granted internet address", box, "192.0.2.10:443", probe.Allowed},
		{"granted internet address, udp", box, "192.0.2.10:443/udp", probe.Allowed},
		{"granted internet address, v6", box, "[2001:db8::10]:443", probe.Allowed},
		{"another internet address", box, "192.0.2.11:443", probe.Denied},
		{"another internet address, udp", box, "198.51.100.1:53/udp", probe.Denied},
		{"another internet address, v6", box, "[2001:db8::11]:443", probe.Denied},
		{"the granted address, another port", box, "192.0.2.10:80", probe.Denied},
		{"granted internal", box, "10.1.2.3:5432", probe.Allowed},
		{"other internal", box, "10.2.0.1:5432", probe.Denied},
		{"everyone's grant", box, "10.0.0.53:53/udp", probe.Allowed},
		{"loopback", box, "127.0.0.1:80", probe.Allowed},
		{"loopback v6", box, "[::1]:80", probe.Allowed},
		{"loopback, udp", box, "127.0.0.53:53/udp", probe.Allowed},
		{"loopback: deny", sealed, "127.0.0.1:80", probe.Denied},
		{"loopback: deny, v6", sealed, "[::1]:80", probe.Denied},
		{"loopback: deny, the unspecified address", sealed, "0.0.0.0:80", probe.Denied},
		{"loopback: deny, the unspecified address v6", sealed, "[::]:80", probe.Denied},
		{"loopback: deny, udp", sealed, "127.0.0.53:53/udp", probe.Denied},
		{"loopback: deny keeps everyone's grant", sealed, "10.0.0.53:53/udp", probe.Allowed},
		{"loopback: deny, internet", sealed, "192.0.2.10:443", probe.Denied},
		{"outside: allow is untouched", free, "192.0.2.11:443", probe.Allowed},
	} {
		t.Run(tc.name, func(t *testing.T) { tryAll(t, tc.p, tc.dest, tc.want) })
	}
	t.Run("ping sockets", func(t *testing.T) {
		for _, tc := range []struct {
			p    *probe.Prober
			addr string
			want probe.Verdict
		}{
			{box, "198.51.100.1", probe.Denied},
			{box, "2001:db8::11", probe.Denied},
			{box, "127.0.0.1", probe.Allowed},
			{sealed, "127.0.0.1", probe.Denied},
			{free, "198.51.100.1", probe.Allowed},
		} {
			got, err := tc.p.Try(ruleset.Dest{Addr: netip.MustParseAddr(tc.addr), Proto: ruleset.TCP}, probe.Ping)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("ping %s: got %s, want %s", tc.addr, got, tc.want)
			}
		}
	})

	// A connected UDP socket to a granted internet address: after a reload
	// that moves the grant, the backstop refuses its datagrams.
	moved := strings.Replace(sandboxPolicy, "to: 192.0.2.10\n", "to: 192.0.2.12\n", 1)
	h := w.holder(w.cgroups["box/run"])
	mustOpen(t, h, "udp", "192.0.2.10:443/udp", probe.Connect, 1)
	mustOpen(t, h, "mapped", "192.0.2.10:443/udp", probe.Mapped, 1)
	send := func(when string, wantSent, wantDenied int) {
		t.Helper()
		for _, group := range []string{"udp", "mapped"} {
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
	send("granted", 1, 0)
	w.apply(mustPolicy(t, moved))
	send("after the grant moved", 0, 1)
	w.apply(mustPolicy(t, sandboxPolicy))
	send("granted again", 1, 0)
}

const listenPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: web
    listen: [8080, 9000-9001]
  - name: agent
    listen: [0, 8443]
  - name: client
    listen: []
  - name: free
`

// TestListen: an app with listen: binds only the ports it lists, TCP and
// UDP, IPv4, IPv6 and IPv4-mapped; port 0 only when listed; a refused bind
// says EACCES and sends an audit event. Apps without listen: and processes
// of no app bind anything.
func TestListen(t *testing.T) {
	w := newWorld(t, "web", "agent", "client", "free")
	rd := w.attachWithEvents()
	gen := w.apply(mustPolicy(t, listenPolicy))
	web, agent, client, free, unbound := w.prober("web"), w.prober("agent"), w.prober("client"), w.prober("free"), w.prober("")
	ids := appIDs(mustPolicy(t, listenPolicy))
	for _, tc := range []struct {
		name string
		p    *probe.Prober
		app  string
		addr string
		port uint16
		want probe.Verdict
	}{
		{"a listed port", web, "web", "127.0.0.1", 8080, probe.Allowed},
		{"a listed port, v6", web, "web", "::1", 8080, probe.Allowed},
		{"a port of a listed range", web, "web", "0.0.0.0", 9001, probe.Allowed},
		{"an unlisted port", web, "web", "127.0.0.1", 8081, probe.Denied},
		{"an unlisted port, v6", web, "web", "::", 8081, probe.Denied},
		{"an ephemeral port, 0 not listed", web, "web", "127.0.0.1", 0, probe.Denied},
		{"an ephemeral port, 0 listed", agent, "agent", "127.0.0.1", 0, probe.Allowed},
		{"an ephemeral port, 0 listed, v6", agent, "agent", "::1", 0, probe.Allowed},
		{"0 listed is not every port", agent, "agent", "127.0.0.1", 8080, probe.Denied},
		{"listen: [] binds nothing", client, "client", "127.0.0.1", 8080, probe.Denied},
		{"listen: [] binds nothing, not even port 0", client, "client", "127.0.0.1", 0, probe.Denied},
		{"an app without listen:", free, "free", "127.0.0.1", 8081, probe.Allowed},
		{"a process of no app", unbound, "", "127.0.0.1", 8081, probe.Allowed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := netip.MustParseAddr(tc.addr)
			methods := []probe.Method{probe.Bind}
			if a.Is4() {
				methods = append(methods, probe.MappedBind)
			}
			for _, proto := range []ruleset.Proto{ruleset.TCP, ruleset.UDP} {
				for _, m := range methods {
					drainEvents(t, rd)
					d := ruleset.Dest{Addr: a, Proto: proto, Port: tc.port}
					got, err := tc.p.Try(d, m)
					if err != nil {
						t.Fatal(err)
					}
					if got != tc.want {
						t.Fatalf("bind %s via %s: got %s, want %s", d, m, got, tc.want)
					}
					if got == probe.Allowed {
						continue
					}
					hook := HookBind4
					if a.Is6() || m == probe.MappedBind {
						hook = HookBind6
					}
					want := a
					if m == probe.MappedBind {
						want = netip.AddrFrom16(a.As16())
					}
					var found bool
					for _, ev := range drainEvents(t, rd) {
						found = found || (ev.Hook == hook && ev.Reason == ruleset.ReasonListen && !ev.Allowed &&
							ev.AppID == ids[tc.app] && ev.Generation == gen && ev.Dest.Port == tc.port && ev.Dest.Addr == want)
					}
					if !found {
						t.Errorf("bind %s via %s refused without an audit event (hook %s, reason listen)", d, m, hook)
					}
				}
			}
		})
	}
}

// TestListenWithoutBind: listen() on a never-bound TCP socket binds it to
// an ephemeral port without the bind hooks; where BPF LSM loads, the
// socket_listen program judges it as a bind to port 0: refused (EACCES,
// with an audit event) unless listen: lists 0. Apps without listen: and
// processes of no app listen as before.
func TestListenWithoutBind(t *testing.T) {
	w := newWorld(t, "web", "agent", "client", "free")
	rd := w.attachWithEvents()
	gen := w.apply(mustPolicy(t, listenPolicy))
	ids := appIDs(mustPolicy(t, listenPolicy))
	for _, tc := range []struct {
		name string
		app  string
		want probe.Verdict
	}{
		{"0 not listed", "web", probe.Denied},
		{"0 listed", "agent", probe.Allowed},
		{"listen: []", "client", probe.Denied},
		{"an app without listen:", "free", probe.Allowed},
		{"a process of no app", "", probe.Allowed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.want == probe.Denied {
				for _, g := range w.e.Guards() {
					if g.Name == "listen-autobind" && !g.Active {
						t.Skipf("kernel feature missing: BPF LSM programs do not load here (%s)", g.Why)
					}
				}
			}
			p := w.prober(tc.app)
			for _, addr := range []string{"0.0.0.0", "::"} {
				drainEvents(t, rd)
				d := ruleset.Dest{Addr: netip.MustParseAddr(addr), Proto: ruleset.TCP}
				got, err := p.Try(d, probe.Listen)
				if err != nil {
					t.Fatal(err)
				}
				if got != tc.want {
					t.Fatalf("listen without bind, %s: got %s, want %s", addr, got, tc.want)
				}
				if got == probe.Allowed {
					continue
				}
				var found bool
				for _, ev := range drainEvents(t, rd) {
					found = found || (ev.Hook == HookListen && ev.Reason == ruleset.ReasonListen && !ev.Allowed &&
						ev.AppID == ids[tc.app] && ev.Generation == gen && ev.Dest.Port == 0)
				}
				if !found {
					t.Errorf("listen without bind, %s, refused without an audit event (hook listen, reason listen)", addr)
				}
			}
		})
	}
}

// TestSweepSandbox: after a reload, the sweep ends a sandbox's live
// sockets to what it no longer reaches (an internet address whose grant
// went, and everything external once an app becomes a sandbox), and spares
// its loopback, its remaining grants and other apps' external sockets. By
// iterator and by sock_diag.
func TestSweepSandbox(t *testing.T) {
	for _, method := range []SweepMethod{SweepIterator, SweepNetlink} {
		t.Run(string(method), func(t *testing.T) {
			w := newWorld(t, "box", "free")
			if method == SweepIterator && w.e.sweep.err != nil {
				t.Skipf("kernel feature missing: socket iterators with bpf_sock_destroy (6.5+): %v", w.e.sweep.err)
			}
			startServers(t, w.netns, []string{"0.0.0.0:443", "0.0.0.0:80"}, []string{"0.0.0.0:53"})
			const before = `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: box
    outside: deny
    allow:
      - to: 192.0.2.10
      - to: 192.0.2.11
  - name: free
`
			w.apply(mustPolicy(t, before))
			if err := w.e.Attach(); err != nil {
				t.Fatal(err)
			}
			box, free := w.holder(w.cgroups["box/run"]), w.holder(w.cgroups["free/run"])
			mustOpen(t, box, "kept", "192.0.2.10:443/tcp", probe.Connect, 1)
			mustOpen(t, box, "revoked", "192.0.2.11:443/tcp", probe.Connect, 1)
			mustOpen(t, box, "revoked-udp", "192.0.2.11:53/udp", probe.Connect, 1)
			mustOpen(t, box, "loopback", "127.0.0.1:80/tcp", probe.Connect, 1)
			mustOpen(t, free, "external", "198.51.100.1:80/tcp", probe.Connect, 1)
			groups := []group{
				{h: box, name: "kept", n: 1}, {h: box, name: "revoked", n: 1}, {h: box, name: "revoked-udp", n: 1},
				{h: box, name: "loopback", n: 1}, {h: free, name: "external", n: 1},
			}
			w.apply(mustPolicy(t, strings.Replace(before, "      - to: 192.0.2.11\n", "", 1)))
			res := w.sweepIn(SweepOptions{Method: method})
			groups[1].ended, groups[2].ended = true, true
			checkGroups(t, "after the grant to 192.0.2.11 went", groups)
			if len(res.Ended) != 2 {
				t.Errorf("ended %d sockets, want 2: %+v", len(res.Ended), res.Ended)
			}
			// free becomes a sandbox without grants: its external socket goes.
			w.apply(mustPolicy(t, strings.Replace(before, "  - name: free\n", "  - name: free\n    outside: deny\n", 1)))
			w.sweepIn(SweepOptions{Method: method})
			groups[4].ended = true
			checkGroups(t, "after free became a sandbox", groups)
		})
	}
}
