package nstest

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/procgate/procgate/cgroups"
)

// cleanupLimit bounds how long a cleanup waits for killed processes to leave
// a cgroup; it is a guard against hanging forever, not a timing assertion.
const cleanupLimit = 30 * time.Second

// Cgroup creates a fresh cgroup directly below the cgroup2 mount, named
// procgate-test-<pid>-<n>, and returns its path. On cleanup every process in
// its subtree is killed (only the test puts processes there) and the subtree
// is removed; errors fail the test.
func Cgroup(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	mount, err := cgroups.Mount()
	if err != nil {
		t.Fatal(err)
	}
	removeStaleOnce()
	return makeCgroup(t, filepath.Join(mount, uniqueName("procgate-test-")))
}

// ChildCgroup creates the cgroup name below parent, a cgroup of this test,
// and returns its path. It is removed (its processes killed) when the test
// that made it ends, and at the latest with parent.
func ChildCgroup(t testing.TB, parent, name string) string {
	t.Helper()
	return makeCgroup(t, filepath.Join(parent, name))
}

func makeCgroup(t testing.TB, dir string) string {
	t.Helper()
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create test cgroup: %v", err)
	}
	t.Cleanup(func() {
		if err := killAndRemove(dir); err != nil {
			t.Errorf("clean up test cgroup: %v", err)
		}
	})
	return dir
}

// killAndRemove empties the subtree at dir with cgroup.kill (Linux 5.14+),
// waits until it holds no live process, and removes it.
func killAndRemove(dir string) error {
	if _, err := os.Stat(dir); os.IsNotExist(err) {
		return nil // a child removed before its parent, or by the test itself
	}
	self := os.Getpid()
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		pids, err := cgroups.Procs(path)
		if err != nil {
			return err
		}
		if slices.Contains(pids, self) {
			return fmt.Errorf("the test process itself is in %s; move it out before the cleanup", path)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0); err != nil {
		return fmt.Errorf("kill processes in %s: %w", dir, err)
	}
	for deadline := time.Now().Add(cleanupLimit); ; time.Sleep(5 * time.Millisecond) {
		populated, err := cgroups.Populated(dir)
		if err != nil {
			return err
		}
		if !populated {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes in %s still alive %v after cgroup.kill", dir, cleanupLimit)
		}
	}
	return cgroups.RemoveTree(dir)
}
