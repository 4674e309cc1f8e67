package main

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// eventDeadline is how long a change may take to be enforced in the tests
// of events: generous for a loaded machine, and far below the poll they set
// (an hour), so that only an event can meet it.
const eventDeadline = 2 * time.Second

// testSettle is the daemon's --settle in TestPolicyFollowsFileEvents: ten
// times the pause between the pieces of a file written in pieces, so that
// a test process the scheduler holds back does not look like a writer that
// finished.
const (
	testSettle = 500 * time.Millisecond
	piecePause = 40 * time.Millisecond
)

func sha(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// waitPolicy waits until the daemon enforces the policy whose bytes hash
// to want, and returns its generation.
func (e *e2e) waitPolicy(want, why string) uint32 {
	e.t.Helper()
	deadline := time.Now().Add(eventDeadline)
	for {
		st := e.status()
		if st.PolicySHA256 == want {
			return st.Generation
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s: not enforced within %v (generation %d, sha256 %.12s, want %.12s):\n%s",
				why, eventDeadline, st.Generation, st.PolicySHA256, want, e.daemonLog())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func policyWithApps(apps ...string) string {
	y := "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\n"
	if len(apps) > 0 {
		y += "apps:\n"
	}
	for _, a := range apps {
		y += "  - name: " + a + "\n    allow:\n      - to: 10.1.2.0/24\n        ports: [5432]\n"
	}
	return y
}

// TestPolicyFollowsFileEvents: with the poll an hour away, the daemon
// follows the policy file through inotify: renames over it, ..data symlink
// swaps, and a file written in pieces, of which it applies only the whole.
func TestPolicyFollowsFileEvents(t *testing.T) {
	e := newE2EWith(t, policyWithApps("a"), false, "--poll", "1h", "--settle", testSettle.String())
	e.waitPolicy(sha(policyWithApps("a")), "the first policy")

	t.Run("rename over the file", func(t *testing.T) {
		y := policyWithApps("a", "b")
		e.writePolicy(y)
		e.waitPolicy(sha(y), "a policy renamed over the file")
	})

	t.Run("written in pieces", func(t *testing.T) {
		// Every piece ends a line, and the first ones alone are a valid
		// policy of another meaning: no apps, so app b loses its grant.
		whole := policyWithApps("b", "c")
		head := policyWithApps()
		if !strings.HasPrefix(whole, head) {
			t.Fatalf("test policy: %q does not start with %q", whole, head)
		}
		pieces := []string{head}
		for _, line := range strings.SplitAfter(strings.TrimPrefix(whole, head), "\n") {
			if line != "" {
				pieces = append(pieces, line)
			}
		}
		before := e.status().Generation
		f, err := os.OpenFile(e.policy+".inplace", os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		// In place, as `cat > policy.yaml` does: the daemon's file is this
		// one from now on.
		if err := os.Rename(e.policy+".inplace", e.policy); err != nil {
			t.Fatal(err)
		}
		for _, p := range pieces {
			if _, err := f.WriteString(p); err != nil {
				t.Fatal(err)
			}
			time.Sleep(piecePause) // within the settle delay
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		gen := e.waitPolicy(sha(whole), "a policy written in pieces")
		time.Sleep(2 * testSettle) // no later generation either
		if st := e.status(); gen != before+1 || st.Generation != gen {
			t.Fatalf("generations %d -> %d -> %d: want exactly one, the whole file's; a piece was applied\n%s",
				before, gen, st.Generation, e.daemonLog())
		}
		if strings.Contains(e.daemonLog(), "policy rejected") {
			t.Fatalf("a piece was read and rejected: the settle delay did not hold\n%s", e.daemonLog())
		}
	})

	t.Run("symlink swap of ..data", func(t *testing.T) {
		// The layout of a Kubernetes ConfigMap volume: policy.yaml ->
		// ..data/policy.yaml, ..data -> ..v1, and an update renames a
		// new ..data symlink over the old one.
		version := func(name, y string) {
			t.Helper()
			if err := os.MkdirAll(filepath.Join(e.dir, name), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(e.dir, name, "policy.yaml"), []byte(y), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		swap := func(link, target string) {
			t.Helper()
			tmp := filepath.Join(e.dir, link+"_tmp")
			if err := os.Symlink(target, tmp); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, filepath.Join(e.dir, link)); err != nil {
				t.Fatal(err)
			}
		}
		v1, v2 := policyWithApps("d"), policyWithApps("d", "e")
		version("..v1", v1)
		swap("..data", "..v1")
		swap("policy.yaml", "..data/policy.yaml")
		e.waitPolicy(sha(v1), "the policy file made a symlink into ..data")
		version("..v2", v2)
		swap("..data", "..v2")
		e.waitPolicy(sha(v2), "a swap of ..data")
	})
	t.Run("drop-ins come, break and go", func(t *testing.T) {
		// The main file is ..v2's from here on.
		apps := func() []string {
			var names []string
			for _, a := range e.status().Apps {
				names = append(names, a.Name)
			}
			return names
		}
		waitApps := func(want, why string) {
			t.Helper()
			deadline := time.Now().Add(eventDeadline)
			for got := strings.Join(apps(), " "); got != want; got = strings.Join(apps(), " ") {
				if time.Now().After(deadline) {
					t.Fatalf("%s: apps %q after %v, want %q\n%s", why, got, eventDeadline, want, e.daemonLog())
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
		dropins := filepath.Join(e.dir, "policy.d")
		dropin := filepath.Join(dropins, "50-f.yaml")
		if err := os.Mkdir(dropins, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dropins) })
		write := func(path, y string) {
			t.Helper()
			if err := os.WriteFile(path+".tmp", []byte(y), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(path+".tmp", path); err != nil {
				t.Fatal(err)
			}
		}
		write(dropin, "version: 1\napps:\n  - name: f\n    allow:\n      - to: 10.1.2.0/24\n")
		waitApps("d e f", "a drop-in in a new policy.d")
		if out, err := e.procgate("status"); err != nil || !strings.Contains(out, "drop-ins "+dropin+"\n") {
			t.Errorf("status does not name the drop-in %s: %v\n%s", dropin, err, out)
		}

		before := e.status().Generation
		write(filepath.Join(dropins, "60-g.yaml"), "version: 1\naudit:\n  rate: 5\n")
		deadline := time.Now().Add(eventDeadline)
		for !strings.Contains(e.status().LastError, "60-g.yaml:2:1: audit: only the main policy file") {
			if time.Now().After(deadline) {
				t.Fatalf("a bad drop-in was not reported within %v: %q\n%s", eventDeadline, e.status().LastError, e.daemonLog())
			}
			time.Sleep(10 * time.Millisecond)
		}
		if g := e.status().Generation; g != before {
			t.Fatalf("a bad drop-in made generation %d", g)
		}
		if err := os.Remove(filepath.Join(dropins, "60-g.yaml")); err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(dropin); err != nil {
			t.Fatal(err)
		}
		waitApps("d e", "drop-ins removed")
		if st := e.status(); st.LastError != "" {
			t.Fatalf("last error kept after a good reload: %s", st.LastError)
		}
	})
}
