package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/policy"
	"github.com/procgate/procgate/ruleset"
)

// TestLearnFromLog: learn reads an audit log without a daemon, prints a
// fragment, and --write writes it only when it validates with the policy.
func TestLearnFromLog(t *testing.T) {
	dir := t.TempDir()
	pol := filepath.Join(dir, "policy.yaml")
	os.WriteFile(pol, []byte("version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: db\n    allow:\n      - to: 10.1.2.0/24\n        proto: tcp\n        ports: [5432]\n"), 0o644)
	logPath := filepath.Join(dir, "audit.jsonl")
	t0 := time.Now().Add(-time.Hour).UTC().Truncate(time.Second)
	var lines []string
	for i, d := range []string{"10.3.0.1:443/tcp", "10.3.0.1:443/tcp", "10.3.0.2:443/tcp", "10.1.2.9:5433/tcp"} {
		b, _ := json.Marshal(audit.Record{Time: t0.Add(time.Duration(i) * time.Minute), Verdict: "deny", Reason: "no-grant", App: "db", Dest: d})
		lines = append(lines, string(b))
	}
	os.WriteFile(logPath, []byte(strings.Join(lines, "\n")+"\n"), 0o600)

	out, code := procgateCLI(t, "learn", "--app", "db", "--from-log", logPath)
	if code != 0 || !strings.Contains(out, "      # 2 attempts, first "+t0.Format(time.RFC3339)) ||
		!strings.Contains(out, "- to: 10.3.0.1/32\n        proto: tcp\n        ports: [443]") {
		t.Errorf("learn (exit %d):\n%s", code, out)
	}
	out, code = procgateCLI(t, "learn", "--app", "db", "--from-log", logPath, "--widen", "--since", "59m30s")
	if code != 0 || !strings.Contains(out, "- to: 10.3.0.0/30\n") || strings.Contains(out, "first "+t0.Format(time.RFC3339)) {
		t.Errorf("learn --widen --since 59m30s (exit %d): want 10.3.0.0/30 and not the first attempt:\n%s", code, out)
	}

	dropin := filepath.Join(dir, policy.DropinDir, "50-learned-db.yaml")
	out, code = procgateCLI(t, "learn", "--app", "db", "--from-log", logPath, "--write", dropin, "--policy", pol)
	if code != 0 {
		t.Fatalf("learn --write (exit %d):\n%s", code, out)
	}
	rs, _, err := policy.Load(pol)
	if err != nil {
		t.Fatalf("the policy with the written drop-in: %v", err)
	}
	for _, d := range []string{"10.3.0.1:443/tcp", "10.3.0.2:443/tcp", "10.1.2.9:5433/tcp"} {
		dest, _ := ruleset.ParseDest(d)
		if dec := rs.Decide("db", dest); !dec.Allow {
			t.Errorf("%s still denied with the learned drop-in: %v", d, dec)
		}
	}
	if dest, _ := ruleset.ParseDest("10.3.0.3:443/tcp"); rs.Decide("db", dest).Allow {
		t.Error("10.3.0.3 allowed: never attempted")
	}

	// A drop-in is written only when the whole policy validates with it.
	other := filepath.Join(dir, policy.DropinDir, "60-other.yaml")
	os.WriteFile(filepath.Join(dir, policy.DropinDir, "10-broken.yaml"), []byte("version: 1\naudit:\n  rate: 5\n"), 0o644)
	out, code = procgateCLI(t, "learn", "--app", "db", "--from-log", logPath, "--write", other, "--policy", pol)
	if code == 0 || !strings.Contains(out, "does not validate, nothing written") {
		t.Errorf("learn --write for an app the policy lacks (exit %d):\n%s", code, out)
	}
	if _, err := os.Stat(other); err == nil {
		t.Error("the invalid drop-in was written")
	}
}

// TestEventFlagsRefused: filters that cannot match are refused before the
// daemon is asked, naming what is expected.
func TestEventFlagsRefused(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"events", "--verdict", "denied"}, `--verdict "denied": want one of allow, deny, would-deny`},
		{[]string{"events", "--since", "yesterday"}, `--since "yesterday": want a duration (90m, 24h) or an RFC 3339 time`},
		{[]string{"events", "--since", "-1h"}, "not a negative one"},
		{[]string{"learn", "--app", "x", "--since", "soon"}, `--since "soon"`},
		{[]string{"learn"}, `required flag(s) "app" not set`},
	} {
		out, code := procgateCLI(t, append(tc.args, "--socket", "/nonexistent/procgate.sock")...)
		if code == 0 || !strings.Contains(out, tc.want) {
			t.Errorf("%v (exit %d): want %q in:\n%s", tc.args, code, tc.want, out)
		}
	}
}
