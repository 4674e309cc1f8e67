package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

// TestExeHashInKernel: a binary pinned with its sha256 holds the app's
// grants in the kernel only while the file at its path has that hash.
// Another binary renamed over it (a process of it started straight into
// the app's cgroup, past procgate run's own check) is denied, and an
// exe-hash record names app, path and both hashes; the right content put
// back holds the grants again. A pin without sha256 follows its path
// whatever the file holds.
func TestExeHashInKernel(t *testing.T) {
	nstest.RequireRoot(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	good, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	// Another binary: the same program with bytes past its end, so that it
	// still serves as a prober but hashes differently.
	other := append(append([]byte{}, good...), []byte("\x00not the pinned binary\n")...)
	goodSum, otherSum := sha256.Sum256(good), sha256.Sum256(other)

	e := newE2E(t, "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\n")
	pinned, followed := filepath.Join(e.dir, "pinned"), filepath.Join(e.dir, "followed")
	put := func(path string, data []byte) {
		t.Helper()
		tmp := path + ".new"
		if err := os.WriteFile(tmp, data, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	put(pinned, good)
	put(followed, good)
	e.writePolicy(fmt.Sprintf(`version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: pinned
    exe:
      - path: %s
        sha256: %s
    allow:
      - to: 10.1.0.0/16
  - name: followed
    exe: [%s]
    allow:
      - to: 10.1.0.0/16
`, pinned, hex.EncodeToString(goodSum[:]), followed))
	if out, err := e.procgate("reload"); err != nil {
		t.Fatalf("reload: %v\n%s", err, out)
	}
	// try starts a process of bin in app's cgroup and connects to a grant,
	// until it gets want or 5s pass: the daemon follows files by a watch.
	try := func(app, bin string, want probe.Verdict) {
		t.Helper()
		cg := filepath.Join(e.cgroup, "procgate.apps", app)
		deadline := time.Now().Add(5 * time.Second)
		for {
			p, err := probe.StartExe(bin, cg, e.netns, nil)
			if err != nil {
				t.Fatal(err)
			}
			d, _ := ruleset.ParseDest("10.1.2.3:22/tcp")
			got, err := p.Try(d, probe.Connect)
			p.Close()
			if err != nil {
				t.Fatal(err)
			}
			if got == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("app %s, binary %s: got %s, want %s\n%s", app, bin, got, want, e.daemonLog())
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	try("pinned", pinned, probe.Allowed)
	try("followed", followed, probe.Allowed)

	put(pinned, other)
	waitEvent(t, e, `"verdict":"deny"`, `"reason":"exe-hash"`, `"app":"pinned"`, `"exe":"`+pinned+`"`,
		hex.EncodeToString(goodSum[:]), hex.EncodeToString(otherSum[:]))
	// Denied at once, not after a retry: the record comes after the hash,
	// which comes after the generation that took the new file out.
	cg := filepath.Join(e.cgroup, "procgate.apps", "pinned")
	p, err := probe.StartExe(pinned, cg, e.netns, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	mustTry(t, p, "10.1.2.3:22/tcp", probe.Denied)
	out, err := e.procgate("explain", "--pid", fmt.Sprint(p.Pid()), "10.1.2.3:22/tcp")
	if err != nil || !strings.Contains(out, "deny (exe-not-pinned)") || !strings.Contains(out, "(exe-hash)") {
		t.Fatalf("explain --pid of the replaced binary: %v, want deny (exe-not-pinned) and (exe-hash) in:\n%s", err, out)
	}
	waitEvent(t, e, `"reason":"exe-not-pinned"`, `"app":"pinned"`)

	put(pinned, good)
	waitEvent(t, e, `"verdict":"allow"`, `"reason":"exe-hash"`, `"app":"pinned"`)
	try("pinned", pinned, probe.Allowed)

	// Without sha256, the pin is the path: another binary there holds the
	// grants, as an upgrade's new file does.
	put(followed, other)
	try("followed", followed, probe.Allowed)
}
