package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/policy"
)

const topPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: db
    users: [nobody]
    allow:
      - to: 10.1.2.0/24
        proto: tcp
        ports: [5432]
  - name: other
    allow:
      - to: 10.9.0.0/16
  - name: trial
    mode: audit
    allow:
      - to: 10.1.2.0/24
        proto: tcp
        ports: [443]
`

// envTopCapture names a file the test writes the pane to, once the apps'
// rows, their counters and the denials show: the terminal capture of
// README.md and docs/top.md, regenerated with
//
//	PROCGATE_TOP_CAPTURE=docs/top-capture.txt go test -count=1 -p 1 -run TestTopInTmux ./cmd/procgate/
//
// A relative path is from the repository's root, not from cmd/procgate
// where the test runs.
const envTopCapture = "PROCGATE_TOP_CAPTURE"

// writeCapture writes pane to the file envTopCapture names, if any, with
// trailing spaces and blank lines stripped: tmux pads to the pane's width.
func writeCapture(t *testing.T, pane string) {
	t.Helper()
	path := os.Getenv(envTopCapture)
	if path == "" {
		return
	}
	if !filepath.IsAbs(path) {
		path = filepath.Join("..", "..", path)
	}
	lines := strings.Split(pane, "\n")
	for i, l := range lines {
		lines[i] = strings.TrimRight(l, " ")
	}
	text := strings.TrimRight(strings.Join(lines, "\n"), "\n") + "\n"
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatalf("%s: %v", envTopCapture, err)
	}
	t.Logf("procgate top captured to %s", path)
}

// tmuxPane is one tmux server of the test's own, with one pane per
// session, 80x24 as over a plain ssh.
type tmuxPane struct {
	bin  string
	sock string
}

func newTmux(t *testing.T, dir string) *tmuxPane {
	tm := &tmuxPane{bin: nstest.Program(t, "tmux"), sock: filepath.Join(dir, "tmux.sock")}
	t.Cleanup(func() { _ = exec.Command(tm.bin, "-S", tm.sock, "kill-server").Run() })
	return tm
}

func (tm *tmuxPane) run(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(tm.bin, append([]string{"-S", tm.sock}, args...)...)
	cmd.Env = append(os.Environ(), "TERM=xterm")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("tmux %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// wait returns the pane of session once ok says so; it fails after 10 s
// (a guard against hanging, not a timing assertion).
func (tm *tmuxPane) wait(t *testing.T, session, why string, ok func(pane string) bool) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		pane := tm.run(t, "capture-pane", "-p", "-t", session)
		if ok(pane) {
			return pane
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the pane never showed it:\n%s", why, pane)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (tm *tmuxPane) waitFor(t *testing.T, session string, wants ...string) string {
	t.Helper()
	return tm.wait(t, session, fmt.Sprintf("%q", wants), func(p string) bool {
		for _, w := range wants {
			if !strings.Contains(p, w) {
				return false
			}
		}
		return true
	})
}

// TestTopInTmux: procgate top in an 80x24 tmux pane against a daemon in a
// test cgroup: the app rows and their counters, a denial, the app filter,
// an app in audit mode, and the grant key, which writes a drop-in after
// which the same attempt is allowed; a user other than root sees only its
// own app.
func TestTopInTmux(t *testing.T) {
	e := newE2E(t, topPolicy)
	tm := newTmux(t, e.dir)
	db, other, trial := e.prober("db"), e.prober("other"), e.prober("trial")
	mustTry(t, db, "10.1.2.3:5433/tcp", probe.Denied)

	top := fmt.Sprintf("env %s=1 TERM=screen %s --socket %s top", envAsMain, e.bin, e.socket)
	tm.run(t, "new-session", "-d", "-s", "root", "-x", "80", "-y", "24", top)
	tm.waitFor(t, "root", "procgate top", "10.1.2.3:5433/tcp", "port-not-granted", "GUARDS")
	// db's row: enforced, launched, not revoked, its denials in total.
	dbRow := regexp.MustCompile(`(?m)^db\s+enforce\s+launched\s+\d+ -\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+\d+\s*$`)
	deny := func(n string) func(string) bool {
		return func(p string) bool { m := dbRow.FindStringSubmatch(p); return m != nil && m[1] == n }
	}
	tm.wait(t, "root", "db's row with 1 denial", deny("1"))

	// The counters move as the app is denied again, and the other app's
	// denial shows, newest first.
	mustTry(t, db, "10.1.2.3:5434/tcp", probe.Denied)
	mustTry(t, other, "10.1.2.3:5432/tcp", probe.Denied)
	tm.wait(t, "root", "db's row with 2 denials", deny("2"))
	tm.waitFor(t, "root", "10.1.2.3:5434/tcp", "other      ")

	// An app in audit mode: named above the table, AUDIT in its row, its
	// would-deny attempt passed, counted with its denials and listed. The
	// allowed attempts are for the capture's ALLOW column.
	mustTry(t, db, "10.1.2.3:5432/tcp", probe.Allowed)
	mustTry(t, trial, "10.1.2.3:443/tcp", probe.Allowed)
	mustTry(t, trial, "10.1.2.3:8443/tcp", probe.Allowed)
	trialRow := regexp.MustCompile(`(?m)^trial\s+AUDIT\s+launched\s+1 -\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+\s+1\s+\d+\s*$`)
	pane := tm.wait(t, "root", "trial's row, audit line and would-deny", func(p string) bool {
		return trialRow.MatchString(p) && strings.Contains(p, "AUDIT MODE, NOT ENFORCED: trial") &&
			strings.Contains(p, "10.1.2.3:8443/tcp       would-deny")
	})
	writeCapture(t, pane)

	t.Run("the app filter", func(t *testing.T) {
		tm.run(t, "send-keys", "-t", "root", "a") // all -> db, the first app
		pane := tm.waitFor(t, "root", "app:db")
		if strings.Contains(pane, "10.1.2.3:5432/tcp") {
			t.Errorf("app:db shows other's denial:\n%s", pane)
		}
	})

	t.Run("the grant key writes a drop-in and the attempt is allowed", func(t *testing.T) {
		// Under app:db the newest is 5434; select the older 5433.
		tm.run(t, "send-keys", "-t", "root", "Down")
		tm.run(t, "send-keys", "-t", "root", "g")
		tm.waitFor(t, "root", "Grant 10.1.2.3:5433/tcp to db?", "- to: 10.1.2.3/32", "ports: [5433]")
		tm.run(t, "send-keys", "-t", "root", "y")
		pane := tm.waitFor(t, "root", "granted 10.1.2.3:5433/tcp to db")
		t.Logf("procgate top after the grant:\n%s", pane)
		dropin := filepath.Join(e.dir, policy.DropinDir, "60-top-db-10.1.2.3-5433-tcp.yaml")
		if _, err := os.Stat(dropin); err != nil {
			t.Fatalf("no drop-in: %v", err)
		}
		if out, err := e.procgate("validate", e.policy); err != nil {
			t.Errorf("validate with the drop-in: %v\n%s", err, out)
		}
		mustTry(t, db, "10.1.2.3:5433/tcp", probe.Allowed)
		mustTry(t, db, "10.1.2.3:5434/tcp", probe.Denied) // the narrowest grant: one port
	})

	t.Run("a user other than root sees its own app only", func(t *testing.T) {
		tm.run(t, "new-session", "-d", "-s", "nobody", "-x", "80", "-y", "24",
			"setpriv --reuid=65534 --regid=65534 --clear-groups "+top)
		pane := tm.waitFor(t, "nobody", "procgate top", "g (root)")
		pane = tm.wait(t, "nobody", "db's row", func(p string) bool { return dbRow.MatchString(p) })
		if regexp.MustCompile(`(?m)^other\s`).MatchString(pane) || strings.Contains(pane, "10.1.2.3:543") {
			t.Errorf("nobody sees other's row or root's denials:\n%s", pane)
		}
		tm.run(t, "send-keys", "-t", "nobody", "g")
		tm.waitFor(t, "nobody", "grant: needs root")
	})

	tm.run(t, "send-keys", "-t", "root", "q")
}
