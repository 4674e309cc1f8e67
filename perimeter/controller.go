package perimeter

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Enforcer is where holes take effect: the nftables Table, or a fake in
// tests. Update must apply all of add and del or none of them;
// UpdateServices also replaces the always-open services, all or nothing.
type Enforcer interface {
	Update(add []Element, del []Key) error
	UpdateServices(services []Service, add []Element, del []Key) error
	Elements() ([]Element, error)
}

// DefaultLease is how long a hole stays open without a renewal when the
// gateway is not told otherwise.
const DefaultLease = 30 * time.Second

// ControllerConfig is what a Controller needs.
type ControllerConfig struct {
	Rules *Rules
	Table Enforcer
	// Protect are the protected ranges: holes are only for hosts in them.
	Protect []netip.Prefix
	// Lease is the lease of a hole whose request names none, and the
	// longest one a request may get. DefaultLease if zero.
	Lease time.Duration
	Log   *slog.Logger
	// Now is the clock; time.Now if nil.
	Now func() time.Time
}

// Controller keeps the holes: it authorizes requests by the rules and the
// per-user limits, gives each hole a lease, and changes the Enforcer in one
// transaction per request. Its bookkeeping and the kernel share each
// hole's deadline: the kernel closes a hole whose lease ran out on its own,
// so the controller never needs to delete an expired one.
type Controller struct {
	mu      sync.Mutex
	rules   *Rules
	table   Enforcer
	protect []netip.Prefix
	lease   time.Duration
	log     *slog.Logger
	now     func() time.Time
	holes   map[Key]*Hole
	perUser map[string]int
	repairs Repairs
	// store, if set, is where the site's gateways share their holes: every
	// change the controller's own API makes is written there too.
	store holeStore
}

// holeStore is where a site's gateways share their holes (HoleStore).
type holeStore interface {
	Put(holes []Hole, now time.Time) error
	Delete(keys []Key) error
}

// share writes the controller's changes to the store, if any. A failed
// write is logged, not returned: the hole works at this gateway, and the
// agent's next renewal writes it again.
func (c *Controller) share(put []Hole, del []Key, now time.Time) {
	if c.store == nil {
		return
	}
	var err error
	if len(del) > 0 {
		err = c.store.Delete(del)
	}
	if len(put) > 0 {
		err = errors.Join(err, c.store.Put(put, now))
	}
	if err != nil {
		c.log.Error("holes not shared with the other gateways", "error", err.Error(), "opened", len(put), "closed", len(del))
	}
}

// Refusal is a hole the rules or a limit do not allow.
type Refusal struct {
	Key    Key
	Reason string
	// Rule is where the deciding rule or limit is written; empty when no
	// allow rule matched.
	Rule string
}

func (e *Refusal) Error() string { return "refused " + e.Key.String() + ": " + e.Reason }

// Conflict is a hole another delegate holds.
type Conflict struct {
	Key    Key
	Holder string
}

func (e *Conflict) Error() string {
	return "hole " + e.Key.String() + " is held by delegate " + e.Holder
}

// RefusedHole is a hole of a batch that was refused or in conflict.
type RefusedHole struct {
	Target
	Error string `json:"error"`
	Rule  string `json:"rule,omitempty"`
}

func refused(k Key, err error) RefusedHole {
	r := RefusedHole{Target: k.Target(), Error: err.Error()}
	var ref *Refusal
	if errors.As(err, &ref) {
		r.Rule = ref.Rule
	}
	return r
}

// RenewResult says what a renewal did: holes it renewed, holes the
// delegate does not hold (expired, closed, never opened), and holes the
// rules no longer allow, which it closed.
type RenewResult struct {
	Renewed []Hole        `json:"renewed"`
	Missing []Target      `json:"missing,omitempty"`
	Refused []RefusedHole `json:"refused,omitempty"`
}

// CloseResult says which holes a close closed and which were not open.
type CloseResult struct {
	Closed  []Target `json:"closed"`
	Missing []Target `json:"missing,omitempty"`
}

// SyncResult says what a delegate's sync left open, what it refused, and
// which of the delegate's other holes it closed.
type SyncResult struct {
	Holes   []Hole        `json:"holes"`
	Refused []RefusedHole `json:"refused,omitempty"`
	Closed  []Target      `json:"closed,omitempty"`
}

// NewController adopts the holes the kernel already holds (a restarted
// gateway): each element's comment names its delegate and user, its timeout
// what is left of its lease. Holes the rules no longer allow, holes outside
// the protected ranges and elements procgate did not write are removed.
func NewController(cfg ControllerConfig) (*Controller, error) {
	if cfg.Rules == nil || cfg.Table == nil {
		return nil, errors.New("controller: rules and table are required")
	}
	c := &Controller{
		rules: cfg.Rules, table: cfg.Table, protect: slices.Clone(cfg.Protect),
		lease: cmp.Or(cfg.Lease, DefaultLease), log: cfg.Log, now: cfg.Now,
		holes: map[Key]*Hole{}, perUser: map[string]int{},
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	if c.now == nil {
		c.now = time.Now
	}
	els, err := c.table.Elements()
	if err != nil {
		return nil, fmt.Errorf("adopt holes: %w", err)
	}
	now := c.now()
	var add []Element
	var del []Key
	var adopted []*Hole
	for _, e := range els {
		delegate, user, ok := parseComment(e.Comment)
		if !ok || e.Timeout == 0 || !c.protected(e.Host) {
			c.audit(slog.LevelWarn, "pinhole closed", e.Key, delegate, user, "reason", "element not written by procgate for a protected host")
			del = append(del, e.Key)
			continue
		}
		h, err := c.authorize(delegate, user, e.Key, now, now.Add(e.Expires), ignoreLimit)
		if err != nil {
			c.audit(slog.LevelInfo, "pinhole closed", e.Key, delegate, user, "reason", "adopted hole "+err.Error())
			del = append(del, e.Key)
			continue
		}
		if h.Expires.Before(now.Add(e.Expires)) {
			add = append(add, h.element(now)) // a time window ends before the lease
		}
		adopted = append(adopted, h)
	}
	if err := c.table.Update(add, del); err != nil {
		return nil, fmt.Errorf("adopt holes: %w", err)
	}
	for _, h := range adopted {
		c.put(h)
		c.audit(slog.LevelInfo, "pinhole adopted", h.Key, h.Delegate, h.User, "rule", h.Rule, "expires", h.Expires)
	}
	return c, nil
}

func (c *Controller) protected(a netip.Addr) bool {
	return slices.ContainsFunc(c.protect, func(p netip.Prefix) bool { return p.Contains(a) })
}

func (c *Controller) put(h *Hole) {
	if old := c.holes[h.Key]; old != nil {
		c.perUser[old.User]--
	}
	c.holes[h.Key] = h
	c.perUser[h.User]++
}

func (c *Controller) drop(k Key) {
	if old := c.holes[k]; old != nil {
		c.perUser[old.User]--
		delete(c.holes, k)
	}
}

// live returns the hole at k if its lease has not run out.
func (c *Controller) live(k Key, now time.Time) *Hole {
	if h := c.holes[k]; h != nil && now.Before(h.Expires) {
		return h
	}
	return nil
}

// audit logs one event about a hole with the project's stable field names.
func (c *Controller) audit(level slog.Level, msg string, k Key, delegate, user string, args ...any) {
	c.log.Log(context.Background(), level, msg, append([]any{
		"delegate", delegate, "user", user, "proto", k.Proto.String(),
		"peer", k.Peer.String(), "host", k.Host.String(), "port", k.Port,
	}, args...)...)
}

// element is the kernel's form of h at now: its lease as a timeout,
// rounded up to the kernel's millisecond.
func (h *Hole) element(now time.Time) Element {
	left := h.Expires.Sub(now)
	timeout := max(time.Millisecond, (left + time.Millisecond - 1).Truncate(time.Millisecond))
	return Element{Key: h.Key, Timeout: timeout, Comment: comment(h.Delegate, h.User)}
}

// ignoreLimit, as the count of holes held, lets a hole pass any limit:
// limits apply to new holes, not to those open when the rules change or the
// gateway restarts.
const ignoreLimit = math.MinInt32

// authorize decides whether delegate may hold k for user from now until
// expires; held is how many other holes count against user's limit. The
// hole it returns ends at expires or when the allowing rule's window
// closes, whichever is first. Whether another delegate holds k is the
// caller's question.
func (c *Controller) authorize(delegate, user string, k Key, now, expires time.Time, held int) (*Hole, error) {
	d := c.rules.Authorize(delegate, user, k, now)
	if !d.Allowed {
		r := &Refusal{Key: k, Reason: d.Reason()}
		if d.Rule != nil {
			r.Rule = d.Rule.Where
		}
		return nil, r
	}
	if lim, ok := c.rules.Limit(user); ok && held >= lim.Max {
		return nil, &Refusal{Key: k, Rule: lim.Where,
			Reason: fmt.Sprintf("limit of %d open holes for user %s reached (%s)", lim.Max, user, lim.Where)}
	}
	if !d.Until.IsZero() && d.Until.Before(expires) {
		expires = d.Until
	}
	h := &Hole{Key: k, Delegate: delegate, User: user, Rule: d.Rule.Where, Opened: now, Expires: expires}
	if cur := c.live(k, now); cur != nil && cur.Delegate == delegate {
		h.Opened = cur.Opened
	}
	return h, nil
}

// heldBy is how many holes other than k count against user's limit.
func (c *Controller) heldBy(user string, k Key, now time.Time) int {
	n := c.perUser[user]
	if cur := c.live(k, now); cur != nil && cur.User == user {
		n--
	}
	return n
}

// leaseFor is the lease a request of seconds gets.
func (c *Controller) leaseFor(seconds int) time.Duration {
	if seconds == 0 || seconds > int(c.lease/time.Second) { // compared in seconds: no overflow
		return c.lease
	}
	return time.Duration(seconds) * time.Second
}

// checkHost refuses a hole for a host outside the protected ranges: the
// forward policy does not stop traffic to it, so a hole would mean nothing.
func (c *Controller) checkHost(k Key) error {
	if c.protected(k.Host) {
		return nil
	}
	ranges := make([]string, len(c.protect))
	for i, p := range c.protect {
		ranges[i] = p.String()
	}
	return &FieldError{"host", fmt.Sprintf("%s is not in a protected range (%s)", k.Host, strings.Join(ranges, ", "))}
}

// Open opens (or, for a hole the delegate already holds, renews) the hole
// req asks for on behalf of delegate.
func (c *Controller) Open(delegate string, req Request) (Hole, error) {
	k, err := req.Parse()
	if err != nil {
		return Hole{}, err
	}
	if err := c.checkHost(k); err != nil {
		return Hole{}, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	var h *Hole
	if cur := c.live(k, now); cur != nil && cur.Delegate != delegate {
		err = &Conflict{Key: k, Holder: cur.Delegate}
	} else {
		h, err = c.authorize(delegate, req.User, k, now, now.Add(c.leaseFor(req.LeaseSeconds)), c.heldBy(req.User, k, now))
	}
	if err != nil {
		c.refusal(k, delegate, req.User, err)
		return Hole{}, err
	}
	if err := c.table.Update([]Element{h.element(now)}, nil); err != nil {
		return Hole{}, fmt.Errorf("open hole %s: %w", k, err)
	}
	c.put(h)
	c.audit(slog.LevelInfo, "pinhole opened", k, delegate, req.User, "rule", h.Rule, "expires", h.Expires)
	c.share([]Hole{*h}, nil, now)
	return *h, nil
}

func (c *Controller) refusal(k Key, delegate, user string, err error) {
	args := []any{"reason", err.Error()}
	var ref *Refusal
	if errors.As(err, &ref) {
		args = []any{"reason", ref.Reason, "rule", ref.Rule}
	}
	c.audit(slog.LevelWarn, "pinhole refused", k, delegate, user, args...)
}

// parseTargets validates a batch of targets, naming the first bad one by
// its index, and drops repeats.
func parseTargets(ts []Target) ([]Key, error) {
	keys := make([]Key, 0, len(ts))
	seen := map[Key]bool{}
	for i, t := range ts {
		k, err := t.Key()
		if err != nil {
			return nil, within(fmt.Sprintf("holes[%d]", i), err)
		}
		if !seen[k] {
			seen[k] = true
			keys = append(keys, k)
		}
	}
	return keys, nil
}

// Renew extends the leases of delegate's holes. The rules are asked again:
// a hole they no longer allow (a time window closed, a deny rule began) is
// closed in the same transaction.
func (c *Controller) Renew(delegate string, targets []Target, leaseSeconds int) (RenewResult, error) {
	keys, err := parseTargets(targets)
	if err != nil {
		return RenewResult{}, err
	}
	if leaseSeconds < 0 {
		return RenewResult{}, &FieldError{"lease_seconds", fmt.Sprintf("want 0 (the default) or more, got %d", leaseSeconds)}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	var res RenewResult
	var add []Element
	var del []Key
	var renewed []*Hole
	for _, k := range keys {
		cur := c.live(k, now)
		if cur == nil || cur.Delegate != delegate {
			res.Missing = append(res.Missing, k.Target())
			continue
		}
		h, err := c.authorize(delegate, cur.User, k, now, now.Add(c.leaseFor(leaseSeconds)), c.heldBy(cur.User, k, now))
		if err != nil {
			res.Refused = append(res.Refused, refused(k, err))
			del = append(del, k)
			continue
		}
		add = append(add, h.element(now))
		renewed = append(renewed, h)
	}
	if err := c.table.Update(add, del); err != nil {
		return RenewResult{}, fmt.Errorf("renew holes: %w", err)
	}
	for _, k := range del {
		c.audit(slog.LevelInfo, "pinhole closed", k, delegate, c.holes[k].User, "reason", "renewal refused")
		c.drop(k)
	}
	for _, h := range renewed {
		c.put(h)
		c.audit(slog.LevelDebug, "pinhole renewed", h.Key, delegate, h.User, "expires", h.Expires)
		res.Renewed = append(res.Renewed, *h)
	}
	c.share(res.Renewed, del, now)
	return res, nil
}

// Close closes delegate's holes among targets.
func (c *Controller) Close(delegate string, targets []Target) (CloseResult, error) {
	keys, err := parseTargets(targets)
	if err != nil {
		return CloseResult{}, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	var res CloseResult
	var del []Key
	for _, k := range keys {
		if cur := c.live(k, now); cur == nil || cur.Delegate != delegate {
			res.Missing = append(res.Missing, k.Target())
			continue
		}
		del = append(del, k)
	}
	if err := c.table.Update(nil, del); err != nil {
		return CloseResult{}, fmt.Errorf("close holes: %w", err)
	}
	for _, k := range del {
		c.audit(slog.LevelInfo, "pinhole closed", k, delegate, c.holes[k].User, "reason", "closed by the delegate")
		c.drop(k)
		res.Closed = append(res.Closed, k.Target())
	}
	c.share(nil, del, now)
	return res, nil
}

// List returns the open holes of delegate (of every delegate if empty),
// with the kernel's counters, in a stable order.
func (c *Controller) List(delegate string) ([]Hole, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	els, err := c.table.Elements()
	if err != nil {
		return nil, fmt.Errorf("list holes: %w", err)
	}
	counters := make(map[Key]Element, len(els))
	for _, e := range els {
		counters[e.Key] = e
	}
	now := c.now()
	var out []Hole
	for k, h := range c.holes {
		if !now.Before(h.Expires) || (delegate != "" && h.Delegate != delegate) {
			continue
		}
		hole := *h
		hole.Packets, hole.Bytes = counters[k].Packets, counters[k].Bytes
		out = append(out, hole)
	}
	slices.SortFunc(out, func(a, b Hole) int { return strings.Compare(a.Key.String(), b.Key.String()) })
	return out, nil
}

// claim is one hole a delegate says it needs.
type claim struct {
	delegate, user string
	key            Key
	lease          time.Duration
}

// claims is a batch of claims, each hole at most once.
type claims struct {
	list []claim
	seen map[Key]int
}

// add validates the i-th claim of a batch and appends it.
func (cs *claims) add(i int, cl claim, c *Controller) error {
	if err := checkName("user", cl.user); err != nil {
		return err
	}
	if err := c.checkHost(cl.key); err != nil {
		return err
	}
	if j, dup := cs.seen[cl.key]; dup {
		return &FieldError{"host", fmt.Sprintf("the same hole as holes[%d]", j)}
	}
	if cs.seen == nil {
		cs.seen = map[Key]int{}
	}
	cs.seen[cl.key] = i
	cs.list = append(cs.list, cl)
	return nil
}

// Sync makes delegate's holes exactly the ones reqs ask for that the rules
// allow, in one transaction: an agent sends it when it (re)connects, so
// that after a gateway restart nothing it needs is lost and nothing it no
// longer needs stays open.
func (c *Controller) Sync(delegate string, reqs []Request) (SyncResult, error) {
	var claims claims
	for i, r := range reqs {
		k, err := r.Parse()
		if err == nil {
			err = claims.add(i, claim{delegate, r.User, k, c.leaseFor(r.LeaseSeconds)}, c)
		}
		if err != nil {
			return SyncResult{}, within(fmt.Sprintf("holes[%d]", i), err)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.settle(func(h *Hole) bool { return h.Delegate == delegate }, claims.list, nil)
}

// Reconcile makes the kernel's holes exactly desired (the union of every
// agent's claims after a gateway restart), as far as the rules allow: each
// hole is authorized again, anything else in the kernel is removed, all in
// one transaction. Expires of a desired hole is ignored: it gets a fresh
// lease.
func (c *Controller) Reconcile(desired []Hole) (SyncResult, error) {
	var claims claims
	for i, h := range desired {
		err := checkName("delegate", h.Delegate)
		if err == nil {
			err = claims.add(i, claim{h.Delegate, h.User, h.Key, c.lease}, c)
		}
		if err != nil {
			return SyncResult{}, within(fmt.Sprintf("holes[%d]", i), err)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	els, err := c.table.Elements()
	if err != nil {
		return SyncResult{}, fmt.Errorf("reconcile: %w", err)
	}
	kernel := make([]Key, len(els))
	for i, e := range els {
		kernel[i] = e.Key
	}
	return c.settle(func(*Hole) bool { return true }, claims.list, kernel)
}

// settle replaces the holes in scope (and the kernel elements in extra)
// with the allowed claims, in one transaction. Limits count the claims
// against the holes out of scope, which stay.
func (c *Controller) settle(inScope func(*Hole) bool, claims []claim, extra []Key) (SyncResult, error) {
	now := c.now()
	held := map[string]int{}
	for _, h := range c.holes {
		if now.Before(h.Expires) && !inScope(h) {
			held[h.User]++
		}
	}
	var res SyncResult
	var add []Element
	keep := map[Key]*Hole{}
	for _, cl := range claims {
		if cur := c.live(cl.key, now); cur != nil && !inScope(cur) {
			err := &Conflict{Key: cl.key, Holder: cur.Delegate}
			c.refusal(cl.key, cl.delegate, cl.user, err)
			res.Refused = append(res.Refused, refused(cl.key, err))
			continue
		}
		h, err := c.authorize(cl.delegate, cl.user, cl.key, now, now.Add(cl.lease), held[cl.user])
		if err != nil {
			c.refusal(cl.key, cl.delegate, cl.user, err)
			res.Refused = append(res.Refused, refused(cl.key, err))
			continue
		}
		held[cl.user]++
		keep[h.Key] = h
		add = append(add, h.element(now))
	}
	var del []Key
	gone := map[Key]bool{}
	for k, h := range c.holes {
		if inScope(h) && keep[k] == nil {
			gone[k] = true
			if now.Before(h.Expires) {
				del = append(del, k)
			}
		}
	}
	for _, k := range extra {
		if keep[k] == nil && !gone[k] && c.holes[k] == nil {
			del = append(del, k)
		}
	}
	if err := c.table.Update(add, del); err != nil {
		return SyncResult{}, fmt.Errorf("sync holes: %w", err)
	}
	for k := range gone {
		h := c.holes[k]
		if now.Before(h.Expires) {
			c.audit(slog.LevelInfo, "pinhole closed", k, h.Delegate, h.User, "reason", "not claimed")
			res.Closed = append(res.Closed, k.Target())
		}
		c.drop(k)
	}
	for _, k := range extra {
		if keep[k] == nil && !gone[k] && c.holes[k] == nil {
			c.audit(slog.LevelInfo, "pinhole closed", k, "", "", "reason", "in the kernel, claimed by no agent")
			res.Closed = append(res.Closed, k.Target())
		}
	}
	for _, h := range keep {
		if c.live(h.Key, now) == nil {
			c.audit(slog.LevelInfo, "pinhole opened", h.Key, h.Delegate, h.User, "rule", h.Rule, "expires", h.Expires)
		}
		c.put(h)
		res.Holes = append(res.Holes, *h)
	}
	slices.SortFunc(res.Holes, func(a, b Hole) int { return strings.Compare(a.Key.String(), b.Key.String()) })
	// Deletions for the store: each key once (etcd refuses a transaction
	// that names a key twice).
	shared := slices.Clone(del)
	for k := range gone {
		if !slices.Contains(del, k) {
			shared = append(shared, k)
		}
	}
	c.share(res.Holes, shared, now)
	return res, nil
}

// Sweep forgets the holes whose leases ran out (the kernel has closed
// them by their timeouts) and returns how many.
func (c *Controller) Sweep() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	n := 0
	for k, h := range c.holes {
		if !now.Before(h.Expires) {
			c.audit(slog.LevelInfo, "pinhole expired", k, h.Delegate, h.User, "opened", h.Opened)
			c.drop(k)
			n++
		}
	}
	return n
}

// SetRules replaces the rules and asks them again about every open hole:
// holes they no longer allow are closed, holes whose time window now ends
// sooner get the shorter timeout, and the always-open services become the
// new rules' ones, in one transaction. If the kernel refuses the
// transaction the old rules stay, services included. Limits apply to new
// holes only.
func (c *Controller) SetRules(rs *Rules) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.rules
	c.rules = rs
	now := c.now()
	var add []Element
	var del []Key
	why := map[Key]error{}
	updated := map[Key]*Hole{}
	for k, h := range c.holes {
		if !now.Before(h.Expires) {
			continue
		}
		nh, err := c.authorize(h.Delegate, h.User, k, now, h.Expires, ignoreLimit)
		if err != nil {
			del = append(del, k)
			why[k] = err
			continue
		}
		updated[k] = nh
		if nh.Expires.Before(h.Expires) {
			add = append(add, nh.element(now))
		}
	}
	if err := c.table.UpdateServices(rs.Services, add, del); err != nil {
		c.rules = old
		return fmt.Errorf("apply new rules to the services and open holes: %w", err)
	}
	for _, k := range del {
		h := c.holes[k]
		c.audit(slog.LevelInfo, "pinhole closed", k, h.Delegate, h.User, "reason", "new rules: "+why[k].Error())
		c.drop(k)
	}
	var shorter []Hole
	for k, h := range updated {
		if h.Expires.Before(c.holes[k].Expires) {
			shorter = append(shorter, *h)
		}
		c.put(h)
	}
	c.share(shorter, del, now)
	return nil
}

// Run sweeps expired holes every interval until ctx ends.
func (c *Controller) Run(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			c.Sweep()
		}
	}
}

// framed is an Enforcer whose frame (table, sets, chain) can drift and be
// written anew: the nftables Table.
type framed interface {
	Drift() (string, error)
	Rebuild(holes []Element) error
}

// Repairs counts what Repair put right since the controller started.
type Repairs struct {
	// Table counts rebuilds of the whole table (deleted, or its sets or
	// chain changed).
	Table uint64 `json:"table"`
	// Missing counts holes put back, Foreign elements removed, Changed
	// elements given back their lease or owner.
	Missing uint64 `json:"missing"`
	Foreign uint64 `json:"foreign"`
	Changed uint64 `json:"changed"`
}

// repairMargin: a hole whose lease ends sooner is left to the kernel's
// timeout, so that the kernel expiring it a moment before the controller
// does is not taken for drift.
const repairMargin = time.Second

// Repair compares the kernel with the holes the controller holds and puts
// right whatever differs, in one transaction: a table deleted or edited is
// written anew, a hole missing from the kernel is put back with what is
// left of its lease, an element the controller does not hold is removed,
// one whose lease or owner was changed is rewritten. Each repair is logged
// and counted (Repaired).
func (c *Controller) Repair() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	want := map[Key]Element{}
	for k, h := range c.holes {
		if h.Expires.Sub(now) > repairMargin {
			want[k] = h.element(now)
		}
	}
	if f, ok := c.table.(framed); ok {
		why, err := f.Drift()
		if err != nil {
			return fmt.Errorf("repair: %w", err)
		}
		if why != "" {
			holes := make([]Element, 0, len(want))
			for _, e := range want {
				holes = append(holes, e)
			}
			if err := f.Rebuild(holes); err != nil {
				return fmt.Errorf("repair (%s): %w", why, err)
			}
			c.repairs.Table++
			c.log.Warn("perimeter table repaired", "reason", why, "holes", len(holes))
			return nil
		}
	}
	els, err := c.table.Elements()
	if err != nil {
		return fmt.Errorf("repair: %w", err)
	}
	var add []Element
	var del []Key
	var missing, foreign, changed int
	seen := map[Key]bool{}
	for _, e := range els {
		seen[e.Key] = true
		w, ok := want[e.Key]
		switch {
		case ok && (e.Comment != w.Comment || absDiff(e.Expires, w.Timeout) > repairMargin):
			// Deleted and added in one transaction: an add alone would keep
			// the old comment.
			del, add = append(del, e.Key), append(add, w)
			changed++
			c.audit(slog.LevelWarn, "pinhole repaired", e.Key, "", "", "reason", "element changed in the kernel", "comment", e.Comment, "expires_in", e.Expires)
		case !ok && c.holes[e.Key] == nil:
			del = append(del, e.Key)
			foreign++
			c.audit(slog.LevelWarn, "pinhole repaired", e.Key, "", "", "reason", "element the gateway does not hold", "comment", e.Comment)
		}
	}
	for k, w := range want {
		if !seen[k] {
			add = append(add, w)
			missing++
			h := c.holes[k]
			c.audit(slog.LevelWarn, "pinhole repaired", k, h.Delegate, h.User, "reason", "hole missing from the kernel", "expires", h.Expires)
		}
	}
	if len(add) == 0 && len(del) == 0 {
		return nil
	}
	if err := c.table.Update(add, del); err != nil {
		return fmt.Errorf("repair holes: %w", err)
	}
	c.repairs.Missing += uint64(missing)
	c.repairs.Foreign += uint64(foreign)
	c.repairs.Changed += uint64(changed)
	return nil
}

func absDiff(a, b time.Duration) time.Duration {
	if a > b {
		return a - b
	}
	return b - a
}

// Repaired returns what Repair has put right so far.
func (c *Controller) Repaired() Repairs {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.repairs
}

// RunRepair repairs the kernel's state every interval until ctx ends; a
// failed repair is logged and tried again at the next interval.
func (c *Controller) RunRepair(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			if err := c.Repair(); err != nil {
				c.log.Error("perimeter repair failed; trying again at the next interval", "error", err.Error())
			}
		}
	}
}

// open is how many holes are open now.
func (c *Controller) open() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	n := 0
	for _, h := range c.holes {
		if now.Before(h.Expires) {
			n++
		}
	}
	return n
}

// SetStore makes store where the controller's changes are shared with the
// site's other gateways.
func (c *Controller) SetStore(store holeStore) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.store = store
}

// usable reports whether a hole of the shared store is one this gateway
// can hold: live, and for a host it protects.
func (c *Controller) usable(h Hole, now time.Time) bool {
	return now.Before(h.Expires) && c.protected(h.Host) && h.Peer.IsValid()
}

// Replace makes the holes exactly holes (the shared store's, at a start or
// after the store was away), in one transaction: holes not among them are
// closed, kernel elements too, and each of them is installed with what is
// left of its lease. Nothing is written back to the store.
func (c *Controller) Replace(holes []Hole) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	want := map[Key]Hole{}
	for _, h := range holes {
		if c.usable(h, now) {
			want[h.Key] = h
		}
	}
	els, err := c.table.Elements()
	if err != nil {
		return fmt.Errorf("replace holes: %w", err)
	}
	var del []Key
	for _, e := range els {
		if _, ok := want[e.Key]; !ok {
			del = append(del, e.Key)
		}
	}
	add := make([]Element, 0, len(want))
	for _, h := range want {
		add = append(add, h.element(now))
	}
	if err := c.table.Update(add, del); err != nil {
		return fmt.Errorf("replace holes: %w", err)
	}
	closed := 0
	for k, h := range c.holes {
		if _, ok := want[k]; !ok {
			if now.Before(h.Expires) {
				c.audit(slog.LevelInfo, "pinhole closed", k, h.Delegate, h.User, "reason", "not in the shared store")
				closed++
			}
			c.drop(k)
		}
	}
	for _, h := range want {
		c.put(&h)
	}
	c.log.Info("holes replaced by the shared store's", "holes", len(want), "closed", closed, "kernel_removed", len(del))
	return nil
}

// Apply takes changes another gateway (or this one) wrote to the shared
// store: holes opened or renewed in put, closed in del. Nothing is written
// back to the store.
func (c *Controller) Apply(put []Hole, del []Key) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	var add []Element
	var adds []Hole
	for _, h := range put {
		cur := c.holes[h.Key]
		if !c.usable(h, now) || (cur != nil && cur.Delegate == h.Delegate && cur.User == h.User && cur.Expires.Equal(h.Expires)) {
			continue // not for this gateway, or this gateway's own write coming back
		}
		add = append(add, h.element(now))
		adds = append(adds, h)
	}
	var dels []Key
	for _, k := range del {
		if h := c.holes[k]; h != nil && now.Before(h.Expires) {
			dels = append(dels, k)
		}
	}
	if len(add) == 0 && len(dels) == 0 {
		return nil
	}
	if err := c.table.Update(add, dels); err != nil {
		return fmt.Errorf("apply holes from the shared store: %w", err)
	}
	for _, k := range dels {
		h := c.holes[k]
		c.audit(slog.LevelInfo, "pinhole closed", k, h.Delegate, h.User, "reason", "closed in the shared store")
		c.drop(k)
	}
	for _, h := range adds {
		if c.live(h.Key, now) == nil {
			c.audit(slog.LevelInfo, "pinhole opened", h.Key, h.Delegate, h.User, "rule", h.Rule, "expires", h.Expires, "from", "shared store")
		}
		c.put(&h)
	}
	return nil
}
