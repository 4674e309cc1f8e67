package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/internal/nstest"
)

// ptyApp checks what an interactive program needs: a terminal on stdin, a
// /dev/tty to prompt on (as ssh, sudo and pinentry do), the window size
// and its changes, and job control (stopped by ^Z with the sleep it waits
// for, continued by fg). It exits 3.
const ptyApp = `[ -t 0 ] && echo "isatty=yes"
echo "size=$(stty size)"
stty -echo </dev/tty; printf 'password: ' >/dev/tty
read -r s </dev/tty; stty echo </dev/tty
echo "got=$s"
w=; trap 'w=1; echo "winch=$(stty size)"' WINCH
echo waiting-winch
while [ -z "$w" ]; do sleep 0.05; done
c=; trap 'c=1' CONT
echo waiting-stop
while [ -z "$c" ]; do sleep 0.05; done
echo continued
exit 3`

// terminal is the test's side of the caller's terminal: what the app
// wrote, collected.
type terminal struct {
	ptmx *os.File
	mu   sync.Mutex
	out  bytes.Buffer
}

func (term *terminal) read() {
	buf := make([]byte, 4096)
	for {
		n, err := term.ptmx.Read(buf)
		term.mu.Lock()
		term.out.Write(buf[:n])
		term.mu.Unlock()
		if err != nil {
			return
		}
	}
}

func (term *terminal) text() string {
	term.mu.Lock()
	defer term.mu.Unlock()
	return term.out.String()
}

func (term *terminal) waitFor(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second) // a guard against hanging, not a timing assertion
	for !strings.Contains(term.text(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("terminal never showed %q:\n%s", want, term.text())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func termios(t *testing.T, f *os.File) *unix.Termios {
	t.Helper()
	tio, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	return tio
}

// TestRunPty: `procgate run` from a terminal (a pty of the test's, the
// controlling terminal of procgate's session) gives the app a terminal of
// its own with /dev/tty, the window size and its changes, and job control;
// the caller's terminal is raw only while the app runs. As a user through
// the daemon and as root directly.
func TestRunPty(t *testing.T) {
	nstest.RequireRoot(t)
	e := newE2EIn(t, callerPolicy, nstest.NetNS(t), true, "--guard-gid", "65533")
	for _, tc := range []struct {
		name string
		cred *syscall.Credential
		app  string
	}{
		{"user, through the daemon", nobody, "shell"},
		{"root, directly", nil, "shell"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ptmx, tty, err := pty.Open()
			if err != nil {
				t.Fatal(err)
			}
			defer ptmx.Close()
			defer tty.Close()
			if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 40, Cols: 100}); err != nil {
				t.Fatal(err)
			}
			cooked := termios(t, tty)
			term := &terminal{ptmx: ptmx}
			go term.read()

			cmd := exec.Command(e.bin, "--socket", e.socket, "run", "--app", tc.app, "--", "sh", "-c", ptyApp)
			cmd.Env = append(os.Environ(), envAsMain+"=1")
			cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
			cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0, Credential: tc.cred}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := false
			defer func() {
				if !done {
					_ = cmd.Process.Kill()
					_ = cmd.Wait()
				}
			}()

			term.waitFor(t, "password: ")
			for _, want := range []string{"isatty=yes", "size=40 100"} {
				if !strings.Contains(term.text(), want) {
					t.Errorf("terminal lacks %q:\n%s", want, term.text())
				}
			}
			if tio := termios(t, tty); tio.Lflag&(unix.ICANON|unix.ECHO) != 0 {
				t.Errorf("the caller's terminal is not raw while the app runs: lflag %#x", tio.Lflag)
			}
			if _, err := ptmx.Write([]byte("hunter2\r")); err != nil {
				t.Fatal(err)
			}
			term.waitFor(t, "got=hunter2")
			if strings.Count(term.text(), "hunter2") != 1 {
				t.Errorf("the password was echoed although the app turned echo off:\n%s", term.text())
			}

			term.waitFor(t, "waiting-winch")
			if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 50, Cols: 120}); err != nil {
				t.Fatal(err)
			}
			term.waitFor(t, "winch=50 120")

			// ^Z: the app stops, then procgate stops itself and gives the
			// terminal back cooked; SIGCONT (a shell's fg) continues both.
			term.waitFor(t, "waiting-stop")
			if _, err := ptmx.Write([]byte{0x1a}); err != nil {
				t.Fatal(err)
			}
			var ws syscall.WaitStatus
			waited := make(chan error, 1)
			go func() {
				_, err := syscall.Wait4(cmd.Process.Pid, &ws, syscall.WUNTRACED, nil)
				waited <- err
			}()
			select {
			case err := <-waited:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second): // a guard against hanging, not a timing assertion
				states := procStates(append([]int{cmd.Process.Pid}, cgroupPids(e, tc.app)...))
				_ = cmd.Process.Kill()
				<-waited
				t.Fatalf("procgate did not stop within 10s of ^Z (processes: %s):\n%s", states, term.text())
			}
			if !ws.Stopped() {
				t.Fatalf("procgate %v, want stopped after ^Z\n%s", ws, term.text())
			}
			if tio := termios(t, tty); tio.Lflag != cooked.Lflag || tio.Iflag != cooked.Iflag || tio.Oflag != cooked.Oflag {
				t.Errorf("terminal not restored while stopped (procgate stopped by %v): lflag %#x, want %#x", ws.StopSignal(), tio.Lflag, cooked.Lflag)
			}
			time.Sleep(300 * time.Millisecond)
			if strings.Contains(term.text(), "continued") {
				t.Fatalf("the app went on while stopped:\n%s", term.text())
			}
			if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
				t.Fatal(err)
			}
			term.waitFor(t, "continued")
			err = cmd.Wait()
			done = true
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 3 {
				t.Fatalf("exit %v, want status 3\n%s", err, term.text())
			}
			if tio := termios(t, tty); tio.Lflag != cooked.Lflag || tio.Iflag != cooked.Iflag || tio.Oflag != cooked.Oflag {
				t.Errorf("terminal not restored at exit: lflag %#x, want %#x", tio.Lflag, cooked.Lflag)
			}
		})
	}
}

// cgroupPids lists the processes in app's cgroup.
func cgroupPids(e *e2e, app string) []int {
	b, _ := os.ReadFile(filepath.Join(e.cgroup, "procgate.apps", app, "cgroup.procs"))
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// procStates says, for a failure message, what each process is doing.
func procStates(pids []int) string {
	var out []string
	for _, pid := range pids {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		out = append(out, strings.TrimSpace(string(b)))
	}
	return strings.Join(out, "; ")
}

// TestRunJobControlInShell drives an interactive bash of nobody in tmux,
// as a user would: ^Z stops the app and gives the prompt back, the shell
// works meanwhile, fg continues the app at the keyboard, and the app's
// status is procgate's.
func TestRunJobControlInShell(t *testing.T) {
	nstest.RequireRoot(t)
	tmux, err := exec.LookPath("tmux")
	if err != nil {
		t.Fatalf("tmux is missing: install the Debian package tmux (make deps): %v", err)
	}
	e := newE2EIn(t, callerPolicy, nstest.NetNS(t), true, "--guard-gid", "65533")
	sock := filepath.Join(e.dir, "tmux.sock")
	tm := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(tmux, append([]string{"-S", sock}, args...)...)
		cmd.Env = append(os.Environ(), "TERM=xterm")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("tmux %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	tm("new-session", "-d", "-x", "150", "-y", "40",
		"setpriv --reuid=65534 --regid=65534 --clear-groups env -i PATH=/usr/bin:/bin HOME=/ TERM=screen PS1='$ ' bash --norc --noprofile -i")
	t.Cleanup(func() { _ = exec.Command(tmux, "-S", sock, "kill-server").Run() })
	waitPane := func(want string, count int) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second) // a guard against hanging, not a timing assertion
		for {
			pane := tm("capture-pane", "-p", "-S", "-100")
			if strings.Count(pane, want) >= count {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("pane never showed %q %d times:\n%s", want, count, pane)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitPane("$", 1) // the prompt (capture-pane drops trailing blanks)
	tm("send-keys", fmt.Sprintf("%s=1 %s --socket %s run --app shell -- sh -c 'echo in-app-$((6*7)); exec cat'", envAsMain, e.bin, e.socket), "Enter")
	waitPane("in-app-42", 1)
	tm("send-keys", "C-z")
	waitPane("Stopped", 1)
	tm("send-keys", "echo shell-$((2*3))", "Enter")
	waitPane("shell-6", 1)
	tm("send-keys", "fg", "Enter")
	tm("send-keys", "typed-line", "Enter")
	waitPane("typed-line", 2) // the terminal's echo, and cat's copy
	tm("send-keys", "C-d")
	// Keys typed before procgate has exited would go to the app's pty, as
	// with ssh -t: type once the prompt is back.
	deadline := time.Now().Add(10 * time.Second)
	for {
		lines := strings.Fields(strings.TrimSpace(tm("capture-pane", "-p")))
		if len(lines) > 0 && lines[len(lines)-1] == "$" && strings.Count(strings.Join(lines, " "), "typed-line") >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no prompt after the app ended:\n%s", tm("capture-pane", "-p"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	tm("send-keys", "echo status=$?", "Enter")
	waitPane("status=0", 1)
}
