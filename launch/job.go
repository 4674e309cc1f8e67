package launch

import (
	"errors"
	"os"
	"os/signal"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// With a terminal (Spec.Tty), the shim does not become the app: it stays,
// as the leader of the app's session, and runs the app as a job of its
// own, in its own process group in the terminal's foreground, as a login
// shell runs a command. The app needs that for job control: the kernel
// discards a SIGTSTP, SIGTTIN or SIGTTOU of default action sent to an
// orphaned process group (kernel/signal.c, get_signal), and a session
// leader's own group, whose parent (the launcher) is in another session,
// is one; a group whose parent is in the same session (the shim) is not.
// So ^Z stops the app; the shim then stops itself (SIGSTOP, which is never
// discarded), which the launcher sees (Process.WaitJob) and reports, and
// the SIGCONT that continues the shim is passed on to the job. The job's
// end is the shim's: the same code, or the same signal raised again. The
// shim runs with the app's ids and confinement by then, and is as
// untraceable as the app.

// jobSignals are the signals the shim passes on to the job.
var jobSignals = []os.Signal{syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTSTP, syscall.SIGCONT, syscall.SIGWINCH,
	syscall.SIGHUP, syscall.SIGTERM, syscall.SIGUSR1, syscall.SIGUSR2}

// shimJob starts the job and mirrors it until it ends; it returns only on
// failure to start it.
func shimJob(a shimArgs, env []string, errPipe *os.File, fail func(int, string, ...any) int) int {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, jobSignals...)
	// Forked from this, the locked, confined thread: the job inherits its
	// bounding set, no_new_privs, namespaces, root and working directory.
	pid, err := syscall.ForkExec(a.path, a.argv, &syscall.ProcAttr{
		Env:   env,
		Files: []uintptr{0, 1, 2},
		Sys:   &syscall.SysProcAttr{Foreground: true, Ctty: 0}, // a new group, in the foreground
	})
	if err != nil {
		return fail(execStatus(err), "exec %s: %v", a.path, err)
	}
	errPipe.Close() // end of file: the binary was executed
	var pidfd int = -1
	if fd, err := unix.PidfdOpen(pid, 0); err == nil { // not reaped yet: the job's
		pidfd = fd
	}
	type event struct {
		ws  syscall.WaitStatus
		err error
	}
	events := make(chan event)
	go func() {
		for {
			var ws syscall.WaitStatus
			_, err := syscall.Wait4(pid, &ws, syscall.WUNTRACED|syscall.WCONTINUED, nil)
			if errors.Is(err, syscall.EINTR) {
				continue
			}
			events <- event{ws, err}
			if err != nil || ws.Exited() || ws.Signaled() {
				return
			}
		}
	}()
	for {
		select {
		case sig := <-sigs:
			signalJob(pid, pidfd, sig.(syscall.Signal))
		case ev := <-events:
			switch {
			case ev.err != nil:
				return 125
			case ev.ws.Stopped():
				// Continued by a SIGCONT, which sigs passes on.
				_ = syscall.Kill(os.Getpid(), syscall.SIGSTOP)
			case ev.ws.Exited():
				return ev.ws.ExitStatus()
			case ev.ws.Signaled():
				signal.Reset()
				raiseDefault(ev.ws.Signal())
				return 128 + int(ev.ws.Signal())
			}
		}
	}
}

// signalJob passes sig on: the signals a terminal sends to the job's whole
// process group, the others to the job's process.
func signalJob(pid, pidfd int, sig syscall.Signal) {
	switch sig {
	case syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTSTP, syscall.SIGCONT, syscall.SIGWINCH, syscall.SIGHUP:
		if pidfd >= 0 {
			err := unix.PidfdSendSignal(pidfd, sig, nil, pidfdSignalProcessGroup)
			if !errors.Is(err, unix.EINVAL) {
				return
			}
		}
		// Before Linux 6.9: by group id, the job's pid, which stays the
		// job's until this process reaps it.
		_ = syscall.Kill(-pid, sig)
		return
	}
	if pidfd >= 0 {
		_ = unix.PidfdSendSignal(pidfd, sig, nil, 0)
		return
	}
	_ = syscall.Kill(pid, sig)
}

// raiseDefault ends this process by sig with the kernel's default action.
// The Go runtime keeps handlers for some signals even after signal.Reset,
// so the action is reset with rt_sigaction itself.
func raiseDefault(sig syscall.Signal) {
	act := struct {
		handler  uintptr // SIG_DFL
		flags    uint64
		restorer uintptr
		mask     uint64
	}{}
	_, _, _ = syscall.RawSyscall6(syscall.SYS_RT_SIGACTION, uintptr(sig), uintptr(unsafe.Pointer(&act)), 0, 8, 0, 0)
	_ = syscall.Kill(os.Getpid(), sig)
	time.Sleep(100 * time.Millisecond) // a signal whose default is to ignore falls through
}
