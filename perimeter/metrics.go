package perimeter

import (
	"github.com/prometheus/client_golang/prometheus"
)

var (
	repairsDesc = prometheus.NewDesc("procgate_perimeter_repairs_total",
		"What the gateway's periodic reconcile put right in its nftables table: table (rebuilt whole), missing (hole put back), foreign (element removed), changed (element rewritten).",
		[]string{"kind"}, nil)
	holesDesc = prometheus.NewDesc("procgate_perimeter_holes",
		"Holes the gateway holds open.", nil, nil)
)

// Metrics exports a Controller's state for Prometheus.
type Metrics struct{ C *Controller }

func (m Metrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- repairsDesc
	ch <- holesDesc
}

func (m Metrics) Collect(ch chan<- prometheus.Metric) {
	r := m.C.Repaired()
	for kind, n := range map[string]uint64{"table": r.Table, "missing": r.Missing, "foreign": r.Foreign, "changed": r.Changed} {
		ch <- prometheus.MustNewConstMetric(repairsDesc, prometheus.CounterValue, float64(n), kind)
	}
	ch <- prometheus.MustNewConstMetric(holesDesc, prometheus.GaugeValue, float64(m.C.open()))
}
