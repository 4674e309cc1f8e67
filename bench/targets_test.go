package main

import (
	"testing"
)

func TestScalingOverhead(t *testing.T) {
	at := func(size int, p50, p99 float64) latResult {
		return latResult{latKey: latKey{Phase: phaseScaling, Topo: topoLoopback, Proto: tcp, Class: classAllow, Size: size, Variant: vProcgate},
			summary: summary{P50: 11 * p50}, P50Ratio: p50, P99Ratio: p99, AddedP50: 11*p50 - 11}
	}
	for _, c := range []struct {
		name  string
		lat   []latResult
		met   *bool
		value string
		gap   string
	}{
		{name: "not measured", lat: []latResult{at(100, 1.01, 1.01)}},
		{name: "all within", lat: []latResult{at(10, 1.03, 1.04), at(100, 1.2, 1.2), at(5000, 1.04, 1.05), at(1000000, 1.02, 1.01)}, met: boolp(true),
			value: "10: p50 +3.0% (11.33 µs vs 11.00), p99 +4.0%; 5000: p50 +4.0% (11.44 µs vs 11.00), p99 +5.0%; 1000000: p50 +2.0% (11.22 µs vs 11.00), p99 +1.0%"},
		{name: "one p99 over", lat: []latResult{at(10, 1.03, 1.04), at(1000000, 1.03, 1.08)}, met: boolp(false),
			value: "10: p50 +3.0% (11.33 µs vs 11.00), p99 +4.0%; 1000000: p50 +3.0% (11.33 µs vs 11.00), p99 +8.0%", gap: "3.0 points over at 1000000"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := (&results{Latency: c.lat}).scalingOverhead()
			if (got.Met == nil) != (c.met == nil) || got.Met != nil && *got.Met != *c.met {
				t.Errorf("met %v, want %v", got.Met, c.met)
			}
			if got.Value != c.value || got.Gap != c.gap {
				t.Errorf("value %q gap %q\nwant  %q gap %q", got.Value, got.Gap, c.value, c.gap)
			}
		})
	}
}

func TestNoAppBulk(t *testing.T) {
	run := func(ratio, control, bpfNsPerSecond float64) *results {
		r := &results{Throughput: []tputResult{
			{Topo: topoVethExternal, Workload: workloadBulk, Variant: vProcgateNoApp, Ratio: ratio},
			{Topo: topoVethExternal, Workload: workloadBulk, Variant: vControl, Ratio: control},
		}}
		if bpfNsPerSecond > 0 {
			r.BPFCost = []bpfCost{{Phase: phaseThroughput, What: "procgate-noapp: veth-external tcp-bulk", Total: bpfNsPerSecond}}
		}
		return r
	}
	// withRounds gives the lane 20 rounds against a baseline of 100 each:
	// half of them at ratio lo, half at hi.
	withRounds := func(r *results, lo, hi float64) *results {
		base := tputResult{Topo: topoVethExternal, Workload: workloadBulk, Variant: vBaseline, Ratio: 1}
		for i := range 20 {
			base.Rounds = append(base.Rounds, 100)
			ratio := lo
			if i%2 == 1 {
				ratio = hi
			}
			r.Throughput[0].Rounds = append(r.Throughput[0].Rounds, 100*ratio)
		}
		r.Throughput = append(r.Throughput, base)
		return r
	}
	for _, c := range []struct {
		name string
		r    *results
		met  bool
		gap  string
	}{
		{"over the goal", run(1.01, 1.02, 0), true, ""},
		{"within noise, BPF bounds it", run(0.98, 0.97, 2e6), true, ""},
		{"within noise, BPF too dear", run(0.98, 0.97, 7e6), false, "tcp-bulk within the noise (control ±3.0%), but the BPF account bounds it only to ≥ 99.3%"},
		{"within noise, no BPF account", run(0.98, 0.97, 0), false, "tcp-bulk within the noise (control ±3.0%), but no BPF account bounds it"},
		{"beyond noise", run(0.90, 0.99, 2e6), false, "tcp-bulk 9.5 points under, beyond the control's ±1.0%"},
		// Rounds of ratio 0.90 and 1.02: the median's interval reaches the
		// goal, so the wall clock cannot tell, and the BPF account does.
		{"within the interval", withRounds(run(0.90, 0.99, 2e6), 0.90, 1.02), true, ""},
		{"beyond the interval", withRounds(run(0.90, 0.99, 2e6), 0.90, 0.92), false, "tcp-bulk 9.5 points under, beyond the control's ±1.0% and the interval (up to 92.0%)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := c.r.noAppBulk()
			if got.Met == nil || *got.Met != c.met || got.Gap != c.gap {
				t.Errorf("met %v gap %q, want %v %q", got.Met, got.Gap, c.met, c.gap)
			}
		})
	}
}

// TestAtP99Only: a latency target missed at p99 alone says so, and whether
// the control lane's p99 moved as far in the same run.
func TestAtP99Only(t *testing.T) {
	r := &results{Latency: []latResult{{latKey: latKey{Variant: vControl}, P50Ratio: 1.002, P99Ratio: 0.976}}}
	for _, c := range []struct {
		name     string
		p50, p99 float64
		want     string
	}{
		{"missed at p50", 1.09, 1.09, ""},
		{"met", 1.05, 1.07, ""},
		{"p99 within the control's noise", 1.065, 1.081, ", at p99 only: within the control lane's p99 noise of ±2.4% in this run"},
		{"p99 beyond it", 1.065, 1.12, ", at p99 only"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := r.atP99Only(latResult{P50Ratio: c.p50, P99Ratio: c.p99}, 1.08); got != c.want {
				t.Errorf("%q, want %q", got, c.want)
			}
		})
	}
}

func TestTransferTarget(t *testing.T) {
	transfer := func(ratio, aaLo, aaHi float64) *results {
		return &results{Pinhole: &pinholeResult{Transfer: &transferRes{
			Open: []float64{1}, Ratio: ratio, RatioCI: [2]float64{ratio - 0.01, ratio + 0.01}, AACI: [2]float64{aaLo, aaHi},
		}}}
	}
	for _, c := range []struct {
		name string
		r    *results
		met  bool
		gap  string
	}{
		{"within the goal", transfer(1.006, 0.99, 1.01), true, ""},
		{"over, within the control's noise", transfer(1.011, 0.975, 1.009), false,
			"0.1 points over, within the A/A control's noise (its median ratio's 95% interval reaches 2.5% from even)"},
		{"over by more than the control's noise", transfer(1.04, 0.99, 1.01), false, "3.0 points over"},
	} {
		t.Run(c.name, func(t *testing.T) {
			xfer := c.r.pinholeTargets()[1]
			if xfer.Met == nil || *xfer.Met != c.met {
				t.Fatalf("met %v, want %v", xfer.Met, c.met)
			}
			if xfer.Gap != c.gap {
				t.Errorf("gap %q\nwant %q", xfer.Gap, c.gap)
			}
		})
	}
}
