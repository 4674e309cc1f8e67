package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/procgate/procgate/users"
)

// nobodyShellPolicy is one app, shell, that nobody may run.
const nobodyShellPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: shell
    users: [nobody]
`

// TestGuardDefaultGroup: with no --guard-gid, the daemon guards with the
// procgate-guard group (created when missing, as the package would), so
// that an app launched for nobody, whose own group is nogroup (65534, the
// old default guard gid), runs guarded: its real gid is the guard's.
func TestGuardDefaultGroup(t *testing.T) {
	e := newE2E(t, nobodyShellPolicy)
	g, err := users.LookupGroup("procgate-guard")
	if err != nil {
		t.Fatalf("the daemon started without a procgate-guard group: %v", err)
	}
	if g.GID == 65534 {
		t.Fatalf("procgate-guard has gid 65534, nobody's group")
	}
	out, err := e.procgateAs(nobody, nil, "run", "--app", "shell", "--", "grep", "^Gid:", "/proc/self/status")
	if err != nil {
		t.Fatalf("run as nobody: %v\n%s", err, out)
	}
	if want := fmt.Sprintf("Gid:\t%d\t65534\t65534\t65534\n", g.GID); !strings.Contains(out, want) {
		t.Errorf("nobody's app: got %q, want real gid %d (procgate-guard), effective and saved 65534:\n%s", out, g.GID, e.daemonLog())
	}
	if st := e.status(); st != nil {
		for _, gd := range st.Guards {
			if gd.Name == "app-tracing" && !gd.Active {
				t.Errorf("status: trace guard not active: %s", gd.Why)
			}
		}
	}
}

// TestGuardTrackerFollowsLaunches: with the default --tcp-handover=auto
// and only guarded launches, the TCP handover guard's sockops tracker is
// not attached (status lists -handover and says why); a script, which the
// launcher cannot guard, attaches it before it starts, through the shim's
// refusal and the launch's second try, and it stays attached.
func TestGuardTrackerFollowsLaunches(t *testing.T) {
	e := newE2E(t, nobodyShellPolicy)
	tracker := func() (bool, string) {
		t.Helper()
		st := e.status()
		for _, gd := range st.Guards {
			if gd.Name == "tcp-handover" {
				return st.Hooks["handover"], gd.What
			}
		}
		t.Fatal("status lists no tcp-handover guard")
		return false, ""
	}
	if on, what := tracker(); strings.Contains(what, "BPF LSM socket_sendmsg, host-wide") {
		t.Skip("kernel feature missing: BPF LSM guards handovers here, without a sockops tracker")
	} else if on || !strings.Contains(what, "sockops tracker not attached") {
		t.Fatalf("tracker attached with no app process open to tracing: hook %v, %s", on, what)
	}
	if out, err := e.procgateAs(nobody, nil, "run", "--app", "shell", "--", "true"); err != nil {
		t.Fatalf("run as nobody: %v\n%s", err, out)
	}
	if on, what := tracker(); on {
		t.Errorf("tracker attached after a guarded launch: %s", what)
	}
	script := filepath.Join(e.dir, "script.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\ngrep ^Gid: /proc/self/status\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := e.procgateAs(nobody, nil, "run", "--app", "shell", "--", script)
	if err != nil {
		t.Fatalf("run a script as nobody: %v\n%s\n%s", err, out, e.daemonLog())
	}
	if !strings.Contains(out, "Gid:\t65534\t65534\t65534") {
		t.Errorf("the script ran with %q, want nobody's gids unguarded", out)
	}
	if on, what := tracker(); !on || !strings.Contains(what, "launched outside the trace guard") {
		t.Errorf("tracker after a script's launch: hook %v, %s; want attached", on, what)
	}
}
