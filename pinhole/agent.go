package pinhole

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/ruleset"
	"github.com/procgate/procgate/users"
)

// Gateway is the perimeter gateway's API (perimeter.Client).
type Gateway interface {
	Open(ctx context.Context, req perimeter.Request) (perimeter.Hole, error)
	Renew(ctx context.Context, holes []perimeter.Target, leaseSeconds int) (perimeter.RenewResult, error)
	Close(ctx context.Context, holes []perimeter.Target) (perimeter.CloseResult, error)
	List(ctx context.Context) ([]perimeter.Hole, error)
	Sync(ctx context.Context, holes []perimeter.Request) (perimeter.SyncResult, error)
}

var (
	_ Gateway = (*perimeter.Client)(nil)
	_ Gateway = (*perimeter.Failover)(nil)
)

// switcher is a Gateway of several gateways (perimeter.Failover) that says
// when its calls moved to another one.
type switcher interface {
	Switched() bool
}

// Guard is the host's own guard of auxiliary ports (Kernel): only the
// peers of open holes get in.
type Guard interface {
	Allow(perimeter.Key) error
	Revoke(perimeter.Key) error
}

// holdReleaser is a Guard that holds a dynamic app's answers on its
// control connections while its new holes are being opened (Kernel): the
// agent releases each auxiliary open it read once the gateway answered.
type holdReleaser interface {
	Release(app uint32, n uint64) error
}

// Source gives kernel events (Kernel); Read fails once the source is closed.
type Source interface {
	Read() (Event, error)
}

// App is a dynamic app as the agent knows it.
type App struct {
	Name    string
	ID      uint32
	Inbound *ruleset.Inbound
}

// Notice is something the audit log keeps: a hole opened, closed or refused.
type Notice struct {
	Action string // ruleset.VerdictOpen, VerdictClose or VerdictRefuse
	App    string
	User   string
	UID    uint32
	PID    uint32
	Key    perimeter.Key
	Reason string
	Rule   string
}

// Config is what an Agent works with.
type Config struct {
	Gateway Gateway
	Guard   Guard
	Source  Source
	Log     *slog.Logger
	// Notify receives every open, close and refusal (the daemon writes them
	// to the audit log); nil: none.
	Notify func(Notice)
	// UserName names a uid for the gateway's rules; default: the user
	// database's name (NSS included), else "uid-N" (userNames).
	UserName func(uid uint32) string
	// Alive reports whether a process still exists; default: /proc/PID.
	Alive func(pid uint32) bool
	// Holds lists the TCP connections (local, remote) whose sockets the
	// process tgid holds open: for a server that forks a process per
	// session (vsftpd), it finds the session's control connection, which
	// the parent accepted. Default: /proc (procHolds); nil results fall
	// back to the app's peers.
	Holds func(tgid uint32) [][2]netip.AddrPort
	// Apps are the dynamic apps at the start (later: SetApps).
	Apps []App
	// Initial lists the sockets that exist when Run starts (Kernel.Snapshot),
	// so that a restarted agent keeps their holes; nil: none.
	Initial func() ([]Event, error)
	// Named are the peers named through the local API that an earlier run
	// saved (SaveNamed); Run takes those whose app is still dynamic and
	// whose port is still auxiliary.
	Named []NamedPeer
	// SaveNamed keeps the named peers over a restart; it is called with
	// all of them whenever they change. nil: not kept.
	SaveNamed func([]NamedPeer) error
	// StaleAfter turns on the stale-hole check: an open hole whose
	// gateway counters have not moved for this long, and whose peer the
	// socket view (Uses) does not show on the port, is closed with reason
	// "stale". 0: off.
	StaleAfter time.Duration
	// Uses is the socket view of which peers use an auxiliary port now
	// (Kernel.Uses); nil: none do, the counters alone decide.
	Uses func() ([]Use, error)
	// Tick is how often leases, dead requesters and retries are looked at
	// (default 1s).
	Tick time.Duration
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// state of a hole.
const (
	stateOpen    = "open"
	stateRefused = "refused"
	statePending = "pending" // wanted, not (yet) open at the gateway
)

type control struct {
	app           uint32
	tgid          uint32
	peer, host    netip.Addr
	local, remote netip.AddrPort
}

type auxSock struct {
	app, tgid, uid uint32
	proto          perimeter.Proto
	port           uint16
}

// named is a peer an app named through the local API for one of its ports.
type named struct {
	app uint32 // the app's id (NamedPeer.App, its name, is filled in when saved)
	NamedPeer
}

// NamedPeer is a named peer as it is saved: by app name (app ids are the
// daemon's, names are the policy's).
type NamedPeer struct {
	App   string          `json:"app"`
	PID   uint32          `json:"pid"`
	UID   uint32          `json:"uid"`
	Peer  netip.Addr      `json:"peer"`
	Host  netip.Addr      `json:"host"`
	Proto perimeter.Proto `json:"proto"`
	Port  uint16          `json:"port"`
	Bound bool            `json:"bound"` // an auxiliary socket was seen on the port since
	Since time.Time       `json:"since"`
}

// namedWait is how long a named peer waits for its port to be bound.
const namedWait = time.Minute

// maxNamed bounds the named peers an app holds at once: each costs memory
// and, bound, a hole.
const maxNamed = 1024

// Use is a peer that uses an auxiliary port now, in the kernel's socket
// view: a connection accepted on the port, or a UDP socket connected to it.
type Use struct {
	Proto perimeter.Proto
	Peer  netip.Addr
	Port  uint16
}

type hole struct {
	key      perimeter.Key
	app      string
	uid, pid uint32
	user     string
	lease    int // seconds asked; 0 the gateway's default
	state    string
	reason   string // why refused
	opened   time.Time
	renewed  time.Time
	expires  time.Time
	// packets is the gateway's counter at the last stale check, moved
	// when it last changed (or the hole opened).
	packets uint64
	moved   time.Time
}

// Status is one hole as `procgate pinholes` shows it.
type Status struct {
	App     string          `json:"app"`
	User    string          `json:"user"`
	PID     uint32          `json:"pid,omitempty"`
	Proto   perimeter.Proto `json:"proto"`
	Peer    netip.Addr      `json:"peer"`
	Host    netip.Addr      `json:"host"`
	Port    uint16          `json:"port"`
	State   string          `json:"state"`
	Reason  string          `json:"reason,omitempty"`
	Opened  time.Time       `json:"opened,omitzero"`
	Expires time.Time       `json:"expires,omitzero"`
	Packets uint64          `json:"packets"`
	Bytes   uint64          `json:"bytes"`
}

// Agent holds the holes the apps' sockets need. Its state lives in the Run
// goroutine; other goroutines reach it through do.
type Agent struct {
	cfg      Config
	log      *slog.Logger
	apps     map[uint32]App
	controls map[uint64]control
	// withControl are the processes that held a control connection of
	// their own: their auxiliary ports are for their own peers only.
	withControl map[uint32]bool
	auxes       map[uint64]auxSock
	named       []*named
	holes       map[perimeter.Key]*hole
	// stale are holes closed as stale: not asked again until a new socket
	// on their port, a new control connection of their peer, or a new
	// naming wants them.
	stale    map[perimeter.Key]bool
	needSync bool
	events   chan Event
	calls    chan func(context.Context)
}

// New makes an agent; Run runs it.
func New(cfg Config) *Agent {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.UserName == nil {
		cfg.UserName = (&userNames{lookup: users.LookupUID, now: time.Now}).name
	}
	if cfg.Alive == nil {
		cfg.Alive = func(pid uint32) bool {
			_, err := os.Stat("/proc/" + strconv.FormatUint(uint64(pid), 10))
			return err == nil
		}
	}
	if cfg.Tick == 0 {
		cfg.Tick = time.Second
	}
	if cfg.Holds == nil {
		cfg.Holds = procHolds
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	a := &Agent{
		cfg: cfg, log: cfg.Log,
		apps: map[uint32]App{}, controls: map[uint64]control{}, auxes: map[uint64]auxSock{}, withControl: map[uint32]bool{},
		holes: map[perimeter.Key]*hole{}, stale: map[perimeter.Key]bool{},
		events: make(chan Event, 4096), calls: make(chan func(context.Context)),
	}
	for _, app := range cfg.Apps {
		a.apps[app.ID] = app
	}
	return a
}

// userNameTTL is how long a uid's name is kept: a user renamed in the
// directory is seen within it.
const userNameTTL = time.Minute

// userNames names uids as the rest of procgate does (users: the files,
// then NSS by getent, so a directory user's name and not "uid-N", which
// a gateway rule naming the user would not match). The agent asks in its
// event loop, at each hole: a getent run there (a directory server's
// answer, at worst users' 10 s timeout) is paid once per uid and
// userNameTTL, not per bind; a failed lookup is kept as long.
type userNames struct {
	lookup func(uid uint32) (users.User, error)
	now    func() time.Time

	mu    sync.Mutex
	known map[uint32]cachedName
}

type cachedName struct {
	name string
	at   time.Time
}

func (n *userNames) name(uid uint32) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	now := n.now()
	if c, ok := n.known[uid]; ok && now.Sub(c.at) < userNameTTL {
		return c.name
	}
	name := "uid-" + strconv.FormatUint(uint64(uid), 10)
	if u, err := n.lookup(uid); err == nil && u.Name != "" {
		name = u.Name
	}
	if n.known == nil {
		n.known = map[uint32]cachedName{}
	}
	for k, c := range n.known {
		if now.Sub(c.at) >= userNameTTL {
			delete(n.known, k) // bounded by the uids seen within a TTL
		}
	}
	n.known[uid] = cachedName{name: name, at: now}
	return name
}

// Run takes the sockets that exist now (Config.Initial), syncs the gateway
// to the holes they need (what an earlier run left open and nothing needs
// closes now, not at the end of its lease), then follows events until ctx
// ends. The holes stay open at the gateway until their leases end, so a
// restarted daemon does not cut transfers short.
func (a *Agent) Run(ctx context.Context) error {
	a.loadNamed()
	if a.cfg.Initial != nil {
		es, err := a.cfg.Initial()
		if err != nil {
			a.log.Warn("cannot list the sockets that exist; their holes close until they are bound again", "err", err)
		}
		for _, e := range es {
			a.handle(e)
		}
		if len(es) > 0 {
			a.log.Info("pinhole agent adopted existing sockets", "sockets", len(es))
		}
	}
	go func() {
		for {
			e, err := a.cfg.Source.Read()
			if err != nil {
				close(a.events)
				return
			}
			select {
			case a.events <- e:
			case <-ctx.Done():
				return
			}
		}
	}()
	a.needSync = true
	a.reconcile(ctx)
	tick := time.NewTicker(a.cfg.Tick)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-a.events:
			if !ok {
				return errors.New("pinhole event source closed")
			}
			// Take whatever else is queued, then talk to the gateway once:
			// the holes of a burst go in one request.
			batch := []Event{e}
			for more := true; more; {
				select {
				case e, ok := <-a.events:
					if !ok {
						return errors.New("pinhole event source closed")
					}
					batch = append(batch, e)
				default:
					more = false
				}
			}
			a.apply(ctx, batch)
		case f := <-a.calls:
			f(ctx)
		case <-tick.C:
			a.tick(ctx)
		}
	}
}

// apply handles a batch of kernel events, asks the gateway once for what
// they change, and then lets the apps' control connections send again:
// the kernel held their answers from each auxiliary open on (see
// holdReleaser). The release comes after the gateway answered (reconcile
// waits for the answers), whatever it answered: the hold is there to let
// a hole go live first, never to stop the app.
func (a *Agent) apply(ctx context.Context, batch []Event) {
	opens := map[uint32]uint64{}
	for _, e := range batch {
		if e.Kind == AuxOpen {
			opens[e.AppID]++
		}
		a.handle(e)
	}
	a.reconcile(ctx)
	r, ok := a.cfg.Guard.(holdReleaser)
	if !ok {
		return
	}
	for app, n := range opens {
		if err := r.Release(app, n); err != nil {
			a.log.Warn("cannot release the hold on the app's control connections; it ends by its deadline", "app_id", app, "err", err)
		}
	}
}

// do runs f in the Run goroutine and waits for it.
func (a *Agent) do(ctx context.Context, f func(context.Context)) error {
	done := make(chan struct{})
	select {
	case a.calls <- func(c context.Context) { f(c); close(done) }:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// SetApps sets the dynamic apps (after a policy load). Holes of apps no
// longer dynamic close.
func (a *Agent) SetApps(ctx context.Context, apps []App) error {
	return a.do(ctx, func(ctx context.Context) {
		a.apps = map[uint32]App{}
		for _, app := range apps {
			a.apps[app.ID] = app
		}
		a.pruneNamed()
		a.reconcile(ctx)
	})
}

func (a *Agent) handle(e Event) {
	a.log.Debug("pinhole event", "event", e.String())
	switch e.Kind {
	case ControlOpen:
		local := netip.AddrPortFrom(e.Local.Addr().Unmap(), e.Local.Port())
		remote := netip.AddrPortFrom(e.Remote.Addr().Unmap(), e.Remote.Port())
		a.controls[e.Cookie] = control{app: e.AppID, tgid: e.TGID, peer: remote.Addr(), host: local.Addr(), local: local, remote: remote}
		a.withControl[e.TGID] = true
		maps.DeleteFunc(a.stale, func(k perimeter.Key, _ bool) bool { return k.Peer == remote.Addr() })
	case ControlClose:
		delete(a.controls, e.Cookie)
	case AuxOpen:
		a.auxes[e.Cookie] = auxSock{app: e.AppID, tgid: e.TGID, uid: e.UID, proto: e.Proto, port: e.Local.Port()}
		maps.DeleteFunc(a.stale, func(k perimeter.Key, _ bool) bool { return k.Proto == e.Proto && k.Port == e.Local.Port() })
		saved := false
		for _, n := range a.named {
			if n.app == e.AppID && n.Proto == e.Proto && n.Port == e.Local.Port() && !n.Bound {
				n.Bound, saved = true, true
			}
		}
		if saved {
			a.saveNamed()
		}
	case AuxClose:
		delete(a.auxes, e.Cookie)
	}
}

type want struct {
	app      string
	uid, pid uint32
	lease    int
}

// desired is every hole the observed sockets and named peers need now.
func (a *Agent) desired() map[perimeter.Key]want {
	out := map[perimeter.Key]want{}
	add := func(peer, host netip.Addr, proto perimeter.Proto, port uint16, app App, uid, pid uint32) {
		// Never a hole for "any", for the host itself, or for a family the
		// host address is not of.
		if !peer.IsValid() || peer.IsUnspecified() || peer.IsLoopback() || peer.IsMulticast() ||
			!host.IsValid() || host.IsUnspecified() || peer.Is4() != host.Is4() || port == 0 {
			return
		}
		k := perimeter.Key{Peer: peer, Proto: proto, Host: host, Port: port}
		if a.stale[k] {
			return
		}
		if _, ok := out[k]; !ok {
			out[k] = want{app: app.Name, uid: uid, pid: pid, lease: int(app.Inbound.Lease / time.Second)}
		}
	}
	cookies := slices.Sorted(mapsKeys(a.auxes)) // deterministic owners of shared holes
	for _, c := range cookies {
		x := a.auxes[c]
		app, ok := a.apps[x.app]
		if !ok || !app.Inbound.IsAux(protoSet(x.proto), x.port) {
			continue
		}
		// The peers of the same process's control connections; if it never
		// had one (a server that forks a process per session, whose control
		// connections its parent accepted), those of the app.
		var peers []control
		for _, c := range a.controls {
			if c.app == x.app && c.tgid == x.tgid {
				peers = append(peers, c)
			}
		}
		if !a.withControl[x.tgid] {
			peers = a.sessionPeers(x)
		}
		for _, c := range peers {
			add(c.peer, c.host, x.proto, x.port, app, x.uid, x.tgid)
		}
	}
	for _, n := range a.named {
		app, ok := a.apps[n.app]
		if !ok {
			continue
		}
		for _, x := range a.auxes {
			if x.app == n.app && x.proto == n.Proto && x.port == n.Port {
				add(n.Peer, n.Host, n.Proto, n.Port, app, n.UID, n.PID)
				break
			}
		}
	}
	return out
}

// sessionPeers are the control connections of x's app that x's process
// holds open (a forked session), else all of the app's.
func (a *Agent) sessionPeers(x auxSock) []control {
	held := map[[2]netip.AddrPort]bool{}
	for _, t := range a.cfg.Holds(x.tgid) {
		held[[2]netip.AddrPort{unmapPort(t[0]), unmapPort(t[1])}] = true
	}
	var mine, all []control
	for _, c := range a.controls {
		if c.app != x.app {
			continue
		}
		all = append(all, c)
		if held[[2]netip.AddrPort{c.local, c.remote}] {
			mine = append(mine, c)
		}
	}
	if len(mine) > 0 {
		return mine
	}
	return all
}

func unmapPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func mapsKeys[K comparable, V any](m map[K]V) func(func(K) bool) {
	return func(yield func(K) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func protoSet(p perimeter.Proto) ruleset.Proto {
	if p == perimeter.UDP {
		return ruleset.UDP
	}
	return ruleset.TCP
}

func (a *Agent) request(k perimeter.Key, w want) perimeter.Request {
	return perimeter.Request{Target: k.Target(), User: a.cfg.UserName(w.uid), LeaseSeconds: w.lease}
}

// reconcile brings the gateway and the host guard to the desired holes.
func (a *Agent) reconcile(ctx context.Context) {
	if sw, ok := a.cfg.Gateway.(switcher); ok && sw.Switched() {
		// Another gateway answers now: it may have none of our holes (no
		// shared store, or a router that lost its state), so it gets all
		// of them at once rather than at the next renewal.
		a.log.Warn("pinhole gateway changed; syncing every hole")
		a.needSync = true
	}
	wants := a.desired()
	var closes []*hole
	for k, h := range a.holes {
		if _, ok := wants[k]; !ok {
			closes = append(closes, h)
		}
	}
	var opens []perimeter.Key
	for k := range wants {
		if _, ok := a.holes[k]; !ok {
			opens = append(opens, k)
		}
	}
	slices.SortFunc(opens, func(x, y perimeter.Key) int { return compareKeys(x, y) })
	for _, k := range opens {
		w := wants[k]
		a.holes[k] = &hole{key: k, app: w.app, uid: w.uid, pid: w.pid, user: a.cfg.UserName(w.uid), lease: w.lease, state: statePending}
	}
	if len(closes) > 0 {
		a.close(ctx, closes, "released")
	}
	switch {
	case a.needSync || len(opens) > 1:
		// One request for a batch of new holes: the gateway's sync opens
		// them (and keeps the others) in one transaction.
		a.sync(ctx, wants)
	case len(opens) == 1:
		a.open(ctx, a.holes[opens[0]])
	}
}

func compareKeys(x, y perimeter.Key) int {
	if c := x.Peer.Compare(y.Peer); c != 0 {
		return c
	}
	if c := x.Host.Compare(y.Host); c != 0 {
		return c
	}
	if x.Port != y.Port {
		return int(x.Port) - int(y.Port)
	}
	return int(x.Proto) - int(y.Proto)
}

func (a *Agent) notify(action string, h *hole, reason, rule string) {
	level := slog.LevelInfo
	if action == ruleset.VerdictRefuse {
		level = slog.LevelWarn
	}
	a.log.Log(context.Background(), level, "pinhole "+action, "app", h.app, "user", h.user, "pid", h.pid,
		"proto", h.key.Proto.String(), "peer", h.key.Peer.String(), "host", h.key.Host.String(), "port", h.key.Port,
		"reason", reason, "rule", rule)
	if a.cfg.Notify != nil {
		a.cfg.Notify(Notice{Action: action, App: h.app, User: h.user, UID: h.uid, PID: h.pid, Key: h.key, Reason: reason, Rule: rule})
	}
}

func (a *Agent) opened(h *hole, g perimeter.Hole) {
	was := h.state
	now := a.cfg.Now()
	h.state, h.reason, h.renewed, h.expires = stateOpen, "", now, g.Expires
	if h.expires.IsZero() || !h.expires.After(now) {
		h.expires = now.Add(time.Duration(max(h.lease, 1)) * time.Second)
	}
	if was != stateOpen {
		h.opened, h.moved, h.packets = now, now, 0
		if err := a.cfg.Guard.Allow(h.key); err != nil {
			a.log.Error("host guard", "err", err)
		}
		a.notify(ruleset.VerdictOpen, h, "", g.Rule)
	}
}

func (a *Agent) refused(h *hole, reason, rule string) {
	if h.state == stateOpen {
		if err := a.cfg.Guard.Revoke(h.key); err != nil {
			a.log.Error("host guard", "err", err)
		}
	}
	if h.state != stateRefused || h.reason != reason {
		a.notify(ruleset.VerdictRefuse, h, reason, rule)
	}
	h.state, h.reason = stateRefused, reason
}

func (a *Agent) open(ctx context.Context, h *hole) {
	g, err := a.cfg.Gateway.Open(ctx, a.request(h.key, want{uid: h.uid, lease: h.lease}))
	var apiErr *perimeter.APIError
	switch {
	case err == nil:
		a.opened(h, g)
	case errors.As(err, &apiErr) && apiErr.Status < 500:
		a.refused(h, apiErr.Message, apiErr.Rule)
	default:
		a.log.Warn("gateway unreachable; will sync", "err", err)
		a.needSync = true
	}
}

func (a *Agent) sync(ctx context.Context, wants map[perimeter.Key]want) {
	var reqs []perimeter.Request
	keys := slices.SortedFunc(mapsKeys(wants), compareKeys)
	for _, k := range keys {
		if h := a.holes[k]; h != nil && h.state == stateRefused && !a.needSync {
			continue // refused by the rules: asked again at a sync only
		}
		reqs = append(reqs, a.request(k, wants[k]))
	}
	res, err := a.cfg.Gateway.Sync(ctx, reqs)
	if err != nil {
		a.log.Warn("gateway sync failed; will retry", "err", err, "holes", len(reqs))
		a.needSync = true
		return
	}
	a.needSync = false
	for _, g := range res.Holes {
		if h := a.holes[g.Key]; h != nil {
			a.opened(h, g)
		}
	}
	for _, r := range res.Refused {
		k, err := r.Target.Key()
		if h := a.holes[k]; err == nil && h != nil {
			a.refused(h, r.Error, r.Rule)
		}
	}
}

// close closes holes at the host guard and, in one request, at the
// gateway; reason is the audit record's: "released" (no socket needs it)
// or "stale".
func (a *Agent) close(ctx context.Context, hs []*hole, reason string) {
	var targets []perimeter.Target
	for _, h := range hs {
		delete(a.holes, h.key)
		if h.state != stateOpen {
			continue
		}
		if err := a.cfg.Guard.Revoke(h.key); err != nil {
			a.log.Error("host guard", "err", err)
		}
		targets = append(targets, h.key.Target())
		a.notify(ruleset.VerdictClose, h, reason, "")
	}
	if len(targets) == 0 {
		return
	}
	if _, err := a.cfg.Gateway.Close(ctx, targets); err != nil {
		// The next sync closes them, or their leases do.
		a.log.Warn("gateway close failed; will sync", "err", err, "holes", len(targets))
		a.needSync = true
	}
}

// tick renews leases, drops named peers whose requester is gone, and
// retries a sync the gateway missed.
func (a *Agent) tick(ctx context.Context) {
	now := a.cfg.Now()
	before := len(a.named)
	defer func() {
		if len(a.named) != before {
			a.saveNamed()
		}
	}()
	a.named = slices.DeleteFunc(a.named, func(n *named) bool {
		if !n.Bound {
			return now.Sub(n.Since) > namedWait
		}
		for _, x := range a.auxes {
			if x.app == n.app && x.proto == n.Proto && x.port == n.Port {
				return false
			}
		}
		return true // its port was bound and is released now
	})
	for tgid := range a.withControl {
		if !a.cfg.Alive(tgid) {
			delete(a.withControl, tgid)
		}
	}
	byLease := map[int][]*hole{}
	for _, h := range a.holes {
		if h.state != stateOpen {
			continue
		}
		if !now.Before(h.expires) {
			// The gateway's lease ran out (it was unreachable): the host
			// guard follows, and the next sync opens it again.
			if err := a.cfg.Guard.Revoke(h.key); err != nil {
				a.log.Error("host guard", "err", err)
			}
			h.state = statePending
			a.needSync = true
			continue
		}
		if now.Sub(h.renewed) >= h.expires.Sub(h.renewed)/3 {
			byLease[h.lease] = append(byLease[h.lease], h)
		}
	}
	if len(byLease) > 0 && a.cfg.StaleAfter > 0 {
		// At renewal time, not every tick: one List per lease third.
		for _, k := range a.closeStale(ctx, now) {
			for lease, hs := range byLease {
				byLease[lease] = slices.DeleteFunc(hs, func(h *hole) bool { return h.key == k })
			}
		}
	}
	for lease, hs := range byLease {
		if len(hs) == 0 {
			continue
		}
		var targets []perimeter.Target
		for _, h := range hs {
			targets = append(targets, h.key.Target())
		}
		res, err := a.cfg.Gateway.Renew(ctx, targets, lease)
		if err != nil {
			a.log.Warn("gateway renew failed; will retry", "err", err, "holes", len(targets))
			continue
		}
		for _, g := range res.Renewed {
			if h := a.holes[g.Key]; h != nil {
				h.renewed, h.expires = now, g.Expires
			}
		}
		if len(res.Missing) > 0 {
			// A restarted gateway, or leases that ran out: sync everything.
			a.log.Warn("gateway lost holes; syncing", "missing", len(res.Missing))
			for _, t := range res.Missing {
				if k, err := t.Key(); err == nil && a.holes[k] != nil {
					a.holes[k].state = statePending
				}
			}
			a.needSync = true
		}
		for _, r := range res.Refused {
			if k, err := r.Target.Key(); err == nil && a.holes[k] != nil {
				a.refused(a.holes[k], r.Error, r.Rule)
			}
		}
	}
	a.reconcile(ctx)
}

// closeStale closes the open holes that are stale: the gateway's counters
// have not moved for StaleAfter, and the socket view shows no connection
// from the peer on the port. It lives in the agent, not in the gateway,
// because only the agent has both halves: the gateway sees packets, the
// agent sees the sockets (and writes the audit log); it asks at renewal
// time with one List, the request the gateway already answers for
// `procgate pinholes`. A hole in use is never stale (its counters move, or
// its peer is connected); a hole whose socket is gone is not waited for
// here at all: the socket's release closes it at once, whatever the
// counters. If the gateway or the socket view does not answer, nothing is
// stale. It returns the keys it closed.
func (a *Agent) closeStale(ctx context.Context, now time.Time) []perimeter.Key {
	gs, err := a.cfg.Gateway.List(ctx)
	if err != nil {
		a.log.Warn("gateway list failed; no stale-hole check this time", "err", err)
		return nil
	}
	counters := map[perimeter.Key]uint64{}
	for _, g := range gs {
		counters[g.Key] = g.Packets
	}
	var idle []*hole
	for _, h := range a.holes {
		if h.state != stateOpen {
			continue
		}
		p, ok := counters[h.key]
		if !ok {
			continue // missing at the gateway: the renewal and a sync deal with it
		}
		if p != h.packets || h.moved.IsZero() {
			h.packets, h.moved = p, now
			continue
		}
		if now.Sub(h.moved) >= a.cfg.StaleAfter {
			idle = append(idle, h)
		}
	}
	if len(idle) == 0 {
		return nil
	}
	used := map[Use]bool{}
	if a.cfg.Uses != nil {
		us, err := a.cfg.Uses()
		if err != nil {
			a.log.Warn("socket view failed; no stale-hole check this time", "err", err)
			return nil
		}
		for _, u := range us {
			u.Peer = u.Peer.Unmap()
			used[u] = true
		}
	}
	var stale []*hole
	var keys []perimeter.Key
	for _, h := range idle {
		if used[Use{Proto: h.key.Proto, Peer: h.key.Peer, Port: h.key.Port}] {
			continue
		}
		stale = append(stale, h)
		keys = append(keys, h.key)
		a.stale[h.key] = true
	}
	if len(stale) > 0 {
		slices.SortFunc(stale, func(x, y *hole) int { return compareKeys(x.key, y.key) })
		a.close(ctx, stale, "stale")
	}
	return keys
}

// loadNamed takes the named peers an earlier run saved.
func (a *Agent) loadNamed() {
	byName := map[string]uint32{}
	for id, app := range a.apps {
		byName[app.Name] = id
	}
	for _, p := range a.cfg.Named {
		id, ok := byName[p.App]
		if !ok {
			continue
		}
		p.Peer, p.Host = p.Peer.Unmap(), p.Host.Unmap()
		a.named = append(a.named, &named{app: id, NamedPeer: p})
	}
	a.pruneNamed()
	if len(a.named) != len(a.cfg.Named) {
		a.saveNamed() // some were dropped while pruning or had no app
	}
	if len(a.named) > 0 {
		a.log.Info("pinhole agent took named peers of an earlier run", "named", len(a.named))
	}
}

// pruneNamed drops the named peers whose app is no longer dynamic or whose
// port is no longer auxiliary.
func (a *Agent) pruneNamed() {
	before := len(a.named)
	a.named = slices.DeleteFunc(a.named, func(n *named) bool {
		app, ok := a.apps[n.app]
		return !ok || !app.Inbound.IsAux(protoSet(n.Proto), n.Port)
	})
	if len(a.named) != before {
		a.saveNamed()
	}
}

func (a *Agent) saveNamed() {
	if a.cfg.SaveNamed == nil {
		return
	}
	out := []NamedPeer{}
	for _, n := range a.named {
		p := n.NamedPeer
		p.App = a.apps[n.app].Name
		out = append(out, p)
	}
	if err := a.cfg.SaveNamed(out); err != nil {
		a.log.Error("save named peers; they will not survive a restart", "err", err)
	}
}

// Open names a peer for an app's auxiliary port on behalf of process pid
// (the local API's `pinhole-open`; pid is recorded, the naming belongs to
// the app, as the CLI that asks exits at once). The hole is open while the
// app has a socket on the port and closes when that socket is released; a
// port not bound within a minute forgets the peer. The answer is the hole's state after the gateway answered:
// open, refused (with the reason), or pending (the port is not bound yet).
func (a *Agent) Open(ctx context.Context, app uint32, pid, uid uint32, peer, host netip.Addr, proto perimeter.Proto, port uint16) (Status, error) {
	var st Status
	var err error
	derr := a.do(ctx, func(ctx context.Context) {
		st, err = a.openNamed(ctx, app, pid, uid, peer, host, proto, port)
	})
	return st, errors.Join(derr, err)
}

func (a *Agent) openNow(app uint32, pid, uid uint32, peer, host netip.Addr, proto perimeter.Proto, port uint16) (Status, error) {
	return a.openNamed(context.Background(), app, pid, uid, peer, host, proto, port)
}

func (a *Agent) openNamed(ctx context.Context, app uint32, pid, uid uint32, peer, host netip.Addr, proto perimeter.Proto, port uint16) (Status, error) {
	peer, host = peer.Unmap(), host.Unmap()
	if !peer.IsValid() || peer.IsUnspecified() || peer.IsMulticast() || peer.IsLoopback() {
		return Status{}, fmt.Errorf("peer %s is not one remote host", peer)
	}
	if !host.IsValid() || host.Is4() != peer.Is4() {
		return Status{}, fmt.Errorf("no local address of the peer's family to open a hole to (host %s)", host)
	}
	x, ok := a.apps[app]
	if !ok || !x.Inbound.IsAux(protoSet(proto), port) {
		return Status{}, fmt.Errorf("port %d/%s is not an auxiliary port of the app", port, proto)
	}
	held := 0
	for _, n := range a.named {
		if n.app == app {
			held++
		}
		if n.app == app && n.Peer == peer && n.Host == host && n.Proto == proto && n.Port == port {
			held = -1 // named already: asking again changes nothing
			break
		}
	}
	if held >= maxNamed {
		return Status{}, fmt.Errorf("app %s names %d peers already (at most %d)", x.Name, held, maxNamed)
	}
	n := &named{app: app, NamedPeer: NamedPeer{App: x.Name, PID: pid, UID: uid, Peer: peer, Host: host, Proto: proto, Port: port, Since: a.cfg.Now()}}
	for _, s := range a.auxes {
		if s.app == app && s.proto == proto && s.port == port {
			n.Bound = true
		}
	}
	if held >= 0 {
		a.named = append(a.named, n)
		a.saveNamed()
	}
	delete(a.stale, perimeter.Key{Peer: peer, Proto: proto, Host: host, Port: port})
	a.reconcile(ctx)
	k := perimeter.Key{Peer: peer, Proto: proto, Host: host, Port: port}
	st := Status{App: x.Name, User: a.cfg.UserName(uid), PID: pid, Proto: proto, Peer: peer, Host: host, Port: port, State: statePending}
	if h := a.holes[k]; h != nil {
		st.State, st.Reason, st.Opened, st.Expires = h.state, h.reason, h.opened, h.expires
	}
	return st, nil
}

// Holes lists the holes the agent holds or wants, with the gateway's
// counters where it answers.
func (a *Agent) Holes(ctx context.Context) ([]Status, error) {
	var out []Status
	err := a.do(ctx, func(context.Context) {
		for _, h := range a.holes {
			out = append(out, Status{App: h.app, User: h.user, PID: h.pid, Proto: h.key.Proto, Peer: h.key.Peer, Host: h.key.Host,
				Port: h.key.Port, State: h.state, Reason: h.reason, Opened: h.opened, Expires: h.expires})
		}
	})
	if err != nil {
		return nil, err
	}
	// Outside the Run goroutine: a slow gateway must not hold up events.
	if gs, lerr := a.cfg.Gateway.List(ctx); lerr == nil {
		counters := map[perimeter.Key]perimeter.Hole{}
		for _, g := range gs {
			counters[g.Key] = g
		}
		for i := range out {
			k := perimeter.Key{Peer: out[i].Peer, Proto: out[i].Proto, Host: out[i].Host, Port: out[i].Port}
			if g, ok := counters[k]; ok {
				out[i].Packets, out[i].Bytes = g.Packets, g.Bytes
			}
		}
	} else {
		a.log.Warn("gateway list failed; counters missing", "err", lerr)
	}
	slices.SortFunc(out, func(x, y Status) int {
		return compareKeys(perimeter.Key{Peer: x.Peer, Proto: x.Proto, Host: x.Host, Port: x.Port},
			perimeter.Key{Peer: y.Peer, Proto: y.Proto, Host: y.Host, Port: y.Port})
	})
	return out, nil
}

// Counts is how many holes are open, pending and refused.
func (a *Agent) Counts(ctx context.Context) (open, pending, refused int, err error) {
	err = a.do(ctx, func(context.Context) {
		for _, h := range a.holes {
			switch h.state {
			case stateOpen:
				open++
			case stateRefused:
				refused++
			default:
				pending++
			}
		}
	})
	return open, pending, refused, err
}
