package main

import (
	"strings"
	"testing"
	"time"
)

// TestDaemonLogsHostWarnings: the daemon logs, at load, the warnings
// validate prints about users and binaries the host lacks.
func TestDaemonLogsHostWarnings(t *testing.T) {
	e := newE2E(t, `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: shell
    users: [nobody, procgate-no-such-user]
    exe: [/nonexistent/psql]
`)
	want := []string{`apps[0].users[1]: unknown user \"procgate-no-such-user\" on this host`, "apps[0].exe[0]: binary /nonexistent/psql does not exist"}
	deadline := time.Now().Add(10 * time.Second)
	for {
		log := e.daemonLog()
		missing := ""
		for _, w := range want {
			if !strings.Contains(log, w) {
				missing = w
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon log lacks %q:\n%s", missing, log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
