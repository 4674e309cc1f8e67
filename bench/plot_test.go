package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPlotsFromStoredResults draws the report's plots from the committed
// results, without measuring: each is an SVG naming its series.
func TestPlotsFromStoredResults(t *testing.T) {
	out := t.TempDir()
	if err := rewrite("results/results.json", out); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ file, want string }{
		{"latency-loopback-tcp.svg", "procgate-hooks-only"},
		{"scaling-p50.svg", "nft-cgroup-set"},
		{"load-time.svg", "procgate first load"},
		{"throughput.svg", "route-uid"},
	} {
		b, err := os.ReadFile(filepath.Join(out, tt.file))
		if err != nil {
			t.Errorf("plot %s: %v", tt.file, err)
			continue
		}
		if s := string(b); !strings.Contains(s, "<svg") || !strings.Contains(s, tt.want) {
			t.Errorf("plot %s: no SVG naming %q", tt.file, tt.want)
		}
	}
}
