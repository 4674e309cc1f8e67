package daemon

import (
	"context"
	"errors"
	"maps"
	"slices"
	"time"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/ruleset"
)

// Concurrency of the daemon.
//
// One goroutine, the reconciler (Daemon.reconcile, and Run before it
// starts the loop), changes the daemon's state: it reads and parses the
// policy, applies generations, sweeps, and publishes a State. It holds no
// lock while it does: nobody else writes what it owns, and readers take
// the published State with one atomic load. API requests that change the
// state (reload, revoke) are run on it in turn (call).
//
// Locks that remain are leaves, each taken alone and released before any
// other is taken: appIDs.mu, exeHashes.mu, exeWatch.mu, pinholes.mu. One
// is not a leaf: pinholes.send, taken before pinholes.mu by the goroutine
// that gives the pinhole agent its apps, and held across that call out;
// the reconciler never takes it. Inside the enforcer, bpf's learned-names
// lock is held by Apply only for writing the name grants and the switch
// (bpf/names.go, bpf/enforcer.go): Learned, which explain and the audit
// annotation ask, may wait for that step, never for a parse or a sweep.

// State is one published view of the daemon: the policy, what the kernel
// enforces of it and how it is bound. The reconciler builds a new State
// for every change and publishes it whole (Daemon.state); readers
// (status, explain, the audit annotation, metrics, launches, the pinhole
// API) load the current one and never wait for a reload. Nothing
// reachable from a published State is written again: a change replaces
// the maps, slices and rulesets it touches.
type State struct {
	gen uint32
	// policy is as the files (or etcd) say (nil before the first
	// generation); what the kernel enforces of it is effective.
	policy     *ruleset.Ruleset
	policyHash string
	// policyDropins are the drop-ins of the policy in force, in merge
	// order.
	policyDropins []string
	loadedAt      time.Time
	lastErr       string
	// routes are the destinations routed via internal.interfaces when last
	// looked at; they are part of the internal set.
	routes []ruleset.InternalPrefix
	// appIDs are the ids of every app known to the state dir, by name;
	// appNames the same by id, made once per generation: the audit
	// reader names every event's app, of up to bpf.MaxApps ids.
	appIDs   map[string]uint32
	appNames map[uint32]string
	// counted are the apps whose kernel counters status and metrics
	// read, made once per generation (countedApps).
	counted countedApps
	// revoked describes each app's revocations (revocations.describe).
	revoked map[string][]string
	// exes are the files of pinned binaries in the generation in force;
	// exeKinds what was last said of each app's pinned path (key app NUL
	// path: ok, pending, mismatch, missing), for explain.
	exes     map[string][]bpf.FileID
	exeKinds map[string]string
	// matched counts, per unit or cgroup app, the existing cgroups the
	// last Apply's scan bound to it.
	matched map[string]int
	// bindings are the dynamic apps of the generation in force, for the
	// pinhole agent.
	bindings []dynamicBinding
	// ended counts the live sockets the sweep after the last Apply ended.
	ended int
	// byGen are the effective rulesets of the last generations, indexed,
	// the one in force (gen) always among them: events of a few
	// generations back may still be in the ring buffer, and naming one
	// must not walk every prefix (ruleset.Index).
	byGen map[uint32]*ruleset.Index
	// fleetRevision and fleetFromDisk are the etcd source's: the revision
	// in force, and whether it came from the last good policy on disk.
	fleetRevision int64
	fleetFromDisk bool
	// listed is what status lists of policy and effective, made when
	// either is published: nil before the first generation.
	listed *statusLists
}

// statusLists are the first api.StatusListMax internal prefixes of a
// generation and of each app's grants, as status says them: made once
// per generation, so that a status answer copies a bounded list however
// large the policy (a million prefixes took 1.6 s a call to list whole).
type statusLists struct {
	internal []string
	grants   map[string][]string
}

// listStatus is the status lists of policy and effective, either of
// which may be nil.
func listStatus(policy, effective *ruleset.Ruleset) *statusLists {
	l := &statusLists{grants: map[string][]string{}}
	if effective != nil {
		l.internal = internalStrings(effective, api.StatusListMax)
	}
	if policy != nil {
		for _, a := range policy.Apps {
			l.grants[a.Name] = grantStrings(a, api.StatusListMax)
		}
	}
	return l
}

// internalStrings are the first n internal prefixes of rs (n < 0: all).
func internalStrings(rs *ruleset.Ruleset, n int) []string {
	return firstStrings(rs.Internal, n, func(p ruleset.InternalPrefix) string { return p.Prefix.String() })
}

// grantStrings are the first n grants of a (n < 0: all).
func grantStrings(a ruleset.App, n int) []string {
	return firstStrings(a.Grants, n, ruleset.Grant.String)
}

// firstStrings says the first n of xs (n < 0: all); nil for none, as
// status said an empty list before it was bounded.
func firstStrings[T any](xs []T, n int, say func(T) string) []string {
	if n < 0 || n > len(xs) {
		n = len(xs)
	}
	var out []string
	for _, x := range xs[:n] {
		out = append(out, say(x))
	}
	return out
}

// policyApp is the app name of the policy in force, nil when none.
func (s *State) policyApp(name string) *ruleset.App {
	if s.policy == nil {
		return nil
	}
	return s.policy.App(name)
}

// current is the state in force; never nil once Run has built the daemon.
func (d *Daemon) current() *State {
	if s := d.state.Load(); s != nil {
		return s
	}
	return &State{}
}

// publish makes a copy of the state in force, changed by edit, the state
// in force. Reconciler only: edit must replace, never write into, what
// the copy shares with the old state.
func (d *Daemon) publish(edit func(s *State)) *State {
	old := d.current()
	s := *old
	edit(&s)
	if s.policy != old.policy || s.effective() != old.effective() {
		s.listed = listStatus(s.policy, s.effective())
	}
	d.state.Store(&s)
	return &s
}

// index is the indexed effective ruleset in force (nil: none yet).
func (s *State) index() *ruleset.Index { return s.byGen[s.gen] }

// effective is what the kernel enforces: the policy minus revocations,
// plus routes, containers resolved; nil before the first generation.
// It is the ruleset of the generation in force's index, so that the two
// are never out of step.
func (s *State) effective() *ruleset.Ruleset {
	if ix := s.index(); ix != nil {
		return ix.Ruleset()
	}
	return nil
}

// countedApps are the unbound principal ("", id 0) and the policy's apps
// with their ids, in order: the ids Daemon.counters asks the kernel
// about and the names it answers by.
type countedApps struct {
	names []string
	ids   []uint32
}

// countApps is the countedApps of policy (nil: the unbound principal
// alone) by ids.
func countApps(policy *ruleset.Ruleset, ids map[string]uint32) countedApps {
	c := countedApps{names: []string{""}, ids: []uint32{0}}
	if policy == nil {
		return c
	}
	for _, a := range policy.Apps {
		if id, ok := ids[a.Name]; ok {
			c.names = append(c.names, a.Name)
			c.ids = append(c.ids, id)
		}
	}
	return c
}

// pendingGen is the generation the reconciler is applying: the kernel may
// decide by it (and report events of it) before its State is published.
type pendingGen struct {
	rules    *ruleset.Index
	appNames map[uint32]string
}

// rememberGen returns byGen with gen's ruleset added, and without the
// generations too old to still have events in the ring buffer. Earlier
// generations are kept, newest first, while they hold at most
// keptPrefixes prefixes and grants together: a policy of 1,000,000
// prefixes takes about 300 MiB a generation, and its events of an
// earlier generation are named by the one in force.
func rememberGen(byGen map[uint32]*ruleset.Index, gen uint32, ix *ruleset.Index) map[uint32]*ruleset.Index {
	out := maps.Clone(byGen)
	if out == nil {
		out = map[uint32]*ruleset.Index{}
	}
	out[gen] = ix
	held := 0
	for _, old := range slices.Backward(slices.Sorted(maps.Keys(out))) {
		if old == gen {
			continue
		}
		held += out[old].Size()
		if old+8 < gen || held > keptPrefixes {
			delete(out, old)
		}
	}
	return out
}

// keptPrefixes bounds the prefixes and grants of the generations before
// the one in force that byGen keeps.
const keptPrefixes = 200_000

// call runs f on the reconciler and waits for it to finish: how API
// requests that change the state (reload, revoke) take their turn with
// watch events. It fails only when the caller's ctx ends or the
// reconciler is gone, whichever context the caller holds.
func (d *Daemon) call(ctx context.Context, f func()) error {
	done := make(chan struct{})
	select {
	case d.calls <- func() { defer close(done); f() }:
	case <-ctx.Done():
		return ctx.Err()
	case <-d.stopped:
		return errReconcilerStopped
	}
	// Once taken, the reconciler runs f to its end.
	<-done
	return nil
}

// errReconcilerStopped is call's answer once the reconciler has returned.
var errReconcilerStopped = errors.New("the daemon is stopping")
