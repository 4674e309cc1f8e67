package main

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

// TestEveryoneSandboxListenEndToEnd: a daemon enforcing everyone grants, a
// sandbox and listen:, as events, explain and the kernel show them.
func TestEveryoneSandboxListenEndToEnd(t *testing.T) {
	e := newE2EWith(t, `version: 1
internal:
  prefixes: [10.0.0.0/8]
everyone:
  allow:
    - to: 10.0.0.53
      proto: udp
      ports: [53]
apps:
  - name: box
    outside: deny
    listen: [8080]
    allow:
      - to: 192.0.2.10
        proto: tcp
        ports: [443]
`, false, "--poll", "1h")
	unbound, box := e.prober(""), e.prober("box")

	t.Run("everyone", func(t *testing.T) {
		mustTry(t, unbound, "10.0.0.53:53/udp", probe.Allowed)
		mustTry(t, unbound, "10.0.0.54:53/udp", probe.Denied)
		mustTry(t, box, "10.0.0.53:53/udp", probe.Allowed)
		out, err := e.procgate("explain", "--app", "box", "10.0.0.53:53/udp")
		if err != nil || !strings.Contains(out, "allow (granted-everyone)") || !strings.Contains(out, "everyone grant #0 10.0.0.53/32") {
			t.Fatalf("explain: %v\n%s", err, out)
		}
	})
	t.Run("outside: deny", func(t *testing.T) {
		mustTry(t, box, "192.0.2.10:443/tcp", probe.Allowed)
		mustTry(t, box, "192.0.2.11:443/tcp", probe.Denied)
		waitEvent(t, e, `"verdict":"deny"`, `"reason":"outside-denied"`, `"app":"box"`, `"dest":"192.0.2.11:443/tcp"`, `"rule":"outside: deny"`)
		for dest, want := range map[string]string{
			"127.0.0.1:80":   "box -> 127.0.0.1:80/tcp: allow (loopback) outside: deny, loopback: allow",
			"192.0.2.11:443": "box -> 192.0.2.11:443/tcp: deny (outside-denied)",
		} {
			out, err := e.procgate("explain", "--app", "box", dest)
			if err != nil || !strings.Contains(out, want) {
				t.Errorf("explain %s: %v\n%s\nwant %q", dest, err, out, want)
			}
		}
	})
	t.Run("listen", func(t *testing.T) {
		for port, want := range map[uint16]probe.Verdict{8080: probe.Allowed, 8081: probe.Denied} {
			d := ruleset.Dest{Addr: netip.MustParseAddr("127.0.0.1"), Proto: ruleset.TCP, Port: port}
			if got, err := box.Try(d, probe.Bind); err != nil || got != want {
				t.Fatalf("bind %s: %v %v, want %s", d, got, err, want)
			}
		}
		waitEvent(t, e, `"verdict":"deny"`, `"reason":"listen"`, `"hook":"bind4"`, `"app":"box"`, `"dest":"127.0.0.1:8081/tcp"`, `"rule":"listen: [8080] [`)
	})
}
