package daemon

import (
	"context"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestPinholeMetrics(t *testing.T) {
	m := &pinholeMetrics{
		counts: func(context.Context) (int, int, int, error) { return 3, 1, 2, nil },
		drops:  func() (uint64, error) { return 7, nil },
		held:   func() (uint64, error) { return 4, nil },
	}
	for _, a := range []string{"open", "open", "close", "refuse", "bogus"} {
		m.note(a)
	}
	want := `
# HELP procgate_pinhole_changes_total Holes the pinhole agent opened, closed, or had refused, since the daemon started.
# TYPE procgate_pinhole_changes_total counter
procgate_pinhole_changes_total{action="close"} 1
procgate_pinhole_changes_total{action="open"} 2
procgate_pinhole_changes_total{action="refuse"} 1
# HELP procgate_pinhole_guard_drops_total Packets the host guard dropped at auxiliary ports (peers without an open hole).
# TYPE procgate_pinhole_guard_drops_total counter
procgate_pinhole_guard_drops_total 7
# HELP procgate_pinhole_held_segments_total Data segments of dynamic apps' control connections held until their new holes were live at the gateway.
# TYPE procgate_pinhole_held_segments_total counter
procgate_pinhole_held_segments_total 4
# HELP procgate_pinholes Holes of the pinhole agent by state: open at the gateway, pending (wanted, not open yet), refused by the gateway's rules.
# TYPE procgate_pinholes gauge
procgate_pinholes{state="open"} 3
procgate_pinholes{state="pending"} 1
procgate_pinholes{state="refused"} 2
`
	if err := testutil.CollectAndCompare(m, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
}
