package bpf

import (
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

// drainEvents decodes every event in the ring buffer now; any record that
// does not decode fails t.
func drainEvents(t *testing.T, rd *ringbuf.Reader) []Event {
	t.Helper()
	var out []Event
	rd.SetDeadline(time.Now()) // return what is there, do not wait
	for {
		rec, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out
		}
		if err != nil {
			t.Fatalf("read audit ring: %v", err)
		}
		ev, err := DecodeEvent(rec.RawSample)
		if err != nil {
			t.Fatalf("an event of the kernel does not decode: %v (raw %x)", err, rec.RawSample)
		}
		out = append(out, ev)
	}
}

// attachWithEvents attaches the world's enforcer and opens its audit ring
// buffer, closed when the test ends.
func (w *world) attachWithEvents() *ringbuf.Reader {
	w.t.Helper()
	if err := w.e.Attach(); err != nil {
		w.t.Fatal(err)
	}
	rd, err := w.e.Events()
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { rd.Close() })
	return rd
}

// TestAuditEventsDecode: every hook's denial event decodes and says what
// happened. The sock_create guard's events once came out as zeros but pid,
// uid and comm (a miscompile of a constant destination): "address family 0".
func TestAuditEventsDecode(t *testing.T) {
	w := newWorld(t, "granted")
	w.allowPing()
	rs := &ruleset.Ruleset{
		Internal: []ruleset.InternalPrefix{{Prefix: netip.MustParsePrefix("10.0.0.0/8")}, {Prefix: netip.MustParsePrefix("fd00::/8")}},
		Apps: []ruleset.App{{Name: "granted", Grants: []ruleset.Grant{
			{Prefix: netip.MustParsePrefix("10.1.0.0/16"), Proto: ruleset.TCP, Ports: []ruleset.PortRange{{Lo: 80, Hi: 80}}},
		}}},
	}
	gen := w.apply(rs)
	rd := w.attachWithEvents()
	granted := appIDs(rs)["granted"]
	unbound, app := w.prober(""), w.prober("granted")
	// Each event names the cgroup of the task, or for the egress backstop
	// of the packet's socket: the prober's.
	cgroupOf := map[*probe.Prober]uint64{}
	for p, dir := range map[*probe.Prober]string{unbound: w.cgroups["/unbound"], app: w.cgroups["granted/run"]} {
		id, err := cgroups.ID(dir)
		if err != nil {
			t.Fatal(err)
		}
		cgroupOf[p] = id
	}
	d := func(s string, proto ruleset.Proto, port uint16) ruleset.Dest {
		return ruleset.Dest{Addr: netip.MustParseAddr(s), Proto: proto, Port: port}
	}
	for _, tc := range []struct {
		name     string
		p        *probe.Prober
		m        probe.Method
		dest     ruleset.Dest
		hook     Hook
		reason   ruleset.Reason
		app      uint32
		wantDest string // the event's destination
	}{
		{"raw IPv4 socket in an app", app, probe.RawICMP, d("192.0.2.7", ruleset.TCP, 0), HookSockCreate, ruleset.ReasonRawSocket, granted, "0.0.0.0"},
		{"raw IPv6 socket in an app", app, probe.RawICMP, d("2001:db8::7", ruleset.TCP, 0), HookSockCreate, ruleset.ReasonRawSocket, granted, "::"},
		{"connect4, unbound", unbound, probe.Connect, d("10.1.2.3", ruleset.TCP, 80), HookConnect4, ruleset.ReasonUnbound, 0, "10.1.2.3"},
		{"connect6, app, no grant", app, probe.Connect, d("fd00:1::3", ruleset.TCP, 80), HookConnect6, ruleset.ReasonNoGrant, granted, "fd00:1::3"},
		{"sendmsg4, app, port", app, probe.SendTo, d("10.1.2.3", ruleset.UDP, 80), HookSendmsg4, ruleset.ReasonPort, granted, "10.1.2.3"},
		{"egress4, ping from an app", app, probe.Ping, d("10.1.2.3", ruleset.TCP, 0), HookEgress4, ruleset.ReasonProto, granted, "10.1.2.3"},
		{"egress6, ping, unbound", unbound, probe.Ping, d("fd00:1::3", ruleset.TCP, 0), HookEgress6, ruleset.ReasonUnbound, 0, "fd00:1::3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			drainEvents(t, rd)
			if v, err := tc.p.Try(tc.dest, tc.m); err != nil || v != probe.Denied {
				t.Fatalf("attempt: %v %v, want denied", v, err)
			}
			evs := drainEvents(t, rd)
			for _, ev := range evs {
				if ev.Hook == tc.hook && ev.Reason == tc.reason && ev.AppID == tc.app && !ev.Allowed &&
					ev.Generation == gen && ev.Dest.Addr.String() == tc.wantDest && ev.CgroupID == cgroupOf[tc.p] {
					return
				}
			}
			t.Fatalf("no event hook %s, reason %s, app %d, dest %s, cgroup %d among %+v", tc.hook, tc.reason, tc.app, tc.wantDest, cgroupOf[tc.p], evs)
		})
	}
}
