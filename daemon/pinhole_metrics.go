package daemon

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/procgate/procgate/ruleset"
)

var (
	pinholesDesc = prometheus.NewDesc("procgate_pinholes",
		"Holes of the pinhole agent by state: open at the gateway, pending (wanted, not open yet), refused by the gateway's rules.",
		[]string{"state"}, nil)
	pinholeNoticesDesc = prometheus.NewDesc("procgate_pinhole_changes_total",
		"Holes the pinhole agent opened, closed, or had refused, since the daemon started.",
		[]string{"action"}, nil)
	pinholeGuardDropsDesc = prometheus.NewDesc("procgate_pinhole_guard_drops_total",
		"Packets the host guard dropped at auxiliary ports (peers without an open hole).", nil, nil)
	pinholeHeldDesc = prometheus.NewDesc("procgate_pinhole_held_segments_total",
		"Data segments of dynamic apps' control connections held until their new holes were live at the gateway.", nil, nil)
)

// pinholeActions are the actions of pinhole.Notice, in the order of
// pinholeMetrics.changes.
var pinholeActions = [...]string{ruleset.VerdictOpen, ruleset.VerdictClose, ruleset.VerdictRefuse}

// pinholeMetrics exports the pinhole agent's state.
type pinholeMetrics struct {
	counts  func(context.Context) (open, pending, refused int, err error)
	drops   func() (uint64, error)
	held    func() (uint64, error)
	changes [len(pinholeActions)]atomic.Uint64
}

func (m *pinholeMetrics) note(action string) {
	for i, a := range pinholeActions {
		if a == action {
			m.changes[i].Add(1)
		}
	}
}

func (m *pinholeMetrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- pinholesDesc
	ch <- pinholeNoticesDesc
	ch <- pinholeGuardDropsDesc
	ch <- pinholeHeldDesc
}

func (m *pinholeMetrics) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if open, pending, refused, err := m.counts(ctx); err == nil {
		for state, n := range map[string]int{"open": open, "pending": pending, "refused": refused} {
			ch <- prometheus.MustNewConstMetric(pinholesDesc, prometheus.GaugeValue, float64(n), state)
		}
	}
	for i, a := range pinholeActions {
		ch <- prometheus.MustNewConstMetric(pinholeNoticesDesc, prometheus.CounterValue, float64(m.changes[i].Load()), a)
	}
	if n, err := m.drops(); err == nil {
		ch <- prometheus.MustNewConstMetric(pinholeGuardDropsDesc, prometheus.CounterValue, float64(n))
	}
	if n, err := m.held(); err == nil {
		ch <- prometheus.MustNewConstMetric(pinholeHeldDesc, prometheus.CounterValue, float64(n))
	}
}
