package daemon

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/procgate/procgate/policy"
)

// DefaultSettle is how long the policy's directories must be quiet before a
// change is read: a file written in several writes (an editor saving in
// place, `cat > policy.yaml`, a configuration manager) shows an event per
// write, and a prefix of a policy can be a valid policy of another meaning.
const DefaultSettle = 150 * time.Millisecond

// policyWatch reports settled changes in the directories of the policy file
// and its drop-ins. It watches directories, not files: a rename over the
// file (editors, `mv tmp policy.yaml`, configuration managers) and a swap of
// a Kubernetes-style ..data symlink replace the file's inode, which a watch
// on the file itself would lose.
type policyWatch struct {
	w      *fsnotify.Watcher
	dirs   func() []string // the directories to watch, as they resolve now
	main   string          // the policy file's own directory
	settle time.Duration
	log    *slog.Logger
	// changed has a value after the directories were quiet for settle.
	changed chan struct{}
	// active is whether main is watched; without it the daemon polls.
	active atomic.Bool

	mu      sync.Mutex
	watched []string
	lastErr string // why main could not be watched at the last resync
}

// watchPolicy starts watching the policy's directories. An error (no
// inotify, too many watches) leaves the daemon to its poll.
func watchPolicy(ctx context.Context, wg *sync.WaitGroup, policyPath string, settle time.Duration, log *slog.Logger) (*policyWatch, error) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, err
	}
	pw := &policyWatch{
		w: w, main: filepath.Dir(filepath.Clean(policyPath)), settle: settle, log: log,
		dirs:    func() []string { return policyDirs(policyPath) },
		changed: make(chan struct{}, 1),
	}
	pw.resync()
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer w.Close()
		pw.run(ctx)
	}()
	return pw, nil
}

// policyDirs are the directories whose entries make up the policy: the
// file's directory and, where the file is a symlink, its target's (which a
// ..data swap or an edit of the target changes), and the same for policy.d.
func policyDirs(policyPath string) []string {
	main := filepath.Clean(policyPath)
	dropins := filepath.Join(filepath.Dir(main), policy.DropinDir)
	dirs := []string{filepath.Dir(main), dropins}
	for _, p := range []string{main, dropins} {
		if real, err := filepath.EvalSymlinks(p); err == nil {
			if p == dropins {
				dirs = append(dirs, real)
			} else {
				dirs = append(dirs, filepath.Dir(real))
			}
		}
	}
	slices.Sort(dirs)
	return slices.Compact(dirs)
}

// resync makes the watched directories those the policy resolves to now: a
// symlink may point elsewhere, policy.d may have come or gone.
func (pw *policyWatch) resync() {
	if pw == nil {
		return
	}
	pw.mu.Lock()
	defer pw.mu.Unlock()
	want := pw.dirs()
	for _, d := range pw.watched {
		if !slices.Contains(want, d) {
			_ = pw.w.Remove(d)
		}
	}
	// fsnotify drops a watch whose directory is removed: its list is the
	// truth about what is watched.
	have := pw.w.WatchList()
	pw.watched = pw.watched[:0]
	var mainErr error
	for _, d := range want {
		if !slices.Contains(have, d) {
			if err := pw.w.Add(d); err != nil {
				if d == pw.main {
					mainErr = err
				}
				continue
			}
		}
		pw.watched = append(pw.watched, d)
	}
	if mainErr == nil && !slices.Contains(pw.watched, pw.main) {
		mainErr = errors.New("not among the directories the policy resolves to")
	}
	// Said once per change of state or reason: the daemon resyncs at
	// every poll while it cannot watch.
	msg := ""
	if mainErr != nil {
		msg = mainErr.Error()
	}
	was := pw.active.Swap(mainErr == nil)
	switch {
	case mainErr != nil && (was || msg != pw.lastErr):
		pw.log.Warn("cannot watch the policy's directory; polling it", "dir", pw.main, "err", mainErr)
	case mainErr == nil && !was:
		pw.log.Info("following the policy by inotify", "dirs", pw.watched, "settle", pw.settle)
	}
	pw.lastErr = msg
}

// watching reports whether changes of the policy file come as events; when
// not, the caller polls.
func (pw *policyWatch) watching() bool { return pw != nil && pw.active.Load() }

// events is the channel of settled changes (nil, never ready, without a
// watch).
func (pw *policyWatch) events() <-chan struct{} {
	if pw == nil {
		return nil
	}
	return pw.changed
}

func (pw *policyWatch) run(ctx context.Context) {
	closed := settleLoop(ctx, pw.w, pw.settle, func(err error) {
		if errors.Is(err, fsnotify.ErrEventOverflow) {
			pw.log.Warn("policy watch overflowed; re-reading the policy", "err", err)
		} else {
			pw.log.Warn("policy watch", "err", err)
		}
	}, func() {
		pw.resync()
		wake(pw.changed)
	})
	if closed {
		pw.active.Store(false)
	}
}

// settleLoop follows w until ctx ends or w's channels close (then it
// returns true), calling settled once w has been quiet for settle after an
// event or an error (which onErr is told of first). Any entry of a watched
// directory counts: a spurious look costs a stat.
func settleLoop(ctx context.Context, w *fsnotify.Watcher, settle time.Duration, onErr func(error), settled func()) (closed bool) {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case _, ok := <-w.Events:
			if !ok {
				return true
			}
			timer.Reset(settle)
		case err, ok := <-w.Errors:
			if !ok {
				return true
			}
			onErr(err)
			timer.Reset(settle)
		case <-timer.C:
			settled()
		}
	}
}

// wake puts a value in c, a channel of capacity 1, unless one waits
// there already.
func wake(c chan<- struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
