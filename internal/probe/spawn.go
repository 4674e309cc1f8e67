package probe

import (
	"os/exec"
	"runtime"
	"sync"
)

// spawner is the one OS thread that forks every child of this package.
//
// A child's Pdeathsig fires when the *thread* that forked it ends, not the
// process. Callers often start children from a locked thread that the Go
// runtime throws away when its goroutine returns (nstest.InNS, NetNS), and a
// child forked there was killed at that moment, at random for the test.
// This thread is locked and never returns, so it ends only with the
// process: Pdeathsig then means "the test process is gone", which is what
// it is for. Children enter their network namespace themselves (EnvNetNS),
// so the spawner's namespace (the process's own) does not matter.
var spawner struct {
	once sync.Once
	reqs chan func()
}

// start runs cmd.Start on the spawner thread.
func start(cmd *exec.Cmd) error {
	spawner.once.Do(func() {
		spawner.reqs = make(chan func())
		go func() {
			// Never unlocked and never returns: see spawner.
			runtime.LockOSThread()
			for f := range spawner.reqs {
				f()
			}
		}()
	})
	done := make(chan error, 1)
	spawner.reqs <- func() { done <- cmd.Start() }
	return <-done
}
