package main

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// variantColors fixes each variant's color across all charts.
func (r *results) variantColors() map[string]string {
	out := map[string]string{}
	for i, n := range r.variantNames() {
		out[n] = palette[i%len(palette)]
	}
	return out
}

// latency plot per path and protocol, scaling, reload time, throughput.
func (r *results) plots() (map[string]string, error) {
	out := map[string]string{}
	names := r.variantNames()
	colors := r.variantColors()
	for _, t := range []topo{topoLoopback, topoVeth} {
		for _, p := range latencyProtos {
			c := bars{title: fmt.Sprintf("%s %s latency at %d prefixes: p50 bars, round-median range, ◆ p99", t, callName(p), r.Config.MatrixSize),
				ylabel: "µs", series: names, colors: colors}
			for _, cl := range allClasses {
				c.groups = append(c.groups, string(cl))
			}
			found := false
			for _, v := range names {
				var val, lo, hi, mk []float64
				for _, cl := range allClasses {
					l, ok := r.lat(phaseLatency, t, p, cl, r.Config.MatrixSize, v)
					if !ok {
						val, lo, hi, mk = append(val, noValue), append(lo, 0), append(hi, 0), append(mk, noValue)
						continue
					}
					found = true
					val, mk = append(val, l.P50), append(mk, l.P99)
					lo, hi = append(lo, slices.Min(l.RoundP50)), append(hi, slices.Max(l.RoundP50))
				}
				c.val, c.lo, c.hi, c.mk = append(c.val, val), append(c.lo, lo), append(c.hi, hi), append(c.mk, mk)
			}
			if found {
				out[fmt.Sprintf("latency-%s-%s.svg", t, p)] = c.svg()
			}
		}
	}
	for _, q := range []struct {
		file, title, ylabel string
		get                 func(latResult) float64
	}{
		{"scaling-p50.svg", "TCP connect, allowed internal destination, loopback: p50 added to the baseline's", "added p50 µs",
			func(l latResult) float64 { return l.AddedP50 }},
		{"scaling-p99.svg", "TCP connect, allowed internal destination, loopback: p99 against the baseline's", "p99, % of baseline",
			func(l latResult) float64 { return 100 * l.P99Ratio }},
	} {
		c := lines{title: q.title, xlabel: "internal prefixes (and grants)", ylabel: q.ylabel, logX: true, colors: colors}
		for _, v := range names {
			if v == vBaseline {
				continue
			}
			s := lineSeries{name: v}
			for _, l := range r.Latency {
				if l.Phase == phaseScaling && l.Variant == v {
					s.points = append(s.points, linePoint{float64(l.Size), q.get(l)})
				}
			}
			if len(s.points) > 0 {
				c.series = append(c.series, s)
			}
		}
		if len(c.series) > 0 {
			out[q.file] = c.svg()
		}
	}
	if c := r.loadPlot(); len(c.series) > 0 {
		out["load-time.svg"] = c.svg()
	}
	if len(r.Throughput) > 0 {
		c := bars{title: "Throughput relative to baseline (median of per-round ratios; whiskers: their quartiles)", ylabel: "% of baseline", refLine: 99, colors: colors}
		type grp struct {
			t  topo
			wl string
		}
		var groups []grp
		for _, t := range r.Throughput {
			if g := (grp{t.Topo, t.Workload}); !slices.Contains(groups, g) {
				groups = append(groups, g)
			}
			if !slices.Contains(c.series, t.Variant) {
				c.series = append(c.series, t.Variant)
			}
		}
		for _, g := range groups {
			c.groups = append(c.groups, string(g.t)+" "+g.wl)
		}
		for _, v := range c.series {
			var val, lo, hi []float64
			for _, g := range groups {
				t, ok := r.tput(g.t, g.wl, v)
				base, bok := r.tput(g.t, g.wl, vBaseline)
				if !ok || !bok || base.Median == 0 {
					val, lo, hi = append(val, noValue), append(lo, 0), append(hi, 0)
					continue
				}
				val = append(val, 100*t.Ratio)
				rs := roundRatios(t.Rounds, base.Rounds)
				lo, hi = append(lo, 100*quantileF(rs, 0.25)), append(hi, 100*quantileF(rs, 0.75))
			}
			c.val, c.lo, c.hi = append(c.val, val), append(c.lo, lo), append(c.hi, hi)
		}
		out["throughput.svg"] = c.svg()
	}
	return out, nil
}

func (r *results) loadPlot() lines {
	c := lines{title: "Time to install a policy", xlabel: "internal prefixes (and grants)", ylabel: "seconds", logX: true, logY: true}
	series := map[string]*lineSeries{}
	var order []string
	add := func(name string, size int, secs float64, dashed bool) {
		if secs <= 0 {
			return
		}
		if series[name] == nil {
			series[name] = &lineSeries{name: name, dashed: dashed}
			order = append(order, name)
		}
		series[name].points = append(series[name].points, linePoint{float64(size), secs})
	}
	for _, l := range r.Loads {
		if l.Variant == vProcgate {
			add("procgate reload", l.Size, l.Reload.Seconds, false)
			add("procgate first load", l.Size, l.First.Seconds, true)
			continue
		}
		add(l.Variant+" load", l.Size, l.First.Seconds, false)
	}
	for _, n := range order {
		c.series = append(c.series, *series[n])
	}
	return c
}

func (r *results) tput(t topo, wl, v string) (tputResult, bool) {
	for _, x := range r.Throughput {
		if x.Topo == t && x.Workload == wl && x.Variant == v {
			return x, true
		}
	}
	return tputResult{}, false
}

func (r *results) variantNames() []string {
	out := make([]string, len(r.Variants))
	for i, v := range r.Variants {
		out[i] = v.Name
	}
	return out
}

func callName(p proto) string {
	switch p {
	case tcp:
		return "TCP connect()"
	case udpConn:
		return "UDP send() on a connected socket"
	}
	return "UDP sendto()"
}

func (r *results) markdown(plots map[string]string) string {
	var s strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&s, format+"\n", args...) }
	m := r.Meta
	w("# procgate benchmarks")
	w("")
	w("Generated by `make bench` (`bench/`); numbers of this machine: %s, %d CPUs, Linux %s, %s, commit %s, %s. Mode **%s**, total %.0f s.",
		m.CPU, m.CPUs, m.Kernel, m.Go, m.Commit, m.Date, r.Config.Mode, m.TotalSeconds)
	for _, mr := range m.Merged {
		w("Phases %s measured again, or added, at commit %s, %s (%.0f s; load average %s), and merged into this run's results (`bench -merge`); the total is this run's with their times replaced.",
			strings.Join(mr.Phases, ", "), mr.Commit, mr.Date, mr.Seconds, strings.Join(mr.LoadAvg, " → "))
	}
	w("Every variant enforces the same policy and is measured in the same run, interleaved (round-robin, rotated each round), in namespaces and cgroups of the bench's own; every ratio is to the baseline of the same run. Raw numbers: [`results.json`](results.json).")
	w("")
	w("## Targets")
	w("")
	w("| target | goal | this run | met | parts |")
	w("|---|---|---|---|---|")
	for _, t := range r.Targets {
		met := "not measured"
		if t.Met != nil {
			met = "**yes**"
			if !*t.Met {
				met = "**no**: " + t.Gap
			}
		}
		w("| %s | %s | %s | %s | %s |", t.Name, t.Target, t.Value, met, t.Why)
	}
	w("")
	if nf := r.noiseFloor(); nf != "" {
		w("%s", nf)
		w("")
	}
	w("%s", strings.Join(append(append([]string{closingFloor}, r.bareDecisions()...), closingCosts), " "))
	w("")
	w("## What is measured")
	w("")
	w("Policy at size N: N internal prefixes (every other /29 of 10.0.0.0/8) and N grants, grant i to app i mod 10 (tcp+udp, ports 5432 and 8000-8100). The client is app0, a process in its own cgroup (and, for uid-based variants, with app0's uid): *internal-allow* destinations are in app0's grants, *internal-deny* in app1's, *external* in 198.51.100.0/24; each batch cycles through up to %d destinations spread over the policy.", destsPerClass)
	w("Latency is the time of one blocking `connect()` (fresh socket, SO_LINGER {1,0}) or one `sendto()` (one unconnected socket), raw syscalls in a tight loop in a re-executed bench process; servers run in the bench process, outside every enforced cgroup. The TCP service listens with TCP_DEFER_ACCEPT: clients send nothing and close with RST, so no connection ever wakes the server, and a connect costs the client's kernel path alone (on this VM a cross-vCPU wake-up would add 5-15 µs at random). *loopback*: client and servers in one namespace where every destination is local; *veth*: the client's namespace routes them over a veth pair to the server's.")
	w("Attempts per point and variant: %d, in rounds of %d per variant (plus %d untimed warm-up attempts per batch), the variants of a point back to back in each round. p50 and p99 are over all attempts; a ratio to the baseline is the median over rounds of that round's ratio, so that a slow spell of the machine (this is a 2-vCPU VM with neighbours) divides out; spread = (p90 − p10) / median of the per-round medians.", r.Config.Attempts, r.Config.Batch, r.Config.Warmup)
	w("")
	w("| variant | how |")
	w("|---|---|")
	for _, v := range r.Variants {
		desc := v.Desc
		if v.MaxSize > 0 {
			desc += fmt.Sprintf(" (measured up to %d prefixes)", v.MaxSize)
		}
		w("| %s | %s |", v.Name, desc)
	}
	w("")
	r.latencySection(w, plots)
	r.bpfCostSection(w, phaseLatency, "Where procgate's time goes",
		"BPF run time of procgate's programs during one extra batch of %d attempts per row, from the kernel's statistics (BPF_ENABLE_STATS, on only for these batches; timing adds a few tens of ns per run): how often each program ran per attempt and how long each run took. The empty-programs rows are the floor per hook: what the statistics report for a program that does nothing there (their clock reads), to subtract from procgate's per-run figures.", r.Config.Batch)
	r.bpfCostSection(w, phaseSpawn, "The daemon's host-wide programs per process",
		"BPF run time of the host-wide programs (tp_btf on fork, exit, cgroup attach, mkdir and rmdir), which run for every process of the host, during %d spawns of `%s` by a process of no app (the bench itself).", r.Config.Spawns, spawnBinary)
	r.scalingSection(w, plots)
	r.reloadSection(w, plots)
	r.throughputSection(w, plots)
	r.pinholeSection(w)
	r.revocationSection(w)
	r.routesSection(w)
	r.principalsSection(w)
	r.outsiderSection(w)
	r.dnsSection(w)
	r.fleetSection(w)
	r.costSection(w)
	if len(r.Notes) > 0 {
		w("## Notes")
		w("")
		for _, n := range r.Notes {
			w("- %s", n)
		}
		w("")
	}
	return s.String()
}

func img(w func(string, ...any), plots map[string]string, name string) {
	if _, ok := plots[name]; ok {
		w("![%s](%s)", name, name)
		w("")
	}
}

func (r *results) latencySection(w func(string, ...any), plots map[string]string) {
	if !slices.ContainsFunc(r.Latency, func(l latResult) bool { return l.Phase == phaseLatency }) {
		return
	}
	w("## Latency per verdict class (%d prefixes)", r.Config.MatrixSize)
	w("")
	for _, t := range []topo{topoLoopback, topoVeth} {
		for _, p := range latencyProtos {
			w("### %s, %s", t, callName(p))
			w("")
			w("| class | variant | p50 µs | p99 µs | p50 vs baseline | p99 vs baseline | spread | n | wrong |")
			w("|---|---|---|---|---|---|---|---|---|")
			for _, c := range allClasses {
				for _, v := range r.variantNames() {
					if l, ok := r.lat(phaseLatency, t, p, c, r.Config.MatrixSize, v); ok {
						w("| %s | %s | %.2f | %.2f | %s | %s | %.1f%% | %d | %d |", c, v, l.P50, l.P99, pct(l.P50Ratio), pct(l.P99Ratio), l.Spread*100, l.N, l.Wrong)
					}
				}
			}
			w("")
			img(w, plots, fmt.Sprintf("latency-%s-%s.svg", t, p))
		}
	}
}

func (r *results) scalingSection(w func(string, ...any), plots map[string]string) {
	if !slices.ContainsFunc(r.Latency, func(l latResult) bool { return l.Phase == phaseScaling }) {
		return
	}
	w("## Scaling: TCP connect to an allowed internal destination, loopback")
	w("")
	w("| prefixes | variant | p50 µs | p99 µs | added p50 µs | p50 vs baseline | p99 vs baseline | spread |")
	w("|---|---|---|---|---|---|---|---|")
	for _, size := range r.Config.Sizes {
		for _, v := range r.variantNames() {
			if l, ok := r.lat(phaseScaling, topoLoopback, tcp, classAllow, size, v); ok {
				w("| %d | %s | %.2f | %.2f | %+.3f | %s | %s | %.1f%% |", size, v, l.P50, l.P99, l.AddedP50, pct(l.P50Ratio), pct(l.P99Ratio), l.Spread*100)
			}
		}
	}
	w("")
	img(w, plots, "scaling-p50.svg")
	img(w, plots, "scaling-p99.svg")
	r.bpfCostSection(w, phaseScaling, "procgate's programs by policy size",
		"BPF run time per TCP connect to an allowed destination, loopback, one extra batch of %d attempts per size.", r.Config.Batch)
}

func (r *results) reloadSection(w func(string, ...any), plots map[string]string) {
	w("## Reloads")
	w("")
	if rl := r.Reload; rl != nil {
		w("procgate switched between two policies of %d prefixes (they differ in one grant of app0) %d times while %d clients in app0's cgroup made %d attempts (UDP sendto and TCP connect to allowed, denied, external and the switched destination) and checked each verdict.",
			rl.Size, rl.Reloads, rl.Clients, rl.Attempt)
		w("")
		w("| reloads | attempts | attempts/s during reloads | attempts/s without | wrong verdicts | switched dest allowed / denied | connects dropped silently | apply p50 / p99 / max ms | goal met |")
		w("|---|---|---|---|---|---|---|---|---|")
		w("| %d | %d | %.0f | %.0f | %d | %d / %d | %d | %.2f / %.2f / %.2f | %v |", rl.Reloads, rl.Attempt, rl.AttemptsPerSec, rl.IdlePerSec, rl.Wrong,
			rl.FlipAllowed, rl.FlipDenied, rl.Dropped, rl.ApplyP50, rl.ApplyP99, rl.ApplyMax, rl.GoalMet)
		if rl.SlowestApply != "" {
			w("")
			w("The slowest reload: %s (the *switch* is the map-of-maps update, which waits for an RCU grace period).", rl.SlowestApply)
		}
		w("")
		w("A connect is *dropped silently* when it gets no answer within %s: connect4 allowed it under one generation and the egress backstop dropped its SYN under the next (the switched destination only; it is a denial, but the application sees a hang instead of EPERM).", verifyTimeout)
		if !rl.GoalMet {
			w("")
			w("The goal (%d reloads and %d attempts) was not reached within %s; the table shows what was done.", r.Config.Reloads, r.Config.ReloadAttempts, r.Config.ReloadLimit)
		}
		w("")
	}
	if len(r.Loads) == 0 {
		return
	}
	w("### Time to install a policy, by size")
	w("")
	w("procgate: *first* is the switch from the previous size, *reload* the median of %d reloads of the same policy (each a full generation switch); CPU is the bench process's (the loader's) user+system time during Apply. nftables and routes: one `nft -f` / `ip -batch` of the whole policy into a fresh namespace, CPU and peak memory of that tool.", r.Config.ReloadTimings)
	w("")
	w("| prefixes | variant | first s | reload s | CPU s | tool peak RSS MiB |")
	w("|---|---|---|---|---|---|")
	for _, l := range r.Loads {
		reload, cpu := "", l.First.CPUSeconds
		if l.Variant == vProcgate {
			reload, cpu = fmt.Sprintf("%.3f", l.Reload.Seconds), l.Reload.CPUSeconds
		}
		rss := ""
		if l.First.MaxRSSKiB > 0 {
			rss = fmt.Sprintf("%.0f", float64(l.First.MaxRSSKiB)/1024)
		}
		w("| %d | %s | %.3f | %s | %.3f | %s |", l.Size, l.Variant, l.First.Seconds, reload, cpu, rss)
	}
	w("")
	img(w, plots, "load-time.svg")
}

func (r *results) throughputSection(w func(string, ...any), plots map[string]string) {
	if len(r.Throughput) == 0 {
		return
	}
	w("## Throughput")
	w("")
	w("One TCP connection from app0 to an allowed internal destination: *bulk* writes 128 KiB buffers, *rr* sends 1 byte and waits for 1 byte back; %d rounds of %s per variant, interleaved. *veth*: to the server namespace; *wireguard*: demo's laptop to its internal service through the wireguard-go tunnel (userspace, in the bench process). In the shared tunnel namespace the nftables table is loaded only during its own batches.", r.Config.TputRounds, r.Config.TputDuration)
	w("")
	w("| path | workload | variant | median | unit | vs baseline | spread |")
	w("|---|---|---|---|---|---|---|")
	for _, t := range r.Throughput {
		w("| %s | %s | %s | %.1f | %s | %.1f%% | %.1f%% |", t.Topo, t.Workload, t.Variant, t.Median, t.Unit, t.Ratio*100, t.Spread*100)
	}
	w("")
	img(w, plots, "throughput.svg")
	r.bpfCostSection(w, phaseThroughput, "procgate's programs during throughput",
		"One extra batch per workload with the kernel's BPF statistics on: BPF run time per second of the batch, that is the share of one CPU procgate's programs took, which bounds what they can cost a CPU-bound path. (The tunnel's own wireguard-go sockets are outside the enforced cgroup here; attached at the cgroup root, their datagrams would pass sendmsg4 and egress as external traffic too: see the UDP external rows above for the cost per datagram.)")
}

func (r *results) costSection(w func(string, ...any)) {
	var largest *loadResult
	for i, l := range r.Loads {
		if l.Variant == vProcgate && (largest == nil || l.Size > largest.Size) {
			largest = &r.Loads[i]
		}
	}
	hasMaps := largest != nil && len(largest.MapMemory) > 0
	if !hasMaps && r.Daemon == nil {
		return
	}
	w("## Cost")
	w("")
	if hasMaps {
		w("Kernel memory of procgate's maps with %d prefixes and %d grants in force (`memlock` of each map fd in /proc/self/fdinfo, which on this kernel is what the map uses; the rules trie holds both generation slots' entries, as the idle slot keeps the rules in force for the next reload to change only what differs):", largest.Size, largest.Size)
		w("")
		mapTable(w, largest.MapMemory)
		w("Loader CPU per reload at that size: %.3f s (user+system, median reload); the daemon does this work only on a reload, and nothing per connection: decisions run in the kernel.", largest.Reload.CPUSeconds)
		w("")
	}
	r.daemonCostSection(w)
}

func mapTable(w func(string, ...any), mem map[string]int64) {
	w("| map | MiB |")
	w("|---|---|")
	var total int64
	for _, name := range slices.Sorted(maps.Keys(mem)) {
		v := mem[name]
		total += v
		w("| %s | %.1f |", name, float64(v)/(1<<20))
	}
	w("| **total** | **%.1f** |", float64(total)/(1<<20))
	w("")
}

func mib(kib int64) float64 { return float64(kib) / 1024 }

// daemonCostSection: the real daemon's memory and CPU at the large policy.
func (r *results) daemonCostSection(w func(string, ...any)) {
	d := r.Daemon
	if d == nil || d.Loaded.RSS == 0 {
		return
	}
	w("### The daemon at %d prefixes", d.Prefixes)
	w("")
	// Runs before the daemon followed its policy by inotify polled it.
	pickup := fmt.Sprintf("the daemon's poll of the file (every %.0f s) loads it", d.PollSeconds)
	delay := "poll delay included"
	idle := "to stat the policy file (it reads and hashes it only when it changed) and to check routes and pinned binaries"
	if d.SettleSeconds > 0 {
		pickup = fmt.Sprintf("the daemon, which follows the file by inotify, loads it once the file was quiet for %.2f s", d.SettleSeconds)
		delay = "settle delay included"
		idle = "only to check pinned binaries (`--poll`; the policy file and the routes come as inotify and netlink events)"
	}
	w("`procgate daemon` (bin/procgate) on a cgroup subtree, state dir, bpffs dir and socket of the bench's own, in a cgroup of its own; memory from /proc/PID/status (VmRSS, and VmHWM: the peak so far), CPU from /proc/PID/stat (utime+stime of all its threads, in 10 ms ticks). It starts with the %d-prefix policy; then the policy file (%.1f MB of YAML, %d prefixes and %d grants) is renamed over it, and %s.", d.RevokePrefixes, float64(d.PolicyBytes)/1e6, d.Prefixes, d.Prefixes, pickup)
	w("")
	w("| when | seconds | daemon CPU s | VmRSS MiB | VmHWM MiB |")
	w("|---|---|---|---|---|")
	w("| started, %d prefixes |  |  | %.0f | %.0f |", d.RevokePrefixes, mib(d.Start.RSS), mib(d.Start.HWM))
	w("| file changed → loaded (parse, compile, Apply; %s) | %.2f | %.2f | %.0f | %.0f |", delay, d.LoadSeconds, d.LoadCPU, mib(d.Loaded.RSS), mib(d.Loaded.HWM))
	w("| idle (%.0f s window, %.1f%% of a CPU) | %.1f | %.2f | %.0f | %.0f |", d.IdleSeconds, 100*ratio(d.IdleCPU, d.IdleSeconds), d.IdleSeconds, d.IdleCPU, mib(d.Idle.RSS), mib(d.Idle.HWM))
	for i, rl := range d.Reloads {
		w("| `procgate reload` %d | %.2f | %.2f | %.0f | %.0f |", i+1, rl.Seconds, rl.CPUSeconds, mib(rl.After.RSS), mib(rl.After.HWM))
	}
	w("")
	w("A reload's CPU counts from the command's start to %s after it returned (the garbage collection it leaves behind included). Idle, the daemon wakes every second %s. The daemon keeps the rulesets of its last 8 generations (to name the rule of audit events still in the ring buffer) and the Go heap may grow to twice what is live (GOGC=100), which fits RSS growing over the first reloads.", reloadSettle, idle)
	w("")
	if len(d.MapMemory) > 0 {
		w("Kernel memory of the daemon's maps at %d prefixes (as above, from its pinned maps):", d.Prefixes)
		w("")
		mapTable(w, d.MapMemory)
	}
}

// closingFloor and closingCosts are what the kernel's hooks leave of the
// latency targets and what would close it: the report's answer for a
// target its floor does not let any design meet. Between them, the run's
// bare decision against each goal missed (bareDecisions).
const closingFloor = `**What would close the rest.** The floor (empty-programs) is what the kernel charges for running any program at procgate's hooks: on this 6.18 guest about 0.3 µs of a TCP connect and 0.1 µs of a datagram.`

const closingCosts = `The costs that remain, and what would remove each:
- **The egress backstop** runs for every packet of every socket below the enforced cgroup; it returns at once for established TCP, but every datagram pays its run and the check that the connect or sendmsg hook already decided it (the hook's verdict on the CPU, then the socket's cgroup, read in place through the kernel's sk_buff on 6.2 and later). A cgroup_skb program cannot be skipped per socket. Closing it needs BPF LSM (socket_sendmsg and socket_connect see the same decisions in the sender's context, and LSM programs run only where attached hooks fire), which this host's kernel does not load (bpf is in its LSM list, but lsm/ programs fail to load with EPERM: no trampolines; docs/kernels.md); or a kernel way for a sock_addr program to mark a socket as decided so that cgroup_skb skips it.
- **The UDP handover check** (egress, 6.18 only) reads the sending task's cgroup for every datagram, in place through the task's BTF pointer (a few ns; the bpf_get_current_cgroup_id helper took ~24 ns on this guest, whose return thunks make every kernel call dear: BenchmarkBackstopEgress in bpf/); on 6.1 and 6.12 the BPF LSM socket_sendmsg program does it instead.
- **The connect and sendmsg programs** cost one principal lookup and one destination lookup per call, each from a per-CPU memo without a kernel call when it holds the answer: the principal when the CPU's last call came from the same cgroup (and uid) in the same generation (principal_memo), the trie lookups' result when the destination is among the CPU's latest (dest_memo, 256 entries). Otherwise hash lookups: the cgroup's app, the ancestor walk's cache and the user's app; dest_lookups, an LRU hash keyed by generation, app and address, before any trie walk. Flat to 1,000,000 prefixes. The TCP handover guard's sockops tracker costs five sockops runs per TCP connect host-wide, and is attached only while an app needs it.`

// controlNoise is how far the control lane came out from the baseline at
// p50 and at p99 over its n latency points (ratios minus one, absolute).
func (r *results) controlNoise() (p50, p99 float64, n int) {
	for _, l := range r.Latency {
		if l.Variant == vControl && l.P50Ratio > 0 {
			p50 = max(p50, abs(l.P50Ratio-1))
			p99 = max(p99, abs(l.P99Ratio-1))
			n++
		}
	}
	return p50, p99, n
}

// noiseFloor says how far the control lane, identical to the baseline,
// came out from it: differences of that size are noise, not enforcement.
func (r *results) noiseFloor() string {
	p50, p99, n := r.controlNoise()
	if n == 0 {
		return ""
	}
	return fmt.Sprintf("**Noise floor**: the control lane (`%s`, a second baseline, identical to it) came out within ±%.1f%% of the baseline at p50 and ±%.1f%% at p99 over its %d latency points: smaller differences are not measured by this run.",
		vControl, p50*100, p99*100, n)
}

func abs(v float64) float64 {
	if v < 0 {
		return -v
	}
	return v
}

func (r *results) bpfCostSection(w func(string, ...any), phase, title, intro string, args ...any) {
	var rows []bpfCost
	for _, c := range r.BPFCost {
		if c.Phase == phase {
			rows = append(rows, c)
		}
	}
	if len(rows) == 0 {
		return
	}
	w("### %s", title)
	w("")
	w(intro, args...)
	w("")
	per := rows[0].Unit
	if per == "second" {
		per = "second (ns = CPU share × 10⁹)"
	}
	w("| batch | prefixes | BPF ns per %s | programs: runs per %s × ns per run |", per, rows[0].Unit)
	w("|---|---|---|---|")
	for _, c := range rows {
		var parts []string
		for _, p := range c.Progs {
			parts = append(parts, fmt.Sprintf("%s %.2f × %.0f", p.Program, p.RunsPer, p.NsPerRun))
		}
		total := fmt.Sprintf("%.0f", c.Total)
		if c.Unit == "second" {
			total = fmt.Sprintf("%.0f (%.2f%% of a CPU)", c.Total, c.Total/1e7)
		}
		w("| %s | %d | %s | %s |", c.What, c.Size, total, strings.Join(parts, ", "))
	}
	w("")
}
