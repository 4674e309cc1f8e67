package nstest

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/cgroups"
)

// fakeTB records what RequireRoot asks of its test.
type fakeTB struct {
	testing.TB
	skipped, failed bool
}

func (f *fakeTB) Helper()           {}
func (f *fakeTB) Skip(...any)       { f.skipped = true }
func (f *fakeTB) Fatal(args ...any) { f.failed = true }

func TestRequireRoot(t *testing.T) {
	tests := []struct {
		name                string
		euid                int
		env                 string
		wantSkip, wantFatal bool
	}{
		{"root", 0, "", false, false},
		{"root required", 0, "1", false, false},
		{"user", 1000, "", true, false},
		{"user, root required", 1000, "1", false, true},
		{"user, other env value", 1000, "0", true, false},
	}
	saved := geteuid
	t.Cleanup(func() { geteuid = saved })
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			geteuid = func() int { return tt.euid }
			t.Setenv(RequireRootEnv, tt.env)
			f := &fakeTB{}
			RequireRoot(f)
			if f.skipped != tt.wantSkip || f.failed != tt.wantFatal {
				t.Errorf("skipped=%v failed=%v, want skipped=%v failed=%v", f.skipped, f.failed, tt.wantSkip, tt.wantFatal)
			}
		})
	}
}

// startIn starts a long sleep directly in cgroup dir.
func startIn(t *testing.T, dir string) *exec.Cmd {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	cmd := exec.Command("sleep", "1000")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start sleep in %s: %v", dir, err)
	}
	return cmd
}

func TestCgroupCleanupKillsAndRemoves(t *testing.T) {
	RequireRoot(t)
	var dirs []string
	var cmds []*exec.Cmd
	t.Run("inner", func(t *testing.T) {
		top := Cgroup(t)
		child := ChildCgroup(t, top, "child")
		grandchild := ChildCgroup(t, child, "grandchild")
		// A grandchild made by a subtest is removed when the subtest ends.
		t.Run("sub", func(t *testing.T) { ChildCgroup(t, top, "sub") })
		if _, err := os.Stat(filepath.Join(top, "sub")); !os.IsNotExist(err) {
			t.Errorf("cgroup of finished subtest still there: %v", err)
		}
		dirs = []string{top, child, grandchild}
		for _, d := range dirs {
			cmd := startIn(t, d)
			cmds = append(cmds, cmd)
			got, err := cgroups.OfPID(cmd.Process.Pid)
			if err != nil || got != d {
				t.Errorf("sleep in cgroup %q (%v), want %s", got, err, d)
			}
		}
		if !strings.HasPrefix(filepath.Base(top), "procgate-test-") {
			t.Errorf("cgroup %s not named procgate-test-*", top)
		}
	})
	for _, cmd := range cmds {
		err := cmd.Wait()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Errorf("sleep %d: %v, want killed by SIGKILL", cmd.Process.Pid, err)
		}
	}
	for _, d := range dirs {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("cgroup %s still there after cleanup: %v", d, err)
		}
	}
}

func TestCgroupsAreUnique(t *testing.T) {
	a, b := Cgroup(t), Cgroup(t)
	if a == b {
		t.Fatalf("two cgroups at %s", a)
	}
}

// nsIno returns the inode of the network namespace file at path.
func nsIno(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestNetNS(t *testing.T) {
	RequireRoot(t)
	// Lock so that the thread compared before and after is the same one.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	own := nsIno(t, "/proc/thread-self/ns/net")
	var path string
	t.Run("inner", func(t *testing.T) {
		path = NetNS(t)
		other := NetNS(t)
		ino := nsIno(t, path)
		if ino == own || ino == nsIno(t, other) {
			t.Errorf("netns %s (inode %d) is not new: own %d, other %d", path, ino, own, nsIno(t, other))
		}
		err := InNS(t, path, func() error {
			if got := nsIno(t, "/proc/thread-self/ns/net"); got != ino {
				t.Errorf("InNS runs in netns %d, want %d", got, ino)
			}
			out, err := exec.Command("readlink", "/proc/self/ns/net").Output()
			if err != nil {
				return err
			}
			if want := "net:[" + strconv.FormatUint(ino, 10) + "]"; strings.TrimSpace(string(out)) != want {
				t.Errorf("command started in InNS is in %s, want %s", out, want)
			}
			lo, err := net.InterfaceByName("lo")
			if err != nil {
				return err
			}
			if lo.Flags&net.FlagUp == 0 {
				t.Errorf("lo is down in %s", path)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if sentinel := errors.New("x"); InNS(t, path, func() error { return sentinel }) != sentinel {
			t.Error("InNS does not return fn's error")
		}
	})
	if got := nsIno(t, "/proc/thread-self/ns/net"); got != own {
		t.Errorf("test thread moved to netns %d, was %d", got, own)
	}
	if _, err := os.Stat(filepath.Dir(path)); !os.IsNotExist(err) {
		t.Errorf("netns dir %s still there after cleanup: %v", filepath.Dir(path), err)
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mounts), path) {
		t.Errorf("netns %s still mounted after cleanup", path)
	}
}

// dial connects to addr from inside nsPath.
func dial(t *testing.T, nsPath, addr string) error {
	t.Helper()
	return InNS(t, nsPath, func() error {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err
	})
}

// listen listens on addr inside nsPath and accepts until the test ends.
func listen(t *testing.T, nsPath, addr string) string {
	t.Helper()
	var l net.Listener
	if err := InNS(t, nsPath, func() (err error) { l, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return l.Addr().String()
}

func TestVeth(t *testing.T) {
	a, b := NetNS(t), NetNS(t)
	Veth(t, a, "va", b, "vb")
	for _, side := range []struct{ ns, link, addr string }{{a, "va", "192.0.2.1/24"}, {b, "vb", "192.0.2.2/24"}} {
		h := handle(t, side.ns)
		l, err := h.LinkByName(side.link)
		if err != nil {
			t.Fatalf("%s not in its netns: %v", side.link, err)
		}
		if l.Attrs().OperState != netlink.OperUp && l.Attrs().Flags&net.FlagUp == 0 {
			t.Errorf("%s is down", side.link)
		}
		addr, err := netlink.ParseAddr(side.addr)
		if err != nil {
			t.Fatal(err)
		}
		if err := h.AddrAdd(l, addr); err != nil {
			t.Fatal(err)
		}
		h.Close()
	}
	_, port, _ := net.SplitHostPort(listen(t, b, "192.0.2.2:0"))
	if err := dial(t, a, net.JoinHostPort("192.0.2.2", port)); err != nil {
		t.Errorf("connect across veth: %v", err)
	}
	if _, err := net.InterfaceByName("va"); err == nil {
		t.Error("veth end va appeared in the test's own netns")
	}
}

func TestAnyIPLoopback(t *testing.T) {
	dests := []string{"10.99.1.2", "fd00:1::5", "198.51.100.7"}
	plain, anyip := NetNS(t), NetNS(t)
	AnyIPLoopback(t, anyip)
	for _, ns := range []struct {
		path    string
		reaches bool
	}{{plain, false}, {anyip, true}} {
		_, port, _ := net.SplitHostPort(listen(t, ns.path, "[::]:0"))
		for _, d := range dests {
			err := dial(t, ns.path, net.JoinHostPort(d, port))
			if (err == nil) != ns.reaches {
				t.Errorf("connect to %s in %s (anyip %v): %v", d, ns.path, ns.reaches, err)
			}
		}
	}
}

func TestBPFFS(t *testing.T) {
	var dir string
	t.Run("inner", func(t *testing.T) {
		dir = BPFFS(t)
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		if st.Type != unix.BPF_FS_MAGIC {
			t.Errorf("%s has fs magic %#x, want bpffs %#x", dir, st.Type, unix.BPF_FS_MAGIC)
		}
		other := BPFFS(t)
		if err := os.Mkdir(filepath.Join(dir, "only-here"), 0o700); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(other, "only-here")); !os.IsNotExist(err) {
			t.Errorf("bpffs instances are shared: %v", err)
		}
	})
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("bpffs dir %s still there after cleanup: %v", dir, err)
	}
}
