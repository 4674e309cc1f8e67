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
	if _, ok := tb.rules[ruleKey(1, everyoneID, netip.MustParsePrefix("10.0.0.53/32"))]; !ok {
		t.Fatal("everyone grant 10.0.0.53 not under the reserved app id")
	}
	rs.Everyone = nil
	if tb, _ = encode(Generation{Rules: rs, AppIDs: appIDs(rs)}, 1); tb.info.Flags&genEveryone != 0 {
		t.Fatal("GEN_EVERYONE without everyone grants: every denial would pay a lookup")
	}
}
