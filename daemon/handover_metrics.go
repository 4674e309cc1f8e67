package daemon

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/procgate/procgate/bpf"
)

var (
	handoverGuardedDesc = prometheus.NewDesc("procgate_handover_guarded_connections",
		"TCP connections apps opened to internal destinations that the handover guard watches now (only the app's processes may write to them).", nil, nil)
	handoverUnguardedDesc = prometheus.NewDesc("procgate_handover_unguarded_total",
		"Such connections left unguarded because the guard's map was full (65,536 at once).", nil, nil)
)

// handoverMetrics exports the TCP handover guard's state.
type handoverMetrics struct{ enf *bpf.Enforcer }

func (m handoverMetrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- handoverGuardedDesc
	ch <- handoverUnguardedDesc
}

func (m handoverMetrics) Collect(ch chan<- prometheus.Metric) {
	guarded, unguarded, ok, err := m.enf.HandoverStats()
	if !ok || err != nil {
		return
	}
	ch <- prometheus.MustNewConstMetric(handoverGuardedDesc, prometheus.GaugeValue, float64(guarded))
	ch <- prometheus.MustNewConstMetric(handoverUnguardedDesc, prometheus.CounterValue, float64(unguarded))
}
