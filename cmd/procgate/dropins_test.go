package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestValidateDropins: validate reads the drop-ins beside the file, says
// which files it read and names the drop-in an error is in; --no-dropins
// and a drop-in alone read one file.
func TestValidateDropins(t *testing.T) {
	dir := t.TempDir()
	main := filepath.Join(dir, "policy.yaml")
	dropins := filepath.Join(dir, "policy.d")
	vpn := filepath.Join(dropins, "50-vpn.yaml")
	bad := filepath.Join(dropins, "60-bad.yaml")
	write := func(path, y string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(y), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(main, "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: db\n    allow:\n      - to: 10.1.2.0/24\n")
	write(vpn, "version: 1\ninternal:\n  interfaces: [wg0]\napps:\n  - name: vpn\n    allow:\n      - to: 10.2.0.0/16\n")
	for _, tc := range []struct {
		name     string
		bad      string // the text of 60-bad.yaml, if any
		args     []string
		wantCode int
		want     []string
	}{
		{"with drop-ins", "", []string{"validate", main}, 0,
			[]string{"read " + main + "\n", "read " + vpn + "\n", main + ": ok with 1 drop-ins: 1 internal prefixes, 2 apps, 2 grants"}},
		{"without drop-ins", "", []string{"validate", "--no-dropins", main}, 0,
			[]string{"read " + main + "\n", main + ": ok: 1 internal prefixes, 1 apps, 1 grants"}},
		{"a drop-in alone", "", []string{"validate", vpn}, 0,
			[]string{"read " + vpn + "\n", vpn + ": ok as a drop-in alone: 0 internal prefixes, 1 apps, 1 grants"}},
		{"an error in a drop-in", "version: 1\naudit:\n  rate: 5\napps:\n  - name: db\n", []string{"validate", main}, 1,
			[]string{bad + ":2:1: audit: only the main policy file", bad + ":5:11: apps[0].name: duplicate app \"db\" (first at " + main + ":5)"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.Remove(bad)
			if tc.bad != "" {
				write(bad, tc.bad)
			}
			out, code := procgateCLI(t, tc.args...)
			if code != tc.wantCode {
				t.Errorf("exit %d, want %d\n%s", code, tc.wantCode, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("want %q in:\n%s", w, out)
				}
			}
		})
	}
}
