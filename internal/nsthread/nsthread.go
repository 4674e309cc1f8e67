// Package nsthread runs functions on one OS thread that stays in one
// network namespace: sockets made there are the namespace's, and a child
// started there keeps its Pdeathsig parent (the thread) for as long as the
// Thread runs.
package nsthread

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// Thread is an OS thread in a network namespace, taking functions in turn
// until Stop.
type Thread struct{ reqs chan func() }

// Start starts a thread in the network namespace ns (a /proc/.../ns/net
// file). ns may be closed once Start returns.
func Start(ns *os.File) (*Thread, error) {
	t := &Thread{reqs: make(chan func())}
	entered := make(chan error, 1)
	go func() {
		// Never unlocked: the thread ends with the goroutine, in the
		// namespace, and no other goroutine ever runs on it.
		runtime.LockOSThread()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			entered <- err
			return
		}
		entered <- nil
		for f := range t.reqs {
			f()
		}
	}()
	if err := <-entered; err != nil {
		return nil, fmt.Errorf("enter network namespace %s: %w", ns.Name(), err)
	}
	return t, nil
}

// Do runs f on the thread and waits for it.
func (t *Thread) Do(f func()) {
	done := make(chan struct{})
	t.reqs <- func() { defer close(done); f() }
	<-done
}

// Stop ends the thread; no Do may follow.
func (t *Thread) Stop() { close(t.reqs) }
