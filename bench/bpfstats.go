package main

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// The kernel's BPF run-time statistics (BPF_ENABLE_STATS, held only while
// a measured batch runs) say exactly how long procgate's programs ran and
// how often: a direct account of its cost, where wall-clock comparisons
// are too noisy (throughput) or need explaining (which program adds what).
// Timing the programs costs a few tens of nanoseconds per run itself, so
// these batches are extra ones, never part of the latency or throughput
// figures.

// progCost is one program's share of a measured batch.
type progCost struct {
	Program  string  `json:"program"`
	Runs     uint64  `json:"runs"`
	NsPerRun float64 `json:"ns_per_run"`
	// Per attempt (latency) or per second of the batch (throughput).
	RunsPer float64 `json:"runs_per_unit"`
	NsPer   float64 `json:"ns_per_unit"`
}

// bpfCost is what procgate's programs cost during one extra batch.
type bpfCost struct {
	Phase string     `json:"phase"`
	What  string     `json:"what"` // the batch, in words
	Size  int        `json:"prefixes"`
	Unit  string     `json:"unit"` // "attempt" or "second"
	Units float64    `json:"units"`
	Total float64    `json:"ns_per_unit"`
	Progs []progCost `json:"programs"`
}

// pinnedPrograms opens the programs an enforcer pinned for inspection in
// its bpffs directory dir as prog_<hook>: the bench's own enforcer's, or a
// daemon's.
func pinnedPrograms(dir string) (map[string]*ebpf.Program, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	progs := map[string]*ebpf.Program{}
	for _, e := range ents {
		name, ok := strings.CutPrefix(e.Name(), "prog_")
		if !ok {
			continue
		}
		p, err := ebpf.LoadPinnedProgram(filepath.Join(dir, e.Name()), nil)
		if err != nil {
			closeProgs(progs)
			return nil, fmt.Errorf("load pinned program %s: %w", e.Name(), err)
		}
		progs[name] = p
	}
	return progs, nil
}

func closeProgs(progs map[string]*ebpf.Program) {
	for _, p := range progs {
		p.Close()
	}
}

type progSnapshot map[string]ebpf.ProgramStats

func snapshot(progs map[string]*ebpf.Program) (progSnapshot, error) {
	s := progSnapshot{}
	for name, p := range progs {
		st, err := p.Stats()
		if err != nil {
			return nil, fmt.Errorf("stats of %s: %w", name, err)
		}
		s[name] = *st
	}
	return s, nil
}

// withBPFStats runs batch with the kernel's BPF statistics on and returns
// what procgate's programs cost during it, per unit of what batch reports
// having done (attempts, or seconds).
func (b *bench) withBPFStats(phase, what string, size int, unit string, batch func() (float64, error)) (*bpfCost, error) {
	progs, err := pinnedPrograms(filepath.Join(b.host.bpffs, "procgate"))
	if err != nil {
		return nil, err
	}
	defer closeProgs(progs)
	return measureBPF(progs, phase, what, size, unit, batch)
}

// measureBPF runs batch with the kernel's BPF statistics on and returns
// what progs cost during it.
func measureBPF(progs map[string]*ebpf.Program, phase, what string, size int, unit string, batch func() (float64, error)) (*bpfCost, error) {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, fmt.Errorf("enable BPF run-time statistics: %w", err)
	}
	before, err := snapshot(progs)
	if err != nil {
		return nil, errors.Join(err, stats.Close())
	}
	units, err := batch()
	after, serr := snapshot(progs)
	if err := errors.Join(err, serr, stats.Close()); err != nil {
		return nil, err
	}
	c := &bpfCost{Phase: phase, What: what, Size: size, Unit: unit, Units: units}
	for _, name := range hookOrder(progs) {
		runs := after[name].RunCount - before[name].RunCount
		if runs == 0 || units == 0 {
			continue
		}
		ns := float64(after[name].Runtime-before[name].Runtime) / float64(time.Nanosecond)
		pc := progCost{Program: name, Runs: runs, NsPerRun: round3(ns / float64(runs)),
			RunsPer: round3(float64(runs) / units), NsPer: round3(ns / units)}
		c.Progs = append(c.Progs, pc)
		c.Total += ns / units
	}
	c.Total = round3(c.Total)
	return c, nil
}

// hookOrder lists program names in the order the report shows them.
func hookOrder(progs map[string]*ebpf.Program) []string {
	order := []string{"sock_create", "connect4", "sendmsg4", "egress", "connect6", "sendmsg6", "lsm_socket_create"}
	var out []string
	for _, n := range order {
		if _, ok := progs[n]; ok {
			out = append(out, n)
		}
	}
	for _, n := range slices.Sorted(maps.Keys(progs)) {
		if !slices.Contains(order, n) {
			out = append(out, n)
		}
	}
	return out
}

// costWhat names the extra batch of variant v at one latency point.
func costWhat(v string, t topo, p proto, c class) string {
	what := fmt.Sprintf("%s %s %s", t, callName(p), c)
	if v != vProcgate {
		what = v + ": " + what
	}
	return what
}

// latencyCost measures one extra batch of lane l (a procgate lane) with the
// BPF statistics on: those of the variant's own programs if it keeps them,
// else those of the bench's enforcer.
func (b *bench) latencyCost(phase string, l *lane, pol *benchPolicy, p proto, c class) error {
	what := costWhat(l.v.Name, l.topo, p, c)
	batch := func() (float64, error) {
		resp, err := l.cl.do(request{Op: opLatency, Proto: p, Dests: addrPorts(pol.dests(c), l.destPort()), N: b.cfg.Batch,
			Allow: l.v.expectAllow(c)})
		return float64(resp.Attempts), err
	}
	var cost *bpfCost
	var err error
	if l.v.progs != nil {
		cost, err = measureBPF(l.v.progs, phase, what, pol.size, "attempt", batch)
	} else {
		cost, err = b.withBPFStats(phase, what, pol.size, "attempt", batch)
	}
	if err != nil {
		return err
	}
	b.res.BPFCost = append(b.res.BPFCost, *cost)
	return nil
}
