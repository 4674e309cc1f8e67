package main

import (
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/term"
)

// relayed are the signals `run` passes on to the app: what a terminal or a
// supervisor sends to the process it started. SIGTSTP too: the app stops
// first, and procgate stops itself when it hears that the app did (job
// control: the shell gets the terminal back, `fg` continues both).
var relayed = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT,
	syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH, syscall.SIGCONT, syscall.SIGTSTP}

// session is the caller's side of a running app: the signals relayed to
// it, its stops mirrored on procgate, and with --pty its terminal.
//
// The terminal is a new pty whose master procgate relays to its own
// terminal, set raw meanwhile. Handing the app the caller's terminal itself
// would not do: a terminal is the controlling terminal of one session only,
// so the app could get it only by taking it from the caller's shell.
type session struct {
	sigs chan os.Signal
	cont chan struct{} // a SIGCONT came
	send func(syscall.Signal)
	tty  *ptyRelay // nil without --pty
}

// newSession starts catching signals (before the app exists, so none is
// lost in between) and, with usePty, opens the pty and sets the caller's
// terminal raw. Call close on every path.
func newSession(usePty bool) (*session, error) {
	s := &session{sigs: make(chan os.Signal, 8), cont: make(chan struct{}, 1)}
	signal.Notify(s.sigs, relayed...)
	if usePty {
		t, err := openPty()
		if err != nil {
			signal.Stop(s.sigs)
			return nil, err
		}
		s.tty = t
	}
	return s, nil
}

// stdio is what the app gets as stdin, stdout and stderr.
func (s *session) stdio() [3]*os.File {
	if s.tty != nil {
		return [3]*os.File{s.tty.slave, s.tty.slave, s.tty.slave}
	}
	return [3]*os.File{os.Stdin, os.Stdout, os.Stderr}
}

// started: the app has its stdio; relay signals to it with send, and the
// terminal.
func (s *session) started(send func(syscall.Signal)) {
	s.send = send
	if s.tty != nil {
		s.tty.slave.Close() // the app holds it: the master reads EIO when it is gone
		s.tty.relay()
	}
	go func() {
		for sig := range s.sigs {
			if sig == syscall.SIGCONT {
				select {
				case s.cont <- struct{}{}:
				default:
				}
			}
			if sig == syscall.SIGWINCH && s.tty != nil {
				// The kernel signals the pty's foreground group itself.
				s.tty.resize()
				continue
			}
			s.send(sig.(syscall.Signal))
		}
	}()
}

// stopped mirrors the app's stop on procgate: the terminal back to cooked,
// then SIGSTOP to itself, so that the shell that started procgate sees its
// job stopped. When the shell continues it (SIGCONT, relayed to the app as
// well), the terminal goes raw again.
func (s *session) stopped() {
	if s.tty != nil {
		s.tty.restore()
	}
	select {
	case <-s.cont:
	default:
	}
	_ = syscall.Kill(os.Getpid(), syscall.SIGSTOP)
	// kill(2) returns before every thread has stopped: the terminal goes
	// raw again only once continued.
	<-s.cont
	if s.tty != nil {
		s.tty.makeRaw()
		s.tty.resize()
	}
}

// exit ends the session as the app ended: its output drained, the
// terminal restored, then procgate's status the app's.
func (s *session) exit(code int, sig syscall.Signal) error {
	if s.tty != nil {
		s.tty.drain(2 * time.Second)
	}
	s.close()
	return exitLike(code, sig)
}

// close restores the caller's terminal and stops catching signals; it may
// be called more than once.
func (s *session) close() {
	if s.tty != nil {
		s.tty.restore()
	}
	signal.Stop(s.sigs)
}

// ptyRelay is a pty and the copying between its master and procgate's
// stdin and stdout.
type ptyRelay struct {
	master, slave *os.File
	mu            sync.Mutex
	saved         *term.State // the caller's terminal before raw; nil when not raw
	out           chan struct{}
}

func openPty() (*ptyRelay, error) {
	master, slave, err := pty.Open()
	if err != nil {
		return nil, err
	}
	t := &ptyRelay{master: master, slave: slave, out: make(chan struct{})}
	t.resize()
	t.makeRaw()
	return t, nil
}

// makeRaw sets procgate's terminal raw, so that every key (^C, ^Z, ^D)
// reaches the pty, whose line discipline acts on it for the app. Not a
// terminal (--pty with stdin redirected): nothing to do.
func (t *ptyRelay) makeRaw() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.saved != nil || !term.IsTerminal(int(os.Stdin.Fd())) {
		return
	}
	if st, err := term.MakeRaw(int(os.Stdin.Fd())); err == nil {
		t.saved = st
	}
}

func (t *ptyRelay) restore() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.saved != nil {
		_ = term.Restore(int(os.Stdin.Fd()), t.saved)
		t.saved = nil
	}
}

// resize gives the pty the size of procgate's terminal.
func (t *ptyRelay) resize() {
	_ = pty.InheritSize(os.Stdin, t.master)
}

func (t *ptyRelay) relay() {
	go func() {
		_, _ = io.Copy(t.master, os.Stdin)
		if !term.IsTerminal(int(os.Stdin.Fd())) {
			// End of redirected input: end of file for the app (^D at the
			// start of a line).
			_, _ = t.master.Write([]byte{4})
		}
	}()
	go func() {
		// Ends with EIO once no process holds the pty any more.
		_, _ = io.Copy(os.Stdout, t.master)
		close(t.out)
	}()
}

// drain waits, at most d (a process the app left behind may hold the pty
// for ever), for the app's last output to be copied.
func (t *ptyRelay) drain(d time.Duration) {
	select {
	case <-t.out:
	case <-time.After(d):
	}
}
