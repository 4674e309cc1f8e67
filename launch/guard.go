package launch

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
	"github.com/procgate/procgate/users"
)

// The trace guard keeps other processes of the same user from tracing an
// app process: ptrace, process_vm_readv/writev, /proc/PID/mem and
// pidfd_getfd all go through the kernel's ptrace_may_access(), which lets a
// caller without CAP_SYS_PTRACE in only when its one gid equals the
// target's real, effective and saved gid alike. An app process runs with
// the guard gid as its real gid and the user's group as its effective and
// saved gid: no caller's gid equals both, so nobody without CAP_SYS_PTRACE
// gets in, not even a process of the same user or root that became that
// user. The exec that follows sees real and effective gids differ, so the
// kernel also makes the process non-dumpable (a second lock on the same
// door) and sets AT_SECURE: the dynamic loader ignores LD_* and glibc's
// other unsafe variables, which ScrubEnv removes anyway. Files the app
// creates keep the user's group: they take the effective gid. Kernel
// assumptions: __ptrace_may_access's gid test and begin_new_exec's
// dumpability rule are unchanged since Linux 2.6; this was checked on 6.18.
//
// The credentials are set by a shim: the launcher re-executes itself in
// the app's cgroup as root and the shim sets the ids, enters the working
// directory as the user and execs the binary. exec.Cmd cannot do it alone:
// its child sets one gid for all three. The shim also takes the app's
// confinement (dropped capabilities, no_new_privs) itself, last before the
// exec: until then it holds every capability the launcher holds, so that
// a caller without them (root started by procgate run in another app,
// which keeps CAP_SETUID and CAP_SETGID) fails ptrace_may_access's
// capability test for the whole window in which the shim still runs with
// root's ids.

// guardOf decides whether spec's process runs under the trace guard (and
// if not, why not), for a caller of uid and gid, and with which gid: a
// caller that is itself a guarded process whose shell set its effective
// gid to the real one (the guard's) asks with the guard gid, and gets the
// user's own group instead, guarded or not, or what it starts would have
// the guard gid everywhere. Only a user whose own group is the guard gid
// cannot be guarded: nobody could tell the two apart. Scripts are decided
// later (isScript), once the binary is known.
func guardOf(spec Spec, uid, gid uint32) (uint32, bool, string) {
	guarded, why := true, ""
	switch {
	case spec.GuardGID == 0:
		guarded, why = false, "trace guard off"
	case spec.App.Traceable:
		guarded, why = false, "app is traceable: true"
	}
	if spec.GuardGID == 0 || gid != spec.GuardGID {
		return gid, guarded, why
	}
	pg, err := primaryGID(uid)
	switch {
	case err != nil:
		return gid, false, fmt.Sprintf("the caller's gid is the guard gid, and its own group is unknown: %v", err)
	case pg == spec.GuardGID:
		return gid, false, "the user's group is the guard gid"
	}
	return pg, guarded, why
}

// primaryGID is uid's group in the user database, NSS included.
func primaryGID(uid uint32) (uint32, error) {
	u, err := users.LookupUID(uid)
	if err != nil {
		return 0, err
	}
	return u.GID, nil
}

// shimArg0 is argv[0] of the launcher re-executed as the shim. The init
// function below runs the shim before main or a test starts. The inits of
// the packages initialised before this one (in procgate: cilium/ebpf,
// netlink, nftables, protobuf, policy and others) have run by then, as
// root in the app's cgroup with the app's environment (loader variables
// scrubbed; the Go runtime's GODEBUG, GOTRACEBACK, GOMAXPROCS and
// GOMEMLIMIT kept) if it had one: it is started with an empty one, and
// the app's comes over a pipe (shimEnvFd) for the exec.
const shimArg0 = "procgate-launch-shim"

// shimErrFd is the shim's descriptor for the error pipe: close-on-exec, so
// the launcher reads end-of-file when the binary was executed and the
// reason otherwise.
const shimErrFd = 3

// shimEnvFd is the shim's descriptor for the app's environment, written
// by the launcher (NUL-terminated entries) and closed after reading.
const shimEnvFd = 4

// In a launch for a Caller (caller.go), the shim also gets the caller's
// pidfd, root and working directory, to enter them before anything else.
const (
	shimPidFd  = 5
	shimRootFd = 6
	shimCwdFd  = 7
)

// maxShimEnv bounds the environment the shim reads (the kernel's limit
// for an exec's arguments and environment is of this order).
const maxShimEnv = 8 << 20

func init() {
	if len(os.Args) > 1 && os.Args[0] == shimArg0 {
		os.Exit(runShim(os.Args[1:]))
	}
}

// shimArgs is what the shim is told: ids, groups ("-" keeps the current
// ones), the confinement, the caller to enter ("-": none), the working
// directory, the binary and its argv.
type shimArgs struct {
	uid, gid, rgid uint32
	groups         []uint32 // nil: keep
	conf           Confinement
	caller         *shimCaller // nil: no caller's namespaces to enter
	tty            bool        // stdin is the controlling terminal: run the app as a job (shimJob)
	dir, path      string
	argv           []string
}

// shimOpts is the shim's argument for what not every launch has ("-":
// nothing of it).
type shimOpts struct {
	Caller *shimCaller `json:"caller,omitempty"`
	Tty    bool        `json:"tty,omitempty"`
}

// shimCaller is what the shim needs to launch in a caller's world: the
// binary is looked up and checked there (lookPath, CheckExe), since the
// caller's mount namespace may show another file at the same path than the
// launcher's; path is then argv[0] as the caller gave it, dir unused.
type shimCaller struct {
	App   string        `json:"app"`
	Exe   []ruleset.Exe `json:"exe,omitempty"`
	Umask uint32        `json:"umask"`
	// GuardOnly: the launcher has not announced a process outside the
	// trace guard (Spec.Untraced), so a script is refused
	// (errScriptGuardOnly) rather than run without the guard.
	GuardOnly bool `json:"guard_only,omitempty"`
}

func (a shimArgs) encode() []string {
	groups := "-"
	if a.groups != nil {
		s := make([]string, len(a.groups))
		for i, g := range a.groups {
			s[i] = strconv.FormatUint(uint64(g), 10)
		}
		groups = "," + strings.Join(s, ",") // never empty, so an empty list survives
	}
	nnp := "0"
	if a.conf.NoNewPrivs {
		nnp = "1"
	}
	caller := "-"
	if a.caller != nil || a.tty {
		b, _ := json.Marshal(shimOpts{Caller: a.caller, Tty: a.tty}) // strings, numbers: cannot fail
		caller = string(b)
	}
	out := []string{shimArg0,
		strconv.FormatUint(uint64(a.uid), 10), strconv.FormatUint(uint64(a.gid), 10),
		strconv.FormatUint(uint64(a.rgid), 10), groups, "," + strings.Join(a.conf.Drop, ","), nnp, caller, a.dir, a.path}
	return append(out, a.argv...)
}

func decodeShimArgs(args []string) (shimArgs, error) {
	if len(args) < 10 {
		return shimArgs{}, fmt.Errorf("want at least 10 arguments, got %d", len(args))
	}
	var a shimArgs
	ids := []*uint32{&a.uid, &a.gid, &a.rgid}
	for i, p := range ids {
		v, err := strconv.ParseUint(args[i], 10, 32)
		if err != nil {
			return shimArgs{}, fmt.Errorf("id %q: %w", args[i], err)
		}
		*p = uint32(v)
	}
	if g := args[3]; g != "-" {
		a.groups = []uint32{}
		for _, s := range strings.Split(strings.TrimPrefix(g, ","), ",") {
			if s == "" {
				continue
			}
			v, err := strconv.ParseUint(s, 10, 32)
			if err != nil {
				return shimArgs{}, fmt.Errorf("group %q: %w", s, err)
			}
			a.groups = append(a.groups, uint32(v))
		}
	}
	for _, c := range strings.Split(strings.TrimPrefix(args[4], ","), ",") {
		if c == "" {
			continue
		}
		if _, ok := capNumbers[c]; !ok {
			return shimArgs{}, fmt.Errorf("capability %q", c)
		}
		a.conf.Drop = append(a.conf.Drop, c)
	}
	switch args[5] {
	case "0":
	case "1":
		a.conf.NoNewPrivs = true
	default:
		return shimArgs{}, fmt.Errorf("no_new_privs %q", args[5])
	}
	if c := args[6]; c != "-" {
		var o shimOpts
		dec := json.NewDecoder(strings.NewReader(c))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&o); err != nil {
			return shimArgs{}, fmt.Errorf("options %q: %w", c, err)
		}
		a.caller, a.tty = o.Caller, o.Tty
	}
	a.dir, a.path, a.argv = args[7], args[8], args[9:]
	return a, nil
}

// runShim becomes the app: it returns only on failure, after writing why
// on the error pipe: the status `procgate run` exits with (StatusOf), a
// space and the message.
func runShim(args []string) int {
	errPipe := os.NewFile(shimErrFd, "launch-errors")
	fail := func(status int, format string, v ...any) int {
		fmt.Fprintf(errPipe, "%d "+format, append([]any{status}, v...)...)
		return status
	}
	a, err := decodeShimArgs(args)
	if err != nil {
		return fail(StatusFailed, "launch shim: %v", err)
	}
	envPipe := os.NewFile(shimEnvFd, "launch-env")
	raw, err := io.ReadAll(io.LimitReader(envPipe, maxShimEnv))
	envPipe.Close()
	if err != nil {
		return fail(StatusFailed, "launch shim: read the environment: %v", err)
	}
	var env []string
	for _, kv := range strings.Split(string(raw), "\x00") {
		if kv != "" {
			env = append(env, kv)
		}
	}
	// Bounding set, no_new_privs, the fs_struct (root, working directory,
	// umask) and namespaces entered by setns are per thread: this one
	// takes them and execs.
	runtime.LockOSThread()
	// Nothing the daemon holds is the app's: not the caller's pidfd, root
	// and working directory, nor a descriptor the daemon itself inherited
	// without close-on-exec (from its unit, its shell). The app gets its
	// stdio only. close_range(CLOSE_RANGE_CLOEXEC) needs Linux 5.11+; the
	// descriptors stay usable here until the exec. Root's own launches
	// (no caller) keep its descriptors, as any exec does.
	if a.caller != nil {
		if err := unix.CloseRange(3, math.MaxUint32, unix.CLOSE_RANGE_CLOEXEC); err != nil {
			return fail(StatusFailed, "mark the daemon's descriptors close-on-exec: %v", err)
		}
	}
	if a.caller != nil {
		var msg string
		if a.path, a.rgid, msg, err = enterCaller(a, env); err != nil {
			return fail(StatusOf(err), "%v", err)
		}
		if msg != "" {
			// Not an error: a note for the launcher's log, before the exec.
			fmt.Fprintf(errPipe, "+%s\n", msg)
		}
	}
	ids := shimIDs(a.tty)
	if a.groups != nil {
		gs := make([]int, len(a.groups))
		for i, g := range a.groups {
			gs[i] = int(g)
		}
		if err := ids.setgroups(gs); err != nil {
			return fail(StatusFailed, "set supplementary groups: %v", err)
		}
	}
	if err := ids.setresgid(int(a.rgid), int(a.gid), int(a.gid)); err != nil {
		return fail(StatusFailed, "set gids (real %d, effective and saved %d): %v", a.rgid, a.gid, err)
	}
	// Last while root (dropping from the bounding set needs CAP_SETPCAP).
	if err := confineThread(a.conf); err != nil {
		return fail(StatusFailed, "confine: %v", err)
	}
	if err := ids.setresuid(int(a.uid), int(a.uid), int(a.uid)); err != nil {
		return fail(StatusFailed, "set uid %d: %v", a.uid, err)
	}
	// Entered as the user: the search permission is the user's.
	if a.caller != nil {
		if err := syscall.Fchdir(shimCwdFd); err != nil {
			return fail(StatusFailed, "chdir to the caller's working directory: %v", err)
		}
	} else if err := syscall.Chdir(a.dir); err != nil {
		return fail(StatusFailed, "chdir %s: %v", a.dir, err)
	}
	if _, err := unix.FcntlInt(shimErrFd, unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
		return fail(StatusFailed, "error pipe: %v", err)
	}
	if a.tty {
		return shimJob(a, env, errPipe, fail)
	}
	err = syscall.Exec(a.path, a.argv, env)
	return fail(execStatus(err), "exec %s: %v", a.path, err)
}

// idCalls are the calls that give the shim the app's groups and ids.
type idCalls struct {
	setgroups            func(gids []int) error
	setresgid, setresuid func(r, e, s int) error
}

// shimIDs: the shim's id calls. A shim that execs the app next changes
// its own, locked thread only (raw system calls), as it does its bounding
// set and no_new_privs: the exec runs on that thread and ends the others,
// and the change of ids makes the process non-dumpable until then, so
// the user cannot trace a thread left with root's ids. syscall's set*id
// calls change every thread instead, by stopping the world and signalling
// each thread of the runtime in turn while the caller spins: on a loaded
// machine each call waits for every thread to be scheduled, which held
// `procgate run` for 100-450 ms while a policy reload kept both CPUs of a
// 2-CPU host busy. A shim that stays to run the app as a job (tty) goes
// on running Go code, on any thread: every thread must change.
func shimIDs(stays bool) idCalls {
	if stays {
		return idCalls{syscall.Setgroups, syscall.Setresgid, syscall.Setresuid}
	}
	return idCalls{unix.Setgroups, threadSetres(sysSetresgid), threadSetres(sysSetresuid)}
}

// threadSetres is setresuid(2) or setresgid(2), nr, on this thread only.
func threadSetres(nr uintptr) func(r, e, s int) error {
	return func(r, e, s int) error {
		if _, _, errno := unix.RawSyscall(nr, uintptr(r), uintptr(e), uintptr(s)); errno != 0 {
			return errno
		}
		return nil
	}
}

// enterCaller moves the shim's thread into the caller's world (caller.go):
// its namespaces, root, working directory and umask; then finds argv[0] and
// checks it there. It returns the binary, the real gid to run with (the
// guard's, or gid for a script) and why the guard is off, if it is.
func enterCaller(a shimArgs, env []string) (path string, rgid uint32, why string, err error) {
	failed := func(format string, v ...any) error {
		return &Error{Status: StatusFailed, Err: fmt.Errorf(format, v...)}
	}
	// setns(CLONE_NEWNS) wants a thread whose fs_struct is its own; Go's
	// threads share one (CLONE_FS).
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return "", 0, "", failed("unshare the fs_struct: %v", err)
	}
	if err := unix.Setns(shimPidFd, callerNS); err != nil {
		return "", 0, "", failed("enter the caller's namespaces (net, mnt, uts, ipc, cgroup; setns with a pidfd needs Linux 5.8+): %v", err)
	}
	// setns of a mount namespace puts root and working directory at its
	// root; the caller may be below (chroot).
	if err := unix.Fchdir(shimRootFd); err != nil {
		return "", 0, "", failed("enter the caller's root directory: %v", err)
	}
	if err := unix.Chroot("."); err != nil {
		return "", 0, "", failed("enter the caller's root directory: %v", err)
	}
	unix.Close(shimRootFd)
	if err := unix.Fchdir(shimCwdFd); err != nil {
		return "", 0, "", failed("enter the caller's working directory: %v", err)
	}
	unix.Umask(int(a.caller.Umask))
	dir, err := unix.Getwd()
	if err != nil {
		return "", 0, "", failed("the caller's working directory is outside its root: %v", err)
	}
	app := ruleset.App{Name: a.caller.App, Exe: a.caller.Exe}
	found, err := lookPath(a.path, env, dir)
	if err != nil {
		return "", 0, "", &Error{Status: StatusNotFound, Err: fmt.Errorf("launch app %s: %w", app.Name, err)}
	}
	exe, err := CheckExe(app, found, a.uid)
	if err != nil {
		return "", 0, "", &Error{Status: exeStatus(err), Err: err}
	}
	rgid = a.rgid
	if rgid != a.gid && isScript(exe) {
		if a.caller.GuardOnly {
			return "", 0, "", failed("%s", errScriptGuardOnly)
		}
		rgid, why = a.gid, scriptWhy
	}
	return exe, rgid, why, nil
}

// shimTimeout bounds the shim's run from start to exec (a Go runtime start
// and a few system calls: milliseconds).
const shimTimeout = 30 * time.Second

// shimCommand turns cmd, which would exec path as argv, into one that runs
// the shim, with extra as its descriptors from shimPidFd on; the returned
// function must be called after cmd.Start: it closes the launcher's end of
// the error pipe and says whether the binary was executed, and the shim's
// note if it left one (why the guard is off).
func shimCommand(cmd *exec.Cmd, a shimArgs, extra ...*os.File) (after func(started error) (string, error), err error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("launch shim's error pipe: %w", err)
	}
	envR, envW, err := os.Pipe()
	if err != nil {
		r.Close()
		w.Close()
		return nil, fmt.Errorf("launch shim's environment pipe: %w", err)
	}
	env := cmd.Env
	cmd.Path = "/proc/self/exe"
	cmd.Args = a.encode()
	cmd.Dir = "" // entered by the shim, as the user
	// Not nil: nil would hand the launcher's own environment on.
	cmd.Env = []string{}
	cmd.ExtraFiles = append([]*os.File{w, envR}, extra...)
	return func(started error) (string, error) {
		w.Close()
		envR.Close()
		defer r.Close()
		if started != nil {
			envW.Close()
			return "", started
		}
		// Written aside: more than a pipe's buffer would block until the
		// shim reads; a shim that died early makes the writes fail.
		go func() {
			defer envW.Close()
			var b strings.Builder
			for _, kv := range env {
				b.WriteString(kv)
				b.WriteByte(0)
			}
			_, _ = io.WriteString(envW, b.String())
		}()
		// A shim stopped by its user (SIGSTOP, once it runs as the user)
		// must not hold the launcher forever.
		_ = r.SetReadDeadline(time.Now().Add(shimTimeout))
		msg, err := io.ReadAll(io.LimitReader(r, 4096))
		if err != nil {
			_ = cmd.Process.Kill()
			// Reaped aside: a shim stuck in an uninterruptible wait (a
			// hung NFS working directory) must not hold the launcher.
			go func() { _ = cmd.Wait() }()
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return "", fmt.Errorf("launch shim did not exec %s within %v (killed)", a.path, shimTimeout)
			}
			return "", fmt.Errorf("read the launch shim's error pipe (shim killed): %w", err)
		}
		note, failure := "", string(msg)
		if n, ok := strings.CutPrefix(failure, "+"); ok {
			note, failure, _ = strings.Cut(n, "\n")
		}
		if failure == "" {
			return note, nil
		}
		_ = cmd.Wait() // the shim exits right after writing
		return note, shimError(failure)
	}, nil
}

// shimError turns the shim's "STATUS message" into an Error.
func shimError(msg string) error {
	code, text, ok := strings.Cut(msg, " ")
	status, err := strconv.Atoi(code)
	if !ok || err != nil || status < StatusFailed || status > StatusNotFound {
		return &Error{Status: StatusFailed, Err: fmt.Errorf("launch shim: %s", msg)}
	}
	return &Error{Status: status, Err: errors.New(text)}
}

// yamaScope is where Yama says who may trace whom.
const yamaScope = "/proc/sys/kernel/yama/ptrace_scope"

// TraceGuard describes the trace guard with guard gid gid (0: off) for the
// start-up log and `procgate status`.
func TraceGuard(gid uint32) (what string, active bool, why string) {
	what = "no ptrace, process_vm_readv/writev, /proc/PID/mem or pidfd_getfd of launched app processes by processes without CAP_SYS_PTRACE, same user included (real gid --guard-gid; not for apps with traceable: true, scripts, or users whose group is that gid)"
	if gid != 0 {
		return what, true, ""
	}
	b, err := os.ReadFile(yamaScope)
	return what, false, tracingWhy(strings.TrimSpace(string(b)), err)
}

// tracingWhy says what stands in for the guard when it is off: Yama's
// ptrace_scope, as read from yamaScope.
func tracingWhy(scope string, err error) string {
	why := "off (--guard-gid off); root started by procgate run still has no CAP_SYS_PTRACE"
	switch {
	case err != nil:
		return why + "; no Yama here: processes of an app's own uid can trace it"
	case scope == "0":
		return why + "; Yama ptrace_scope is 0: processes of an app's own uid can trace it (set kernel.yama.ptrace_scope=1)"
	default:
		return why + "; Yama ptrace_scope " + scope + " stops processes of an app's uid that are not its ancestors"
	}
}
