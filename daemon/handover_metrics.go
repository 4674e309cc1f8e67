package daemon

import (
	"github.com/prometheus/client_golang/prometheus"
)

var (
	handoverGuardedDesc = prometheus.NewDesc("procgate_handover_guarded_connections",
		"TCP connections apps opened to internal destinations that the handover guard watches now (only the app's processes may write to them).", nil, nil)
	handoverUnguardedDesc = prometheus.NewDesc("procgate_handover_unguarded_total",
		"Such connections left unguarded because the guard's map was full (65,536 at once).", nil, nil)
	handoverUnmatchedDesc = prometheus.NewDesc("procgate_handover_unmatched_total",
		"Marked connections established with another peer than the connect hook allowed (a refused connect re-used, or a later connect program rewrote the destination): not guarded.", nil, nil)
)

// handoverMetrics exports the TCP handover guard's state.
type handoverMetrics struct{ enf Enforcer }

func (m handoverMetrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- handoverGuardedDesc
	ch <- handoverUnguardedDesc
	ch <- handoverUnmatchedDesc
}

func (m handoverMetrics) Collect(ch chan<- prometheus.Metric) {
	st, ok, err := m.enf.Handover()
	if !ok {
		return
	}
	if err != nil {
		ch <- prometheus.NewInvalidMetric(handoverGuardedDesc, err)
		return
	}
	ch <- prometheus.MustNewConstMetric(handoverGuardedDesc, prometheus.GaugeValue, float64(st.Guarded))
	ch <- prometheus.MustNewConstMetric(handoverUnguardedDesc, prometheus.CounterValue, float64(st.Unguarded))
	ch <- prometheus.MustNewConstMetric(handoverUnmatchedDesc, prometheus.CounterValue, float64(st.Unmatched))
}
