package main

import (
	"fmt"
	"math"
	"slices"
	"strings"
)

// targetResult is one of the issue's targets, judged on this run.
type targetResult struct {
	Name   string `json:"name"`
	Target string `json:"target"`
	Value  string `json:"value"`
	// Met is nil when the run did not measure it.
	Met *bool  `json:"met"`
	Gap string `json:"gap,omitempty"` // by how much it was missed
	// Why splits the result into its parts, where the run measured them.
	Why string `json:"why,omitempty"`
	// point is the latency point a latency target judges, nil for others.
	point *latPoint
}

// latPoint is a latency target's point: the variant's ratio at t, p, c
// judged against goal.
type latPoint struct {
	t       topo
	p       proto
	c       class
	variant string
	goal    float64
}

func boolp(b bool) *bool { return &b }

func (r *results) lat(phase string, t topo, p proto, c class, size int, variant string) (latResult, bool) {
	for _, l := range r.Latency {
		if l.Phase == phase && l.Topo == t && l.Proto == p && l.Class == c && l.Size == size && l.Variant == variant {
			return l, true
		}
	}
	return latResult{}, false
}

func pct(ratio float64) string { return fmt.Sprintf("%+.1f%%", (ratio-1)*100) }

// evaluate judges every target against the baseline of the same run.
func (r *results) evaluate() []targetResult {
	var out []targetResult
	// Overhead of the internal-allow path: the issue's goals per call.
	goals := map[proto]float64{tcp: 1.05, udp: 1.08, udpConn: 1.03}
	for _, t := range []topo{topoLoopback, topoVeth} {
		for _, p := range latencyProtos {
			goal := goals[p]
			tr := targetResult{Name: fmt.Sprintf("internal-allow overhead, %s %s", t, p), Target: fmt.Sprintf("p50 and p99 within %s of baseline", pct(goal))}
			if l, ok := r.lat(phaseLatency, t, p, classAllow, r.Config.MatrixSize, vProcgate); ok {
				tr.point = &latPoint{t, p, classAllow, vProcgate, goal}
				if !judgeRatio(&tr, l, goal) {
					tr.Gap += r.overFloor(t, p, classAllow, l, goal) + r.atP99Only(l, goal)
				}
				tr.Why = r.guardParts(t, p, classAllow)
			}
			out = append(out, tr)
		}
	}
	// External destinations, from an app and from a process of no app.
	for _, v := range []struct{ name, who string }{{vProcgate, "from an app"}, {vProcgateNoApp, "from a process of no app"}} {
		for _, p := range latencyProtos {
			tr := targetResult{Name: fmt.Sprintf("external overhead %s, loopback %s", v.who, p), Target: "p50 and p99 within +2.0% of baseline"}
			if l, ok := r.lat(phaseLatency, topoLoopback, p, classExternal, r.Config.MatrixSize, v.name); ok {
				tr.point = &latPoint{topoLoopback, p, classExternal, v.name, 1.02}
				if !judgeRatio(&tr, l, 1.02) {
					tr.Gap += r.overFloor(topoLoopback, p, classExternal, l, 1.02) + r.atP99Only(l, 1.02)
				}
				switch v.name {
				case vProcgate:
					tr.Why = r.guardParts(topoLoopback, p, classExternal)
				case vProcgateNoApp:
					tr.Why = r.parts(topoLoopback, p, classExternal, append(floorParts(),
						variantPart{vNoAppTracker, "with the handover guard's sockops tracker, attached host-wide while some app needs it"}))
				}
				out = append(out, tr)
			}
		}
	}
	out = append(out, r.outsiderTargets()...)
	out = append(out, r.scalingOverhead())
	out = append(out, r.spawnTarget(), r.flatness(), r.versusNft(), r.tunnel(), r.noAppBulk(), r.reloadCorrect(), r.reloadTime(), r.revocationTarget(), r.verdictsCorrect())
	out = append(out, r.pinholeTargets()...)
	out = append(out, r.routesTarget())
	out = append(out, r.fleetTargets()...)
	out = append(out, r.scaleTargets()...)
	return out
}

// judgeRatio judges tr on l: p50 and p99 within goal of the baseline
// (a ratio). It reports whether they are; the gap says by how many points
// not.
func judgeRatio(tr *targetResult, l latResult, goal float64) bool {
	tr.Value = fmt.Sprintf("p50 %s (%.2f µs vs %.2f), p99 %s", pct(l.P50Ratio), l.P50, l.P50-l.AddedP50, pct(l.P99Ratio))
	worst := math.Max(l.P50Ratio, l.P99Ratio)
	tr.Met = boolp(worst <= goal)
	if !*tr.Met {
		tr.Gap = fmt.Sprintf("%.1f points over", (worst-goal)*100)
	}
	return *tr.Met
}

// guardParts says what each guard adds, one at a time (p50 and p99, each
// against the baseline of its own rounds), from the floor up.
func (r *results) guardParts(t topo, p proto, c class) string {
	return r.parts(t, p, c, append(floorParts(),
		variantPart{vProcgateHooks, "connect/sendmsg programs alone"},
		variantPart{vProcgateSockCreate, "with the sock_create guard"},
		variantPart{vProcgateEgress, "with the egress backstop"},
		variantPart{vProcgateTraceable, "everything, for a process open to tracing (TCP handover guard on its connections)"}))
}

// floorParts are the parts below every design: the floor, and the bare
// decision on top of it.
func floorParts() []variantPart {
	return []variantPart{
		{vEmpty, "the floor, an empty program at every hook"},
		{vMinimal, "a bare decision, the issue's minimal program"},
	}
}

// bareDecisions says, for the latency targets missed, where the floor
// (empty-programs) and the bare decision (minimal-decision) of the same
// point stand against the goal, one sentence per case: the floor over
// it, no program at these hooks meets the goal; the bare decision over
// it, only a decision cheaper than its lookups fits (procgate's per-CPU
// memos are one); both under it, the rest of procgate's cost is its
// guards. Judged at p50, as overFloor.
func (r *results) bareDecisions() []string {
	var floorOver, bareOver, guards, atP99 []string
	for _, tr := range r.Targets {
		pt := tr.point
		if pt == nil || tr.Met == nil || *tr.Met {
			continue
		}
		m, okM := r.lat(phaseLatency, pt.t, pt.p, pt.c, r.Config.MatrixSize, vMinimal)
		l, okL := r.lat(phaseLatency, pt.t, pt.p, pt.c, r.Config.MatrixSize, pt.variant)
		if !okM || !okL {
			continue
		}
		f, okF := r.lat(phaseLatency, pt.t, pt.p, pt.c, r.Config.MatrixSize, vEmpty)
		item := fmt.Sprintf("%s (goal %s: ", tr.Name, pct(pt.goal))
		if okF {
			item += fmt.Sprintf("floor %s, ", pct(f.P50Ratio))
		}
		item += fmt.Sprintf("bare decision %s, procgate %s)", pct(m.P50Ratio), pct(l.P50Ratio))
		switch {
		case okF && f.P50Ratio > pt.goal:
			floorOver = append(floorOver, item)
		case m.P50Ratio > pt.goal:
			bareOver = append(bareOver, item)
		case l.P50Ratio <= pt.goal:
			atP99 = append(atP99, item)
		default:
			guards = append(guards, item)
		}
	}
	var out []string
	for _, g := range []struct {
		items []string
		say   string
	}{
		{floorOver, "Where the floor alone is over the goal, no program at these hooks meets it"},
		{bareOver, "Where the bare decision (" + vMinimal + ": a hash and two LPM lookups) is over the goal and the floor under it, only a decision cheaper than those lookups fits, as procgate's per-CPU memos of the principal and the destination are"},
		{guards, "Where the bare decision is under the goal, deciding fits in it and the rest is procgate's guards, shown one at a time in the parts"},
		{atP99, "Missed at p99 only, p50 within the goal"},
	} {
		if len(g.items) > 0 {
			out = append(out, g.say+" (p50): "+strings.Join(g.items, "; ")+".")
		}
	}
	return out
}

// overFloor says, for a latency target missed, where the floor of the
// same point stands against the goal: above it, no program at these
// hooks can meet the goal and the rest is procgate's own; below it, how
// many points procgate adds over the floor and how many the goal leaves.
// Judged at p50, which the floor's rounds measure within the noise.
func (r *results) overFloor(t topo, p proto, c class, l latResult, goal float64) string {
	f, ok := r.lat(phaseLatency, t, p, c, r.Config.MatrixSize, vEmpty)
	if !ok {
		return ""
	}
	own := (l.P50Ratio - f.P50Ratio) * 100
	if f.P50Ratio > goal {
		return fmt.Sprintf(" (the floor alone is p50 %s, over the goal: no program at these hooks meets it; procgate adds %.1f points over the floor)", pct(f.P50Ratio), own)
	}
	return fmt.Sprintf(" (the floor is p50 %s; procgate adds %.1f points over it, the goal leaves %.1f)", pct(f.P50Ratio), own, (goal-f.P50Ratio)*100)
}

// atP99Only says of a latency target missed at p99 alone, its p50 within
// the goal, how far the control lane's p99, identical to the baseline,
// moved in the same run: a miss within that is a miss the run cannot
// tell from noise. Empty for a miss at p50.
func (r *results) atP99Only(l latResult, goal float64) string {
	if l.P50Ratio > goal || l.P99Ratio <= goal {
		return ""
	}
	_, p99, n := r.controlNoise()
	if n > 0 && l.P99Ratio-goal <= p99 {
		return fmt.Sprintf(", at p99 only: within the control lane's p99 noise of ±%.1f%% in this run", p99*100)
	}
	return ", at p99 only"
}

// variantPart is a variant a target's parts show, and what it adds.
type variantPart struct{ name, what string }

// parts shows each variant's p50 and p99 ratio, each against the baseline
// of its own rounds.
func (r *results) parts(t topo, p proto, c class, vs []variantPart) string {
	var parts []string
	for _, v := range vs {
		if h, ok := r.lat(phaseLatency, t, p, c, r.Config.MatrixSize, v.name); ok {
			parts = append(parts, fmt.Sprintf("%s (%s): p50 %s, p99 %s", v.what, v.name, pct(h.P50Ratio), pct(h.P99Ratio)))
		}
	}
	return strings.Join(parts, "; ")
}

// scaleSize is the policy size the scale targets are set at.
const scaleSize = 1_000_000

// scaleTargets: reload time, daemon memory, the calls' answers and audit
// events during reloads, at 1,000,000 prefixes (smaller runs are shown, not
// judged).
func (r *results) scaleTargets() []targetResult {
	s := r.Scale
	tr := []targetResult{
		{Name: "reload at 1,000,000 prefixes", Target: "the load of the policy and each `procgate reload` < 5 s"},
		{Name: "daemon memory at 1,000,000 prefixes", Target: "peak RSS (VmHWM) < 1 GiB"},
		{Name: "calls during a reload", Target: "`procgate status`, `explain` and `run` answer in < 100 ms p99 while a reload of 1,000,000 prefixes runs"},
		{Name: "audit events during reloads", Target: "none lost while reloads of 1,000,000 prefixes run"},
	}
	if s == nil || len(s.Reloads) == 0 {
		return tr
	}
	judge := func(t *targetResult, met bool, gap string) {
		if s.Prefixes != scaleSize {
			t.Why = fmt.Sprintf("measured at %d prefixes: judged at %d only", s.Prefixes, scaleSize)
			return
		}
		t.Met = boolp(met)
		if !met {
			t.Gap = gap
		}
	}
	// Time and memory are judged on the load and every reload, those with
	// calls too: what the calls make (status lists every app's grants)
	// is the daemon's memory as much as the reload's.
	gib := func(kib int64) float64 { return float64(kib) / (1 << 20) }
	worst, peak := s.LoadSeconds, gib(s.Loaded.HWM)
	var secs, peaks []string
	for _, rl := range s.Reloads {
		with := ""
		if rl.Calls {
			with = " with calls"
		}
		worst, peak = max(worst, rl.Seconds), max(peak, gib(rl.After.HWM))
		secs = append(secs, fmt.Sprintf("%.3f s%s%s", rl.Seconds, cpuOf(rl.CPUSeconds), with))
		peaks = append(peaks, fmt.Sprintf("%.2f GiB%s", gib(rl.After.HWM), with))
	}
	tr[0].Value = fmt.Sprintf("load %.3f s%s, reloads %s", s.LoadSeconds, cpuOf(s.LoadCPU), strings.Join(secs, ", "))
	judge(&tr[0], worst < 5, fmt.Sprintf("%.3f s over", worst-5))
	tr[1].Value = fmt.Sprintf("load %.2f GiB, reloads %s", gib(s.Loaded.HWM), strings.Join(peaks, ", "))
	judge(&tr[1], peak < 1, fmt.Sprintf("%.2f GiB over", peak-1))
	var parts, gaps []string
	met := true
	for _, name := range scaleCallNames {
		b, i := s.Busy[name], s.Idle[name]
		parts = append(parts, fmt.Sprintf("%s p99 %.1f ms (max %.1f, %d calls, %d failed; idle p50 %.1f ms)", name, b.P99, b.Max, b.N, b.Errors, i.P50))
		if b.N == 0 || b.Errors > 0 || b.P99 >= 100 {
			met = false
			gaps = append(gaps, fmt.Sprintf("%s p99 %.1f ms, %d failed", name, b.P99, b.Errors))
		}
	}
	tr[2].Value = strings.Join(parts, "; ")
	judge(&tr[2], met, strings.Join(gaps, "; "))
	lost := s.AuditAttempts - s.AuditEvents
	tr[3].Value = fmt.Sprintf("%d denied attempts, %d events (%d lost); the kernel could not send %d, the daemon dropped %d", s.AuditAttempts, s.AuditEvents, lost, s.AuditDrops, s.AuditDaemonDrops)
	judge(&tr[3], lost <= 0 && s.AuditDrops == 0 && s.AuditDaemonDrops == 0, fmt.Sprintf("%d lost, %d not sent by the kernel, %d dropped by the daemon", lost, s.AuditDrops, s.AuditDaemonDrops))
	return tr
}

// cpuOf is " (CPU X s)" for the daemon's CPU seconds, "" when not
// measured (results from before they were).
func cpuOf(secs float64) string {
	if secs == 0 {
		return ""
	}
	return fmt.Sprintf(" (CPU %.2f s)", secs)
}

// flatness: procgate's p50 (as a ratio to the baseline of the same size)
// at every size against the smallest size.
func (r *results) flatness() targetResult {
	tr := targetResult{Name: "flat scaling", Target: "procgate p50 within ±5% from the smallest to the largest policy"}
	var sizes []int
	norm := map[int]float64{}
	for _, l := range r.Latency {
		if l.Phase == phaseScaling && l.Variant == vProcgate && l.P50Ratio > 0 {
			sizes = append(sizes, l.Size)
			norm[l.Size] = l.P50Ratio
		}
	}
	if len(sizes) < 2 {
		return tr
	}
	slices.Sort(sizes)
	ref := norm[sizes[0]]
	worst, at := 0.0, 0
	for _, s := range sizes {
		if d := norm[s]/ref - 1; math.Abs(d) > math.Abs(worst) {
			worst, at = d, s
		}
	}
	tr.Target = fmt.Sprintf("procgate p50 (relative to baseline) within ±5%% from %d to %d prefixes", sizes[0], sizes[len(sizes)-1])
	tr.Value = fmt.Sprintf("largest change %+.1f%% (at %d prefixes)", worst*100, at)
	lo, okLo := r.lat(phaseScaling, topoLoopback, tcp, classAllow, sizes[0], vProcgateHooks)
	hi, okHi := r.lat(phaseScaling, topoLoopback, tcp, classAllow, at, vProcgateHooks)
	pgLo, _ := r.lat(phaseScaling, topoLoopback, tcp, classAllow, sizes[0], vProcgate)
	pgHi, _ := r.lat(phaseScaling, topoLoopback, tcp, classAllow, at, vProcgate)
	if okLo && okHi {
		tr.Why = fmt.Sprintf("added p50 goes from +%.2f to +%.2f µs; the connect program alone from +%.2f to +%.2f µs (a connect walks the LPM trie, whose depth grows with the policy, only for a destination missing from the per-destination lookup cache: a batch's 64 destinations stay cached; the egress backstop takes the connect's verdict)",
			pgLo.AddedP50, pgHi.AddedP50, lo.AddedP50, hi.AddedP50)
	}
	tr.Met = boolp(math.Abs(worst) <= 0.05)
	if !*tr.Met {
		tr.Gap = fmt.Sprintf("%.1f points beyond ±5%%", (math.Abs(worst)-0.05)*100)
	}
	return tr
}

// issueSizes are the policy sizes at which the issue sets the TCP
// internal-allow goal.
var issueSizes = []int{10, 5000, 1000000}

// scalingOverhead judges the TCP internal-allow goal at each of the
// issue's sizes that the scaling phase measured: p50 and p99, as the
// latency phase's target does at its one size.
func (r *results) scalingOverhead() targetResult {
	const goal = 1.05
	tr := targetResult{Name: "internal-allow overhead by policy size, loopback tcp", Target: fmt.Sprintf("p50 and p99 within %s of baseline at 10, 5,000 and 1,000,000 prefixes", pct(goal))}
	var vals, gaps []string
	met := true
	for _, size := range issueSizes {
		l, ok := r.lat(phaseScaling, topoLoopback, tcp, classAllow, size, vProcgate)
		if !ok {
			continue
		}
		one := targetResult{}
		if !judgeRatio(&one, l, goal) {
			met = false
			gaps = append(gaps, fmt.Sprintf("%s at %d", one.Gap, size))
		}
		vals = append(vals, fmt.Sprintf("%d: %s", size, one.Value))
	}
	if len(vals) == 0 {
		return tr
	}
	tr.Value = strings.Join(vals, "; ")
	tr.Met = boolp(met)
	tr.Gap = strings.Join(gaps, ", ")
	return tr
}

func (r *results) versusNft() targetResult {
	const size = 5000
	tr := targetResult{Name: "procgate vs nftables at 5,000 prefixes", Target: "procgate's added p50 ≤ 1/10 of the best nftables configuration's"}
	pg, ok := r.lat(phaseScaling, topoLoopback, tcp, classAllow, size, vProcgate)
	if !ok {
		return tr
	}
	best, bestName := math.Inf(1), ""
	for _, v := range []string{vNftCgroupSet, vNftCgroupRules, vNftUIDSet} {
		if l, ok := r.lat(phaseScaling, topoLoopback, tcp, classAllow, size, v); ok && l.AddedP50 < best {
			best, bestName = l.AddedP50, v
		}
	}
	if bestName == "" {
		return tr
	}
	tr.Value = fmt.Sprintf("procgate +%.3f µs, best nftables (%s) +%.3f µs: ratio %.3f", pg.AddedP50, bestName, best, pg.AddedP50/best)
	tr.Met = boolp(pg.AddedP50 <= best/10)
	if !*tr.Met {
		tr.Gap = fmt.Sprintf("%.3f µs over a tenth", pg.AddedP50-best/10)
	}
	if h, ok := r.lat(phaseScaling, topoLoopback, tcp, classAllow, size, vProcgateHooks); ok {
		tr.Why = fmt.Sprintf("connect program alone +%.3f µs, the backstops +%.3f µs more; a tenth of nftables' cost is %.3f µs",
			h.AddedP50, pg.AddedP50-h.AddedP50, best/10)
	}
	return tr
}

// tunnel judges throughput through the tunnel.
func (r *results) tunnel() targetResult {
	return r.tputTarget("tunnel throughput", "procgate ≥ 99% of baseline over the wireguard-go tunnel (bulk and request/response)",
		topoTunnel, vProcgate, []string{workloadBulk, workloadRR}, 0.99)
}

// noAppBulk judges a process of no app's bulk TCP (to an external
// destination: internal ones it may not reach).
func (r *results) noAppBulk() targetResult {
	return r.tputTarget("processes of no app: bulk TCP", "procgate-noapp ≥ 99.5% of baseline (veth, to an external destination)",
		topoVethExternal, vProcgateNoApp, []string{workloadBulk}, 0.995)
}

// tputTarget judges a variant's throughput on path t. One connection's
// rate on this 2-vCPU VM varies by tens of percent from batch to batch, so
// the wall-clock ratio is read against the control lane's: when it is
// within that noise, the kernel's account of procgate's BPF run time during
// the same workload (its share of a CPU) bounds the cost instead.
func (r *results) tputTarget(name, target string, t topo, variant string, workloads []string, goal float64) targetResult {
	tr := targetResult{Name: name, Target: target}
	var parts []string
	met, measured := true, false
	for _, wl := range workloads {
		pg, ok := r.tput(t, wl, variant)
		if !ok {
			continue
		}
		measured = true
		noise, control := 0.0, 1.0
		if c, ok := r.tput(t, wl, vControl); ok {
			noise, control = math.Abs(c.Ratio-1), c.Ratio
		}
		what := fmt.Sprintf("%s %s", t, wl)
		if variant != vProcgate {
			what = variant + ": " + what
		}
		share := -1.0
		if c, ok := r.cost(phaseThroughput, what); ok {
			share = c.Total / 1e9
		}
		part := fmt.Sprintf("%s %.1f%% (control %.1f%%", wl, pg.Ratio*100, control*100)
		// The wall clock can tell the lane below the goal only if the
		// 95% interval of its median round ratio is below it too.
		ci := [2]float64{}
		if b, ok := r.tput(t, wl, vBaseline); ok {
			if rs := roundRatios(pg.Rounds, b.Rounds); len(rs) > 0 {
				ci = medianCI(rs)
				part += fmt.Sprintf("; 95%% interval %.1f%% to %.1f%%", ci[0]*100, ci[1]*100)
			}
		}
		part += ")"
		within := pg.Ratio >= 1-noise || ci[1] >= goal
		switch {
		case pg.Ratio >= goal:
		case within && share >= 0 && 1-share >= goal:
			part += fmt.Sprintf(", within noise; BPF took %.2f%% of a CPU: ≥ %.1f%%", share*100, (1-share)*100)
		case within && share >= 0:
			met = false
			part += fmt.Sprintf(", within noise; BPF took %.2f%% of a CPU", share*100)
			tr.Gap = fmt.Sprintf("%s within the noise (control ±%.1f%%), but the BPF account bounds it only to ≥ %.1f%%", wl, noise*100, (1-share)*100)
		case within:
			met = false
			part += ", within noise"
			tr.Gap = fmt.Sprintf("%s within the noise (control ±%.1f%%), but no BPF account bounds it", wl, noise*100)
		default:
			met = false
			tr.Gap = fmt.Sprintf("%s %.1f points under, beyond the control's ±%.1f%%", wl, (goal-pg.Ratio)*100, noise*100)
			if ci[1] > 0 {
				tr.Gap += fmt.Sprintf(" and the interval (up to %.1f%%)", ci[1]*100)
			}
		}
		parts = append(parts, part)
	}
	if !measured {
		return tr
	}
	tr.Value = strings.Join(parts, "; ")
	tr.Met = boolp(met)
	tr.Why = "wall-clock ratio (the median of the rounds' ratios) against the noise: the control lane's distance from the baseline, and the 95% bootstrap interval of the lane's median; where the goal is within either, the kernel's BPF run-time account bounds the cost"
	return tr
}

func (r *results) reloadCorrect() targetResult {
	tr := targetResult{Name: "no wrong verdict during reloads", Target: "0 wrong verdicts"}
	if r.Reload == nil {
		return tr
	}
	rl := r.Reload
	tr.Value = fmt.Sprintf("%d wrong in %d attempts during %d reloads", rl.Wrong, rl.Attempt, rl.Reloads)
	tr.Met = boolp(rl.Wrong == 0)
	if rl.Wrong > 0 {
		tr.Gap = rl.WrongAt
	}
	return tr
}

func (r *results) reloadTime() targetResult {
	const size = 100000
	tr := targetResult{Name: "reload time", Target: "a reload of 100,000 prefixes (and 100,000 grants) < 1 s"}
	for _, l := range r.Loads {
		if l.Variant == vProcgate && l.Size == size {
			tr.Value = fmt.Sprintf("%.3f s (median of %d)", l.Reload.Seconds, r.Config.ReloadTimings)
			tr.Met = boolp(l.Reload.Seconds < 1)
			if !*tr.Met {
				tr.Gap = fmt.Sprintf("%.3f s over", l.Reload.Seconds-1)
			}
		}
	}
	return tr
}

// verdictsCorrect: every timed attempt of every variant got the verdict
// the policy gives (a fast wrong answer is no result).
func (r *results) verdictsCorrect() targetResult {
	tr := targetResult{Name: "verdicts of the latency runs", Target: "every attempt of every variant decided as the policy says"}
	var wrong, n int
	var first string
	for _, l := range r.Latency {
		wrong += l.Wrong
		n += l.N
		if l.Wrong > 0 && first == "" {
			first = fmt.Sprintf("%s %s/%s %s %s: %s", l.Variant, l.Topo, l.Proto, l.Class, fmt.Sprint(l.Size), l.WrongAt)
		}
	}
	if n == 0 {
		return tr
	}
	tr.Value = fmt.Sprintf("%d wrong of %d", wrong, n)
	tr.Met = boolp(wrong == 0)
	tr.Gap = first
	return tr
}
