package nstest

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
)

// deadPID is the pid of a process that has ended.
func deadPID(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid
}

func TestRemoveStale(t *testing.T) {
	RequireRoot(t)
	// The fake cgroup2 mount is a test cgroup of ours, so nothing outside
	// this test is ever looked at.
	root := Cgroup(t)
	nsRoot := t.TempDir()
	dead, self := strconv.Itoa(deadPID(t)), strconv.Itoa(os.Getpid())

	mk := func(path string) string {
		t.Helper()
		if err := os.MkdirAll(path, 0o755); err != nil {
			t.Fatal(err)
		}
		return path
	}
	staleCgroup := mk(filepath.Join(root, "procgate-test-"+dead+"-1"))
	mk(filepath.Join(staleCgroup, "app"))
	liveCgroup := mk(filepath.Join(root, "procgate-test-"+self+"-2"))
	busyCgroup := mk(filepath.Join(root, "procgate-test-"+dead+"-3"))
	otherCgroup := mk(filepath.Join(root, "someone-else-"+dead+"-1"))
	sleeper := startIn(t, busyCgroup)
	t.Cleanup(func() { sleeper.Process.Kill(); sleeper.Wait() })

	staleNS := mk(filepath.Join(nsRoot, dead+"-1"))
	if err := os.WriteFile(filepath.Join(staleNS, "net"), nil, 0o444); err != nil {
		t.Fatal(err)
	}
	liveNS := mk(filepath.Join(nsRoot, self+"-2"))

	removed := removeStale(root, nsRoot)
	slices.Sort(removed)
	want := []string{staleNS, staleCgroup}
	slices.Sort(want)
	if !slices.Equal(removed, want) {
		t.Errorf("removed %v, want %v", removed, want)
	}
	for _, tc := range []struct {
		path string
		kept bool
	}{
		{staleCgroup, false},
		{staleNS, false},
		{liveCgroup, true},  // its creator (this process) is alive
		{busyCgroup, true},  // still holds a process
		{otherCgroup, true}, // not named as ours
		{liveNS, true},
	} {
		_, err := os.Stat(tc.path)
		if kept := err == nil; kept != tc.kept {
			t.Errorf("%s: kept=%v, want %v (%v)", tc.path, kept, tc.kept, err)
		}
	}
	// The cgroups the test left are removed with root by Cgroup's cleanup,
	// after the sleeper is killed (cleanups run last-in first-out).
}
