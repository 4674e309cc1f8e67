package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestOutsiderCostReport writes the report from results.json files with
// and without the outsider phase's BPF statistics: the table appears with
// them, and the comparison with the latency phase only when both phases'
// extra batches are there.
func TestOutsiderCostReport(t *testing.T) {
	cost := func(phase, what string, progs ...progCost) bpfCost {
		c := bpfCost{Phase: phase, What: what, Size: outsiderSize, Unit: "attempt", Units: 2000}
		if phase == phaseLatency {
			c.Size = 100
		}
		for _, p := range progs {
			p.NsPer = p.RunsPer * p.NsPerRun
			p.Runs = uint64(p.RunsPer * c.Units)
			c.Progs = append(c.Progs, p)
			c.Total += p.NsPer
		}
		return c
	}
	lat := func(phase string, v string, added float64) latResult {
		return latResult{latKey: latKey{Phase: phase, Topo: topoLoopback, Proto: tcp, Class: classAllow, Size: 100, Variant: v},
			summary:  summary{N: 2000, P50: 11, P99: 15, RoundP50: []float64{11}},
			P50Ratio: 1 + added/11, P99Ratio: 1.03, AddedP50: added}
	}
	latency := cost(phaseLatency, costWhat(vProcgate, topoLoopback, tcp, classAllow),
		progCost{Program: "sock_create", RunsPer: 1, NsPerRun: 70},
		progCost{Program: "connect4", RunsPer: 1, NsPerRun: 230},
		progCost{Program: "egress", RunsPer: 3, NsPerRun: 100})
	run := cost(phaseOutsider, costWhat(vRun, topoLoopback, tcp, classAllow),
		progCost{Program: "sock_create", RunsPer: 1, NsPerRun: 75},
		progCost{Program: "connect4", RunsPer: 1, NsPerRun: 260},
		progCost{Program: "egress", RunsPer: 4, NsPerRun: 100},
		progCost{Program: "handover", RunsPer: 5, NsPerRun: 60})
	placed := cost(phaseOutsider, costWhat(vPlaced, topoLoopback, tcp, classAllow),
		progCost{Program: "sock_create", RunsPer: 1, NsPerRun: 70},
		progCost{Program: "connect4", RunsPer: 1, NsPerRun: 230},
		progCost{Program: "egress", RunsPer: 4, NsPerRun: 100})
	const (
		heading  = "### Where the daemon's time goes under an outsider's harness"
		runRow   = "| procgate-run: loopback TCP connect() internal-allow | 5000 | 1035 | sock_create 1.00 × 75, connect4 1.00 × 260, egress 4.00 × 100, handover 5.00 × 60 |"
		placeRow = "| procgate-placed: loopback TCP connect() internal-allow | 5000 | 700 | sock_create 1.00 × 70, connect4 1.00 × 230, egress 4.00 × 100 |"
		diff     = "- internal-allow: 1035 ns per attempt instead of 600 (+435 ns): handover +300 ns (5.00 runs per attempt instead of 0.00), egress +100 ns (4.00 runs per attempt instead of 3.00), connect4 +30 ns (260 ns per run instead of 230); procgate-placed: 700 ns per attempt. procgate-run adds +0.800 µs to its baseline's p50, procgate in the latency phase +0.400 µs: of the +0.400 µs between them, the BPF programs account for +0.435 µs."
	)
	tests := []struct {
		name        string
		costs       []bpfCost
		want, avoid []string
	}{
		{"no outsider statistics", []bpfCost{latency}, nil, []string{heading, "Against procgate's programs"}},
		{"outsider statistics alone", []bpfCost{run, placed}, []string{heading, runRow, placeRow}, []string{"Against procgate's programs"}},
		{"both phases", []bpfCost{latency, run, placed}, []string{heading, runRow, placeRow,
			"Against procgate's programs in the latency phase (loopback TCP connect(), 100 prefixes, the listener outside the enforced cgroup), procgate-run's cost per connect:", diff}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := results{Config: config{MatrixSize: 100, Batch: 2000}, Variants: []variantInfo{{Name: vBaseline}, {Name: vProcgate}},
				Latency:  []latResult{lat(phaseLatency, vBaseline, 0), lat(phaseLatency, vProcgate, 0.4)},
				Outsider: []latResult{lat(phaseOutsider, vBaseline, 0), lat(phaseOutsider, vRun, 0.8), lat(phaseOutsider, vPlaced, 0.7)},
				BPFCost:  tt.costs}
			dir := t.TempDir()
			data, err := json.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			from := filepath.Join(dir, "in.json")
			if err := os.WriteFile(from, data, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := rewrite(from, dir); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(filepath.Join(dir, "REPORT.md"))
			if err != nil {
				t.Fatal(err)
			}
			report := string(b)
			for _, s := range tt.want {
				if !strings.Contains(report, s) {
					t.Errorf("REPORT.md lacks %q", s)
				}
			}
			for _, s := range tt.avoid {
				if strings.Contains(report, s) {
					t.Errorf("REPORT.md has %q", s)
				}
			}
			if t.Failed() {
				i := strings.Index(report, "## An outsider's harness")
				t.Logf("outsider section:\n%s", report[max(i, 0):])
			}
		})
	}
}

// TestOutsiderTargetFloor: an outsider's target missed at p50 names the
// latency phase's floor of the same class, which this harness cannot go
// below; without that floor in the run it names none.
func TestOutsiderTargetFloor(t *testing.T) {
	outsider := latResult{latKey: latKey{Class: classExternal, Variant: vRun}, P50Ratio: 1.037, P99Ratio: 1.069}
	floor := latResult{latKey: latKey{Phase: phaseLatency, Topo: topoLoopback, Proto: tcp, Class: classExternal, Size: 100, Variant: vEmpty}, P50Ratio: 1.021}
	for _, c := range []struct {
		name    string
		latency []latResult
		gap     string
	}{
		{"floor over the goal", []latResult{floor}, "4.9 points over (the floor alone is p50 +2.1%, over the goal: no program at these hooks meets it; procgate adds 1.6 points over the floor)"},
		{"no floor measured", nil, "4.9 points over"},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := &results{Outsider: []latResult{outsider}, Latency: c.latency}
			r.Config.MatrixSize = 100
			for _, tr := range r.outsiderTargets() {
				if !strings.HasPrefix(tr.Name, string(classExternal)) {
					continue
				}
				if tr.Gap != c.gap {
					t.Errorf("gap %q, want %q", tr.Gap, c.gap)
				}
				return
			}
			t.Fatal("no external target")
		})
	}
}
