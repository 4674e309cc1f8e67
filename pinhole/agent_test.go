package pinhole

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/ruleset"
	"github.com/procgate/procgate/users"
)

// fakeGateway is the gateway's API in memory, with its rules reduced to a
// set of refused peers.
type fakeGateway struct {
	mu     sync.Mutex
	holes  map[perimeter.Key]perimeter.Hole
	refuse map[netip.Addr]bool
	down   bool
	calls  []string // method and number of holes, in order
	now    func() time.Time
	// packets are the holes' counters List reports (default 3); lists
	// counts the List calls.
	packets map[perimeter.Key]uint64
	lists   int
}

func newFakeGateway(now func() time.Time) *fakeGateway {
	return &fakeGateway{holes: map[perimeter.Key]perimeter.Hole{}, refuse: map[netip.Addr]bool{}, now: now, packets: map[perimeter.Key]uint64{}}
}

var errDown = errors.New("connection refused")

func (g *fakeGateway) record(method string, n int) error {
	g.calls = append(g.calls, method+":"+itoa(uint32(n)))
	if g.down {
		return errDown
	}
	return nil
}

func (g *fakeGateway) hole(r perimeter.Request) (perimeter.Hole, *perimeter.RefusedHole) {
	k, err := r.Parse()
	if err != nil {
		return perimeter.Hole{}, &perimeter.RefusedHole{Target: r.Target, Error: err.Error()}
	}
	if g.refuse[k.Peer] {
		return perimeter.Hole{}, &perimeter.RefusedHole{Target: r.Target, Error: "denied by site.rules:3", Rule: "site.rules:3"}
	}
	lease := r.LeaseSeconds
	if lease == 0 {
		lease = 30
	}
	h := perimeter.Hole{Key: k, User: r.User, Delegate: "srv1", Rule: "site.rules:2", Opened: g.now(), Expires: g.now().Add(time.Duration(lease) * time.Second)}
	g.holes[k] = h
	return h, nil
}

func (g *fakeGateway) Open(_ context.Context, r perimeter.Request) (perimeter.Hole, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := g.record("open", 1); err != nil {
		return perimeter.Hole{}, err
	}
	h, ref := g.hole(r)
	if ref != nil {
		return h, &perimeter.APIError{Status: http.StatusForbidden, Message: ref.Error, Rule: ref.Rule}
	}
	return h, nil
}

func (g *fakeGateway) Renew(_ context.Context, ts []perimeter.Target, lease int) (perimeter.RenewResult, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	var res perimeter.RenewResult
	if err := g.record("renew", len(ts)); err != nil {
		return res, err
	}
	for _, t := range ts {
		k, _ := t.Key()
		h, ok := g.holes[k]
		if !ok {
			res.Missing = append(res.Missing, t)
			continue
		}
		if lease == 0 {
			lease = 30
		}
		h.Expires = g.now().Add(time.Duration(lease) * time.Second)
		g.holes[k] = h
		res.Renewed = append(res.Renewed, h)
	}
	return res, nil
}

func (g *fakeGateway) Close(_ context.Context, ts []perimeter.Target) (perimeter.CloseResult, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	var res perimeter.CloseResult
	if err := g.record("close", len(ts)); err != nil {
		return res, err
	}
	for _, t := range ts {
		k, _ := t.Key()
		delete(g.holes, k)
		res.Closed = append(res.Closed, t)
	}
	return res, nil
}

func (g *fakeGateway) List(context.Context) ([]perimeter.Hole, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.down {
		return nil, errDown
	}
	g.lists++
	var out []perimeter.Hole
	for k, h := range g.holes {
		h.Packets, h.Bytes = 3, 300
		if p, ok := g.packets[k]; ok {
			h.Packets, h.Bytes = p, 100*p
		}
		out = append(out, h)
	}
	return out, nil
}

func (g *fakeGateway) Sync(_ context.Context, rs []perimeter.Request) (perimeter.SyncResult, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	var res perimeter.SyncResult
	if err := g.record("sync", len(rs)); err != nil {
		return res, err
	}
	old := g.holes
	g.holes = map[perimeter.Key]perimeter.Hole{}
	for _, r := range rs {
		h, ref := g.hole(r)
		if ref != nil {
			res.Refused = append(res.Refused, *ref)
			continue
		}
		res.Holes = append(res.Holes, h)
	}
	for k := range old {
		if _, ok := g.holes[k]; !ok {
			res.Closed = append(res.Closed, k.Target())
		}
	}
	return res, nil
}

func (g *fakeGateway) keys() []perimeter.Key {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.SortedFunc(mapsKeys(g.holes), compareKeys)
}

func (g *fakeGateway) takeCalls() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	c := g.calls
	g.calls = nil
	return c
}

type fakeGuard struct {
	mu      sync.Mutex
	allowed map[perimeter.Key]bool
}

func (f *fakeGuard) Allow(k perimeter.Key) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.allowed[k] = true
	return nil
}

func (f *fakeGuard) Revoke(k perimeter.Key) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.allowed, k)
	return nil
}

func (f *fakeGuard) keys() []perimeter.Key {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.SortedFunc(mapsKeys(f.allowed), compareKeys)
}

// fakeSource hands the agent events from a channel.
type fakeSource chan Event

func (s fakeSource) Read() (Event, error) {
	e, ok := <-s
	if !ok {
		return Event{}, errors.New("closed")
	}
	return e, nil
}

type rig struct {
	t       *testing.T
	agent   *Agent
	gw      *fakeGateway
	guard   *fakeGuard
	notes   []Notice
	now     time.Time
	alive   map[uint32]bool
	holds   map[uint32][][2]netip.AddrPort
	ctx     context.Context
	dynamic App
}

var (
	server  = netip.MustParseAddr("10.9.0.5")
	client  = netip.MustParseAddr("198.51.100.10")
	client2 = netip.MustParseAddr("198.51.100.11")
	mallory = netip.MustParseAddr("203.0.113.66")
)

func newRig(t *testing.T) *rig {
	r := &rig{t: t, now: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC), alive: map[uint32]bool{}, holds: map[uint32][][2]netip.AddrPort{}, ctx: context.Background()}
	r.gw = newFakeGateway(func() time.Time { return r.now })
	r.guard = &fakeGuard{allowed: map[perimeter.Key]bool{}}
	r.agent = New(Config{
		Gateway: r.gw, Guard: r.guard,
		Notify:   func(n Notice) { r.notes = append(r.notes, n) },
		UserName: func(uid uint32) string { return "u" + itoa(uid) },
		Alive:    func(pid uint32) bool { return r.alive[pid] },
		Holds:    func(tgid uint32) [][2]netip.AddrPort { return r.holds[tgid] },
		Now:      func() time.Time { return r.now },
	})
	r.dynamic = App{Name: "ftp", ID: 3, Inbound: &ruleset.Inbound{
		Control: []ruleset.PortRange{{Lo: 21, Hi: 21}}, Ports: []ruleset.PortRange{{Lo: 40000, Hi: 40100}}, Proto: ruleset.Both, Lease: 30 * time.Second}}
	r.agent.apps = map[uint32]App{3: r.dynamic}
	return r
}

// events feeds events as Run does: handled in a batch, then one reconcile.
func (r *rig) events(es ...Event) {
	for _, e := range es {
		r.agent.handle(e)
	}
	r.agent.reconcile(r.ctx)
}

func ctl(cookie uint64, tgid uint32, peer netip.Addr) Event {
	return Event{Kind: ControlOpen, Cookie: cookie, AppID: 3, TGID: tgid, Proto: perimeter.TCP,
		Local: netip.AddrPortFrom(server, 21), Remote: netip.AddrPortFrom(peer, 50000)}
}

func aux(cookie uint64, tgid uint32, proto perimeter.Proto, port uint16) Event {
	return Event{Kind: AuxOpen, Cookie: cookie, AppID: 3, TGID: tgid, UID: 1000, Proto: proto, Local: netip.AddrPortFrom(netip.IPv6Unspecified(), port)}
}

func closed(e Event) Event {
	switch e.Kind {
	case AuxOpen:
		e.Kind = AuxClose
	case ControlOpen:
		e.Kind = ControlClose
	}
	return e
}

func key(peer netip.Addr, proto perimeter.Proto, port uint16) perimeter.Key {
	return perimeter.Key{Peer: peer, Proto: proto, Host: server, Port: port}
}

func (r *rig) want(why string, keys ...perimeter.Key) {
	r.t.Helper()
	slices.SortFunc(keys, compareKeys)
	if got := r.gw.keys(); !slices.Equal(got, keys) {
		r.t.Errorf("%s: gateway holds %v, want %v", why, got, keys)
	}
	if got := r.guard.keys(); !slices.Equal(got, keys) {
		r.t.Errorf("%s: host guard allows %v, want %v", why, got, keys)
	}
}

func (r *rig) wantCalls(why string, calls ...string) {
	r.t.Helper()
	if got := r.gw.takeCalls(); !slices.Equal(got, calls) {
		r.t.Errorf("%s: gateway calls %v, want %v", why, got, calls)
	}
}

func TestAgentHolesFollowSockets(t *testing.T) {
	r := newRig(t)
	c1 := ctl(1, 100, client)
	r.events(c1)
	r.want("a control connection alone opens nothing")
	r.wantCalls("no hole, no call")

	a1 := aux(2, 100, perimeter.TCP, 40000)
	r.events(a1)
	r.want("listen on an aux port", key(client, perimeter.TCP, 40000))
	r.wantCalls("one new hole, one open", "open:1")

	// Another process of the app with its own control connection: its aux
	// port is for its own peer only.
	r.events(ctl(3, 200, client2), aux(4, 200, perimeter.UDP, 40001))
	r.want("second session", key(client, perimeter.TCP, 40000), key(client2, perimeter.UDP, 40001))

	// A process without control connections (forked per session) gets the
	// app's peers, in one batched request.
	r.events(aux(5, 300, perimeter.TCP, 40002))
	r.want("forked session", key(client, perimeter.TCP, 40000), key(client2, perimeter.UDP, 40001),
		key(client, perimeter.TCP, 40002), key(client2, perimeter.TCP, 40002))
	r.wantCalls("batched", "open:1", "sync:4")

	// Not an aux port, or another app: nothing.
	r.events(aux(6, 100, perimeter.TCP, 41000), Event{Kind: AuxOpen, Cookie: 7, AppID: 9, TGID: 100, Proto: perimeter.TCP, Local: netip.AddrPortFrom(server, 40003)})
	r.wantCalls("no hole for a port or app the policy does not name")

	r.events(closed(a1), closed(aux(5, 300, perimeter.TCP, 40002)))
	r.want("aux sockets released", key(client2, perimeter.UDP, 40001))
	r.wantCalls("closes batched", "close:3")

	// Its own control connection gone, a process's aux port is for nobody:
	// never for the peers of the app's other sessions.
	r.events(closed(ctl(3, 200, client2)))
	r.want("control connection gone")

	var actions []string
	for _, n := range r.notes {
		actions = append(actions, n.Action)
	}
	if want := []string{"open", "open", "open", "open", "close", "close", "close", "close"}; !slices.Equal(actions, want) {
		t.Errorf("notices %v, want %v", actions, want)
	}
	if n := r.notes[0]; n.App != "ftp" || n.User != "u1000" || n.PID != 100 || n.Rule != "site.rules:2" {
		t.Errorf("first notice %+v", n)
	}
}

// A server that forks a session per connection: the parent accepted both
// control connections, each session's process holds its own and listens on
// its own aux port, which is for that session's peer only.
func TestAgentForkedSessions(t *testing.T) {
	r := newRig(t)
	c1, c2 := ctl(1, 10, client), ctl(2, 10, client2)
	c2.Remote = netip.AddrPortFrom(client2, 50001)
	r.holds[101] = [][2]netip.AddrPort{{c1.Local, c1.Remote}}
	r.holds[102] = [][2]netip.AddrPort{{netip.AddrPortFrom(netip.MustParseAddr("::ffff:10.9.0.5"), 21), netip.AddrPortFrom(netip.MustParseAddr("::ffff:198.51.100.11"), 50001)}}
	r.events(c1, c2, aux(3, 101, perimeter.TCP, 40000), aux(4, 102, perimeter.TCP, 40001))
	r.want("each session its own peer", key(client, perimeter.TCP, 40000), key(client2, perimeter.TCP, 40001))
	// A process holding none of them: the app's peers.
	r.events(aux(5, 103, perimeter.TCP, 40002))
	r.want("unknown holder", key(client, perimeter.TCP, 40000), key(client2, perimeter.TCP, 40001),
		key(client, perimeter.TCP, 40002), key(client2, perimeter.TCP, 40002))
}

func TestAgentNeverOpensForAny(t *testing.T) {
	tests := []struct {
		name string
		peer netip.Addr
		host netip.Addr
	}{
		{"unspecified peer", netip.IPv4Unspecified(), server},
		{"loopback peer", netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.1")},
		{"unspecified host", client, netip.IPv4Unspecified()},
		{"families differ", netip.MustParseAddr("2001:db8::1"), server},
		{"multicast", netip.MustParseAddr("224.0.0.1"), server},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRig(t)
			c := ctl(1, 100, tt.peer)
			c.Local = netip.AddrPortFrom(tt.host, 21)
			r.events(c, aux(2, 100, perimeter.TCP, 40000))
			r.want("no hole")
			if _, err := r.agent.openNow(3, 100, 0, tt.peer, server, perimeter.TCP, 40000); err == nil && (tt.peer.IsUnspecified() || tt.peer.IsLoopback() || tt.peer.IsMulticast()) {
				t.Errorf("Open accepted peer %s", tt.peer)
			}
		})
	}
}

func TestAgentRefusalAndRenewal(t *testing.T) {
	r := newRig(t)
	r.gw.refuse[mallory] = true
	r.events(ctl(1, 100, mallory), aux(2, 100, perimeter.TCP, 40000))
	r.want("refused")
	if len(r.notes) != 1 || r.notes[0].Action != "refuse" || r.notes[0].Rule != "site.rules:3" {
		t.Fatalf("notices %+v, want one refusal with its rule", r.notes)
	}
	r.agent.tick(r.ctx)
	r.wantCalls("a refused hole is not asked again each tick", "open:1")

	r.events(ctl(3, 100, client))
	r.want("the other peer", key(client, perimeter.TCP, 40000))
	r.gw.takeCalls()

	r.now = r.now.Add(5 * time.Second)
	r.agent.tick(r.ctx)
	r.wantCalls("too early to renew")
	r.now = r.now.Add(6 * time.Second)
	r.agent.tick(r.ctx)
	r.wantCalls("a third of the lease gone: renew", "renew:1")

	// The gateway restarts and loses its holes: the next renewal finds
	// them missing and a sync brings them back.
	r.gw.holes = map[perimeter.Key]perimeter.Hole{}
	r.now = r.now.Add(11 * time.Second)
	r.agent.tick(r.ctx)
	r.want("after the gateway's restart", key(client, perimeter.TCP, 40000))
	r.wantCalls("renew, then sync", "renew:1", "sync:2")

	// Unreachable past the lease: the host guard closes too, and the hole
	// comes back when the gateway does.
	r.gw.down = true
	r.now = r.now.Add(31 * time.Second)
	r.agent.tick(r.ctx)
	if got := r.guard.keys(); len(got) != 0 {
		t.Errorf("host guard still allows %v after the lease", got)
	}
	r.gw.down = false
	r.agent.tick(r.ctx)
	r.want("gateway back", key(client, perimeter.TCP, 40000))
}

func TestAgentNamedPeer(t *testing.T) {
	r := newRig(t)
	r.alive[500] = true
	st, err := r.agent.openNow(3, 500, 1000, client, server, perimeter.UDP, 40010)
	if err != nil || st.State != statePending {
		t.Fatalf("named before the bind: %+v, %v; want pending", st, err)
	}
	r.want("not bound yet")
	r.events(aux(9, 500, perimeter.UDP, 40010))
	r.want("bound", key(client, perimeter.UDP, 40010))
	if _, err := r.agent.openNow(3, 500, 1000, client, server, perimeter.TCP, 21); err == nil {
		t.Errorf("a control port was accepted as an auxiliary port")
	}
	r.events(closed(aux(9, 500, perimeter.UDP, 40010)))
	r.agent.tick(r.ctx)
	r.want("released")
	r.events(aux(10, 500, perimeter.UDP, 40010))
	r.want("a named peer is for one bind")

	// A named port that is never bound forgets its peer.
	if _, err := r.agent.openNow(3, 600, 1000, client2, server, perimeter.UDP, 40011); err != nil {
		t.Fatal(err)
	}
	r.now = r.now.Add(2 * namedWait)
	r.agent.tick(r.ctx)
	r.events(aux(11, 600, perimeter.UDP, 40011))
	r.want("named peer forgotten")
	r.openAndBind(600, 40012, 12)

	// Naming a peer twice is one naming; an app names a bounded number.
	before := len(r.agent.named)
	for range 2 {
		if _, err := r.agent.openNow(3, 600, 1000, client2, server, perimeter.UDP, 40012); err != nil {
			t.Fatal(err)
		}
	}
	if len(r.agent.named) != before {
		t.Errorf("named peers %d -> %d after naming one again", before, len(r.agent.named))
	}
	for i := len(r.agent.named); i < maxNamed; i++ {
		peer := netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
		if _, err := r.agent.openNow(3, 600, 1000, peer, server, perimeter.UDP, 40013); err != nil {
			t.Fatalf("naming peer %d: %v", i, err)
		}
	}
	if _, err := r.agent.openNow(3, 600, 1000, mallory, server, perimeter.UDP, 40013); err == nil {
		t.Errorf("named more than %d peers", maxNamed)
	}
}

func (r *rig) openAndBind(pid uint32, port uint16, cookie uint64) {
	r.t.Helper()
	r.alive[pid] = true
	if _, err := r.agent.openNow(3, pid, 1000, client2, server, perimeter.UDP, port); err != nil {
		r.t.Fatal(err)
	}
	r.events(aux(cookie, pid, perimeter.UDP, port))
	r.want("named and bound", key(client2, perimeter.UDP, port))
}

// TestAgentRun drives the agent through Run, as the daemon does: a start
// syncs away what an earlier run left at the gateway.
func TestAgentRun(t *testing.T) {
	r := newRig(t)
	stale := key(mallory, perimeter.TCP, 40099)
	r.gw.holes[stale] = perimeter.Hole{Key: stale}
	src := make(fakeSource)
	r.agent.cfg.Source = src
	// A socket bound before the (re)start keeps its hole.
	r.agent.cfg.Initial = func() ([]Event, error) {
		return []Event{ctl(7, 700, client2), aux(8, 700, perimeter.UDP, 40050)}, nil
	}
	r.agent.cfg.Notify = nil
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.agent.Run(ctx) }()
	if err := r.agent.SetApps(ctx, []App{r.dynamic}); err != nil {
		t.Fatal(err)
	}
	src <- ctl(1, 100, client)
	src <- aux(2, 100, perimeter.TCP, 40000)
	for {
		hs, err := r.agent.Holes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(hs) == 2 && hs[0].State == stateOpen && hs[1].State == stateOpen {
			if hs[0].Bytes != 300 || hs[0].App != "ftp" || hs[0].Peer != client {
				t.Errorf("hole %+v", hs[0])
			}
			break
		}
		time.Sleep(time.Millisecond)
	}
	r.want("through Run", key(client, perimeter.TCP, 40000), key(client2, perimeter.UDP, 40050))
	if calls := r.gw.takeCalls(); len(calls) == 0 || calls[0] != "sync:1" {
		t.Errorf("gateway calls %v: want a start-up sync of the adopted socket's hole first (the stale one closed)", calls)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestAgentStaleHoles: a hole closes as stale when its gateway counters
// stood still for StaleAfter and the socket view shows no use by its peer;
// moving counters or a connected peer keep it; a released socket closes
// its hole at once, whatever the counters.
func TestAgentStaleHoles(t *testing.T) {
	r := newRig(t)
	r.agent.cfg.StaleAfter = time.Minute
	var uses []Use
	var usesErr error
	r.agent.cfg.Uses = func() ([]Use, error) { return uses, usesErr }
	idle, busy, connected := key(client, perimeter.TCP, 40000), key(client, perimeter.UDP, 40001), key(client, perimeter.TCP, 40002)
	udp := aux(3, 100, perimeter.UDP, 40001)
	r.events(ctl(1, 100, client), aux(2, 100, perimeter.TCP, 40000), udp, aux(4, 100, perimeter.TCP, 40002))
	r.want("open", idle, busy, connected)
	r.gw.takeCalls()
	// The peer holds a connection accepted on 40002 (seen as ::ffff:).
	uses = []Use{{Proto: perimeter.TCP, Peer: netip.MustParseAddr("::ffff:198.51.100.10"), Port: 40002}}

	step := func(d time.Duration) {
		r.gw.packets[busy] += 10 // traffic through this hole only
		r.now = r.now.Add(d)
		r.agent.tick(r.ctx)
	}
	step(5 * time.Second)
	if r.gw.lists != 0 {
		t.Errorf("List asked %d times before a renewal was due", r.gw.lists)
	}
	// The first List sees the counters at 16s; a minute later the idle
	// hole is stale.
	for range 8 {
		step(11 * time.Second)
	}
	if r.gw.lists == 0 {
		t.Fatal("no List at renewal time")
	}
	r.want("counters still, peer not connected: stale", busy, connected)
	var stale []Notice
	for _, n := range r.notes {
		if n.Action == "close" {
			stale = append(stale, n)
		}
	}
	if len(stale) != 1 || stale[0].Key != idle || stale[0].Reason != "stale" {
		t.Errorf("close notices %+v, want one for %v with reason stale", stale, idle)
	}
	for _, c := range r.gw.takeCalls() {
		if c == "sync:1" || c == "open:1" {
			t.Errorf("a stale hole was asked again (%s)", c)
		}
	}

	// The peer's connection ends and the counters stay: stale too. The
	// socket view failing decides nothing.
	uses = nil
	usesErr = errors.New("iterator refused")
	for range 7 {
		step(11 * time.Second)
	}
	r.want("no socket view, no stale", busy, connected)
	usesErr = nil
	for range 2 {
		step(11 * time.Second)
	}
	r.want("connection gone", busy)

	// A new socket on the port wants the hole again.
	r.events(aux(5, 100, perimeter.TCP, 40000))
	r.want("bound again", busy, idle)

	// A released socket closes its hole though its counters move.
	r.events(closed(udp))
	r.want("released", idle)
	if n := r.notes[len(r.notes)-1]; n.Action != "close" || n.Key != busy || n.Reason != "released" {
		t.Errorf("last notice %+v, want close of %v, released", n, busy)
	}
}

// TestAgentNamedPeersSurviveRestart: the named peers are saved on every
// change and a new agent takes them back, without those whose port is no
// longer auxiliary or whose app is gone.
func TestAgentNamedPeersSurviveRestart(t *testing.T) {
	r := newRig(t)
	var saved []byte
	r.agent.cfg.SaveNamed = func(ps []NamedPeer) (err error) {
		saved, err = json.Marshal(ps) // as the daemon's state file holds them
		return err
	}
	for _, port := range []uint16{40010, 40011} {
		if _, err := r.agent.openNow(3, 500, 1000, client, server, perimeter.UDP, port); err != nil {
			t.Fatal(err)
		}
	}
	r.events(aux(9, 500, perimeter.UDP, 40010))
	r.want("named and bound", key(client, perimeter.UDP, 40010))
	var ps []NamedPeer
	if err := json.Unmarshal(saved, &ps); err != nil || len(ps) != 2 || !ps[0].Bound || ps[0].Peer != client || ps[0].App != "ftp" {
		t.Fatalf("saved %s (%v): want both named peers, the first bound", saved, err)
	}

	// The daemon restarts with a policy whose aux ports end at 40010, and
	// an app that is gone named a peer too.
	r2 := newRig(t)
	r2.dynamic.Inbound.Ports = []ruleset.PortRange{{Lo: 40000, Hi: 40010}}
	r2.agent.apps = map[uint32]App{3: r2.dynamic}
	r2.agent.cfg.Named = append(ps, NamedPeer{App: "gone", Peer: client2, Host: server, Proto: perimeter.UDP, Port: 40010, Bound: true})
	saved = nil
	r2.agent.cfg.SaveNamed = r.agent.cfg.SaveNamed
	r2.agent.loadNamed()
	r2.events(aux(9, 500, perimeter.UDP, 40010)) // the socket outlived the daemon
	r2.want("named peer back", key(client, perimeter.UDP, 40010))
	if err := json.Unmarshal(saved, &ps); err != nil || len(ps) != 1 || ps[0].Port != 40010 {
		t.Errorf("saved after the restart %s (%v): want the 40010 peer only", saved, err)
	}
	// Released after the restart: forgotten as before.
	r2.events(closed(aux(9, 500, perimeter.UDP, 40010)))
	r2.agent.tick(r2.ctx)
	r2.events(aux(10, 500, perimeter.UDP, 40010))
	r2.want("a named peer is for one bind, across a restart too")
	if string(saved) != "[]" {
		t.Errorf("saved %s after the release, want []", saved)
	}
}

// TestUserNames: a uid is named by the user database once per TTL, not at
// each hole; a uid it does not know is "uid-N", kept as long.
func TestUserNames(t *testing.T) {
	now := time.Unix(1000, 0)
	asked := map[uint32]int{}
	n := &userNames{now: func() time.Time { return now }, lookup: func(uid uint32) (users.User, error) {
		asked[uid]++
		if uid == 1001 {
			return users.User{Name: "ldapuser", UID: uid}, nil
		}
		return users.User{}, users.ErrUnknown
	}}
	for _, tt := range []struct {
		step  time.Duration
		uid   uint32
		want  string
		asked int
	}{
		{0, 1001, "ldapuser", 1},
		{time.Second, 1001, "ldapuser", 1},
		{0, 64002, "uid-64002", 1},
		{0, 64002, "uid-64002", 1},
		{userNameTTL, 1001, "ldapuser", 2},
	} {
		now = now.Add(tt.step)
		if got := n.name(tt.uid); got != tt.want || asked[tt.uid] != tt.asked {
			t.Errorf("name(%d) at %v = %q after %d lookups, want %q after %d", tt.uid, now, got, asked[tt.uid], tt.want, tt.asked)
		}
	}
	if _, ok := n.known[64002]; ok {
		t.Errorf("an entry older than the TTL was kept: %+v", n.known)
	}
}
