package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

// revocationResult is how fast a revocation takes hold: for new attempts
// (the generation switch) and for live sockets (the sweep after it), as
// `procgate revoke` does them: Apply, then Sweep.
type revocationResult struct {
	Size    int            `json:"prefixes"`
	Revokes []revokeTiming `json:"revokes"`
	Sweeps  []sweepTiming  `json:"sweeps"`
}

// revokeTiming is one revocation under a client that sends to the revoked
// destination without pause; times are from the start of the revocation.
type revokeTiming struct {
	// ApplyMs: until Apply returned (the switch is complete).
	ApplyMs float64 `json:"apply_ms"`
	// FirstDenialMs: until the first denied attempt returned.
	FirstDenialMs float64 `json:"first_denial_ms"`
	// LastAllowedMs: until the last allowed attempt started (must be
	// before ApplyMs).
	LastAllowedMs float64 `json:"last_allowed_ms"`
	Attempts      int64   `json:"attempts"`
}

// sweepTiming is one sweep that ends n live TCP connections of app0 to a
// destination the new generation no longer grants.
type sweepTiming struct {
	Sockets int     `json:"sockets"`
	Ended   int     `json:"ended"`
	Failed  int     `json:"failed"`
	Alive   int     `json:"alive_after"` // of the n, still alive after the sweep (must be 0)
	Method  string  `json:"method"`
	Ms      float64 `json:"ms"` // the sweep: socket walk, destroys, conntrack deletes
	// ConntrackMs is the part of Ms spent on the ended flows' conntrack
	// entries.
	ConntrackMs float64 `json:"conntrack_ms"`
	// WalkMs is a sweep of the same sockets just before the revocation,
	// which ends none: the walk and its decisions alone. Ms less WalkMs
	// and ConntrackMs is what the destroys cost.
	WalkMs float64 `json:"walk_ms"`
}

func msOf(ns int64) float64 { return round3(float64(ns) / 1e6) }

// holdPort is where the sweep's live connections go: granted (8000-8100),
// and no other server of the bench listens there.
const holdPort = 8003

// revocationPhase measures both halves of a revocation on the procgate lane
// (loopback, the matrix policy): app0 loses its first grant.
func (b *bench) revocationPhase(ctx context.Context) error {
	pol, err := newPolicy(b.cfg.MatrixSize)
	if err != nil {
		return err
	}
	rsA := pol.ruleset()
	rsB := withoutFirstGrant(rsA)
	if _, err := b.applyProcgate(rsA, pol); err != nil {
		return err
	}
	w, err := b.buildWorld(pol, pickVariants(b.variants, vProcgate), []topo{topoLoopback})
	if err != nil {
		return err
	}
	defer w.close()
	l := w.lanes[0]
	revoked := hostIn(pol.grants[0][0])
	res := &revocationResult{Size: pol.size}
	b.res.Revocation = res

	for range b.cfg.Revokes {
		if err := ctx.Err(); err != nil {
			return err
		}
		req := request{Op: opUntilDenied, Dests: []netip.AddrPort{netip.AddrPortFrom(revoked, servicePort)}, Duration: 5 * time.Second}
		if err := l.cl.send(req); err != nil {
			return err
		}
		time.Sleep(20 * time.Millisecond) // the client is sending, and allowed
		t0 := monotonic()
		if _, err := b.applyProcgate(rsB, pol); err != nil {
			return err
		}
		t1 := monotonic()
		resp, err := l.cl.receive()
		if err != nil {
			return err
		}
		if resp.FirstDenied == 0 {
			return fmt.Errorf("revocation: %s still allowed 5 s after the revoke", revoked)
		}
		rt := revokeTiming{ApplyMs: msOf(t1 - t0), FirstDenialMs: msOf(resp.FirstDenied - t0), Attempts: resp.Attempts}
		if resp.LastAllowed > 0 {
			rt.LastAllowedMs = msOf(resp.LastAllowed - t0)
		}
		res.Revokes = append(res.Revokes, rt)
		if _, err := b.applyProcgate(rsA, pol); err != nil {
			return err
		}
	}

	for _, n := range b.cfg.SweepSockets {
		if err := ctx.Err(); err != nil {
			return err
		}
		st, err := b.sweepOnce(l, pol, rsB, revoked, n)
		if err != nil {
			return fmt.Errorf("sweep of %d sockets: %w", n, err)
		}
		res.Sweeps = append(res.Sweeps, st)
		if _, err := b.applyProcgate(rsA, pol); err != nil {
			return err
		}
	}
	return nil
}

// sweepOnce opens n connections from app0's cgroup to revoked (granted),
// revokes, sweeps, and checks what is left of them.
func (b *bench) sweepOnce(l *lane, pol *benchPolicy, rsB *ruleset.Ruleset, revoked netip.Addr, n int) (sweepTiming, error) {
	st := sweepTiming{Sockets: n}
	// The peer accepts and keeps the connections, and never reads: ended
	// connections wake nothing of the bench while the sweep is timed. It
	// keeps them out of Go's poller: the RST of each destroy is received
	// inside the destroy (loopback), and a socket in the poller would wake
	// the bench's epoll there, as a peer on another host does not.
	var ln net.Listener
	if err := inNS(l.clientNS, func() error {
		var err error
		ln, err = net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", holdPort))
		return err
	}); err != nil {
		return st, err
	}
	var mu sync.Mutex
	var conns []int
	defer func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, fd := range conns {
			unix.Close(fd)
		}
	}()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			// A bare duplicate: closing c takes the socket out of the
			// poller (os.NewFile of a nonblocking duplicate would put
			// it back).
			fd := -1
			if raw, err := c.(*net.TCPConn).SyscallConn(); err == nil {
				raw.Control(func(s uintptr) { fd, _ = unix.Dup(int(s)) })
			}
			c.Close()
			if fd < 0 {
				continue
			}
			mu.Lock()
			conns = append(conns, fd)
			mu.Unlock()
		}
	}()
	accepted := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(conns)
	}
	h, err := probe.StartHolder(b.appCgroup(vProcgate, 0), l.clientNS)
	if err != nil {
		return st, err
	}
	defer h.Close()
	if err := h.Open("live", fmt.Sprintf("%s:%d/tcp", revoked, holdPort), probe.Connect, n); err != nil {
		return st, err
	}
	// Every connection accepted: the accepts do not run during the sweep.
	for deadline := time.Now().Add(10 * time.Second); accepted() < n; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			return st, fmt.Errorf("%d of %d connections accepted after 10 s", accepted(), n)
		}
	}
	sweep := func() (bpf.SweepResult, error) {
		var sr bpf.SweepResult
		err := inNS(l.clientNS, func() error {
			var err error
			sr, err = b.enf.Sweep(bpf.SweepOptions{})
			return err
		})
		return sr, err
	}
	walk, err := sweep()
	if err != nil {
		return st, err
	}
	if len(walk.Ended) > 0 {
		return st, fmt.Errorf("a sweep under the granting policy ended %d sockets", len(walk.Ended))
	}
	st.WalkMs = msOf(walk.Took.Nanoseconds())
	if _, err := b.applyProcgate(rsB, pol); err != nil {
		return st, err
	}
	sr, err := sweep()
	if err != nil {
		return st, err
	}
	hs, err := h.State("live")
	if err != nil {
		return st, err
	}
	st.Ended, st.Failed, st.Alive = len(sr.Ended), len(sr.Failed), hs.Alive
	st.Method, st.Ms, st.ConntrackMs = string(sr.Method), msOf(sr.Took.Nanoseconds()), msOf(sr.ConntrackTook.Nanoseconds())
	if st.Alive > 0 {
		return st, fmt.Errorf("%d of %d revoked connections still alive after the sweep", st.Alive, n)
	}
	return st, nil
}

// revocationTarget: the first denial comes before the revoke returns (no
// attempt begun after Apply returned is allowed; most revocations show a
// denial before, unless the client was not scheduled in that window), and a
// sweep ends 10,000 live sockets in under 50 ms.
func (r *results) revocationTarget() targetResult {
	tr := targetResult{Name: "revocation", Target: "first denial before `revoke` returns; 10,000 live sockets ended in < 50 ms"}
	rv := r.Revocation
	if rv == nil || len(rv.Revokes) == 0 {
		return tr
	}
	met := true
	if d := r.Daemon; d != nil && len(d.CLIRevokes) > 0 {
		// The command itself: this half of the target is judged on it.
		var ts []revokeTally
		for _, t := range d.CLIRevokes {
			ts = append(ts, revokeTally{t.FirstDenialMs, t.CommandMs, t.LastAllowedMs})
		}
		first, cmd, before, late := tallyRevokes(ts)
		n := len(ts)
		tr.Value = fmt.Sprintf("`procgate revoke` against the daemon: first denial %.2f ms after the command started (median of %d), the command returned after %.2f ms (median); denied before it returned in %d of %d, no attempt begun after it allowed in %d of %d",
			first, n, cmd, before, n, n-late, n)
		if before < n || late > 0 {
			met = false
			tr.Gap = fmt.Sprintf("in %d of %d the first denial came after `revoke` returned", n-before, n)
		}
		var afs []float64
		for _, t := range rv.Revokes {
			afs = append(afs, t.FirstDenialMs)
		}
		slices.Sort(afs)
		tr.Why = fmt.Sprintf("the generation switch alone (Apply in the bench process): first denial %.2f ms after it began (median of %d)", afs[len(afs)/2], len(afs))
	} else {
		met = r.applyRevocations(&tr)
	}
	for _, s := range rv.Sweeps {
		if s.Sockets != 10000 {
			continue
		}
		tr.Value += fmt.Sprintf("; 10,000 live sockets ended in %.1f ms (%s; the walk alone %.1f ms, conntrack deletes %.1f ms)", s.Ms, s.Method, s.WalkMs, s.ConntrackMs)
		if s.Ms >= 50 || s.Alive > 0 {
			met = false
			tr.Gap = strings.TrimPrefix(tr.Gap+fmt.Sprintf("; 10,000 sockets took %.1f ms, %.1f ms over", s.Ms, s.Ms-50), "; ")
		}
	}
	tr.Met = boolp(met)
	return tr
}

// revokeTally is one revocation's times, from its start: the first denied
// attempt, the return (of Apply or of the command), the last allowed one.
type revokeTally struct{ first, returned, lastAllowed float64 }

// tallyRevokes gives the medians of first denial and return, and how many
// revocations denied before they returned and allowed an attempt begun after.
func tallyRevokes(ts []revokeTally) (first, returned float64, before, late int) {
	var firsts, rets []float64
	for _, t := range ts {
		firsts, rets = append(firsts, t.first), append(rets, t.returned)
		if t.lastAllowed > t.returned {
			late++
		}
		if t.first <= t.returned {
			before++
		}
	}
	slices.Sort(firsts)
	slices.Sort(rets)
	return firsts[len(firsts)/2], rets[len(rets)/2], before, late
}

// applyRevocations judges the first half of the revocation target on the
// generation switches alone, when the run did not time `procgate revoke`.
func (r *results) applyRevocations(tr *targetResult) bool {
	rv := r.Revocation
	met := true
	var ts []revokeTally
	for _, t := range rv.Revokes {
		ts = append(ts, revokeTally{t.FirstDenialMs, t.ApplyMs, t.LastAllowedMs})
	}
	first, apply, before, late := tallyRevokes(ts)
	n := len(ts)
	tr.Value = fmt.Sprintf("first denial %.2f ms after the revoke began (median of %d), Apply returned after %.2f ms (median); denied before Apply returned in %d of %d, no attempt begun after it allowed in %d of %d",
		first, n, apply, before, n, n-late, n)
	if late > 0 {
		met = false
		tr.Gap = fmt.Sprintf("%d of %d revocations allowed an attempt begun after Apply returned", late, len(rv.Revokes))
	}
	return met
}

// revocationSection writes the revocation table.
func (r *results) revocationSection(w func(string, ...any)) {
	w("## Revocation")
	w("")
	rv := r.Revocation
	if rv == nil {
		if r.Daemon != nil && len(r.Daemon.CLIRevokes) > 0 {
			r.cliRevokeTable(w)
			return
		}
		w("Not measured in this run.")
		w("")
		return
	}
	w("What `procgate revoke` does, measured on the procgate lane (loopback, %d prefixes): app0 loses its first grant in a new generation (Apply), then the sweep ends app0's live sockets to what it no longer may reach.", rv.Size)
	w("")
	w("*New attempts*: a client in app0's cgroup sends UDP datagrams to the revoked destination without pause while the bench revokes; times from the start of the revocation (CLOCK_MONOTONIC in both processes): when the first denied sendto() returned, and when the last allowed one began. Apply switches the generation at once and returns after an RCU grace period, so the first denial comes well before it returns.")
	w("")
	w("| revocation | Apply returned ms | first denial ms | last allowed attempt ms | attempts |")
	w("|---|---|---|---|---|")
	for i, t := range rv.Revokes {
		w("| %d | %.2f | %.2f | %.2f | %d |", i+1, t.ApplyMs, t.FirstDenialMs, t.LastAllowedMs, t.Attempts)
	}
	w("")
	r.cliRevokeTable(w)
	w("*Live sockets*: app0 holds n established TCP connections to the revoked destination (the peer, in the bench process, keeps them and never reads); after the revoking Apply, one sweep (timed by the enforcer: the socket walk with its decisions, the destroys, and the ended flows' conntrack deletes) must end all of them. Of it: the conntrack part, and a sweep of the same sockets just before the revocation, which ends none (the walk alone); the rest is the destroys.")
	w("")
	w("| live sockets | ended | failed | alive after | method | sweep ms | conntrack ms | walk alone ms |")
	w("|---|---|---|---|---|---|---|---|")
	for _, s := range rv.Sweeps {
		w("| %d | %d | %d | %d | %s | %.2f | %.2f | %.2f |", s.Sockets, s.Ended, s.Failed, s.Alive, s.Method, s.Ms, s.ConntrackMs, s.WalkMs)
	}
	w("")
}

// cliRevokeTable writes the revocations through `procgate revoke`.
func (r *results) cliRevokeTable(w func(string, ...any)) {
	d := r.Daemon
	if d == nil || len(d.CLIRevokes) == 0 {
		return
	}
	w("*Through the CLI*: against the real daemon (bin/procgate, %d-prefix policy, see the daemon under Cost): a client in the daemon's app0 cgroup sends UDP datagrams to one of app0's granted destinations without pause while `procgate revoke --app app0` runs (then `--restore`); times from just before the command was started: when it exited (process start, API request, the daemon's new generation and sweep, the answer), when the first denied sendto() returned, and when the last allowed one began.", d.RevokePrefixes)
	w("")
	w("| revocation | `revoke` returned ms | first denial ms | last allowed attempt ms | attempts | denied before it returned |")
	w("|---|---|---|---|---|---|")
	for i, t := range d.CLIRevokes {
		w("| %d | %.2f | %.2f | %.2f | %d | %v |", i+1, t.CommandMs, t.FirstDenialMs, t.LastAllowedMs, t.Attempts, t.FirstDenialMs <= t.CommandMs)
	}
	w("")
}
