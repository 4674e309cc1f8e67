package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/procgate/procgate/api"
)

// TestPrintStatusCutShort: the internal line of status lists what the
// daemon sent, and says how many more there are and how to see them only
// when the daemon cut the list short; the GRANTS column counts every
// grant, listed or not.
func TestPrintStatusCutShort(t *testing.T) {
	for _, tc := range []struct {
		name     string
		st       api.Status
		internal string
		grants   string
	}{
		{"whole lists", api.Status{Internal: []string{"10.0.0.0/8", "fd00::/8"}, InternalTotal: 2,
			Apps: []api.AppStatus{{Name: "db", Grants: []string{"#0", "#1"}, GrantsTotal: 2}}},
			"internal 10.0.0.0/8 fd00::/8\n", "  2  "},
		{"an older daemon without totals", api.Status{Internal: []string{"10.0.0.0/8"},
			Apps: []api.AppStatus{{Name: "db", Grants: []string{"#0"}}}},
			"internal 10.0.0.0/8\n", "  1  "},
		{"cut short", api.Status{Internal: []string{"10.0.0.0/32", "10.0.0.1/32"}, InternalTotal: 1_000_000,
			Apps: []api.AppStatus{{Name: "db", Grants: []string{"#0"}, GrantsTotal: 500_000}}},
			"internal 10.0.0.0/32 10.0.0.1/32 ... and 999998 more (procgate status --all lists them)\n", "  500000  "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			printStatus(&b, &tc.st)
			out := b.String()
			if !strings.Contains(out, "\n"+tc.internal) {
				t.Errorf("status lacks the line %q:\n%s", tc.internal, out)
			}
			var row string
			for _, l := range strings.Split(out, "\n") {
				if strings.HasPrefix(l, "db ") {
					row = l
				}
			}
			if !strings.Contains(row, tc.grants) {
				t.Errorf("app row %q does not count %q grants", row, strings.TrimSpace(tc.grants))
			}
		})
	}
}
