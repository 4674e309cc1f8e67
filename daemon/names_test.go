package daemon

import (
	"strings"
	"testing"
)

// TestDNSNamesWhat: the dns-names guard's start line says what is true
// since the daemon starts proxies in matched cgroups' namespaces as it
// binds them (docs/policy.md, "Other network namespaces"): a proxy
// before the first query where the daemon sees the process first, the
// first query's answer lost only elsewhere.
func TestDNSNamesWhat(t *testing.T) {
	for _, tc := range []struct {
		says string
		want bool
	}{
		{"before the app's first query", true},
		{"procgate run", true},
		{"match.container", true},
		{"before each generation binds", true},
		{"else at its first query, whose answer grants nothing", true},
		{"from their first query on", false},
	} {
		if got := strings.Contains(dnsNamesWhat, tc.says); got != tc.want {
			t.Errorf("the dns-names guard line says %q: %v, want %v\n%s", tc.says, got, tc.want, dnsNamesWhat)
		}
	}
}
