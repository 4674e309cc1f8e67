package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/procgate/procgate/internal/journaltest"
	"github.com/procgate/procgate/internal/probe"
)

// TestAuditSinkJournald: with --audit-sink journald the daemon sends each
// record to journald with its PROCGATE_* fields and keeps no log file;
// events then points at journalctl.
func TestAuditSinkJournald(t *testing.T) {
	jd := journaltest.New(t)
	e := newE2EWith(t, basePolicy, false, "--audit-sink", "journald", "--journal-socket", jd.Path)
	mustTry(t, e.prober("db"), "10.1.2.3:5433/tcp", probe.Denied)
	want := map[string]string{
		"PROCGATE_VERDICT": "deny", "PROCGATE_APP": "db", "PROCGATE_DEST": "10.1.2.3:5433/tcp",
		"PROCGATE_REASON": "port-not-granted", "PROCGATE_HOOK": "connect4", "PRIORITY": "4", "SYSLOG_IDENTIFIER": "procgate",
	}
	for i := 0; ; i++ {
		got := jd.Entry()
		match := strings.HasPrefix(got["MESSAGE"], "deny ")
		for k, v := range want {
			match = match && got[k] == v
		}
		if match {
			break
		}
		if i == 20 {
			t.Fatalf("20 journal entries and none of the denial %v; the last: %v", want, got)
		}
	}
	if _, err := os.Stat(filepath.Join(e.state, "audit.jsonl")); err == nil {
		t.Error("the daemon wrote audit.jsonl with --audit-sink journald")
	}
	if out, err := e.procgate("events", "--last", "5"); err == nil || !strings.Contains(out, "journalctl -t procgate") {
		t.Errorf("events without a log file: %v\n%s", err, out)
	}
	if st := e.status(); !strings.Contains(st.Audit.Log, "journald "+jd.Path) {
		t.Errorf("status names the audit sinks %q", st.Audit.Log)
	}
}

// TestAuditSinkRefused: an unknown sink, and journald where none listens,
// stop the daemon before it does anything.
func TestAuditSinkRefused(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--audit-sink", "syslog"}, `--audit-sink "syslog": want file, journald, or both (file,journald)`},
		{[]string{"--audit-sink", "file,journald", "--journal-socket", filepath.Join(t.TempDir(), "none")}, "--audit-sink journald: no journald socket at"},
	} {
		out, code := procgateCLI(t, append([]string{"daemon", "--policy", "/nonexistent"}, tc.args...)...)
		if code == 0 || !strings.Contains(out, tc.want) {
			t.Errorf("daemon %v (exit %d): want %q\n%s", tc.args, code, tc.want, out)
		}
	}
}
