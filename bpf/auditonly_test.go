package bpf

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

// Two apps with the same policy, one in audit mode.
const auditOnlyPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8, fd00::/8]
apps:
  - name: trial
    mode: audit
    listen: [7000]
    allow:
      - {to: 10.1.0.0/16, proto: tcp, ports: [80]}
  - name: strict
    listen: [7000]
    allow:
      - {to: 10.1.0.0/16, proto: tcp, ports: [80]}
`

// TestAuditOnly: what an app in audit mode's policy refuses passes, at
// every hook that decides by the policy (connect, sendmsg, bind, the egress
// backstop), each with a would-deny event and count; the same attempts of
// an app in enforce mode are denied. The sweep leaves its sockets, and a
// reload to mode: enforce denies its next attempts and lets the sweep end
// its sockets.
func TestAuditOnly(t *testing.T) {
	w := newWorld(t, "trial", "strict")
	w.allowPing()
	startServers(t, w.netns, []string{"0.0.0.0:80"}, []string{"0.0.0.0:5000"})
	rs := mustPolicy(t, auditOnlyPolicy)
	enforce := mustPolicy(t, strings.Replace(auditOnlyPolicy, "mode: audit", "mode: enforce", 1))
	gen := w.apply(rs)
	rd := w.attachWithEvents()
	ids := appIDs(rs)
	probers := map[string]*probe.Prober{"trial": w.prober("trial"), "strict": w.prober("strict")}
	d := func(s string, proto ruleset.Proto, port uint16) ruleset.Dest {
		return ruleset.Dest{Addr: netip.MustParseAddr(s), Proto: proto, Port: port}
	}
	cases := []struct {
		name   string
		m      probe.Method
		dest   ruleset.Dest
		hook   Hook
		reason ruleset.Reason
	}{
		{"connect4, no grant", probe.Connect, d("10.9.2.3", ruleset.TCP, 80), HookConnect4, ruleset.ReasonNoGrant},
		{"connect6, no grant", probe.Connect, d("fd00:1::3", ruleset.TCP, 80), HookConnect6, ruleset.ReasonNoGrant},
		{"sendmsg4, port", probe.SendTo, d("10.1.2.3", ruleset.UDP, 81), HookSendmsg4, ruleset.ReasonPort},
		{"egress4, ping", probe.Ping, d("10.1.2.3", ruleset.TCP, 0), HookEgress4, ruleset.ReasonProto},
		{"bind4, not in listen:", probe.Bind, d("127.0.0.1", ruleset.TCP, 7001), HookBind4, ruleset.ReasonListen},
	}
	for _, tc := range cases {
		for _, app := range []string{"trial", "strict"} {
			t.Run(tc.name+", "+app, func(t *testing.T) {
				drainEvents(t, rd)
				want := rs.Decide(app, tc.dest)
				if tc.m == probe.Bind {
					want = rs.DecideBind(app, tc.dest.Port)
				}
				wantVerdict := probe.Denied
				if want.Passes() {
					wantVerdict = probe.Allowed
				}
				if want.Allow || (app == "trial") != want.Passes() {
					t.Fatalf("Decide: %s (verdict %s): not the case this test is about", want, want.Verdict())
				}
				if v, err := probers[app].Try(tc.dest, tc.m); err != nil || v != wantVerdict {
					t.Fatalf("attempt: %v %v, want %s", v, err, wantVerdict)
				}
				found := false
				for _, ev := range drainEvents(t, rd) {
					if ev.AppID != ids[app] {
						continue
					}
					if ev.Allowed || ev.WouldDeny != (app == "trial") {
						t.Errorf("event %+v: want allowed false, would-deny %v", ev, app == "trial")
					}
					found = found || (ev.Hook == tc.hook && ev.Reason == tc.reason && ev.Generation == gen && ev.Dest.Addr == tc.dest.Addr)
				}
				if !found {
					t.Errorf("no event of app %s, hook %s, reason %s, dest %s", app, tc.hook, tc.reason, tc.dest.Addr)
				}
			})
		}
	}
	counts, err := w.e.Counters([]uint32{ids["trial"], ids["strict"]})
	if err != nil {
		t.Fatal(err)
	}
	n := uint64(len(cases))
	if c := counts[ids["trial"]]; c[CountDeny] != 0 || c[CountWouldDeny] < n {
		t.Errorf("trial's counters %v: want no deny and at least %d would-deny", c, n)
	}
	if c := counts[ids["strict"]]; c[CountDeny] < n || c[CountWouldDeny] != 0 {
		t.Errorf("strict's counters %v: want at least %d deny and no would-deny", c, n)
	}

	// A connected UDP socket's datagrams pass no hook: after a reload the
	// backstop decides them in full, and lets trial's pass.
	trial := w.holder(w.cgroups["trial/run"])
	mustOpen(t, trial, "udp", "10.1.2.3:5000/udp", probe.Connect, 1)
	mustOpen(t, trial, "tcp", "10.1.2.3:80/tcp", probe.Connect, 1)
	gen = w.apply(rs)
	drainEvents(t, rd)
	for range 2 {
		if r, err := trial.Send("udp"); err != nil || r.Sent != 1 {
			t.Fatalf("audit mode, a connected UDP socket's datagram: %+v %v, want sent", r, err)
		}
	}
	egress := 0
	for _, ev := range drainEvents(t, rd) {
		if ev.Hook == HookEgress4 && ev.WouldDeny && ev.Generation == gen && ev.Dest.Port == 5000 {
			egress++
		}
	}
	if egress != 1 {
		t.Errorf("%d would-deny events of the backstop for two datagrams of a new generation, want 1 (the second one's verdict is remembered)", egress)
	}

	// Grant withdrawn: a sweep leaves trial's connections (audit mode),
	// both ways of sweeping.
	noGrant := strings.Replace(auditOnlyPolicy, "    allow:\n      - {to: 10.1.0.0/16, proto: tcp, ports: [80]}\n  - name: strict", "  - name: strict", 1)
	w.apply(mustPolicy(t, noGrant))
	methods := []SweepMethod{SweepNetlink}
	if w.e.sweep.err == nil {
		methods = append(methods, SweepIterator)
	}
	for _, m := range methods {
		if res := w.sweepIn(SweepOptions{Method: m}); len(res.Ended) != 0 {
			t.Errorf("a sweep (%s) in audit mode ended %d sockets: %+v", m, len(res.Ended), res.Ended)
		}
		checkGroups(t, "after a sweep ("+string(m)+") in audit mode", []group{{h: trial, name: "tcp", n: 1}, {h: trial, name: "udp", n: 1}})
	}

	// mode: enforce by reload: the same attempts are denied, and the sweep
	// ends the connections the policy does not grant.
	w.apply(mustPolicy(t, strings.Replace(noGrant, "mode: audit", "mode: enforce", 1)))
	if res := w.sweepIn(SweepOptions{}); len(res.Ended) != 2 {
		t.Errorf("a sweep after the switch to enforce ended %d sockets, want 2: %+v", len(res.Ended), res.Ended)
	}
	checkGroups(t, "after a sweep in enforce mode", []group{{h: trial, name: "tcp", n: 1, ended: true}, {h: trial, name: "udp", n: 1, ended: true}})
	w.apply(enforce)
	for _, tc := range cases {
		if v, err := probers["trial"].Try(tc.dest, tc.m); err != nil || v != probe.Denied {
			t.Errorf("mode: enforce, %s: %v %v, want denied", tc.name, v, err)
		}
	}
}
