package launch_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/launch"
	"github.com/procgate/procgate/ruleset"
)

// The test's users: the app runs as nobody with its own group; the guard
// gid is a group nobody is not in.
const (
	appUID, appGID = 65534, 65534
	guardGID       = 65533
)

func TestTraceGuardIDs(t *testing.T) {
	cg := nstest.Cgroup(t)
	// -p: a shell started with real and effective gids apart would
	// otherwise set its effective gid to the real one (TestTraceGuard).
	const show = "grep -E '^(Uid|Gid|Groups|CapBnd):' /proc/self/status; echo keep=$KEEP; pwd; exit 7"
	argv := []string{"/bin/sh", "-p", "-c", show}
	script := filepath.Join(t.TempDir(), "show")
	if err := os.WriteFile(script, []byte("#!/bin/sh -p\n"+show+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{filepath.Dir(script), filepath.Dir(filepath.Dir(script))} {
		if err := os.Chmod(d, 0o755); err != nil { // nobody runs it
			t.Fatal(err)
		}
	}
	tests := []struct {
		name        string
		app         ruleset.App
		cred        *launch.Cred
		guard       uint32
		uid         string // empty: the app's, appUID
		gid, groups string
		wantGuarded bool
		why         string // in the reason it is not guarded
		argv        []string
	}{
		{name: "user", app: ruleset.App{Name: "t"}, cred: &launch.Cred{UID: appUID, GID: appGID, Groups: []uint32{100}}, guard: guardGID,
			gid: "65533\t65534\t65534\t65534", groups: "100 65534", wantGuarded: true},
		{name: "root", app: ruleset.App{Name: "t"}, guard: guardGID, uid: "0\t0\t0\t0", gid: "65533\t0\t0\t0", wantGuarded: true},
		{name: "traceable", app: ruleset.App{Name: "t", Traceable: true}, cred: &launch.Cred{UID: appUID, GID: appGID}, guard: guardGID,
			gid: "65534\t65534\t65534\t65534", why: "traceable"},
		{name: "guard off", app: ruleset.App{Name: "t"}, cred: &launch.Cred{UID: appUID, GID: appGID}, gid: "65534\t65534\t65534\t65534", why: "off"},
		// Interpreters take mixed ids for a set-group-ID run (Perl's taint
		// mode): scripts are launched unguarded.
		{name: "script", app: ruleset.App{Name: "t"}, cred: &launch.Cred{UID: appUID, GID: appGID}, guard: guardGID,
			gid: "65534\t65534\t65534\t65534", why: "script", argv: []string{script}},
		// Unguarded, the guard gid of a guarded caller is still replaced.
		{name: "script, caller with the guard gid", app: ruleset.App{Name: "t"}, cred: &launch.Cred{UID: appUID, GID: guardGID}, guard: guardGID,
			gid: "65534\t65534\t65534\t65534", why: "script", argv: []string{script}},
		// A guarded shell's process asks with the guard gid as its gid:
		// the user's own group (passwd) takes its place.
		{name: "caller with the guard gid", app: ruleset.App{Name: "t"}, cred: &launch.Cred{UID: appUID, GID: guardGID}, guard: guardGID,
			gid: "65533\t65534\t65534\t65534", wantGuarded: true},
		// Nobody could tell the guard from the user's own group: unguarded.
		{name: "user whose group is the guard gid", app: ruleset.App{Name: "t"}, cred: &launch.Cred{UID: appUID, GID: appGID}, guard: appGID,
			gid: "65534\t65534\t65534\t65534", why: "guard gid"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			argv := argv
			if tt.argv != nil {
				argv = tt.argv
			}
			p, err := launch.Start(launch.Spec{App: tt.app, CgroupDir: cg, Argv: argv, Cred: tt.cred, GuardGID: tt.guard,
				Env: []string{"PATH=/usr/bin:/bin", "KEEP=1"},
				Dir: "/tmp", Stdio: [3]*os.File{nil, w, w}})
			w.Close()
			if err != nil {
				t.Fatal(err)
			}
			out := readAll(t, r)
			exit, err := p.Wait()
			if err != nil {
				t.Fatal(err)
			}
			if exit.Code != 7 {
				t.Errorf("exit %+v, want code 7 through the shim: %q", exit, out)
			}
			if guarded, why := p.Guarded(); guarded != tt.wantGuarded || !strings.Contains(why, tt.why) {
				t.Errorf("Guarded() = %v, %q; want %v, %q", guarded, why, tt.wantGuarded, tt.why)
			}
			// The shim sets the ids of the thread that execs the app
			// (shimIDs): the app has them all, real, effective, saved, fs.
			uid := tt.uid
			if uid == "" {
				uid = "65534\t65534\t65534\t65534"
			}
			if got := statusField(t, out, "Uid"); got != uid {
				t.Errorf("Uid %q, want %q", got, uid)
			}
			if got := statusField(t, out, "Gid"); got != tt.gid {
				t.Errorf("Gid %q, want %q", got, tt.gid)
			}
			if tt.groups != "" && statusField(t, out, "Groups") != tt.groups {
				t.Errorf("Groups %q, want %q", statusField(t, out, "Groups"), tt.groups)
			}
			// Confined either way: by the launcher's thread, or by the shim
			// itself last before its exec.
			if bnd, err := strconv.ParseUint(statusField(t, out, "CapBnd"), 16, 64); err != nil || bnd&(1<<unix.CAP_NET_RAW|1<<unix.CAP_SYS_PTRACE) != 0 {
				t.Errorf("CapBnd %s (%v): net_raw or sys_ptrace left", statusField(t, out, "CapBnd"), err)
			}
			// The shim starts with no environment; the app gets its own.
			if !strings.Contains(out, "\nkeep=1\n") {
				t.Errorf("the environment did not reach the app: %q", out)
			}
			if !strings.Contains(out, "\n/tmp\n") {
				t.Errorf("working directory not /tmp: %q", out)
			}
		})
	}
}

// TestTraceGuardRefuses: the shim's failures come back from Start, not as
// an exit status, and leave no process behind.
func TestTraceGuardRefuses(t *testing.T) {
	cg := nstest.Cgroup(t)
	private := t.TempDir() // 0700 root: nobody cannot enter it
	_, err := launch.Start(launch.Spec{App: ruleset.App{Name: "t"}, CgroupDir: cg, Argv: []string{"/bin/true"},
		Cred: &launch.Cred{UID: appUID, GID: appGID}, GuardGID: guardGID, Dir: private})
	if err == nil || !strings.Contains(err.Error(), "chdir "+private) || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("Start in a directory the user cannot enter: %v, want a chdir permission error", err)
	}
	procs, err := os.ReadFile(cg + "/cgroup.procs")
	if err != nil {
		t.Fatal(err)
	}
	if len(strings.TrimSpace(string(procs))) != 0 {
		t.Errorf("processes left in the app's cgroup: %q", procs)
	}
}

// traceTechniques are the ways into another process that the kernel checks
// with ptrace_may_access; each returns nil when it got in.
var traceTechniques = []struct {
	name string
	try  func(pid int) error
}{
	{"ptrace-seize", func(pid int) error { return unix.PtraceSeize(pid) }},
	{"process-vm-readv", func(pid int) error {
		buf := make([]byte, 8)
		// Address 4096 is never mapped: EFAULT means the access check passed.
		_, err := unix.ProcessVMReadv(pid, []unix.Iovec{{Base: &buf[0], Len: 8}}, []unix.RemoteIovec{{Base: 4096, Len: 8}}, 0)
		if errors.Is(err, unix.EFAULT) {
			return nil
		}
		return err
	}},
	{"proc-pid-mem", func(pid int) error {
		f, err := os.OpenFile(fmt.Sprintf("/proc/%d/mem", pid), os.O_RDWR, 0)
		if err == nil {
			f.Close()
		}
		return err
	}},
	{"pidfd-getfd", func(pid int) error {
		pfd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			return fmt.Errorf("pidfd_open: %w", err)
		}
		defer unix.Close(pfd)
		fd, err := unix.PidfdGetfd(pfd, 0, 0)
		if err == nil {
			unix.Close(fd)
		}
		return err
	}},
}

// TestTraceGuard tries every tracing technique on guarded and traceable app
// processes, from a process of the same user and from one of another app of
// the same user, and as that user after root took its ids (CAP_SETUID and
// CAP_SETGID kept, as for root started by procgate run).
func TestTraceGuard(t *testing.T) {
	// Yama refuses too at ptrace_scope >= 1: the guard's refusals would
	// then pass whether it works or not.
	if b, err := os.ReadFile("/proc/sys/kernel/yama/ptrace_scope"); err == nil && strings.TrimSpace(string(b)) != "0" {
		t.Skipf("Yama ptrace_scope %s refuses tracing by itself; the test needs 0 (or no Yama) to see the guard's own refusals", strings.TrimSpace(string(b)))
	}
	cg := nstest.Cgroup(t)
	type ids struct{ rgid, egid int }
	attackers := []struct {
		name string
		ids  ids
	}{
		{"same user", ids{appGID, appGID}},
		{"another app of the user", ids{guardGID, appGID}},
		{"root as the user, guard gid everywhere", ids{guardGID, guardGID}},
	}
	targets := []struct {
		name      string
		traceable bool
		argv      []string
		// in: the attackers that get in; every other one must not.
		in func(a ids, technique string) bool
	}{
		{name: "guarded", argv: []string{"/bin/sleep", "60"}, in: func(ids, string) bool { return false }},
		{name: "traceable", traceable: true, argv: []string{"/bin/sleep", "60"},
			in: func(a ids, technique string) bool {
				// /proc/PID/mem compares the effective gid: the user's.
				return a == ids{appGID, appGID} || (a == ids{guardGID, appGID} && technique == "proc-pid-mem")
			}},
		// A shell without -p sets its effective gid to the real one (the
		// guard's), and what it execs has the guard gid everywhere: the
		// user's other processes still cannot get in, but processes of
		// other guarded apps of the user can, through the real gid the
		// ptrace-style checks compare (/proc/PID/mem compares the
		// effective one). SECURITY.md says so.
		{name: "guarded, behind a shell", argv: []string{"/bin/sh", "-c", "exec /bin/sleep 60"},
			in: func(a ids, technique string) bool {
				return a == ids{guardGID, guardGID} || (a == ids{guardGID, appGID} && technique != "proc-pid-mem")
			}},
	}
	for _, tg := range targets {
		t.Run(tg.name, func(t *testing.T) {
			app := ruleset.App{Name: "t", Traceable: tg.traceable}
			p, err := launch.Start(launch.Spec{App: app, CgroupDir: cg, Argv: tg.argv,
				Cred: &launch.Cred{UID: appUID, GID: appGID}, GuardGID: guardGID})
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				_ = p.Signal(unix.SIGKILL)
				_, _ = p.Wait()
			}()
			waitExec(t, p.Pid(), "sleep")
			for _, a := range attackers {
				for _, tech := range traceTechniques {
					err := asUser(appUID, a.ids.rgid, a.ids.egid, func() error { return tech.try(p.Pid()) })
					blocked := errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES)
					if want := tg.in(a.ids, tech.name); want && err != nil {
						t.Errorf("%s by %s: %v, want it to get in", tech.name, a.name, err)
					} else if !want && !blocked {
						t.Errorf("%s by %s: %v, want EPERM or EACCES", tech.name, a.name, err)
					}
				}
			}
		})
	}
}

// asUser runs f on a thread of its own with uid and gids (real rgid,
// effective and saved egid) and no supplementary groups; the thread is
// discarded afterwards, so no other goroutine ever has these ids.
func asUser(uid, rgid, egid int, f func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		for _, c := range []struct {
			nr      uintptr
			a, b, d int
		}{
			{unix.SYS_SETGROUPS, 0, 0, 0},
			{unix.SYS_SETRESGID, rgid, egid, egid},
			{unix.SYS_SETRESUID, uid, uid, uid},
		} {
			// Raw per-thread calls: syscall.Set*id would change every thread.
			if _, _, e := unix.RawSyscall(c.nr, uintptr(c.a), uintptr(c.b), uintptr(c.d)); e != 0 {
				done <- fmt.Errorf("set ids (syscall %d): %w", c.nr, e)
				return
			}
		}
		done <- f()
	}()
	return <-done
}

// waitExec waits until pid runs the binary named comm (past the shim).
func waitExec(t *testing.T, pid int, comm string) {
	t.Helper()
	for range 500 {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil {
			t.Fatalf("pid %d: %v", pid, err)
		}
		if strings.TrimSpace(string(b)) == comm {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("pid %d never ran %s", pid, comm)
}

func readAll(t *testing.T, f *os.File) string {
	t.Helper()
	var sb strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := f.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			return sb.String()
		}
	}
}
