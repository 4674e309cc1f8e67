package daemon

import (
	"net/netip"
	"time"

	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/ruleset"
)

// Enforcer is what the daemon needs of the kernel's enforcement once it
// is open and attached (bpf.Enforcer): the reconciler applies generations
// and sweeps through it, readers ask it for counters, guards and learned
// answers, the DNS proxy teaches it answers. Opening, attaching, the
// audit ring and closing stay with Run, on the concrete type: they happen
// once. Tests drive the daemon over a fake (reconcile_test.go).
type Enforcer interface {
	// Apply, Matched and Sweep are called by the reconciler only, one at
	// a time (bpf.Enforcer.Apply is not safe for concurrent use).
	Apply(g bpf.Generation) (uint32, error)
	Matched() map[string]int
	Sweep(opts bpf.SweepOptions) (bpf.SweepResult, error)

	// The readers: safe from any goroutine, also while Apply runs.
	Counters(ids []uint32) (map[uint32][bpf.NumCounts]uint64, error)
	Attached() map[string]bool
	Guards() []bpf.Guard
	Handover() (st bpf.HandoverStats, ok bool, err error)
	Learned() []ruleset.Learned

	// KeepTracker attaches the TCP handover guard's tracker for a process
	// launched outside the trace guard: safe from any goroutine.
	KeepTracker(why string) error

	// The DNS learner (names.go): safe from any goroutine.
	Learn(facts []ruleset.Learned, cap int) (refused, evicted []ruleset.Learned, err error)
	ExpireLearned(now time.Time) (int, error)
	RedirectOf(proto ruleset.Proto, src, dst netip.AddrPort) (bpf.Redirected, error)
	ServeDNS(port uint16, netns uint64) error
	ForgetDNSProxies() error
}

var _ Enforcer = (*bpf.Enforcer)(nil)
