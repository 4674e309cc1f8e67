// Package nstest gives tests that need root their own throw-away kernel
// objects: cgroups below a test subtree, network namespaces, veth pairs and
// bpffs instances. Every helper registers a cleanup that removes what it made,
// and none of them changes the host's root network namespace or a cgroup the
// test did not create.
package nstest

import (
	"os"
	"strconv"
	"sync/atomic"
	"testing"
)

// RequireRootEnv, set to 1, turns a skip for missing privilege into a
// failure, so that CI (which runs as root) never passes by skipping.
const RequireRootEnv = "PROCGATE_REQUIRE_ROOT"

// RequireRoot skips t unless the test runs with euid 0; with
// PROCGATE_REQUIRE_ROOT=1 it fails instead.
func RequireRoot(t testing.TB) {
	t.Helper()
	euid := geteuid()
	if euid == 0 {
		return
	}
	reason := "test needs root (euid 0), runs as euid " + strconv.Itoa(euid)
	if os.Getenv(RequireRootEnv) == "1" {
		t.Fatal(reason + " and " + RequireRootEnv + "=1 forbids skipping")
		return
	}
	t.Skip(reason)
}

// geteuid is replaced in tests of RequireRoot itself.
var geteuid = os.Geteuid

// seq makes names unique within this test process; the pid makes them unique
// across test processes running at once.
var seq atomic.Uint64

func uniqueName(prefix string) string {
	return prefix + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatUint(seq.Add(1), 10)
}
