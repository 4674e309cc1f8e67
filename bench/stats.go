package main

import (
	"math"
	"slices"
)

// samples collects one point's latencies over the rounds of a run.
type samples struct {
	all      []uint32
	roundP50 []float64 // ns, per round
	roundP99 []float64
	wrong    int
	wrongAt  string
}

func (s *samples) add(resp response) {
	s.all = append(s.all, resp.Latencies...)
	sorted := slices.Sorted(slices.Values(resp.Latencies))
	s.roundP50 = append(s.roundP50, quantile(sorted, 0.5))
	s.roundP99 = append(s.roundP99, quantile(sorted, 0.99))
	if resp.Wrong > 0 && s.wrong == 0 {
		s.wrongAt = resp.WrongDesc
	}
	s.wrong += resp.Wrong
}

// summary is a latency distribution, in microseconds.
type summary struct {
	N    int     `json:"n"`
	Mean float64 `json:"mean_us"`
	Min  float64 `json:"min_us"`
	P25  float64 `json:"p25_us"`
	P50  float64 `json:"p50_us"`
	P75  float64 `json:"p75_us"`
	P90  float64 `json:"p90_us"`
	P99  float64 `json:"p99_us"`
	P999 float64 `json:"p999_us"`
	Max  float64 `json:"max_us"`
	// RoundP50 are the medians of each round: their spread shows how much
	// the machine drifted during the run.
	RoundP50 []float64 `json:"round_p50_us"`
	// Spread is (p90 - p10) / median of RoundP50.
	Spread float64 `json:"round_spread"`
	Wrong  int     `json:"wrong_verdicts"`
	// WrongAt describes the first wrong verdict.
	WrongAt string `json:"wrong_at,omitempty"`
}

func (s *samples) summary() summary {
	sorted := slices.Sorted(slices.Values(s.all))
	out := summary{N: len(sorted), Wrong: s.wrong, WrongAt: s.wrongAt}
	if len(sorted) == 0 {
		return out
	}
	var sum float64
	for _, v := range sorted {
		sum += float64(v)
	}
	us := func(ns float64) float64 { return math.Round(ns) / 1000 }
	out.Mean = us(sum / float64(len(sorted)))
	out.Min, out.Max = us(float64(sorted[0])), us(float64(sorted[len(sorted)-1]))
	out.P25, out.P50, out.P75 = us(quantile(sorted, 0.25)), us(quantile(sorted, 0.5)), us(quantile(sorted, 0.75))
	out.P90, out.P99, out.P999 = us(quantile(sorted, 0.9)), us(quantile(sorted, 0.99)), us(quantile(sorted, 0.999))
	for _, r := range s.roundP50 {
		out.RoundP50 = append(out.RoundP50, us(r))
	}
	out.Spread = spread(out.RoundP50)
	return out
}

// spread is (p90 - p10) / median of vs: how much rounds differ, robust to
// a stray round.
func spread(vs []float64) float64 {
	sorted := slices.Sorted(slices.Values(vs))
	med := quantileF(sorted, 0.5)
	if med == 0 {
		return 0
	}
	return round3((quantileF(sorted, 0.9) - quantileF(sorted, 0.1)) / med)
}

// pairedRatio is the median over rounds of a[r]/b[r]: each round's
// variant and baseline ran back to back, so a slow phase of the machine
// (a busy neighbour of this VM) divides out instead of landing on
// whichever variant happened to run then.
func pairedRatio(a, b []float64) float64 {
	return round3(quantileF(roundRatios(a, b), 0.5))
}

// roundRatios are a[r]/b[r], sorted.
func roundRatios(a, b []float64) []float64 {
	var rs []float64
	for i := range min(len(a), len(b)) {
		if b[i] > 0 {
			rs = append(rs, a[i]/b[i])
		}
	}
	slices.Sort(rs)
	return rs
}

// quantile of sorted values, nearest rank.
func quantile(sorted []uint32, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return float64(sorted[max(0, min(i, len(sorted)-1))])
}

func quantileF(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func round3(v float64) float64 { return math.Round(v*1000) / 1000 }

// ratio is a/b, 0 when b is 0.
func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return round3(a / b)
}
