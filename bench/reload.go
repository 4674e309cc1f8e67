package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/procgate/procgate/ruleset"
)

// reloadResult is the reload-under-load phase's outcome.
type reloadResult struct {
	Size    int   `json:"prefixes"`
	Clients int   `json:"clients"`
	Reloads int   `json:"reloads"`
	Attempt int64 `json:"attempts"`
	// Seconds is the time attempts ran while reloads went on.
	Seconds        float64 `json:"seconds"`
	AttemptsPerSec float64 `json:"attempts_per_sec"`
	// IdlePerSec is the same clients' rate without reloads.
	IdlePerSec float64 `json:"idle_attempts_per_sec"`
	Wrong      int     `json:"wrong_verdicts"`
	WrongAt    string  `json:"wrong_at,omitempty"`
	// The destination granted in one policy and not the other: both
	// verdicts must show up, or the reloads changed nothing.
	FlipAllowed int64 `json:"flip_allowed"`
	FlipDenied  int64 `json:"flip_denied"`
	// Dropped are TCP connects that got no answer within 100 ms: their SYN
	// was dropped by the egress backstop (only the switched destination
	// may see that: connect4 allowed it under one generation, egress denied
	// its SYN under the next).
	Dropped int64 `json:"dropped_connects"`
	// Apply times of the reloads, milliseconds.
	ApplyP50 float64 `json:"apply_p50_ms"`
	ApplyP99 float64 `json:"apply_p99_ms"`
	ApplyMax float64 `json:"apply_max_ms"`
	// SlowestApply is where the slowest reload spent its time.
	SlowestApply string `json:"slowest_apply"`
	GoalMet      bool   `json:"goal_met"`
}

// withoutFirstGrant is rs with app0's first grant gone.
func withoutFirstGrant(rs *ruleset.Ruleset) *ruleset.Ruleset {
	out := *rs
	out.Apps = slices.Clone(rs.Apps)
	out.Apps[0].Grants = rs.Apps[0].Grants[1:]
	return &out
}

// hostIn is the address of a prefix the bench sends to.
func hostIn(p netip.Prefix) netip.Addr { return p.Addr().Next().Next() }

// reloadPhase switches procgate between two policies as fast as it can
// while clients in app0's cgroup make attempts whose verdicts are the same
// in both (must never change) and one whose verdict differs (either).
func (b *bench) reloadPhase(ctx context.Context) error {
	pol, err := newPolicy(max(b.cfg.ReloadSize, 3*maxApps))
	if err != nil {
		return err
	}
	rsA := pol.ruleset()
	rsB := withoutFirstGrant(rsA)
	g0, g1 := pol.grants[0], pol.grants[1]
	type dest struct {
		addr netip.Addr
		must verdictRule
	}
	dests := []dest{
		{hostIn(g0[1]), mustAllow}, {hostIn(g0[len(g0)/2]), mustAllow}, {hostIn(g0[len(g0)-1]), mustAllow},
		{hostIn(g1[0]), mustDeny}, {hostIn(g1[len(g1)-1]), mustDeny},
		{netip.MustParseAddr("198.51.100.7"), mustAllow},
		{hostIn(g0[0]), eitherVerdict},
	}
	var checks []check
	flip := map[int]bool{}
	for _, d := range dests {
		for _, pr := range []proto{udp, tcp} {
			port := uint16(servicePort)
			if pr == tcp {
				port = refusedPort
			}
			if d.must == eitherVerdict {
				flip[len(checks)] = true
			}
			checks = append(checks, check{Dest: netip.AddrPortFrom(d.addr, port), Proto: pr, Must: d.must})
		}
	}
	// Twice: the second Apply waits for the background clear of what the
	// phase before left (up to 2,000,000 entries take seconds to delete),
	// which is not what this phase measures.
	for range 2 {
		if _, err := b.applyProcgate(rsA, pol); err != nil {
			return err
		}
	}
	w, err := b.buildWorld(pol, pickVariants(b.variants, vProcgate), []topo{topoLoopback})
	if err != nil {
		return err
	}
	defer w.close()
	l := w.lanes[0]
	// One client per core: the machine's both cores make attempts, and the
	// loader competes with them, as a daemon would.
	clients := []*client{l.cl}
	extra, err := b.startLaneClient(l.v, l.topo, l.clientNS)
	if err != nil {
		return err
	}
	defer extra.close()
	clients = append(clients, extra)

	res := reloadResult{Size: pol.size, Clients: len(clients)}
	segment := func(reloads int, d time.Duration) (int64, time.Duration, []time.Duration, error) {
		for _, c := range clients {
			if err := c.send(request{Op: opVerify, Checks: checks}); err != nil {
				return 0, 0, nil, err
			}
		}
		t0 := time.Now()
		var applies []time.Duration
		var applyErr error
		for i := 0; (reloads > 0 && i < reloads) || (reloads == 0 && time.Since(t0) < d); i++ {
			if reloads == 0 {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			rs := rsA
			if i%2 == 0 {
				rs = rsB
			}
			st, err := b.applyProcgate(rs, pol)
			if err != nil {
				applyErr = err
				break
			}
			applies = append(applies, time.Duration(st.Seconds*float64(time.Second)))
			if ctx.Err() != nil {
				break
			}
		}
		// Back to A, so that every segment starts alike.
		if len(applies)%2 == 1 && applyErr == nil {
			if _, err := b.applyProcgate(rsA, pol); err != nil {
				applyErr = err
			}
		}
		elapsed := time.Since(t0)
		var attempts int64
		var errs []error
		for _, c := range clients {
			errs = append(errs, c.send(request{Op: opStop}))
		}
		for _, c := range clients {
			resp, err := c.receive()
			if err != nil {
				errs = append(errs, err)
				continue
			}
			attempts += resp.Attempts
			if resp.Wrong > 0 && res.Wrong == 0 {
				res.WrongAt = resp.WrongDesc
			}
			res.Wrong += resp.Wrong
			for i := range checks {
				res.Dropped += resp.Dropped[i]
				if flip[i] && reloads > 0 {
					res.FlipAllowed += resp.Allowed[i]
					res.FlipDenied += resp.Denied[i]
				}
			}
		}
		return attempts, elapsed, applies, errors.Join(append(errs, applyErr)...)
	}

	b.applies.takeSlowest()
	idle, idleTime, _, err := segment(0, time.Second)
	if err != nil {
		return err
	}
	res.IdlePerSec = float64(idle) / idleTime.Seconds()
	var applies []time.Duration
	start := time.Now()
	var busy time.Duration
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, took, ap, err := segment(100, 0)
		if err != nil {
			return err
		}
		res.Attempt += n
		busy += took
		applies = append(applies, ap...)
		res.Reloads = len(applies)
		b.log.Info("reloads", "done", res.Reloads, "attempts", res.Attempt, "wrong", res.Wrong)
		if res.Reloads >= b.cfg.Reloads && res.Attempt >= b.cfg.ReloadAttempts {
			res.GoalMet = true
			break
		}
		if time.Since(start) > b.cfg.ReloadLimit && res.Reloads >= b.cfg.Reloads {
			break
		}
	}
	res.Seconds = round3(busy.Seconds())
	res.AttemptsPerSec = float64(res.Attempt) / busy.Seconds()
	slices.Sort(applies)
	ms := func(d time.Duration) float64 { return round3(float64(d) / 1e6) }
	res.ApplyP50 = ms(applies[len(applies)/2])
	res.ApplyP99 = ms(applies[min(len(applies)-1, len(applies)*99/100)])
	res.ApplyMax = ms(applies[len(applies)-1])
	res.SlowestApply = b.applies.takeSlowest()
	b.res.Reload = &res
	if res.FlipAllowed == 0 || res.FlipDenied == 0 {
		return fmt.Errorf("the destination granted only in one policy was allowed %d and denied %d times: the reloads did not take effect",
			res.FlipAllowed, res.FlipDenied)
	}
	return w.close()
}
