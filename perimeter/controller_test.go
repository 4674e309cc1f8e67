package perimeter

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"
)

// fakeTable is an Enforcer in memory with the kernel's behaviour that
// matters here: all or nothing, deleting an absent element fails, elements
// vanish when their timeout runs out (on the fake clock).
type fakeTable struct {
	clock *fakeClock
	els   map[Key]fakeElement
	fail  error // the next Update fails with it
	calls int
	// services are those of the last UpdateServices that succeeded.
	services []Service
}

type fakeElement struct {
	Element
	deadline time.Time
}

type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

func newFakeTable(clock *fakeClock) *fakeTable {
	return &fakeTable{clock: clock, els: map[Key]fakeElement{}}
}

func (f *fakeTable) expire() {
	for k, e := range f.els {
		if !f.clock.t.Before(e.deadline) {
			delete(f.els, k)
		}
	}
}

func (f *fakeTable) Update(add []Element, del []Key) error {
	f.calls++
	f.expire()
	if err := f.fail; err != nil {
		f.fail = nil
		return err
	}
	for _, k := range del {
		if _, ok := f.els[k]; !ok {
			return fmt.Errorf("delete %s: no such element", k)
		}
	}
	for _, k := range del {
		delete(f.els, k)
	}
	for _, e := range add {
		if e.Timeout < time.Millisecond {
			return fmt.Errorf("add %s without a timeout", e.Key)
		}
		if old, ok := f.els[e.Key]; ok {
			e.Comment, e.Packets = old.Comment, old.Packets // as the kernel: comment and counter stay
		}
		f.els[e.Key] = fakeElement{Element: e, deadline: f.clock.t.Add(e.Timeout)}
	}
	return nil
}

// UpdateServices is Update; the fake keeps the services it was last given.
func (f *fakeTable) UpdateServices(services []Service, add []Element, del []Key) error {
	if err := f.Update(add, del); err != nil {
		return err
	}
	f.services = services
	return nil
}

func (f *fakeTable) Elements() ([]Element, error) {
	f.expire()
	var out []Element
	for _, e := range f.els {
		el := e.Element
		el.Expires = e.deadline.Sub(f.clock.t)
		out = append(out, el)
	}
	return out, nil
}

// keys lists what the fake kernel holds, sorted.
func (f *fakeTable) keys() []string {
	f.expire()
	var out []string
	for k := range f.els {
		out = append(out, k.String())
	}
	slices.Sort(out)
	return out
}

const controllerRules = `host srv1 10.9.0.5
host srv2 10.9.0.6
allow srv1,srv2 * * * * self *
deny * mallory * * * * *
allow media * udp 198.51.100.0/24 * 10.9.0.7 5000-5999 at 09:00-17:00 UTC
limit alice 2
`

// testController is a controller over a fake table at 10:00 UTC, logging
// JSON into log.
type testController struct {
	*Controller
	table *fakeTable
	clock *fakeClock
	log   *bytes.Buffer
}

func newTestController(t *testing.T, rules string, seed ...Element) *testController {
	t.Helper()
	clock := &fakeClock{time.Date(2026, 11, 25, 10, 0, 0, 0, time.UTC)}
	table := newFakeTable(clock)
	if err := table.Update(seed, nil); err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	c, err := NewController(ControllerConfig{
		Rules: mustRules(t, rules), Table: table, Protect: testProtect, Lease: time.Minute,
		Log: slog.New(slog.NewJSONHandler(&log, &slog.HandlerOptions{Level: slog.LevelDebug})), Now: clock.now,
	})
	if err != nil {
		t.Fatal(err)
	}
	return &testController{c, table, clock, &log}
}

func req(user, hole string) Request {
	f := strings.Fields(hole)
	return Request{Target: Target{Proto: f[0], Peer: f[1], Host: f[2], Port: atoi(f[3])}, User: user}
}

func TestOpenBadInput(t *testing.T) {
	c := newTestController(t, controllerRules)
	calls := c.table.calls
	tests := []struct {
		name  string
		req   Request
		field string
	}{
		{"no proto", Request{Target: Target{Peer: "203.0.113.9", Host: "10.9.0.5", Port: 4000}, User: "alice"}, "proto"},
		{"sctp", req("alice", "sctp 203.0.113.9 10.9.0.5 4000"), "proto"},
		{"peer not an address", req("alice", "tcp 203.0.113.x 10.9.0.5 4000"), "peer"},
		{"peer is a network", Request{Target: Target{Proto: "tcp", Peer: "203.0.113.0/24", Host: "10.9.0.5", Port: 4000}, User: "alice"}, "peer"},
		{"peer unspecified", req("alice", "tcp 0.0.0.0 10.9.0.5 4000"), "peer"},
		{"peer multicast", req("alice", "udp 224.0.0.1 10.9.0.5 4000"), "peer"},
		{"families differ", req("alice", "tcp 2001:db8::9 10.9.0.5 4000"), "peer"},
		{"no host", Request{Target: Target{Proto: "tcp", Peer: "203.0.113.9", Port: 4000}, User: "alice"}, "host"},
		{"host unprotected", req("alice", "tcp 203.0.113.9 10.8.0.5 4000"), "host"},
		{"port 0", req("alice", "tcp 203.0.113.9 10.9.0.5 0"), "port"},
		{"port too big", Request{Target: Target{Proto: "tcp", Peer: "203.0.113.9", Host: "10.9.0.5", Port: 65536}, User: "alice"}, "port"},
		{"no user", req("", "tcp 203.0.113.9 10.9.0.5 4000"), "user"},
		{"user with a space", req("al ice", "tcp 203.0.113.9 10.9.0.5 4000"), "user"},
		{"negative lease", Request{Target: req("", "tcp 203.0.113.9 10.9.0.5 4000").Target, User: "alice", LeaseSeconds: -1}, "lease_seconds"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := c.Open("srv1", tt.req)
			var fe *FieldError
			if !errors.As(err, &fe) || fe.Field != tt.field {
				t.Fatalf("Open = %v, want a FieldError on %s", err, tt.field)
			}
		})
	}
	if c.table.calls != calls || len(c.table.els) != 0 {
		t.Errorf("bad input reached the table: %d calls, %v", c.table.calls, c.table.keys())
	}
}

func TestOpenAuthorization(t *testing.T) {
	tests := []struct {
		name, delegate, user, hole string
		wantRule                   string // for refusals: the deciding rule; "-" = no allow rule
		wantErr                    error  // type of error, nil = opened
		wantLease                  time.Duration
	}{
		{"own host", "srv1", "alice", "tcp 203.0.113.9 10.9.0.5 40000", "", nil, time.Minute},
		{"own host v6 peer family mismatch is bad input, v6 both ok", "srv1", "bob", "tcp 198.51.100.1 10.9.0.5 40001", "", nil, time.Minute},
		{"another host", "srv1", "alice", "tcp 203.0.113.9 10.9.0.6 40000", "-", &Refusal{}, 0},
		{"denied user", "srv1", "mallory", "tcp 203.0.113.9 10.9.0.5 40000", "site.rules:4", &Refusal{}, 0},
		{"inside a window", "media", "carol", "udp 198.51.100.7 10.9.0.7 5004", "", nil, time.Minute},
		{"outside the window's ports", "media", "carol", "udp 198.51.100.7 10.9.0.7 6000", "-", &Refusal{}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newTestController(t, controllerRules)
			h, err := c.Open(tt.delegate, req(tt.user, tt.hole))
			if tt.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				if got := h.Expires.Sub(c.clock.t); got != tt.wantLease {
					t.Errorf("lease %v, want %v", got, tt.wantLease)
				}
				e := c.table.els[key(tt.hole)]
				if e.Timeout != tt.wantLease || e.Comment != comment(tt.delegate, tt.user) {
					t.Errorf("kernel element %+v, want timeout %v and the delegate's comment", e, tt.wantLease)
				}
				if !strings.Contains(c.log.String(), `"msg":"pinhole opened"`) {
					t.Errorf("no audit record of the opening:\n%s", c.log)
				}
				return
			}
			var ref *Refusal
			if !errors.As(err, &ref) {
				t.Fatalf("Open = %v, want a refusal", err)
			}
			want := strings.TrimPrefix(tt.wantRule, "-")
			if ref.Rule != want {
				t.Errorf("refusal names rule %q, want %q (%v)", ref.Rule, want, err)
			}
			if len(c.table.els) != 0 {
				t.Errorf("a refused hole reached the table: %v", c.table.keys())
			}
			if !strings.Contains(c.log.String(), `"msg":"pinhole refused"`) || !strings.Contains(c.log.String(), ref.Reason) {
				t.Errorf("no audit record of the refusal:\n%s", c.log)
			}
		})
	}
}

func TestWindowEndCapsLease(t *testing.T) {
	c := newTestController(t, controllerRules)
	c.clock.t = time.Date(2026, 11, 25, 16, 59, 30, 0, time.UTC)
	h, err := c.Open("media", req("carol", "udp 198.51.100.7 10.9.0.7 5004"))
	if err != nil {
		t.Fatal(err)
	}
	if got := h.Expires.Sub(c.clock.t); got != 30*time.Second {
		t.Errorf("lease %v, want the 30s left of the window", got)
	}
	c.clock.advance(30 * time.Second)
	if got := c.table.keys(); len(got) != 0 {
		t.Errorf("the hole outlived its window in the kernel: %v", got)
	}
	res, err := c.Renew("media", []Target{h.Key.Target()}, 0)
	if err != nil || len(res.Missing) != 1 {
		t.Errorf("renew after the window: %+v, %v; want the hole missing", res, err)
	}
}

func TestLimitsAndConflicts(t *testing.T) {
	c := newTestController(t, controllerRules)
	open := func(delegate, user, hole string) error {
		_, err := c.Open(delegate, req(user, hole))
		return err
	}
	steps := []struct {
		name, delegate, user, hole string
		want                       string // "" ok, else a fragment of the error
	}{
		{"first", "srv1", "alice", "tcp 203.0.113.9 10.9.0.5 40000", ""},
		{"second", "srv1", "alice", "tcp 203.0.113.9 10.9.0.5 40001", ""},
		{"third is over the limit", "srv1", "alice", "tcp 203.0.113.9 10.9.0.5 40002", "limit of 2 open holes for user alice reached (site.rules:6)"},
		{"opening a held hole again is a renewal", "srv1", "alice", "tcp 203.0.113.9 10.9.0.5 40001", ""},
		{"other users have no limit", "srv1", "bob", "tcp 203.0.113.9 10.9.0.5 40002", ""},
		{"another delegate's hole", "srv2", "bob", "tcp 203.0.113.9 10.9.0.5 40002", "held by delegate srv1"},
	}
	for _, s := range steps {
		err := open(s.delegate, s.user, s.hole)
		if s.want == "" && err != nil || s.want != "" && (err == nil || !strings.Contains(err.Error(), s.want)) {
			t.Fatalf("%s: %v, want %q", s.name, err, s.want)
		}
	}
	if _, err := c.Close("srv1", []Target{key("tcp 203.0.113.9 10.9.0.5 40000").Target()}); err != nil {
		t.Fatal(err)
	}
	if err := open("srv1", "alice", "tcp 203.0.113.9 10.9.0.5 40003"); err != nil {
		t.Errorf("after a close alice is under her limit again: %v", err)
	}
	// The delegate says the port now serves alice: the hole moves to her
	// and counts against her limit.
	if err := open("srv1", "alice", "tcp 203.0.113.9 10.9.0.5 40002"); err == nil {
		t.Error("a hole moved from bob to alice past her limit")
	}
}

func TestRenewCloseSweep(t *testing.T) {
	c := newTestController(t, controllerRules)
	a, b := key("tcp 203.0.113.9 10.9.0.5 40000"), key("udp 198.51.100.7 10.9.0.6 5004")
	if _, err := c.Open("srv1", req("alice", a.String2())); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Open("srv2", Request{Target: b.Target(), User: "carol", LeaseSeconds: 10}); err != nil {
		t.Fatal(err)
	}
	for asked, want := range map[int]time.Duration{0: time.Minute, 1: time.Second, 60: time.Minute, 61: time.Minute, 1 << 62: time.Minute} {
		if got := c.leaseFor(asked); got != want {
			t.Errorf("lease for %d seconds asked: %v, want %v", asked, got, want)
		}
	}
	c.clock.advance(50 * time.Second)
	if n := c.Sweep(); n != 1 {
		t.Errorf("sweep removed %d holes, want b, whose 10s lease ran out", n)
	}
	res, err := c.Renew("srv1", []Target{a.Target(), a.Target(), b.Target()}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Renewed) != 1 || res.Renewed[0].Key != a || len(res.Missing) != 1 {
		t.Fatalf("renew: %+v; want a renewed once, b missing (srv2's, and expired)", res)
	}
	if got := c.table.els[a].Timeout; got != time.Minute {
		t.Errorf("kernel timeout after renewal %v, want 1m", got)
	}
	if _, err := c.Renew("srv1", []Target{{Proto: "tcp", Peer: "x"}}, 0); err == nil || !strings.Contains(err.Error(), "holes[0].peer") {
		t.Errorf("renew with bad input: %v", err)
	}
	c.clock.advance(59 * time.Second)
	if n := c.Sweep(); n != 0 {
		t.Errorf("sweep removed %d renewed holes", n)
	}
	c.clock.advance(time.Second)
	if n := c.Sweep(); n != 1 {
		t.Errorf("sweep removed %d holes, want the expired one", n)
	}
	if !strings.Contains(c.log.String(), `"msg":"pinhole expired"`) {
		t.Errorf("no audit record of the expiry:\n%s", c.log)
	}
	if holes, _ := c.List(""); len(holes) != 0 {
		t.Errorf("after expiry: %v", holes)
	}
	cr, err := c.Close("srv1", []Target{a.Target()})
	if err != nil || len(cr.Missing) != 1 {
		t.Errorf("close of an expired hole: %+v, %v", cr, err)
	}
}

// String2 writes a key as the tests' key() reads it.
func (k Key) String2() string {
	return fmt.Sprintf("%s %s %s %d", k.Proto, k.Peer, k.Host, k.Port)
}

func TestTableFailureChangesNothing(t *testing.T) {
	c := newTestController(t, controllerRules)
	a := key("tcp 203.0.113.9 10.9.0.5 40000")
	c.table.fail = errors.New("netlink: no buffer space")
	if _, err := c.Open("srv1", req("alice", a.String2())); err == nil {
		t.Fatal("Open succeeded with a failing table")
	}
	if holes, _ := c.List(""); len(holes) != 0 {
		t.Fatalf("bookkeeping holds %v after a failed transaction", holes)
	}
	if _, err := c.Open("srv1", req("alice", a.String2())); err != nil {
		t.Fatal(err)
	}
	c.table.fail = errors.New("boom")
	if _, err := c.Close("srv1", []Target{a.Target()}); err == nil {
		t.Fatal("Close succeeded with a failing table")
	}
	if holes, _ := c.List(""); len(holes) != 1 {
		t.Fatalf("bookkeeping lost the hole after a failed close: %v", holes)
	}
	c.table.fail = errors.New("boom")
	if err := c.SetRules(mustRules(t, "deny * * * * * * *\nservice 10.9.0.5 tcp 21")); err == nil {
		t.Fatal("SetRules succeeded with a failing table")
	}
	if c.table.services != nil {
		t.Errorf("a failed reload left the services %v in the table", c.table.services)
	}
	if _, err := c.Open("srv1", req("bob", "tcp 203.0.113.9 10.9.0.5 40001")); err != nil {
		t.Errorf("the old rules are not in force after a failed reload: %v", err)
	}
}

func TestSetRules(t *testing.T) {
	c := newTestController(t, controllerRules)
	for _, r := range []Request{req("alice", "tcp 203.0.113.9 10.9.0.5 40000"), req("bob", "tcp 203.0.113.9 10.9.0.5 40001")} {
		if _, err := c.Open("srv1", r); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.SetRules(mustRules(t, controllerRules+"deny * bob * * * * *\nservice 10.9.0.5 tcp 21\n")); err != nil {
		t.Fatal(err)
	}
	if got, want := c.table.keys(), []string{"tcp 203.0.113.9 -> 10.9.0.5:40000"}; !slices.Equal(got, want) {
		t.Errorf("after the reload the kernel holds %v, want %v", got, want)
	}
	if len(c.table.services) != 1 || c.table.services[0].Text != "service 10.9.0.5 tcp 21" {
		t.Errorf("after the reload the table has the services %+v, want the new rules' one", c.table.services)
	}
	if !strings.Contains(c.log.String(), "new rules: refused tcp 203.0.113.9 -> 10.9.0.5:40001: denied by site.rules:7") {
		t.Errorf("no audit record of the closing:\n%s", c.log)
	}
}

func TestSync(t *testing.T) {
	c := newTestController(t, controllerRules)
	a, b, x := "tcp 203.0.113.9 10.9.0.5 40000", "tcp 203.0.113.9 10.9.0.5 40001", "udp 198.51.100.7 10.9.0.6 5004"
	for _, o := range []struct{ d, u, h string }{{"srv1", "alice", a}, {"srv1", "bob", b}, {"srv2", "carol", x}} {
		if _, err := c.Open(o.d, req(o.u, o.h)); err != nil {
			t.Fatal(err)
		}
	}
	res, err := c.Sync("srv1", []Request{
		req("bob", b), // kept
		req("alice", "tcp 203.0.113.9 10.9.0.5 40002"),   // new
		req("mallory", "tcp 203.0.113.9 10.9.0.5 40003"), // refused
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"tcp 203.0.113.9 -> 10.9.0.5:40001", "tcp 203.0.113.9 -> 10.9.0.5:40002", "udp 198.51.100.7 -> 10.9.0.6:5004"}
	if got := c.table.keys(); !slices.Equal(got, want) {
		t.Errorf("kernel after sync: %v, want %v", got, want)
	}
	if len(res.Holes) != 2 || len(res.Refused) != 1 || res.Refused[0].Rule != "site.rules:4" || len(res.Closed) != 1 {
		t.Errorf("sync result %+v", res)
	}
	if _, err := c.Sync("srv1", []Request{req("bob", b), req("bob", b)}); err == nil || !strings.Contains(err.Error(), "holes[1]") {
		t.Errorf("sync with a repeated hole: %v", err)
	}
	if _, err := c.Sync("srv1", []Request{req("bob", b), req("bob", "tcp 203.0.113.9 10.8.0.5 1")}); err == nil || !strings.Contains(err.Error(), "holes[1].host") {
		t.Errorf("sync with an unprotected host: %v", err)
	}
	if got := c.table.keys(); !slices.Equal(got, want) {
		t.Errorf("a refused sync changed the kernel: %v", got)
	}
}

// TestRestart is a gateway restart: the new controller adopts what the
// kernel holds, then reconciles with the agents' claims.
func TestRestart(t *testing.T) {
	a, b, c3 := key("tcp 203.0.113.9 10.9.0.5 40000"), key("tcp 203.0.113.9 10.9.0.5 40001"), key("udp 198.51.100.7 10.9.0.6 5004")
	stray, denied, outside := key("tcp 203.0.113.1 10.9.0.5 22"), key("tcp 203.0.113.9 10.9.0.5 40009"), key("tcp 203.0.113.9 10.8.0.5 1")
	c := newTestController(t, controllerRules,
		Element{Key: a, Timeout: 20 * time.Second, Comment: comment("srv1", "alice")},
		Element{Key: b, Timeout: 20 * time.Second, Comment: comment("srv1", "bob")},
		Element{Key: stray, Timeout: time.Hour, Comment: "added by hand"},
		Element{Key: denied, Timeout: time.Hour, Comment: comment("srv1", "mallory")},
		Element{Key: outside, Timeout: time.Hour, Comment: comment("srv1", "alice")},
	)
	want := []string{a.String(), b.String()}
	if got := c.table.keys(); !slices.Equal(got, want) {
		t.Fatalf("after adoption the kernel holds %v, want %v", got, want)
	}
	holes, err := c.List("srv1")
	if err != nil || len(holes) != 2 || holes[0].User != "alice" || holes[0].Expires != c.clock.t.Add(20*time.Second) {
		t.Fatalf("adopted holes %+v, %v", holes, err)
	}
	// The agents claim a and c3; b was closed while the gateway was down.
	res, err := c.Reconcile([]Hole{
		{Key: a, Delegate: "srv1", User: "alice"},
		{Key: c3, Delegate: "srv2", User: "carol"},
	})
	if err != nil {
		t.Fatal(err)
	}
	want = []string{a.String(), c3.String()}
	if got := c.table.keys(); !slices.Equal(got, want) {
		t.Errorf("after reconcile the kernel holds %v, want %v", got, want)
	}
	if len(res.Holes) != 2 || len(res.Closed) != 1 || len(res.Refused) != 0 {
		t.Errorf("reconcile result %+v", res)
	}
	if c.table.els[a].Timeout != time.Minute {
		t.Errorf("a reconciled hole has timeout %v, want a fresh lease", c.table.els[a].Timeout)
	}
	if _, err := c.Reconcile([]Hole{{Key: a, Delegate: "srv 1", User: "alice"}}); err == nil || !strings.Contains(err.Error(), "holes[0].delegate") {
		t.Errorf("reconcile with a bad delegate: %v", err)
	}
}
