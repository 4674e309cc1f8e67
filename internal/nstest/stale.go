package nstest

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/procgate/procgate/cgroups"
	"golang.org/x/sys/unix"
)

// A test process killed by a timeout or SIGKILL runs no cleanup and leaves
// its cgroups and namespace files behind. The next test process removes
// them: they are ours by name (procgate-test-<pid>-<n>, nsDir/<pid>-<n>),
// and only those whose creating process is gone. A cgroup that still holds
// processes stays: they are not this process's to end.
var staleOnce sync.Once

func removeStaleOnce() {
	staleOnce.Do(func() {
		mount, err := cgroups.Mount()
		if err != nil {
			return // Cgroup reports it
		}
		removeStale(mount, nsDir)
	})
}

// removeStale removes the leftovers of dead test processes below the cgroup2
// mount cgroupDir and the namespace directory nsRoot, and returns what it
// removed.
func removeStale(cgroupDir, nsRoot string) []string {
	var removed []string
	entries, _ := os.ReadDir(cgroupDir)
	for _, e := range entries {
		name, ok := strings.CutPrefix(e.Name(), "procgate-test-")
		if !e.IsDir() || !ok || !creatorGone(name) {
			continue
		}
		dir := filepath.Join(cgroupDir, e.Name())
		if populated, err := cgroups.Populated(dir); err != nil || populated {
			continue
		}
		if err := cgroups.RemoveTree(dir); err != nil {
			slog.Warn("remove stale test cgroup", "path", dir, "err", err)
			continue
		}
		removed = append(removed, dir)
	}
	entries, _ = os.ReadDir(nsRoot)
	for _, e := range entries {
		if !e.IsDir() || !creatorGone(e.Name()) {
			continue
		}
		dir := filepath.Join(nsRoot, e.Name())
		net := filepath.Join(dir, "net")
		if err := unix.Unmount(net, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			slog.Warn("unmount stale test netns", "path", net, "err", err)
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			slog.Warn("remove stale test netns", "path", dir, "err", err)
			continue
		}
		removed = append(removed, dir)
	}
	return removed
}

// creatorGone: is name "<pid>-<n>" with no process <pid> alive? A reused
// pid keeps the leftover, which is the safe side.
func creatorGone(name string) bool {
	pidText, _, ok := strings.Cut(name, "-")
	if !ok {
		return false
	}
	pid, err := strconv.Atoi(pidText)
	if err != nil || pid <= 0 || pid == os.Getpid() {
		return false
	}
	return errors.Is(unix.Kill(pid, 0), unix.ESRCH)
}
