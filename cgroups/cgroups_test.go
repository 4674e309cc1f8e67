package cgroups_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/internal/nstest"
)

// hybrid is this development machine's layout: v1 controllers and a v2 mount
// beside them.
const hybrid = `22 27 0:21 / /proc rw,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`

func TestParseMountinfo(t *testing.T) {
	tests := []struct {
		name, in, want string
		wantErr        string
	}{
		{name: "hybrid", in: hybrid, want: "/sys/fs/cgroup/unified"},
		{name: "unified with optional fields",
			in:   "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 master:2 - cgroup2 cgroup2 rw,nsdelegate\n",
			want: "/sys/fs/cgroup"},
		{name: "escaped space and backslash",
			in:   `50 1 0:40 / /mnt/my\040cgroups\134x rw - cgroup2 none rw` + "\n",
			want: `/mnt/my cgroups\x`},
		{name: "first of two", in: hybrid + "60 1 0:38 / /other rw - cgroup2 cgroup2 rw\n", want: "/sys/fs/cgroup/unified"},
		{name: "subtree mount passed over",
			in:   "60 1 0:38 /sub /sub rw - cgroup2 cgroup2 rw\n61 1 0:38 / /full rw - cgroup2 cgroup2 rw\n",
			want: "/full"},
		{name: "only a subtree", in: "60 1 0:38 /sub /sub rw - cgroup2 cgroup2 rw\n", wantErr: "only a subtree"},
		{name: "v1 only", in: "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n", wantErr: "no cgroup2 mount"},
		{name: "empty", in: "", wantErr: "no cgroup2 mount"},
		{name: "fs type looks like separator", in: "1 2 0:1 / /x rw - - cgroup2 rw\n", wantErr: "no cgroup2 mount"},
		{name: "malformed", in: "41 31 0:38 / /sys/fs/cgroup/unified rw cgroup2\n", wantErr: "malformed: parsing '41 31"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := cgroups.ParseMountinfo(strings.NewReader(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %q, %v; want error containing %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

func TestMountIsCgroup2(t *testing.T) {
	mount, err := cgroups.Mount()
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mount, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Errorf("%s has fs magic %#x, want cgroup2 %#x", mount, st.Type, unix.CGROUP2_SUPER_MAGIC)
	}
}

func TestLevel(t *testing.T) {
	const m = "/sys/fs/cgroup/unified"
	tests := []struct {
		dir  string
		want int
		err  bool
	}{
		{dir: m, want: 0},
		{dir: m + "/", want: 0},
		{dir: m + "/a", want: 1},
		{dir: m + "/a/b/", want: 2},
		{dir: m + "/a/../a/b/c", want: 3},
		{dir: "/sys/fs/cgroup", err: true},
		{dir: "/sys/fs/cgroup/unifiedx", err: true},
		{dir: "a/b", err: true},
	}
	for _, tt := range tests {
		got, err := cgroups.Level(m, tt.dir)
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("Level(%s) = %d, %v; want %d, error %v", tt.dir, got, err, tt.want, tt.err)
		}
	}
}

// startIn starts a long sleep directly in cgroup dir, with cred if non-nil.
func startIn(t *testing.T, dir string, cred *syscall.Credential, name string, args ...string) *exec.Cmd {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd()), Credential: cred}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s in %s: %v", name, dir, err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func TestIDAndOfPID(t *testing.T) {
	top := nstest.Cgroup(t)
	child := nstest.ChildCgroup(t, top, "child")
	mount, err := cgroups.Mount()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[uint64]string{}
	for _, dir := range []string{mount, top, child} {
		id, err := cgroups.ID(dir)
		if err != nil {
			t.Fatal(err)
		}
		var st unix.Stat_t
		if err := unix.Stat(dir, &st); err != nil {
			t.Fatal(err)
		}
		// On 64-bit the kernfs id is the inode number: two kernel interfaces agree.
		if id != st.Ino {
			t.Errorf("ID(%s) = %d, inode %d", dir, id, st.Ino)
		}
		if other, dup := seen[id]; dup {
			t.Errorf("%s and %s share id %d", dir, other, id)
		}
		seen[id] = dir
		cmd := startIn(t, dir, nil, "sleep", "1000")
		got, err := cgroups.OfPID(cmd.Process.Pid)
		if err != nil || got != filepath.Clean(dir) {
			t.Errorf("OfPID of process in %s = %q, %v", dir, got, err)
		}
	}
	if _, err := cgroups.ID(t.TempDir()); err == nil {
		t.Error("ID of a plain directory succeeded")
	}
	if _, err := cgroups.OfPID(1 << 30); err == nil {
		t.Error("OfPID of a missing process succeeded")
	}
}

func TestAppDirs(t *testing.T) {
	a := cgroups.AppDirs{Base: filepath.Join(nstest.Cgroup(t), "procgate.apps")}
	if apps, err := a.List(); err != nil || len(apps) != 0 {
		t.Fatalf("List before any app = %v, %v", apps, err)
	}
	dir, err := a.Ensure("psql")
	if err != nil {
		t.Fatal(err)
	}
	if dir != filepath.Join(a.Base, "psql") {
		t.Errorf("Ensure returned %s", dir)
	}
	if _, err := a.Ensure("web"); err != nil {
		t.Fatal(err)
	}

	sub, err := os.MkdirTemp(dir, "sub")
	if err != nil {
		t.Fatal(err)
	}
	// join has a process of uid 65534 in sub move itself up into the app's
	// cgroup, which needs write access to the app's cgroup.procs.
	join := func() error {
		cmd := startIn(t, sub, &syscall.Credential{Uid: 65534, Gid: 65534}, "sh", "-c", `echo $$ > "$1/cgroup.procs"`, "sh", dir)
		return cmd.Wait()
	}

	// Someone hands the cgroup to nobody, who can then move processes in it.
	for _, p := range []string{dir, dir + "/cgroup.procs", dir + "/cgroup.threads"} {
		if err := os.Chown(p, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, 0o777); err != nil {
			t.Fatal(err)
		}
	}
	if err := join(); err != nil {
		t.Fatalf("uid 65534 cannot join a cgroup delegated to it: %v", err)
	}
	// Ensure takes it back.
	if again, err := a.Ensure("psql"); err != nil || again != dir {
		t.Fatalf("Ensure again = %s, %v", again, err)
	}
	for _, c := range []struct {
		path string
		mode os.FileMode
	}{{a.Base, 0o755}, {dir, 0o755}, {dir + "/cgroup.procs", 0o644}, {dir + "/cgroup.threads", 0o644}, {dir + "/cgroup.subtree_control", 0o644}} {
		var st unix.Stat_t
		if err := unix.Stat(c.path, &st); err != nil {
			t.Fatal(err)
		}
		if st.Uid != 0 || st.Gid != 0 || os.FileMode(st.Mode)&os.ModePerm != c.mode {
			t.Errorf("%s: owner %d:%d mode %o, want 0:0 %o", c.path, st.Uid, st.Gid, st.Mode&0o777, c.mode)
		}
	}
	if err := join(); err == nil {
		t.Errorf("uid 65534 joined %s after Ensure", dir)
	}

	if apps, err := a.List(); err != nil || strings.Join(apps, ",") != "psql,web" {
		t.Errorf("List = %v, %v; want [psql web]", apps, err)
	}

	for _, bad := range []string{"", ".", "..", "a/b", "cgroup.procs", "x\ny"} {
		if _, err := a.Ensure(bad); err == nil {
			t.Errorf("Ensure(%q) succeeded", bad)
		}
		if err := a.Remove(bad); err == nil {
			t.Errorf("Remove(%q) succeeded", bad)
		}
	}

	busy := startIn(t, sub, nil, "sleep", "1000")
	err = a.Remove("psql")
	if err == nil || !strings.Contains(err.Error(), "still holds processes") || !strings.Contains(err.Error(), strconv.Itoa(busy.Process.Pid)) {
		t.Fatalf("Remove with a process inside: %v", err)
	}
	busy.Process.Kill()
	busy.Wait()
	if err := a.Remove("psql"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("%s still there: %v", dir, err)
	}
	if err := a.Remove("psql"); err != nil {
		t.Errorf("Remove of a removed app: %v", err)
	}
	if apps, err := a.List(); err != nil || strings.Join(apps, ",") != "web" {
		t.Errorf("List = %v, %v; want [web]", apps, err)
	}
}
