package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/procgate/procgate/demo"
)

type tputResult struct {
	Topo     topo      `json:"path"`
	Workload string    `json:"workload"`
	Variant  string    `json:"variant"`
	Unit     string    `json:"unit"`
	Rounds   []float64 `json:"rounds"`
	Median   float64   `json:"median"`
	// Ratio is the median over rounds of the round's ratio to the baseline.
	Ratio  float64 `json:"ratio"`
	Spread float64 `json:"round_spread"`
}

const (
	workloadBulk = "tcp-bulk"
	workloadRR   = "tcp-rr"
)

// tputVariants are measured for throughput; the other nftables variants
// differ from nft-cgroup-set only in how a new connection is matched, which
// bulk and request/response traffic hardly makes.
var tputVariants = []string{vBaseline, vControl, vProcgate, vProcgateHooks, vNftCgroupSet, vRouteUID}

// tunnelVariants share the laptop namespace of one demo topology: the
// nftables table is loaded there only during its own batches.
var tunnelVariants = []string{vBaseline, vControl, vProcgate, vProcgateHooks, vNftCgroupSet}

func (b *bench) throughputPhase(ctx context.Context) error {
	pol, err := newPolicy(b.cfg.MatrixSize)
	if err != nil {
		return err
	}
	if _, err := b.applyProcgate(pol.ruleset(), pol); err != nil {
		return err
	}
	w, err := b.buildWorld(pol, pickVariants(b.variants, tputVariants...), []topo{topoVeth})
	if err != nil {
		return err
	}
	defer w.close()
	res, err := b.tput(ctx, w.lanes, hostIn(pol.grants[0][0]))
	if err != nil {
		return err
	}
	b.res.Throughput = append(b.res.Throughput, res...)
	if err := w.close(); err != nil {
		return err
	}
	if err := b.noAppThroughput(ctx, pol); err != nil {
		return err
	}
	return b.tunnelThroughput(ctx, pol)
}

// noAppThroughput measures a process of no app (procgate-noapp) to an
// external destination over veth, against the baseline and its control
// in the same rounds: what every other process of the host pays.
func (b *bench) noAppThroughput(ctx context.Context, pol *benchPolicy) error {
	w, err := b.buildWorld(pol, pickVariants(b.variants, vBaseline, vControl, vProcgateNoApp), []topo{topoVeth})
	if err != nil {
		return err
	}
	defer w.close()
	res, err := b.tput(ctx, w.lanes, pol.dests(classExternal)[0])
	if err != nil {
		return err
	}
	for i := range res {
		res[i].Topo = topoVethExternal
	}
	for i := range b.res.BPFCost {
		if c := &b.res.BPFCost[i]; c.Phase == phaseThroughput && strings.HasPrefix(c.What, vProcgateNoApp+": ") {
			c.What = strings.Replace(c.What, string(topoVeth), string(topoVethExternal), 1)
		}
	}
	b.res.Throughput = append(b.res.Throughput, res...)
	return w.close()
}

// tunnelThroughput measures through demo's wireguard-go tunnel: the laptop
// reaches the internal service 10.20.0.10 over wg0, an internal prefix
// granted to app0.
func (b *bench) tunnelThroughput(ctx context.Context, pol *benchPolicy) (err error) {
	topo, err := demo.Up(ctx, b.log.With("component", "demo"))
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, topo.Close()) }()
	pol.internal = append(pol.internal, topo.InternalPrefix)
	pol.grants[0] = append(pol.grants[0], netip.PrefixFrom(topo.InternalAddr.Addr(), 32))
	if _, err := b.applyProcgate(pol.ruleset(), pol); err != nil {
		return err
	}
	srv, err := startServers(topo.Internal, false)
	if err != nil {
		return err
	}
	defer srv.close()
	var lanes []*lane
	defer func() {
		for _, l := range lanes {
			err = errors.Join(err, l.cl.close())
		}
	}()
	for _, v := range pickVariants(b.variants, tunnelVariants...) {
		l := &lane{v: v, topo: topoTunnel, clientNS: topo.Laptop}
		if l.cl, err = b.startLaneClient(v, topoTunnel, topo.Laptop); err != nil {
			return err
		}
		if v.install != nil {
			l.before = func() error { _, err := v.install(b, l, pol); return err }
			l.after = func() error { return removeNft(topo.Laptop) }
		}
		lanes = append(lanes, l)
	}
	res, err := b.tput(ctx, lanes, topo.InternalAddr.Addr())
	if err != nil {
		return err
	}
	b.res.Throughput = append(b.res.Throughput, res...)
	return nil
}

// tput runs bulk and request/response batches on every lane, interleaved
// and rotated per round as measure does.
func (b *bench) tput(ctx context.Context, lanes []*lane, dst netip.Addr) ([]tputResult, error) {
	type key struct{ workload, variant string }
	rounds := map[key][]float64{}
	for r := range b.cfg.TputRounds {
		b.log.Info("throughput round", "path", lanes[0].topo, "round", r+1, "of", b.cfg.TputRounds)
		for _, wl := range []string{workloadBulk, workloadRR} {
			for i := range lanes {
				l := lanes[(i+r)%len(lanes)]
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				v, _, err := l.tputBatch(wl, dst, b.cfg)
				if err != nil {
					return nil, fmt.Errorf("%s %s: %w", wl, l, err)
				}
				k := key{wl, l.v.Name}
				rounds[k] = append(rounds[k], v)
			}
		}
	}
	// What procgate's programs cost during one more batch of each workload:
	// their run time per second of the batch is the share of a CPU they
	// took, a bound on what they can cost a CPU-bound path.
	for _, l := range lanes {
		if l.v.Name != vProcgate && l.v.Name != vProcgateNoApp {
			continue
		}
		for _, wl := range []string{workloadBulk, workloadRR} {
			what := fmt.Sprintf("%s %s", l.topo, wl)
			if l.v.Name != vProcgate {
				what = l.v.Name + ": " + what
			}
			cost, err := b.withBPFStats(phaseThroughput, what, b.cfg.MatrixSize, "second", func() (float64, error) {
				_, secs, err := l.tputBatch(wl, dst, b.cfg)
				return secs, err
			})
			if err != nil {
				return nil, err
			}
			b.res.BPFCost = append(b.res.BPFCost, *cost)
		}
	}
	var out []tputResult
	for _, wl := range []string{workloadBulk, workloadRR} {
		base := rounds[key{wl, vBaseline}]
		for _, l := range lanes {
			rs := rounds[key{wl, l.v.Name}]
			med := quantileF(slices.Sorted(slices.Values(rs)), 0.5)
			t := tputResult{Topo: l.topo, Workload: wl, Variant: l.v.Name, Rounds: rs, Median: round3(med),
				Ratio: pairedRatio(rs, base), Spread: spread(rs)}
			t.Unit = "Mbit/s"
			if wl == workloadRR {
				t.Unit = "transactions/s"
			}
			out = append(out, t)
		}
	}
	return out, nil
}

// tputBatch runs one batch and returns its rate (Mbit/s or transactions/s)
// and how long it ran.
func (l *lane) tputBatch(wl string, dst netip.Addr, cfg config) (v, secs float64, err error) {
	if l.before != nil {
		if err := l.before(); err != nil {
			return 0, 0, err
		}
	}
	if l.after != nil {
		defer func() { err = errors.Join(err, l.after()) }()
	}
	req := request{Op: opBulk, Dests: []netip.AddrPort{netip.AddrPortFrom(dst, bulkPort)}, Duration: cfg.TputDuration}
	if wl == workloadRR {
		req.Op, req.Dests = opRR, []netip.AddrPort{netip.AddrPortFrom(dst, rrPort)}
	}
	resp, err := l.cl.do(req)
	if err != nil {
		return 0, 0, err
	}
	secs = resp.Elapsed.Seconds()
	if wl == workloadRR {
		return round3(float64(resp.Trans) / secs), secs, nil
	}
	return round3(float64(resp.Bytes) * 8 / secs / 1e6), secs, nil
}
