package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/procgate/procgate/users"
)

// TestGuardDefaultGroup: with no --guard-gid, the daemon guards with the
// procgate-guard group (created when missing, as the package would), so
// that an app launched for nobody, whose own group is nogroup (65534, the
// old default guard gid), runs guarded: its real gid is the guard's.
func TestGuardDefaultGroup(t *testing.T) {
	e := newE2E(t, `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: shell
    users: [nobody]
`)
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
