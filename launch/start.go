package launch

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
)

// Spec says what to launch and how.
type Spec struct {
	App ruleset.App
	// CgroupDir is the app's cgroup. The process is created in it by clone3
	// with CLONE_INTO_CGROUP (Linux 5.7+), so no instruction of it runs
	// anywhere else.
	CgroupDir string
	// Argv[0] is looked up in the PATH of Env unless it contains a slash; a
	// relative path is taken from Dir.
	Argv []string
	Env  []string // the caller's environment; Start scrubs it (ScrubEnv)
	Dir  string   // working directory, entered as the caller; empty: "/"
	// Cred is the identity to run as; nil keeps this process' identity.
	Cred *Cred
	// Stdio are the process' stdin, stdout and stderr; nil entries are
	// /dev/null. Start does not close them.
	Stdio [3]*os.File
	// Tty: Stdio[0] is a terminal (a pty the caller relays), made the
	// controlling terminal of the app's new session, with the app in its
	// foreground: /dev/tty, job control and window size work.
	Tty bool
	// NetNS is a network namespace file to run in; empty inherits this
	// process' namespace.
	NetNS string
	// Caller, when set, is the process the app is launched for: the app
	// runs in its namespaces, root, working directory (Dir is ignored) and
	// umask (caller.go), and argv[0] is looked up and checked there. Start
	// does not close it.
	Caller *Caller
	// GuardGID is the real gid app processes run with so that no process
	// without CAP_SYS_PTRACE can trace them (guard.go); 0: no guard. An
	// app with `traceable: true` is never guarded, and neither is a user
	// whose own group is the guard gid: nobody could tell them apart.
	GuardGID uint32
	// Untraced, when set, is called before a process that will run
	// outside the trace guard starts, with why: the daemon attaches the
	// TCP handover guard's tracker for it, which the launch waits for. An
	// error fails the launch. For a Caller, whose binary the shim finds,
	// the shim refuses a script until Untraced has been called, and the
	// launch is then tried again.
	Untraced func(why string) error
}

// The status `procgate run` exits with when the app does not start, as a
// shell would (POSIX, "Command Search and Execution"; also env(1), chroot(1)
// and timeout(1)), so that it is never confused with the app's own status.
const (
	StatusFailed     = 125 // the launcher failed or refused
	StatusCannotExec = 126 // found, but not executable: permission, not one of the app's exe:
	StatusNotFound   = 127 // no such command
)

// Error is a launch failure with the status to report it with.
type Error struct {
	Status int
	Err    error
}

func (e *Error) Error() string { return e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// StatusOf is the exit status for a launch error: StatusFailed unless the
// error says the command was not found or could not be executed.
func StatusOf(err error) int {
	var e *Error
	if errors.As(err, &e) {
		return e.Status
	}
	return StatusFailed
}

// execStatus is the status for a failed execve(2), as a shell gives it.
func execStatus(err error) int {
	if errors.Is(err, syscall.ENOENT) {
		return StatusNotFound
	}
	return StatusCannotExec
}

// exeStatus is the status for a CheckExe refusal: the command is missing
// (or a dangling link), or it is there and may not run.
func exeStatus(err error) int {
	if errors.Is(err, fs.ErrNotExist) {
		return StatusNotFound
	}
	return StatusCannotExec
}

// scriptWhy is why a script runs without the trace guard.
const scriptWhy = "a script (#!): interpreters refuse or drop set-group-ID ids"

// Cred is a user identity: the caller's uid, gid and supplementary groups.
type Cred struct {
	UID, GID uint32
	Groups   []uint32
}

// defaultPath is searched when Env has no PATH, as execvp(3) would.
const defaultPath = "/usr/local/bin:/usr/bin:/bin"

// Process is a launched application process.
type Process struct {
	cmd     *exec.Cmd
	guarded bool
	why     string   // why not guarded
	pidfd   *os.File // for Relay's group signals; nil if none could be had
	tty     bool     // a job of the shim, in a session with a terminal
}

// Exit is how a process ended.
type Exit struct {
	Code   int            // exit status; 0 when killed by a signal
	Signal syscall.Signal // the signal that killed it, 0 when it exited
}

// ShellCode is the status a shell would report: 128+signal, or the code.
func (e Exit) ShellCode() int {
	if e.Signal != 0 {
		return 128 + int(e.Signal)
	}
	return e.Code
}

// Start checks and starts spec. The process runs in its own session, so
// that signals meant for the launcher's process group (a terminal's ^C, a
// daemon's stop) do not reach it; relay them with Signal. Its controlling
// terminal is Stdio[0] with Tty (a new pty), or none: taking the caller's
// own would take it from the caller.
func Start(spec Spec) (*Process, error) {
	p, err := start(spec, false)
	if err != nil && spec.Untraced != nil && strings.Contains(err.Error(), errScriptGuardOnly) {
		// Nothing of the app ran: the shim refused before its exec.
		if err := spec.Untraced(scriptWhy); err != nil {
			return nil, fmt.Errorf("launch app %s: %w", spec.App.Name, err)
		}
		return start(spec, true)
	}
	return p, err
}

// errScriptGuardOnly is the shim's refusal of a script while the launcher
// has not called Spec.Untraced (shimCaller.GuardOnly).
const errScriptGuardOnly = "a script runs outside the trace guard, not yet announced"

// start is Start; untraced: Spec.Untraced was called.
func start(spec Spec, untraced bool) (*Process, error) {
	if len(spec.Argv) == 0 || spec.Argv[0] == "" {
		return nil, fmt.Errorf("launch app %s: empty command", spec.App.Name)
	}
	if spec.CgroupDir == "" {
		return nil, fmt.Errorf("launch app %s: no cgroup", spec.App.Name)
	}
	env := ScrubEnv(spec.Env)
	dir := spec.Dir
	if dir == "" || spec.Caller != nil {
		dir = "/"
	}
	uid, gid := uint32(os.Geteuid()), uint32(os.Getegid())
	attr := &syscall.SysProcAttr{Setsid: true, UseCgroupFD: true}
	if spec.Tty {
		// TIOCSCTTY on the child's stdin, after setsid and before the shim
		// or the app runs; the new session's process group is then the
		// terminal's foreground one.
		attr.Setctty, attr.Ctty = true, 0
	}
	if spec.Cred != nil {
		uid, gid = spec.Cred.UID, spec.Cred.GID
		attr.Credential = &syscall.Credential{Uid: spec.Cred.UID, Gid: spec.Cred.GID, Groups: spec.Cred.Groups}
	}
	callerGID := gid
	gid, guarded, why := guardOf(spec, uid, gid)
	if gid != callerGID {
		if attr.Credential == nil {
			// Root from a guarded root process: reset every gid.
			attr.Credential = &syscall.Credential{Uid: uid, NoSetGroups: true}
		}
		attr.Credential.Gid = gid
	}
	// For a caller, the binary is found and checked in the caller's mount
	// namespace, by the shim.
	exe := spec.Argv[0]
	if spec.Caller == nil {
		path, err := lookPath(spec.Argv[0], env, dir)
		if err != nil {
			return nil, &Error{Status: StatusNotFound, Err: fmt.Errorf("launch app %s: %w", spec.App.Name, err)}
		}
		if exe, err = CheckExe(spec.App, path, uid); err != nil {
			return nil, &Error{Status: exeStatus(err), Err: err}
		}
		if guarded && isScript(exe) {
			// Interpreters treat a real gid apart from the effective one as a
			// set-group-ID run: Perl refuses its environment (taint mode: Debian's
			// psql is a Perl wrapper), bash and dash set their effective gid to
			// the guard's. Guarding a script breaks it or gains nothing.
			guarded, why = false, scriptWhy
		}
	}

	if !guarded && spec.Untraced != nil && !untraced {
		if err := spec.Untraced(why); err != nil {
			return nil, fmt.Errorf("launch app %s: %w", spec.App.Name, err)
		}
	}

	cg, err := os.OpenFile(spec.CgroupDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("launch app %s: open cgroup: %w", spec.App.Name, err)
	}
	defer cg.Close()
	attr.CgroupFD = int(cg.Fd())

	var stdio [3]*os.File
	for i, f := range spec.Stdio {
		if f == nil {
			if f, err = os.OpenFile(os.DevNull, os.O_RDWR, 0); err != nil {
				return nil, fmt.Errorf("launch app %s: %w", spec.App.Name, err)
			}
			defer f.Close()
		}
		stdio[i] = f
	}
	cmd := &exec.Cmd{
		Path:        exe,
		Args:        spec.Argv,
		Env:         env,
		Dir:         dir,
		Stdin:       stdio[0],
		Stdout:      stdio[1],
		Stderr:      stdio[2],
		SysProcAttr: attr,
	}
	var enter func() error
	switch {
	case spec.Caller != nil:
		if spec.NetNS != "" {
			return nil, fmt.Errorf("launch app %s: a caller's namespaces and NetNS %s at once", spec.App.Name, spec.NetNS)
		}
		// The shim enters the others itself; the pid namespace is where
		// the shim is born (caller.go).
		enter = func() error {
			if err := unix.Setns(int(spec.Caller.pidfd.Fd()), unix.CLONE_NEWPID); err != nil {
				return &Error{Status: StatusFailed, Err: fmt.Errorf("enter the pid namespace of the caller (pid %d) for the app (setns with a pidfd needs Linux 5.8+): %w", spec.Caller.pid, err)}
			}
			return nil
		}
	case spec.NetNS != "":
		ns, err := netns.GetFromPath(spec.NetNS)
		if err != nil {
			return nil, fmt.Errorf("launch app %s: open netns: %w", spec.App.Name, err)
		}
		defer ns.Close()
		enter = func() error {
			if err := netns.Set(ns); err != nil {
				return fmt.Errorf("enter netns %s: %w", spec.NetNS, err)
			}
			return nil
		}
	}
	// Last before the start: the shim's error pipe is closed by after.
	after := func(started error) (string, error) { return "", started }
	conf := ConfinementOf(spec.App)
	if guarded || spec.Caller != nil || spec.Tty {
		// The shim confines itself, last before its exec (guard.go), and
		// with a terminal stays to run the app as a job (job.go).
		a := shimArgs{uid: uid, gid: gid, rgid: gid, conf: conf, dir: dir, path: exe, argv: spec.Argv, tty: spec.Tty}
		if guarded {
			a.rgid = spec.GuardGID
		}
		var extra []*os.File
		if c := spec.Caller; c != nil {
			a.caller = &shimCaller{App: spec.App.Name, Exe: spec.App.Exe, Umask: c.umask,
				GuardOnly: spec.Untraced != nil && !untraced}
			extra = []*os.File{c.pidfd, c.root, c.cwd}
		}
		conf = Confinement{}
		if spec.Cred != nil {
			// The user's own group stays a supplementary one: access(2)
			// and faccessat test with the real gid, the guard's.
			a.groups = slices.Clone(spec.Cred.Groups)
			if !slices.Contains(a.groups, gid) {
				a.groups = append(a.groups, gid)
			}
		}
		cmd.SysProcAttr.Credential = nil // the shim sets them
		if after, err = shimCommand(cmd, a, extra...); err != nil {
			return nil, fmt.Errorf("launch app %s: %w", spec.App.Name, err)
		}
	}
	// Forked from a thread of its own: the child inherits that thread's
	// namespace and reduced capabilities, which no other goroutine ever
	// sees. With *os.File stdio, exec.Cmd starts no copying goroutines that
	// could run elsewhere.
	note, err := after(onConfinedThread(conf, enter, cmd.Start))
	if err != nil {
		return nil, &Error{Status: StatusOf(err), Err: fmt.Errorf("launch app %s: start %s in %s: %w", spec.App.Name, exe, spec.CgroupDir, err)}
	}
	if note != "" {
		guarded, why = false, note
	}
	p := &Process{cmd: cmd, guarded: guarded, why: why, tty: spec.Tty}
	// Opened while the child cannot have been reaped: it is the child's.
	if fd, err := unix.PidfdOpen(cmd.Process.Pid, 0); err == nil {
		p.pidfd = os.NewFile(uintptr(fd), "app-pidfd")
	}
	return p, nil
}

// isScript: does the file start with "#!"? The path is the user's: it is
// opened O_PATH first, so that a FIFO or a device swapped in after
// CheckExe is never opened for reading by root (a FIFO would block, some
// devices act on open), and read only if it is a regular file. Anything
// else, or unreadable: no.
func isScript(path string) bool {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return false
	}
	rfd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(fd), unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(rfd)
	var b [2]byte
	n, _ := unix.Read(rfd, b[:])
	return n == 2 && b == [2]byte{'#', '!'}
}

// Guarded says whether the process runs under the trace guard, and if not,
// why not.
func (p *Process) Guarded() (bool, string) { return p.guarded, p.why }

// lookPath finds file as execvp(3) would with env's PATH, except that a
// relative result is made absolute against dir, the child's working
// directory, rather than this process'.
func lookPath(file string, env []string, dir string) (string, error) {
	if strings.Contains(file, "/") {
		if !filepath.IsAbs(file) {
			file = filepath.Join(dir, file)
		}
		return file, nil
	}
	pathEnv := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathEnv = v
		}
	}
	for _, d := range filepath.SplitList(pathEnv) {
		if d == "" {
			d = "." // POSIX: an empty PATH entry is the working directory
		}
		if !filepath.IsAbs(d) {
			d = filepath.Join(dir, d)
		}
		p := filepath.Join(d, file)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: not found in PATH %s", file, pathEnv)
}

func (p *Process) closePidfd() {
	if p.pidfd != nil {
		p.pidfd.Close()
	}
}

// Pid is the process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Signal sends sig to the process. It goes through a pidfd, so it never
// reaches another process that reused the pid.
func (p *Process) Signal(sig syscall.Signal) error {
	if err := p.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("signal pid %d: %w", p.Pid(), err)
	}
	return nil
}

// pidfdSignalProcessGroup is PIDFD_SIGNAL_PROCESS_GROUP of
// pidfd_send_signal(2), Linux 6.9+ (include/uapi/linux/pidfd.h).
const pidfdSignalProcessGroup = 1 << 2

// Relay passes sig on as a terminal would: SIGINT, SIGQUIT, SIGTSTP,
// SIGCONT and SIGWINCH to the app's whole process group (a shell's pipeline,
// a sleep the app waits for: what ^C, ^Z and `fg` reach), the others to the
// process. Through the pidfd, so never to a group that took the pid after
// the app ended; before Linux 6.9 (no group flag) to the process alone.
func (p *Process) Relay(sig syscall.Signal) error {
	if sig == syscall.SIGTSTP && !p.tty {
		// Without a terminal the app leads a session of its own, an
		// orphaned process group, where the kernel discards SIGTSTP
		// (job.go): stop it for sure. With one, the shim passes SIGTSTP
		// on to the job, which may catch it (an editor restoring the
		// screen).
		sig = syscall.SIGSTOP
	}
	switch sig {
	case syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTSTP, syscall.SIGSTOP, syscall.SIGCONT, syscall.SIGWINCH:
		if p.pidfd == nil {
			break
		}
		raw, err := p.pidfd.SyscallConn()
		if err != nil {
			break // closed: the app has ended
		}
		var serr error
		if err := raw.Control(func(fd uintptr) {
			serr = unix.PidfdSendSignal(int(fd), sig, nil, pidfdSignalProcessGroup)
		}); err != nil || errors.Is(serr, unix.EINVAL) {
			break
		}
		if serr != nil {
			return fmt.Errorf("signal process group %d: %w", p.Pid(), serr)
		}
		return nil
	}
	return p.Signal(sig)
}

// WaitJob is Wait that also reports, as a shell's job control needs, each
// time the process stops (the stop signal: SIGTSTP, SIGTTIN, SIGTTOU,
// SIGSTOP) and continues (0), from the waiting goroutine.
func (p *Process) WaitJob(report func(stop syscall.Signal)) (Exit, error) {
	pid := p.Pid()
	for {
		var ws syscall.WaitStatus
		_, err := syscall.Wait4(pid, &ws, syscall.WUNTRACED|syscall.WCONTINUED, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return Exit{}, fmt.Errorf("wait pid %d: %w", pid, err)
		}
		switch {
		case ws.Stopped():
			report(ws.StopSignal())
			continue
		case ws.Continued():
			report(0)
			continue
		}
		// Reaped here, not by exec.Cmd: its pidfd goes, so that a later
		// Signal fails instead of reaching a process that took the pid.
		_ = p.cmd.Process.Release()
		p.closePidfd()
		if ws.Signaled() {
			return Exit{Signal: ws.Signal()}, nil
		}
		return Exit{Code: ws.ExitStatus()}, nil
	}
}

// Wait waits for the process to end and says how it did. The error is for
// failures to wait, not for a non-zero exit.
func (p *Process) Wait() (Exit, error) {
	err := p.cmd.Wait()
	p.closePidfd()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return Exit{}, fmt.Errorf("wait pid %d: %w", p.Pid(), err)
	}
	ws, ok := p.cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok {
		return Exit{Code: p.cmd.ProcessState.ExitCode()}, nil
	}
	if ws.Signaled() {
		return Exit{Signal: ws.Signal()}, nil
	}
	return Exit{Code: ws.ExitStatus()}, nil
}
