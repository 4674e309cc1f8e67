// Package cgroups finds the cgroup v2 hierarchy and manages the cgroups that
// stand for procgate applications.
//
// Only cgroup v2 is supported: the eBPF hooks and the cgroup ids they see
// exist only there. On hybrid hosts (v1 controllers beside a v2 mount, as on
// the development machines) the v2 mount is found wherever it is mounted.
package cgroups

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// Mount returns the mount point of the cgroup2 hierarchy, from
// /proc/self/mountinfo.
func Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	defer f.Close()
	return ParseMountinfo(f)
}

// ParseMountinfo returns the mount point of the first cgroup2 mount in r, in
// the format of proc(5) /proc/PID/mountinfo. Mounts of a subtree (a bind mount
// whose root is not "/") are passed over: paths from /proc/PID/cgroup joined
// to them would name the wrong directory.
func ParseMountinfo(r io.Reader) (string, error) {
	mounts, err := mountinfo.GetMountsFromReader(r, mountinfo.FSTypeFilter("cgroup2"))
	if err != nil {
		return "", fmt.Errorf("read mountinfo: malformed: %w", err)
	}
	subtree := ""
	for _, m := range mounts {
		if m.Root != "/" {
			subtree = m.Mountpoint
			continue
		}
		return m.Mountpoint, nil
	}
	if subtree != "" {
		return "", fmt.Errorf("no cgroup2 mount of the hierarchy root (only a subtree mounted at %s)", subtree)
	}
	return "", errors.New("no cgroup2 mount in mountinfo: procgate needs the unified cgroup hierarchy")
}

// fileidKernfs is the file handle type of kernfs nodes (include/linux/exportfs.h).
const fileidKernfs = 0xfe

// ID returns the id of the cgroup at dir as bpf_get_current_cgroup_id() and
// bpf_get_current_ancestor_cgroup_id() report it: the kernfs node id, which
// the kernel also hands out as the cgroup's file handle (FILEID_KERNFS, since
// Linux 5.5). On 64-bit hosts it equals the directory's inode number.
func ID(dir string) (uint64, error) {
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, dir, 0)
	if err != nil {
		return 0, fmt.Errorf("cgroup id of %s: %w", dir, err)
	}
	b := h.Bytes()
	if h.Type() != fileidKernfs || len(b) != 8 {
		return 0, fmt.Errorf("cgroup id of %s: not a cgroup2 directory (file handle type %#x)", dir, h.Type())
	}
	return binary.NativeEndian.Uint64(b), nil
}

// Level returns the depth of dir below the cgroup2 mount, counted as
// bpf_get_current_ancestor_cgroup_id() counts ancestor levels: the root is 0,
// its children 1.
func Level(mount, dir string) (int, error) {
	rel, err := relative(mount, dir)
	if err != nil {
		return 0, err
	}
	if rel == "." {
		return 0, nil
	}
	return strings.Count(rel, "/") + 1, nil
}

// relative returns dir relative to mount, refusing dirs outside it.
func relative(mount, dir string) (string, error) {
	rel, err := filepath.Rel(filepath.Clean(mount), filepath.Clean(dir))
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") || filepath.IsAbs(rel) {
		return "", fmt.Errorf("cgroup %s is not below the cgroup2 mount %s", dir, mount)
	}
	return rel, nil
}

// OfPID returns the absolute cgroup v2 directory of process pid.
func OfPID(pid int) (string, error) {
	mount, err := Mount()
	if err != nil {
		return "", err
	}
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return "", fmt.Errorf("cgroup of pid %d: %w", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		path, ok := strings.CutPrefix(sc.Text(), "0::")
		if !ok {
			continue
		}
		if strings.HasSuffix(path, " (deleted)") {
			return "", fmt.Errorf("cgroup of pid %d: %s was removed", pid, path)
		}
		return filepath.Join(mount, path), nil
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("cgroup of pid %d: %w", pid, err)
	}
	return "", fmt.Errorf("cgroup of pid %d: no cgroup v2 (0::) line in /proc/%d/cgroup", pid, pid)
}

// Procs returns the processes directly in the cgroup dir (not in its
// descendants).
func Procs(dir string) ([]int, error) {
	data, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("processes of cgroup %s: %w", dir, err)
	}
	var pids []int
	for _, f := range strings.Fields(string(data)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("processes of cgroup %s: bad pid %q", dir, f)
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

// Populated reports whether dir or any of its descendants holds a live
// process (cgroup.events "populated").
func Populated(dir string) (bool, error) {
	data, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return false, fmt.Errorf("events of cgroup %s: %w", dir, err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "populated "); ok {
			return v != "0", nil
		}
	}
	return false, fmt.Errorf("events of cgroup %s: no populated field", dir)
}

// RemoveTree removes the cgroup dir and all its descendants, deepest first.
// It removes nothing that holds a process and says which processes are in
// the way. A dir that does not exist is not an error.
func RemoveTree(dir string) error {
	var dirs []string
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, path)
		}
		return nil
	})
	if errors.Is(err, os.ErrNotExist) && len(dirs) == 0 {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove cgroup %s: %w", dir, err)
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		d := dirs[i]
		pids, err := Procs(d)
		if err != nil {
			return fmt.Errorf("remove cgroup %s: %w", dir, err)
		}
		if len(pids) > 0 {
			return fmt.Errorf("remove cgroup %s: %s still holds processes %v", dir, d, pids)
		}
		if err := unix.Rmdir(d); err != nil {
			return fmt.Errorf("remove cgroup %s: rmdir %s: %w", dir, d, err)
		}
	}
	return nil
}
