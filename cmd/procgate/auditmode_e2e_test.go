package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/internal/probe"
)

const auditModePolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: trial
    mode: audit
    allow:
      - to: 10.1.0.0/16
        proto: tcp
        ports: [443]
`

// TestAuditMode: an app in mode: audit reaches what its policy refuses,
// each attempt logged as would-deny, counted, shown by status and
// explained; learn proposes the grant; revoke --app cuts it off whatever
// its mode; and a reload to mode: enforce denies the same attempts.
func TestAuditMode(t *testing.T) {
	e := newE2E(t, auditModePolicy)
	trial := e.prober("trial")

	mustTry(t, trial, "10.1.2.3:443/tcp", probe.Allowed)
	mustTry(t, trial, "10.9.9.9:80/tcp", probe.Allowed)
	waitEvent(t, e, `"verdict":"would-deny"`, `"reason":"no-grant"`, `"app":"trial"`, `"dest":"10.9.9.9:80/tcp"`)
	if out, err := e.procgate("events", "--last", "0", "--verdict", "would-deny", "--app", "trial"); err != nil || !strings.Contains(out, "would-deny app=trial") || !strings.Contains(out, "dest=10.9.9.9:80/tcp") {
		t.Errorf("events --verdict would-deny: %v\n%s", err, out)
	}

	out, err := e.procgate("status")
	if err != nil || !strings.Contains(out, "AUDIT MODE, NOT ENFORCED: trial") {
		t.Errorf("status does not say trial is in audit mode: %v\n%s", err, out)
	}
	app := func() api.AppStatus {
		t.Helper()
		for _, a := range e.status().Apps {
			if a.Name == "trial" {
				return a
			}
		}
		t.Fatal("no app trial in status")
		return api.AppStatus{}
	}
	if a := app(); a.Mode != "audit" || a.Counters.WouldDeny != 1 || a.Counters.Deny != 0 || a.Counters.Allow != 1 {
		t.Errorf("status of trial: mode %q, counters %+v; want audit, 1 allow, 1 would-deny, no deny", a.Mode, a.Counters)
	}

	out, err = e.procgate("explain", "--json", "--app", "trial", "10.9.9.9:80")
	var ex api.Explain
	if err != nil || json.Unmarshal([]byte(out), &ex) != nil {
		t.Fatalf("explain: %v\n%s", err, out)
	}
	if ex.Allow || ex.Verdict != "would-deny" || ex.Mode != "audit" || !strings.Contains(ex.Decision, "deny (no-grant)") || !strings.Contains(ex.Decision, "mode: audit") {
		t.Errorf("explain in audit mode: %+v; want what enforce would do (deny), verdict would-deny, and the mode", ex)
	}
	if out, err := e.procgate("explain", "--exit-code", "--app", "trial", "10.9.9.9:80"); err == nil {
		t.Errorf("explain --exit-code of an attempt enforcement would deny exits 0:\n%s", out)
	}

	if out, err := e.procgate("learn", "--app", "trial"); err != nil || !strings.Contains(out, "- to: 10.9.9.9/32\n        proto: tcp\n        ports: [80]") {
		t.Errorf("learn from would-deny: %v\n%s", err, out)
	}

	// revoke --app is a brake: it enforces, audit mode or not.
	if out, err := e.procgate("revoke", "--app", "trial"); err != nil {
		t.Fatalf("revoke: %v\n%s", err, out)
	}
	mustTry(t, trial, "10.9.9.9:80/tcp", probe.Denied)
	mustTry(t, trial, "10.1.2.3:443/tcp", probe.Denied)
	if a := app(); a.Mode != "enforce" {
		t.Errorf("a revoked app's mode is %q, want enforce", a.Mode)
	}
	if out, err := e.procgate("revoke", "--app", "trial", "--restore"); err != nil {
		t.Fatalf("revoke --restore: %v\n%s", err, out)
	}
	mustTry(t, trial, "10.9.9.9:80/tcp", probe.Allowed)

	// Switched to enforce by a reload: the same attempt is denied.
	denied := app().Counters.Deny
	y := strings.Replace(auditModePolicy, "mode: audit", "mode: enforce", 1)
	e.writePolicy(y)
	e.waitPolicy(sha(y), "mode: enforce")
	mustTry(t, trial, "10.9.9.9:80/tcp", probe.Denied)
	mustTry(t, trial, "10.1.2.3:443/tcp", probe.Allowed)
	waitEvent(t, e, `"verdict":"deny"`, `"app":"trial"`, `"dest":"10.9.9.9:80/tcp"`)
	if a := app(); a.Mode != "enforce" || a.Counters.Deny != denied+1 {
		t.Errorf("status of trial after the switch: mode %q, counters %+v; want enforce, %d deny", a.Mode, a.Counters, denied+1)
	}
}
