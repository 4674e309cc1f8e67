package bpf

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/internal/nstest"
)

// TestUninstallLeavesNothingAttached: once Uninstall has returned, none of
// the daemon's programs runs on its cgroup, even while another process
// holds a descriptor of a link (one leaked into a launched process); and a
// link that cannot be detached and that another process holds is reported
// with that process, not left attached behind a success.
func TestUninstallLeavesNothingAttached(t *testing.T) {
	for _, tc := range []struct {
		name string
		hold string // pin of the link a child process holds; "" for none
		// wantHeld: Uninstall fails, naming the holder.
		wantHeld bool
	}{
		{name: "no link held"},
		{name: "a cgroup link held", hold: "link_connect4"},
		{name: "a tracing link held", hold: "link_migrate_fork", wantHeld: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nstest.RequireRoot(t)
			cgroup := nstest.Cgroup(t)
			dir := filepath.Join(nstest.BPFFS(t), "procgate")
			e, err := Open(Options{BPFDir: dir, CgroupDir: cgroup, Log: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			if err := e.Attach(); err != nil {
				e.Close()
				t.Fatal(err)
			}
			if tc.hold == "link_migrate_fork" {
				for _, g := range e.Guards() {
					if g.Name == "cgroup-migration" && !g.Active {
						e.Close()
						t.Skipf("kernel feature missing: %s", g.Why)
					}
				}
			}
			e.Close()
			links := pinnedLinks(t, dir)
			if len(links) == 0 {
				t.Fatalf("no link pinned in %s", dir)
			}
			var holder *exec.Cmd
			if tc.hold != "" {
				holder = holdLink(t, filepath.Join(dir, tc.hold))
			}

			if tc.wantHeld {
				// Held until the test ends: no need for the whole wait.
				defer func(limit time.Duration) { releaseLimit = limit }(releaseLimit)
				releaseLimit = 300 * time.Millisecond
			}
			_, err = Uninstall(dir)

			cg, oerr := os.Open(cgroup)
			if oerr != nil {
				t.Fatal(oerr)
			}
			defer cg.Close()
			for _, l := range links {
				if l.Cgroup() == nil {
					continue
				}
				at := ebpf.AttachType(l.Cgroup().AttachType)
				q, qerr := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: at})
				if qerr != nil {
					t.Fatalf("query %s programs on %s: %v", at, cgroup, qerr)
				}
				if len(q.Programs) != 0 {
					t.Errorf("%s: %d programs still attached to the cgroup after Uninstall returned (%v)", at, len(q.Programs), err)
				}
			}
			if !tc.wantHeld {
				if err != nil {
					t.Fatalf("Uninstall: %v", err)
				}
				// Links that cannot be detached were waited for.
				for _, l := range links {
					if k, err := link.NewFromID(l.ID); l.Cgroup() == nil && err == nil {
						k.Close()
						t.Errorf("link %d (program %d) still exists after Uninstall returned", l.ID, l.Program)
					} else if err == nil {
						k.Close()
					}
				}
				return
			}
			want := fmt.Sprintf("pid %d (", holder.Process.Pid)
			if err == nil || !strings.Contains(err.Error(), "still attached") || !strings.Contains(err.Error(), want) {
				t.Fatalf("Uninstall with %s held by pid %d: got %v, want an error saying it is still attached, naming %q",
					tc.hold, holder.Process.Pid, err, want)
			}
			t.Logf("Uninstall: %v", err)
			if !strings.Contains(err.Error(), tc.hold) {
				t.Errorf("the error does not name the pin %s: %v", tc.hold, err)
			}
		})
	}
}

// pinnedLinks returns the info of every link pinned in dir.
func pinnedLinks(t *testing.T, dir string) []*link.Info {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var infos []*link.Info
	for _, ent := range ents {
		if !strings.HasPrefix(ent.Name(), "link_") {
			continue
		}
		l, err := link.LoadPinnedLink(filepath.Join(dir, ent.Name()), nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		infos = append(infos, info)
	}
	return infos
}

// holdLink starts a process that holds a descriptor of the link pinned at
// pin until the test ends, as a process that inherited one would.
func holdLink(t *testing.T, pin string) *exec.Cmd {
	t.Helper()
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fd, err := unix.FcntlInt(uintptr(l.(interface{ FD() int }).FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "link")
	defer f.Close()
	cmd := exec.Command("sleep", "600")
	cmd.ExtraFiles = []*os.File{f}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}
