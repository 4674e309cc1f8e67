package audit

import (
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/procgate/procgate/bpf"
)

// CounterSource reads the kernel's per-app counters, indexed by the bpf
// package's Count* slots, by app name ("" for unbound).
type CounterSource func() (map[string][bpf.NumCounts]uint64, error)

var (
	decisionsDesc = prometheus.NewDesc("procgate_decisions_total",
		"Connection attempts decided by the kernel hooks, per app (\"-\": unbound): "+
			"allow and deny for internal destinations, external for the rest; would-deny: "+
			"denials of an app in audit mode (mode: audit), which passed.",
		[]string{"app", "verdict"}, nil)
	droppedDesc = prometheus.NewDesc("procgate_audit_dropped_total",
		"Audit events lost, per app and where (kernel: rate limit or full ring buffer).",
		[]string{"app", "where"}, nil)
	eventsDesc = prometheus.NewDesc("procgate_audit_events_total",
		"Audit events read and decoded by the daemon.", nil, nil)
	decodeErrorsDesc = prometheus.NewDesc("procgate_audit_decode_errors_total",
		"Audit ring buffer records that did not decode.", nil, nil)
	subscriberDroppedDesc = prometheus.NewDesc("procgate_audit_subscriber_dropped_total",
		"Audit records a slow live subscriber (events --follow) did not get.", nil, nil)
	logWriteErrorsDesc = prometheus.NewDesc("procgate_audit_log_write_errors_total",
		"Audit records not, or not cleanly, written to the audit log.", nil, nil)
)

// verdictSlots maps the decision counter slots to their verdict label.
var verdictSlots = []struct {
	slot    int
	verdict string
}{
	{bpf.CountAllow, "allow"},
	{bpf.CountDeny, "deny"},
	{bpf.CountExternal, "external"},
	{bpf.CountWouldDeny, "would-deny"},
}

type collector struct {
	counters CounterSource
	auditor  *Auditor
}

// NewCollector exposes the kernel counters (read at each scrape) and the
// auditor's Stats. Either may be nil to leave its metrics out.
func NewCollector(counters CounterSource, a *Auditor) prometheus.Collector {
	return &collector{counters: counters, auditor: a}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	if c.counters != nil {
		ch <- decisionsDesc
		ch <- droppedDesc
	}
	if c.auditor != nil {
		ch <- eventsDesc
		ch <- decodeErrorsDesc
		ch <- subscriberDroppedDesc
		ch <- logWriteErrorsDesc
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	if c.counters != nil {
		c.collectCounters(ch)
	}
	if c.auditor != nil {
		s := c.auditor.Stats()
		for _, m := range []struct {
			desc  *prometheus.Desc
			value uint64
		}{
			{eventsDesc, s.Events},
			{decodeErrorsDesc, s.DecodeErrors},
			{subscriberDroppedDesc, s.Dropped},
			{logWriteErrorsDesc, s.LogWriteErrors},
		} {
			ch <- counter(m.desc, m.value)
		}
	}
}

func (c *collector) collectCounters(ch chan<- prometheus.Metric) {
	counts, err := c.counters()
	if err != nil {
		err = fmt.Errorf("read kernel counters: %w", err)
		ch <- prometheus.NewInvalidMetric(decisionsDesc, err)
		ch <- prometheus.NewInvalidMetric(droppedDesc, err)
		return
	}
	for app, v := range counts {
		label := app
		if label == "" {
			label = "-"
		}
		for _, s := range verdictSlots {
			ch <- counter(decisionsDesc, v[s.slot], label, s.verdict)
		}
		ch <- counter(droppedDesc, v[bpf.CountAuditDrop], label, "kernel")
	}
}

// counter reports a bad label value (an app name that is not UTF-8) as a
// collection error rather than panicking as MustNewConstMetric would.
func counter(desc *prometheus.Desc, v uint64, labels ...string) prometheus.Metric {
	m, err := prometheus.NewConstMetric(desc, prometheus.CounterValue, float64(v), labels...)
	if err != nil {
		return prometheus.NewInvalidMetric(desc, err)
	}
	return m
}

// Handler serves reg at /metrics (and nothing else). A failing collector
// leaves its metrics out instead of failing the whole scrape.
func Handler(reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
	}))
	return mux
}
