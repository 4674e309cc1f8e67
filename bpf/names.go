package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
)

// DNS-name grants in the kernel (decision.h, name_grants): the addresses DNS
// answers gave an app for the names its grants name. The daemon's DNS proxy
// calls Learn with an answer's addresses before it relays the answer, so the
// grant is in force before the app can use it; ExpireLearned drops them once
// their TTL (plus grace) has run out, and the kernel refuses an expired
// entry by itself in the meantime.
//
// The entries are keyed by generation slot, like every entry a decision
// reads: Apply writes the learned addresses into the idle slot under the new
// policy (its app ids and its name grants' ports), before the switch, and
// the old slot's entries go with the rest of the slot. So a reload neither
// drops what was learned nor lets a grant outlive the policy that had it.

// NameParts is how many name grants of one app can stand for one address
// at once (NAME_PARTS): past that, the ones that expire first are left out
// (fail closed, and logged).
const NameParts = 4

// DefaultNameCap is the addresses one name may hold for an app when the
// daemon sets no cap: enough for round-robin sets, not for an answer that
// tries to open a whole network.
const DefaultNameCap = 64

// nameRef is one name grant of an app: its ports are the slot's.
type nameRef struct {
	app   string
	index int32
}

type factKey struct {
	app, name string
	addr      netip.Addr
}

type appAddr struct {
	app  string
	addr netip.Addr
}

type appName struct{ app, name string }

// learnedNames is what the enforcer knows of DNS answers, under mu.
type learnedNames struct {
	mu    sync.Mutex
	facts map[factKey]ruleset.Learned
	// byAddr and perName index facts: the facts behind one kernel entry,
	// and the addresses a name holds (the cap).
	byAddr  map[appAddr]map[factKey]bool
	perName map[appName]map[factKey]bool
	// The generation in force, as this process applied it: its slot,
	// policy, app ids and the name grants' ports in its slot. live: there
	// is one.
	live  bool
	slot  uint32
	rules *ruleset.Ruleset
	ids   map[string]uint32
	ports map[nameRef]procgateRuleValue
	// keys are the entries written in each slot; nil: unknown (state
	// adopted from an earlier daemon), cleared by walking the map.
	keys [2]map[procgateNameKey]bool
}

func (n *learnedNames) init(adopted bool) {
	n.facts = map[factKey]ruleset.Learned{}
	n.byAddr = map[appAddr]map[factKey]bool{}
	n.perName = map[appName]map[factKey]bool{}
	if !adopted {
		n.keys = [2]map[procgateNameKey]bool{{}, {}}
	}
}

// putNamePorts puts the ports of an app's name grants in the slot's port
// table, for the name entries of the slot to refer to.
func (t *tables) putNamePorts(ports *portTable, app *ruleset.App) {
	for _, g := range app.Grants {
		if g.Name == "" {
			continue
		}
		var v procgateRuleValue
		if g.Proto&ruleset.TCP != 0 {
			v.TcpFirst, v.TcpCount = ports.add(mergeRanges(g.Ports))
		}
		if g.Proto&ruleset.UDP != 0 {
			v.UdpFirst, v.UdpCount = ports.add(mergeRanges(g.Ports))
		}
		if t.namePorts == nil {
			t.namePorts = map[nameRef]procgateRuleValue{}
		}
		t.namePorts[nameRef{app.Name, g.Index}] = v
	}
}

func nameKey(slot, appID uint32, a netip.Addr) procgateNameKey {
	k := procgateNameKey{Slot: slot, AppId: appID, Family: 6}
	if a.Is4() {
		k.Family = 4
		b := a.As4()
		copy(k.Addr[:], b[:])
	} else {
		k.Addr = a.As16()
	}
	return k
}

// monotonic is the CLOCK_MONOTONIC time (bpf_ktime_get_ns) of t; 1, long
// past, for a time already gone.
func monotonic(t time.Time) uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 1
	}
	d := time.Until(t)
	if d <= 0 {
		return 1
	}
	return uint64(ts.Nano()) + uint64(d)
}

// entry is the kernel entry of app's address under a policy: one part per
// name grant of the app that a live fact for the address matches, with the
// latest expiry among those facts. ok is false when nothing stands.
func (n *learnedNames) entry(rules *ruleset.Ruleset, ports map[nameRef]procgateRuleValue, app string, addr netip.Addr) (v procgateNameValue, ok bool, dropped int) {
	a := rules.App(app)
	if a == nil {
		return v, false, 0
	}
	type part struct {
		expires time.Time
		ports   procgateRuleValue
	}
	var parts []part
	for _, g := range a.Grants {
		if g.Name == "" {
			continue
		}
		var best time.Time
		for k := range n.byAddr[appAddr{app, addr}] {
			if f := n.facts[k]; g.MatchesName(f.Name) && f.Expires.After(best) {
				best = f.Expires
			}
		}
		if p, have := ports[nameRef{app, g.Index}]; have && !best.IsZero() {
			parts = append(parts, part{best, p})
		}
	}
	if len(parts) == 0 {
		return v, false, 0
	}
	slices.SortFunc(parts, func(x, y part) int { return y.expires.Compare(x.expires) })
	if len(parts) > NameParts {
		dropped = len(parts) - NameParts
		parts = parts[:NameParts]
	}
	for i, p := range parts {
		v.Part[i] = procgateNamePart{ExpiresNs: monotonic(p.expires), TcpFirst: p.ports.TcpFirst, TcpCount: p.ports.TcpCount,
			UdpFirst: p.ports.UdpFirst, UdpCount: p.ports.UdpCount}
	}
	return v, true, dropped
}

// writeNames writes the entries of every learned address into slot under
// a new generation's policy (Apply, before the switch; the slot is idle
// and empty).
func (e *Enforcer) writeNames(slot uint32, rules *ruleset.Ruleset, ids map[string]uint32, ports map[nameRef]procgateRuleValue) error {
	n := &e.names
	var keys []procgateNameKey
	var vals []procgateNameValue
	for aa := range n.byAddr {
		id, have := ids[aa.app]
		if !have {
			continue
		}
		v, ok, _ := n.entry(rules, ports, aa.app, aa.addr)
		if !ok {
			continue
		}
		keys = append(keys, nameKey(slot, id, aa.addr))
		vals = append(vals, v)
	}
	n.keys[slot] = map[procgateNameKey]bool{}
	for _, k := range keys {
		n.keys[slot][k] = true
	}
	if err := putBatch(e.objs.NameGrants, keys, vals); err != nil {
		return fmt.Errorf("write %d learned name addresses: %w", len(keys), err)
	}
	return nil
}

// clearNames deletes a slot's entries, by the keys written or by a walk.
func (e *Enforcer) clearNames(slot uint32) error {
	n := &e.names
	n.mu.Lock()
	defer n.mu.Unlock()
	var keys []procgateNameKey
	if n.keys[slot] == nil {
		var k procgateNameKey
		var v procgateNameValue
		it := e.objs.NameGrants.Iterate()
		for it.Next(&k, &v) {
			if k.Slot == slot {
				keys = append(keys, k)
			}
		}
		if err := it.Err(); err != nil {
			return fmt.Errorf("walk learned name addresses: %w", err)
		}
	} else {
		for k := range n.keys[slot] {
			keys = append(keys, k)
		}
	}
	if err := deleteBatch(e.objs.NameGrants, keys); err != nil {
		return fmt.Errorf("clear learned name addresses of slot %d: %w", slot, err)
	}
	n.keys[slot] = map[procgateNameKey]bool{}
	return nil
}

// refresh rewrites (or deletes) the current slot's entries of the given
// addresses after their facts changed.
func (e *Enforcer) refresh(addrs map[appAddr]bool) error {
	n := &e.names
	id := n.ids
	var errs []error
	for aa := range addrs {
		appID, have := id[aa.app]
		if !have {
			continue
		}
		k := nameKey(n.slot, appID, aa.addr)
		v, ok, dropped := n.entry(n.rules, n.ports, aa.app, aa.addr)
		if dropped > 0 {
			e.opts.Log.Warn("more name grants cover an address than the kernel entry holds; the ones that expire first are left out",
				"app", aa.app, "addr", aa.addr, "left_out", dropped, "max", NameParts)
		}
		if !ok {
			if err := e.objs.NameGrants.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("delete learned address %s of app %s: %w", aa.addr, aa.app, err))
			}
			delete(n.keys[n.slot], k)
			continue
		}
		if err := e.objs.NameGrants.Put(k, &v); err != nil {
			errs = append(errs, fmt.Errorf("write learned address %s of app %s: %w", aa.addr, aa.app, err))
			continue
		}
		if n.keys[n.slot] != nil {
			n.keys[n.slot][k] = true
		}
	}
	return errors.Join(errs...)
}

// Learn puts the addresses of DNS answers in force for the apps that asked:
// when it returns, the kernel allows each address to the app's name grants
// whose names the fact's Name matches, until its Expires. Facts of apps
// without such a grant are ignored; a fact already known only moves its
// expiry later.
//
// A name holds at most cap addresses for an app (0: DefaultNameCap). A new
// address of a name at its cap takes the place of the one that expires
// first among those learned from earlier answers (a rotating name keeps
// working; evicted lists them); one that would take a name past cap within
// one call is not learned and is returned in refused, for the caller to
// audit.
func (e *Enforcer) Learn(facts []ruleset.Learned, cap int) (refused, evicted []ruleset.Learned, err error) {
	if cap <= 0 {
		cap = DefaultNameCap
	}
	n := &e.names
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.live {
		return nil, nil, errors.New("learn DNS answers: no policy applied yet")
	}
	changed := map[appAddr]bool{}
	fresh := map[factKey]bool{} // learned or renewed by this call
	for _, f := range facts {
		f.Name = strings.ToLower(strings.TrimSuffix(f.Name, "."))
		f.Addr = f.Addr.Unmap()
		a := n.rules.App(f.App)
		if a == nil || !f.Addr.IsValid() || !slices.ContainsFunc(a.Grants, func(g ruleset.Grant) bool { return g.MatchesName(f.Name) }) {
			continue
		}
		k := factKey{f.App, f.Name, f.Addr}
		an := appName{f.App, f.Name}
		if old, known := n.facts[k]; known {
			fresh[k] = true
			if !f.Expires.After(old.Expires) {
				continue
			}
		} else {
			if len(n.perName[an]) >= cap {
				victim, ok := n.oldest(an, fresh)
				if !ok {
					refused = append(refused, f)
					continue
				}
				evicted = append(evicted, n.facts[victim])
				n.forget(victim)
				changed[appAddr{victim.app, victim.addr}] = true
			}
			if n.perName[an] == nil {
				n.perName[an] = map[factKey]bool{}
			}
			n.perName[an][k] = true
			aa := appAddr{f.App, f.Addr}
			if n.byAddr[aa] == nil {
				n.byAddr[aa] = map[factKey]bool{}
			}
			n.byAddr[aa][k] = true
			fresh[k] = true
		}
		n.facts[k] = f
		changed[appAddr{f.App, f.Addr}] = true
	}
	return refused, evicted, e.refresh(changed)
}

// oldest is the fact of a name that expires first, among those not in
// keep.
func (n *learnedNames) oldest(an appName, keep map[factKey]bool) (factKey, bool) {
	var best factKey
	found := false
	for k := range n.perName[an] {
		if keep[k] {
			continue
		}
		if !found || n.facts[k].Expires.Before(n.facts[best].Expires) {
			best, found = k, true
		}
	}
	return best, found
}

// ExpireLearned forgets the facts expired at now and deletes or narrows
// their kernel entries; it returns how many it forgot.
func (e *Enforcer) ExpireLearned(now time.Time) (int, error) {
	n := &e.names
	n.mu.Lock()
	defer n.mu.Unlock()
	changed := map[appAddr]bool{}
	for k, f := range n.facts {
		if f.Expires.After(now) {
			continue
		}
		n.forget(k)
		changed[appAddr{k.app, k.addr}] = true
	}
	if !n.live {
		return len(changed), nil
	}
	return len(changed), e.refresh(changed)
}

func (n *learnedNames) forget(k factKey) {
	delete(n.facts, k)
	aa := appAddr{k.app, k.addr}
	delete(n.byAddr[aa], k)
	if len(n.byAddr[aa]) == 0 {
		delete(n.byAddr, aa)
	}
	an := appName{k.app, k.name}
	delete(n.perName[an], k)
	if len(n.perName[an]) == 0 {
		delete(n.perName, an)
	}
}

// Learned is every fact in force (expired ones too, until ExpireLearned),
// for explain.
func (e *Enforcer) Learned() []ruleset.Learned {
	n := &e.names
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]ruleset.Learned, 0, len(n.facts))
	for _, f := range n.facts {
		out = append(out, f)
	}
	return out
}
