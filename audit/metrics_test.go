package audit

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/procgate/procgate/bpf"
)

const kernelMetrics = `
# HELP procgate_audit_dropped_total Audit events lost, per app and where (kernel: rate limit or full ring buffer).
# TYPE procgate_audit_dropped_total counter
procgate_audit_dropped_total{app="-",where="kernel"} 4
procgate_audit_dropped_total{app="web",where="kernel"} 8
# HELP procgate_decisions_total Connection attempts decided by the kernel hooks, per app ("-": unbound): allow and deny for internal destinations, external for the rest; would-deny: denials of an app in audit mode (mode: audit), which passed.
# TYPE procgate_decisions_total counter
procgate_decisions_total{app="-",verdict="allow"} 1
procgate_decisions_total{app="-",verdict="deny"} 2
procgate_decisions_total{app="-",verdict="external"} 3
procgate_decisions_total{app="-",verdict="would-deny"} 9
procgate_decisions_total{app="web",verdict="allow"} 5
procgate_decisions_total{app="web",verdict="deny"} 6
procgate_decisions_total{app="web",verdict="external"} 7
procgate_decisions_total{app="web",verdict="would-deny"} 10
`

const auditorMetrics = `
# HELP procgate_audit_decode_errors_total Audit ring buffer records that did not decode.
# TYPE procgate_audit_decode_errors_total counter
procgate_audit_decode_errors_total 2
# HELP procgate_audit_events_total Audit events read and decoded by the daemon.
# TYPE procgate_audit_events_total counter
procgate_audit_events_total 11
# HELP procgate_audit_log_write_errors_total Audit records not, or not cleanly, written to the audit log.
# TYPE procgate_audit_log_write_errors_total counter
procgate_audit_log_write_errors_total 1
# HELP procgate_audit_subscriber_dropped_total Audit records a slow live subscriber (events --follow) did not get.
# TYPE procgate_audit_subscriber_dropped_total counter
procgate_audit_subscriber_dropped_total 3
`

func testCounters() (map[string][bpf.NumCounts]uint64, error) {
	return map[string][bpf.NumCounts]uint64{"": {1, 2, 3, 4, 9}, "web": {5, 6, 7, 8, 10}}, nil
}

func failingCounters() (map[string][bpf.NumCounts]uint64, error) {
	return nil, errors.New("map gone")
}

func testAuditor(t *testing.T) *Auditor {
	a, err := New(newFakeSource(true), Options{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	a.events.Store(11)
	a.decodeErrors.Store(2)
	a.dropped.Store(3)
	a.logWriteErrors.Store(1)
	return a
}

func TestCollector(t *testing.T) {
	tests := []struct {
		name     string
		counters CounterSource
		auditor  bool
		want     string
	}{
		{name: "kernel counters and auditor", counters: testCounters, auditor: true, want: kernelMetrics + auditorMetrics},
		{name: "kernel counters only", counters: testCounters, want: kernelMetrics},
		{name: "auditor only", auditor: true, want: auditorMetrics},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var a *Auditor
			if tt.auditor {
				a = testAuditor(t)
			}
			c := NewCollector(tt.counters, a)
			if err := testutil.CollectAndCompare(c, strings.NewReader(tt.want)); err != nil {
				t.Error(err)
			}
		})
	}
}

// TestHandler checks that a failing counter source costs only its own
// metrics, and that nothing but /metrics is served.
func TestHandler(t *testing.T) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(failingCounters, testAuditor(t)))
	srv := httptest.NewServer(Handler(reg))
	defer srv.Close()
	tests := []struct {
		path       string
		wantStatus int
		want       []string
		wantNot    []string
	}{
		{
			path: "/metrics", wantStatus: http.StatusOK,
			want:    []string{"procgate_audit_events_total 11"},
			wantNot: []string{"procgate_decisions_total"},
		},
		{path: "/", wantStatus: http.StatusNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			resp, err := http.Get(srv.URL + tt.path)
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("status %d, want %d; body %s", resp.StatusCode, tt.wantStatus, body)
			}
			for _, s := range tt.want {
				if !strings.Contains(string(body), s) {
					t.Errorf("body lacks %q:\n%s", s, body)
				}
			}
			for _, s := range tt.wantNot {
				if strings.Contains(string(body), s) {
					t.Errorf("body has %q:\n%s", s, body)
				}
			}
		})
	}
}

func TestCollectorReportsCounterErrors(t *testing.T) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(failingCounters, nil))
	if _, err := reg.Gather(); err == nil || !strings.Contains(err.Error(), "map gone") {
		t.Errorf("Gather: %v, want the counter source's error", err)
	}
}
