package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
)

// latKey names one measured point of one variant.
type latKey struct {
	Phase   string `json:"phase"`
	Topo    topo   `json:"path"`
	Proto   proto  `json:"proto"`
	Class   class  `json:"class"`
	Size    int    `json:"prefixes"`
	Variant string `json:"variant"`
}

type latResult struct {
	latKey
	summary
	// Ratios to the baseline measured in the same run at the same point:
	// medians over rounds of the round's ratio (see pairedRatio).
	P50Ratio float64 `json:"p50_ratio"`
	P99Ratio float64 `json:"p99_ratio"`
	// AddedP50 is what the variant adds to the baseline's p50, in
	// microseconds: (P50Ratio - 1) × the baseline's p50.
	AddedP50 float64 `json:"added_p50_us"`
}

func addrPorts(addrs []netip.Addr, port uint16) []netip.AddrPort {
	out := make([]netip.AddrPort, len(addrs))
	for i, a := range addrs {
		out[i] = netip.AddrPortFrom(a, port)
	}
	return out
}

// latencyProtos are the calls of the latency phase.
var latencyProtos = []proto{tcp, udp, udpConn}

// measure runs every (topology, proto, class) point on every lane of w,
// interleaved: in each round every point visits every lane of its
// topology once, the lanes in an order rotated by the round, so that drift
// and warm caches hit every variant alike.
func (b *bench) measure(ctx context.Context, w *world, pol *benchPolicy, phase string, protos []proto, classes []class) ([]latResult, error) {
	rounds := max(1, b.cfg.Attempts/b.cfg.Batch)
	set := map[latKey]*samples{}
	var keys []latKey
	var topos []topo
	for _, l := range w.lanes {
		if !slices.Contains(topos, l.topo) {
			topos = append(topos, l.topo)
		}
	}
	for r := range rounds {
		if r%10 == 0 {
			b.log.Info("round", "phase", phase, "prefixes", pol.size, "round", r+1, "of", rounds)
		}
		for _, t := range topos {
			var lanes []*lane
			for _, l := range w.lanes {
				if l.topo == t {
					lanes = append(lanes, l)
				}
			}
			for _, pr := range protos {
				for _, c := range classes {
					for i := range lanes {
						l := lanes[(i+r)%len(lanes)]
						if err := ctx.Err(); err != nil {
							return nil, err
						}
						dests := addrPorts(pol.dests(c), l.destPort())
						resp, err := l.cl.do(request{Op: opLatency, Proto: pr, Dests: dests, N: b.cfg.Batch,
							Warmup: b.cfg.Warmup, Allow: l.v.expectAllow(c)})
						if err != nil {
							return nil, err
						}
						k := latKey{Phase: phase, Topo: t, Proto: pr, Class: c, Size: pol.size, Variant: l.v.Name}
						if set[k] == nil {
							set[k] = &samples{}
							keys = append(keys, k)
						}
						set[k].add(resp)
					}
				}
			}
		}
	}
	out := make([]latResult, 0, len(keys))
	for _, k := range keys {
		out = append(out, latResult{latKey: k, summary: set[k].summary()})
	}
	for i := range out {
		bk := out[i].latKey
		bk.Variant = vBaseline
		base, ok := set[bk]
		if !ok {
			continue
		}
		own := set[out[i].latKey]
		out[i].P50Ratio = pairedRatio(own.roundP50, base.roundP50)
		out[i].P99Ratio = pairedRatio(own.roundP99, base.roundP99)
		out[i].AddedP50 = round3((out[i].P50Ratio - 1) * base.summary().P50)
		if out[i].Wrong > 0 {
			b.log.Error("wrong verdicts", "point", fmt.Sprintf("%+v", out[i].latKey), "count", out[i].Wrong, "first", out[i].WrongAt)
		}
	}
	return out, nil
}

// latencyPhase: connect and sendmsg latency per verdict class, over
// loopback and veth, every variant, at the matrix policy size.
func (b *bench) latencyPhase(ctx context.Context) error {
	pol, err := newPolicy(b.cfg.MatrixSize)
	if err != nil {
		return err
	}
	if _, err := b.applyProcgate(pol.ruleset(), pol); err != nil {
		return err
	}
	w, err := b.buildWorld(pol, b.variants, []topo{topoLoopback})
	if err != nil {
		return err
	}
	defer w.close()
	// One rule per prefix differs from the set only in how app0's chain is
	// walked, and the hooks-only diagnostic only in the backstop, which the
	// loopback lanes and the scaling phase show; leaving them out over veth
	// keeps the full run within its time. The floor (empty-programs) is
	// measured over veth too: a veth target missed is judged against it.
	var vethVariants []*variant
	for _, v := range b.variants {
		if v.Name != vNftCgroupRules && v.Name != vProcgateHooks && (!v.latencyOnly || v.Name == vEmpty) {
			vethVariants = append(vethVariants, v)
		}
	}
	if err := b.addLanes(w, pol, vethVariants, topoVeth); err != nil {
		return err
	}
	res, err := b.measure(ctx, w, pol, phaseLatency, []proto{tcp, udp}, allClasses)
	if err != nil {
		return err
	}
	b.res.Latency = append(b.res.Latency, res...)
	// A connected socket's datagrams pass no hook: the egress backstop
	// alone decides them. Its connect is the TCP row's cost.
	res, err = b.measure(ctx, w, pol, phaseLatency, []proto{udpConn}, []class{classAllow, classExternal})
	if err != nil {
		return err
	}
	b.res.Latency = append(b.res.Latency, res...)
	for _, l := range w.lanes {
		if l.v.Name != vProcgate && l.v.Name != vProcgateTraceable && l.v.Name != vProcgateNoApp && l.v.Name != vNoAppTracker && l.v.progs == nil {
			continue
		}
		for _, p := range latencyProtos {
			for _, c := range allClasses {
				if p == udpConn && c == classDeny {
					continue
				}
				if err := b.latencyCost(phaseLatency, l, pol, p, c); err != nil {
					return err
				}
			}
		}
	}
	return w.close()
}

// scalingPhase: TCP connect latency of app0's allowed destinations over
// loopback at every policy size, with the cost of loading each size.
func (b *bench) scalingPhase(ctx context.Context) error {
	for _, size := range b.cfg.Sizes {
		if err := ctx.Err(); err != nil {
			return err
		}
		pol, err := newPolicy(size)
		if err != nil {
			return err
		}
		rs := pol.ruleset()
		first, err := b.applyProcgate(rs, pol)
		if err != nil {
			return err
		}
		// Reloads of the same size (each one a full generation switch), as
		// the daemon does on every policy change.
		var reloads []loadStats
		timings := b.cfg.ReloadTimings
		if size >= 1_000_000 {
			timings = 1 // ~10 s each: one says enough
		}
		for range timings {
			st, err := b.applyProcgate(rs, pol)
			if err != nil {
				return err
			}
			reloads = append(reloads, st)
		}
		mem, err := mapMemoryIn(filepath.Join(b.host.bpffs, "procgate"))
		if err != nil {
			return err
		}
		b.res.Loads = append(b.res.Loads, loadResult{Variant: vProcgate, Size: size, First: first, Reload: medianLoad(reloads), MapMemory: mem})
		var vs []*variant
		for _, v := range b.variants {
			if !v.control && !v.latencyOnly {
				vs = append(vs, v)
			}
		}
		w, err := b.buildWorld(pol, vs, []topo{topoLoopback})
		if err != nil {
			return err
		}
		for _, l := range w.lanes {
			if l.v.install != nil {
				b.res.Loads = append(b.res.Loads, loadResult{Variant: l.v.Name, Size: size, First: l.load})
			}
		}
		res, err := b.measure(ctx, w, pol, phaseScaling, []proto{tcp}, []class{classAllow})
		for _, l := range w.lanes {
			if err == nil && l.v.Name == vProcgate {
				err = b.latencyCost(phaseScaling, l, pol, tcp, classAllow)
			}
		}
		cerr := w.close()
		if err != nil {
			return err
		}
		if cerr != nil {
			return cerr
		}
		b.res.Latency = append(b.res.Latency, res...)
	}
	for _, v := range b.variants {
		if v.MaxSize > 0 && v.MaxSize < slices.Max(b.cfg.Sizes) {
			b.res.Notes = append(b.res.Notes, fmt.Sprintf("%s stops at %d prefixes: %s.", v.Name, v.MaxSize, v.StopWhy))
		}
	}
	return nil
}

func medianLoad(ls []loadStats) loadStats {
	if len(ls) == 0 {
		return loadStats{}
	}
	slices.SortFunc(ls, func(a, b loadStats) int {
		switch {
		case a.Seconds < b.Seconds:
			return -1
		case a.Seconds > b.Seconds:
			return 1
		}
		return 0
	})
	return ls[len(ls)/2]
}

// mapMemoryIn reads the kernel's memory accounting of every map an
// enforcer pinned in dir (memlock in /proc/self/fdinfo of a map fd, which
// on 6.x reports what the map uses, not its cap), by map name, in bytes.
func mapMemoryIn(dir string) (map[string]int64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "link_") || strings.HasPrefix(e.Name(), "prog_") {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, e.Name()), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			continue // not a map
		}
		v, err := fdinfoField(m.FD(), "memlock")
		m.Close()
		if err != nil {
			return nil, err
		}
		out[e.Name()] = v
	}
	return out, nil
}

func fdinfoField(fd int, field string) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", fd))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(data)) {
		name, val, ok := strings.Cut(line, ":")
		if ok && name == field {
			return strconv.ParseInt(strings.TrimSpace(val), 10, 64)
		}
	}
	return 0, fmt.Errorf("fdinfo of fd %d has no %s", fd, field)
}

// loadResult is what installing one policy size cost one variant.
type loadResult struct {
	Variant string    `json:"variant"`
	Size    int       `json:"prefixes"`
	First   loadStats `json:"first_load"`
	// Reload is the median of reloads at the same size (procgate only).
	Reload    loadStats        `json:"reload"`
	MapMemory map[string]int64 `json:"map_memlock_bytes,omitempty"`
}
