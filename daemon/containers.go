package daemon

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/procgate/procgate/containers"
)

// containerWatch follows the event streams of the container runtimes
// while the policy has match.container apps: a container made again
// under its name has a new id and so a new scope cgroup, and its create
// event (which comes before its start makes the scope) has the daemon
// find the new scope at once, so that the kernel binds it in its mkdir.
// Without a stream (no runtime yet, an older runtime) the poll follows.
type containerWatch struct {
	sockets []string
	retry   time.Duration
	log     *slog.Logger
	// changed has a value after an event that may move a container, and
	// after each (re)subscription: events before it were not seen.
	changed chan struct{}
	wanted  atomic.Bool
	// wakes, one per socket, tell its goroutine that the policy started
	// or stopped wanting events: a wait ends, a stream is closed.
	wakes []chan struct{}
}

func watchContainers(ctx context.Context, wg *sync.WaitGroup, sockets []string, retry time.Duration, log *slog.Logger) *containerWatch {
	cw := &containerWatch{sockets: sockets, retry: retry, log: log, changed: make(chan struct{}, 1)}
	for _, sock := range sockets {
		w := make(chan struct{}, 1)
		cw.wakes = append(cw.wakes, w)
		wg.Add(1)
		go func() {
			defer wg.Done()
			cw.run(ctx, sock, w)
		}()
	}
	return cw
}

// want says whether the policy in force has match.container apps: only
// then does the daemon connect to the runtimes, and a policy without them
// closes the streams.
func (cw *containerWatch) want(on bool) {
	if cw == nil || cw.wanted.Swap(on) == on {
		return
	}
	for _, w := range cw.wakes {
		wake(w)
	}
}

func (cw *containerWatch) events() <-chan struct{} {
	if cw == nil {
		return nil
	}
	return cw.changed
}

func (cw *containerWatch) run(ctx context.Context, sock string, wanted <-chan struct{}) {
	last := ""
	for {
		if cw.wanted.Load() {
			followed := false
			err := cw.follow(ctx, sock, wanted, func() { last, followed = "", true })
			if ctx.Err() != nil {
				return
			}
			// Said once per reason; a runtime that is not installed is
			// the usual case and only worth a debug line.
			switch {
			case errors.Is(err, errUnwanted):
				if followed {
					cw.log.Info("no longer following container events: no match.container app", "socket", sock)
				}
				last = ""
				continue
			case errors.Is(err, fs.ErrNotExist):
				cw.log.Debug("no container runtime on the socket; polling it", "socket", sock, "retry_in", cw.retry)
			case err.Error() != last:
				cw.log.Warn("container events not to be had; polling the runtime", "socket", sock, "err", err, "retry_in", cw.retry)
			}
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return
		case <-wanted:
		case <-time.After(cw.retry):
		}
	}
}

// errUnwanted: follow ended its stream because the policy no longer has
// match.container apps.
var errUnwanted = errors.New("no match.container app")

// follow follows the events of the runtime on sock until the stream ends,
// ctx ends or the policy stops wanting them (a wake with wanted false:
// errUnwanted).
func (cw *containerWatch) follow(ctx context.Context, sock string, wanted <-chan struct{}, subscribed func()) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-wanted:
				if !cw.wanted.Load() {
					cancel(errUnwanted)
					return
				}
			}
		}
	}()
	err := containers.Events(ctx, sock, func() {
		cw.log.Info("following container events", "socket", sock)
		subscribed()
		wake(cw.changed)
	}, func(e containers.Event) {
		if e.Moves() {
			cw.log.Debug("container event", "socket", sock, "action", e.Action, "container", e.Name, "id", e.ID)
			wake(cw.changed)
		}
	})
	if errors.Is(context.Cause(ctx), errUnwanted) {
		return errUnwanted
	}
	return err
}
