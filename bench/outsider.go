package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/procgate/procgate/daemon"
)

// The outsider phase measures what issue 13's first measurement did, the
// way a new user would: the real daemon with a policy of outsiderSize
// internal prefixes and no per-app opt-outs, an app started by `procgate
// run` (so with the trace guard's credentials and in the cgroup the daemon
// made), whose TCP connects go to a listener of its own process, against
// the same client started plainly, interleaved as in the latency phase.
// Unlike the latency phase's clients, the listener is inside the enforced
// cgroup here, so its SYN-ACKs pass the egress backstop too.

const phaseOutsider = "outsider"

// outsiderSize is the policy's size: the issue measured at 5,000 prefixes.
const outsiderSize = 5000

// vRun is the lane of the client `procgate run` started.
const vRun = "procgate-run"

// vPlaced is the lane of a client the bench placed in the daemon's app
// cgroup itself, as the principals phase's launched kind: what differs
// from vRun is what `procgate run` does to the process.
const vPlaced = "procgate-placed"

// outsiderPorts are the lanes' listeners' ports, one per lane in one
// namespace, all inside grantPorts' 8000-8100.
var outsiderPorts = map[string]uint16{vBaseline: 8001, vControl: 8002, vRun: 8003, vPlaced: 8004}

// outsiderClasses are the phase's classes: the TCP goals it judges.
var outsiderClasses = []class{classAllow, classExternal}

func (b *bench) outsiderPhase(ctx context.Context) error {
	bin, err := procgateBinary()
	if err != nil {
		return err
	}
	pol, err := newPolicy(outsiderSize)
	if err != nil {
		return err
	}
	w := &world{nsg: netnsGroup{h: b.host}}
	defer w.close()
	ns, err := w.nsg.localNS(phaseOutsider)
	if err != nil {
		return err
	}
	dir, err := b.phaseDir(phaseOutsider)
	if err != nil {
		return err
	}
	policyPath := filepath.Join(dir, "policy.yaml")
	if _, err := writePolicyYAML(policyPath, pol, 100); err != nil {
		return err
	}
	d, err := b.startDaemon(bin, dir, ns, policyPath, phaseOutsider)
	if err != nil {
		return err
	}
	defer d.stop()

	if err := b.unenforcedLanes(w, ns, phaseOutsider, nil); err != nil {
		return err
	}
	for _, l := range w.lanes {
		l.port = outsiderPorts[l.v.Name]
	}
	run := &variant{Name: vRun, Desc: "an app started by `procgate run --app app0` (the daemon's defaults), connecting to a listener of its own process"}
	l := &lane{v: run, topo: topoLoopback, clientNS: ns, port: outsiderPorts[vRun]}
	w.lanes = append(w.lanes, l)
	if l.cl, err = startLaunchedClient(phaseOutsider+"/"+vRun, d, appName(0), ns); err != nil {
		return err
	}
	placed := &variant{Name: vPlaced, Desc: "a client the bench placed in app0's cgroup, with the trace guard's credentials, connecting to a listener of its own process"}
	l = &lane{v: placed, topo: topoLoopback, clientNS: ns, port: outsiderPorts[vPlaced]}
	w.lanes = append(w.lanes, l)
	if l.cl, err = startClient(phaseOutsider+"/"+vPlaced, filepath.Join(d.cgroupRoot, daemon.AppsDir, appName(0)), ns, 0, false); err != nil {
		return err
	}
	for _, l := range w.lanes {
		if _, err := l.cl.do(request{Op: opListen, Port: l.port}); err != nil {
			return err
		}
	}
	res, err := b.measure(ctx, w, pol, phaseOutsider, []proto{tcp}, outsiderClasses)
	if err != nil {
		return err
	}
	b.res.Outsider = res
	if err := b.outsiderCost(w, d, pol); err != nil {
		return err
	}
	return errors.Join(d.stop(), w.close())
}

// outsiderCost measures one extra batch per procgate lane and class with
// the BPF statistics of the daemon's programs, which it pins in its own
// bpffs directory: it shows where the difference to the latency phase's
// cost goes (the listener in the enforced cgroup, what `procgate run`
// does to the process).
func (b *bench) outsiderCost(w *world, d *daemonProc, pol *benchPolicy) error {
	progs, err := pinnedPrograms(d.bpfDir)
	if err != nil {
		return err
	}
	defer closeProgs(progs)
	for _, l := range w.lanes {
		if l.v.Name != vRun && l.v.Name != vPlaced {
			continue
		}
		l.v.progs = progs
		for _, c := range outsiderClasses {
			if err := b.latencyCost(phaseOutsider, l, pol, tcp, c); err != nil {
				return err
			}
		}
	}
	return nil
}

// outsiderSection writes the outsider phase's table.
func (r *results) outsiderSection(w func(string, ...any)) {
	if len(r.Outsider) == 0 {
		return
	}
	w("## An outsider's harness")
	w("")
	w("The real daemon (bin/procgate) in a namespace of its own, with a policy of %d internal prefixes and %d apps' grants and no per-app option (no `match:`, no `traceable:`, no `handover:`). *%s*: a client started by `procgate run --app %s -- <client>`, as a user would start an app: in the cgroup the daemon made, with the trace guard's credentials; it connects (blocking TCP connect, loopback) to a listener of its own process, so that the listener's SYN-ACKs pass the egress backstop too. *%s*: the same client placed by the bench in app0's cgroup, with the credentials the trace guard gives (what differs from *%s* is what `procgate run` does to the process). *baseline* and its control: the same client outside the daemon's cgroup root. Each client has its own listener. Interleaved rounds as in the latency phase.", outsiderSize, maxApps, vRun, appName(0), vPlaced, vRun)
	w("")
	w("| class | variant | p50 µs | p99 µs | added p50 µs | p50 ratio | p99 ratio | spread | n | wrong |")
	w("|---|---|---|---|---|---|---|---|---|---|")
	for _, l := range r.Outsider {
		w("| %s | %s | %.2f | %.2f | %+.3f | %s | %s | %.1f%% | %d | %d |", l.Class, l.Variant, l.P50, l.P99, l.AddedP50, pct(l.P50Ratio), pct(l.P99Ratio), l.Spread*100, l.N, l.Wrong)
	}
	w("")
	r.bpfCostSection(w, phaseOutsider, "Where the daemon's time goes under an outsider's harness",
		"BPF run time of the daemon's programs (pinned in its bpffs directory) during one extra batch of %d attempts per procgate lane and class, from the kernel's statistics, as in the latency phase's table.", r.Config.Batch)
	if d := r.outsiderCostDiff(); d != "" {
		w("%s", d)
		w("")
	}
}

// costDiffMin is the smallest change of a program's ns per attempt that
// outsiderCostDiff names (unless its runs per attempt changed): smaller
// ones are within the statistics' run-to-run noise.
const costDiffMin = 20

// outsiderCostDiff says, per class, how the BPF cost of procgate-run's
// connects differs from procgate's in the latency phase, program by
// program, and how much of the difference in added p50 that explains; ""
// without both phases' extra batches.
func (r *results) outsiderCostDiff() string {
	var items []string
	for _, c := range outsiderClasses {
		o, ok := r.cost(phaseOutsider, costWhat(vRun, topoLoopback, tcp, c))
		if !ok {
			continue
		}
		l, ok := r.cost(phaseLatency, costWhat(vProcgate, topoLoopback, tcp, c))
		if !ok {
			continue
		}
		item := fmt.Sprintf("- %s: %.0f ns per attempt instead of %.0f (%+.0f ns)", c, o.Total, l.Total, o.Total-l.Total)
		if parts := progDiffs(o.Progs, l.Progs); len(parts) > 0 {
			item += ": " + strings.Join(parts, ", ")
		} else {
			item += fmt.Sprintf(": no program's share differs by %d ns or more", costDiffMin)
		}
		if pl, ok := r.cost(phaseOutsider, costWhat(vPlaced, topoLoopback, tcp, c)); ok {
			item += fmt.Sprintf("; %s: %.0f ns per attempt", vPlaced, pl.Total)
		}
		ol, ook := r.outsiderLat(c, vRun)
		ll, lok := r.lat(phaseLatency, topoLoopback, tcp, c, r.Config.MatrixSize, vProcgate)
		if ook && lok && ll.P50Ratio > 0 {
			item += fmt.Sprintf(". %s adds %+.3f µs to its baseline's p50, procgate in the latency phase %+.3f µs: of the %+.3f µs between them, the BPF programs account for %+.3f µs",
				vRun, ol.AddedP50, ll.AddedP50, ol.AddedP50-ll.AddedP50, (o.Total-l.Total)/1e3)
		}
		items = append(items, item+".")
	}
	if len(items) == 0 {
		return ""
	}
	return fmt.Sprintf("Against procgate's programs in the latency phase (loopback TCP connect(), %d prefixes, the listener outside the enforced cgroup), %s's cost per connect:\n\n%s",
		r.Config.MatrixSize, vRun, strings.Join(items, "\n"))
}

// progDiffs names the programs whose share of an attempt differs between
// two batches by a run or more than costDiffMin, the largest first.
func progDiffs(now, then []progCost) []string {
	type diff struct {
		text string
		ns   float64
	}
	var ds []diff
	add := func(name string, n, t progCost) {
		d := n.NsPer - t.NsPer
		switch {
		case abs(n.RunsPer-t.RunsPer) >= 0.05:
			ds = append(ds, diff{fmt.Sprintf("%s %+.0f ns (%.2f runs per attempt instead of %.2f)", name, d, n.RunsPer, t.RunsPer), d})
		case abs(d) >= costDiffMin:
			ds = append(ds, diff{fmt.Sprintf("%s %+.0f ns (%.0f ns per run instead of %.0f)", name, d, n.NsPerRun, t.NsPerRun), d})
		}
	}
	for _, n := range now {
		i := slices.IndexFunc(then, func(t progCost) bool { return t.Program == n.Program })
		var t progCost
		if i >= 0 {
			t = then[i]
		}
		add(n.Program, n, t)
	}
	for _, t := range then {
		if !slices.ContainsFunc(now, func(n progCost) bool { return n.Program == t.Program }) {
			add(t.Program, progCost{}, t)
		}
	}
	slices.SortStableFunc(ds, func(a, b diff) int { return cmp.Compare(abs(b.ns), abs(a.ns)) })
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.text
	}
	return out
}

// outsiderLat is the outsider phase's result of variant v for class c.
func (r *results) outsiderLat(c class, v string) (latResult, bool) {
	i := slices.IndexFunc(r.Outsider, func(l latResult) bool { return l.Class == c && l.Variant == v })
	if i < 0 {
		return latResult{}, false
	}
	return r.Outsider[i], true
}

// cost is the extra batch what of phase.
func (r *results) cost(phase, what string) (bpfCost, bool) {
	i := slices.IndexFunc(r.BPFCost, func(c bpfCost) bool { return c.Phase == phase && c.What == what })
	if i < 0 {
		return bpfCost{}, false
	}
	return r.BPFCost[i], true
}

// outsiderTargets judges the TCP goals (internal-allow within +5%, external
// within +2%) under the outsider's harness, which the issue asks them to
// hold under too.
func (r *results) outsiderTargets() []targetResult {
	var out []targetResult
	for _, g := range []struct {
		c    class
		goal float64
	}{{classAllow, 1.05}, {classExternal, 1.02}} {
		tr := targetResult{Name: fmt.Sprintf("%s overhead under an outsider's harness, tcp", g.c),
			Target: fmt.Sprintf("p50 and p99 within %s of baseline, for an app started by `procgate run` connecting to its own listener, %d prefixes", pct(g.goal), outsiderSize)}
		if l, ok := r.outsiderLat(g.c, vRun); ok && !judgeRatio(&tr, l, g.goal) && l.P50Ratio > g.goal {
			// The latency phase's floor of the same class: this harness
			// runs one egress program more per connect (its listener's
			// SYN-ACK), so its own floor is no lower.
			if f := r.overFloor(topoLoopback, tcp, g.c, l, g.goal); f != "" {
				tr.Gap += f
				tr.Why = "the floor is the latency phase's empty-programs at the same class (loopback TCP); this harness runs one egress program more per connect, its listener's SYN-ACK, so its own floor is no lower"
			}
		}
		if tr.Met != nil {
			out = append(out, tr)
		}
	}
	return out
}
