package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/ruleset"
)

// A pinned binary (exe:) holds its app's grants in the kernel by its file,
// (inode, dev), in app_exes (bpf/decision.h, exe_allowed). A pin with a
// sha256 puts the file there only once the daemon hashed that very version
// of it and the hash matched; a pin without one follows the path, whatever
// the file holds (launch checks ownership at `procgate run`, nothing more).
//
// Deny until verified: a file version the daemon has not hashed yet (a new
// inode after a rename over the path, or new content written in place) is
// left out of app_exes, and so holds no grants, until its hash is known.
// Hashing runs on its own goroutine, off the reconciler, so that a large binary
// delays only its own grants, never a reload, explain or the DNS learner.
//
// The race this leaves: between a replacement and the daemon's next
// generation, app_exes still holds the old (inode, dev). Only a task that
// runs the old inode matches it, and that inode is the binary that was
// verified (a rename over the path does not change it; a write in place,
// which needs root on a pinned binary, does, for as long as the daemon
// takes to see the write: one settle plus an Apply). The new inode is in
// no map until it is hashed.

// exeHashQueue bounds the files waiting to be hashed; past it a file waits
// for the next look (watch event or poll), denied meanwhile.
const exeHashQueue = 64

// exeVersion identifies one version of a file: a rename gives a new inode,
// a write in place a new ctime (and usually size and mtime).
type exeVersion struct {
	id           bpf.FileID
	size         int64
	mtime, ctime unix.Timespec
}

func versionOfStat(st *unix.Stat_t) exeVersion {
	return exeVersion{id: bpf.FileIDOfStat(st), size: st.Size, mtime: st.Mtim, ctime: st.Ctim}
}

type hashJob struct {
	path string
	ver  exeVersion
}

// exeHashes knows the SHA-256 of file versions and hashes new ones in the
// background. Its methods are safe from any goroutine.
type exeHashes struct {
	log  *slog.Logger
	work chan hashJob
	// done has a value after a hash finished: the caller looks again.
	done chan struct{}

	mu     sync.Mutex
	sums   map[exeVersion]string
	queued map[exeVersion]bool
}

func newExeHashes(log *slog.Logger) *exeHashes {
	return &exeHashes{
		log: log, work: make(chan hashJob, exeHashQueue), done: make(chan struct{}, 1),
		sums: map[exeVersion]string{}, queued: map[exeVersion]bool{},
	}
}

// lookup stats path and returns its file, its version and, when that
// version was hashed, its SHA-256 ("" when not yet: with queue, the version
// is then queued for hashing).
func (h *exeHashes) lookup(path string, queue bool) (exeVersion, string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return exeVersion{}, "", fmt.Errorf("stat %s: %w", path, err)
	}
	v := versionOfStat(&st)
	h.mu.Lock()
	defer h.mu.Unlock()
	if sum, ok := h.sums[v]; ok {
		return v, sum, nil
	}
	if queue && !h.queued[v] {
		select {
		case h.work <- hashJob{path: path, ver: v}:
			h.queued[v] = true
		default: // full: the next look queues it
		}
	}
	return v, "", nil
}

// hashNow hashes path at once in the caller's goroutine, unless its
// version is known: for the daemon's start, before anything else runs, so
// that adopted enforcement does not drop running apps' binaries while
// they are hashed.
func (h *exeHashes) hashNow(path string) {
	if _, sum, err := h.lookup(path, false); err == nil && sum == "" {
		h.hash(path)
	}
}

// retain forgets the versions not in keep: files replaced since.
func (h *exeHashes) retain(keep map[exeVersion]bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for v := range h.sums {
		if !keep[v] {
			delete(h.sums, v)
		}
	}
}

// run hashes queued files until ctx ends.
func (h *exeHashes) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case j := <-h.work:
			h.hash(j.path)
			h.mu.Lock()
			delete(h.queued, j.ver)
			h.mu.Unlock()
			wake(h.done)
		}
	}
}

// hash reads the file at path and records its SHA-256 for the version it
// had throughout the read: a version that changed while it was read is not
// recorded, and the change's own event brings it back.
func (h *exeHashes) hash(path string) {
	start := time.Now()
	v, sum, err := hashFile(path)
	if err != nil {
		h.log.Warn("cannot hash a pinned binary; it holds no grants", "exe", path, "err", err)
		return
	}
	h.mu.Lock()
	h.sums[v] = sum
	h.mu.Unlock()
	h.log.Debug("hashed a pinned binary", "exe", path, "sha256", sum, "took", time.Since(start))
}

func hashFile(path string) (exeVersion, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return exeVersion{}, "", err
	}
	defer f.Close()
	var before, after unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &before); err != nil {
		return exeVersion{}, "", fmt.Errorf("stat %s: %w", path, err)
	}
	sh := sha256.New()
	if _, err := io.Copy(sh, f); err != nil {
		return exeVersion{}, "", fmt.Errorf("read %s: %w", path, err)
	}
	if err := unix.Fstat(int(f.Fd()), &after); err != nil {
		return exeVersion{}, "", fmt.Errorf("stat %s: %w", path, err)
	}
	if versionOfStat(&before) != versionOfStat(&after) {
		return exeVersion{}, "", errors.New("changed while hashed; hashing again at its next change")
	}
	return versionOfStat(&after), hex.EncodeToString(sh.Sum(nil)), nil
}

// exeState is what the daemon last said about one pinned path of an app,
// so that it says it once per change, not at every poll.
type exeState struct {
	kind string // "ok", "missing", "pending", "mismatch"
	ver  exeVersion
	// unaudited: a mismatch found before the audit log was open (the
	// daemon's first generation), to be audited once it is.
	unaudited bool
	// mismatched: the last version hashed did not match (kept through
	// "pending"), so that a match is said to be one again.
	mismatched bool
}

// pinnedPath is one path of an app's exe: with the hashes it may have; no
// hashes: the path is followed whatever its content.
type pinnedPath struct {
	path string
	sums []string
}

// pinnedPaths groups app's exe: by path: a path listed with and without a
// hash is followed as it is (as launch.CheckExe does), one listed with
// several hashes admits any of them.
func pinnedPaths(app ruleset.App) []pinnedPath {
	var out []pinnedPath
	free := map[string]bool{}
	for _, x := range app.Exe {
		i := slices.IndexFunc(out, func(p pinnedPath) bool { return p.path == x.Path })
		if i < 0 {
			out = append(out, pinnedPath{path: x.Path})
			i = len(out) - 1
		}
		if x.SHA256 == "" {
			free[x.Path] = true
		} else {
			out[i].sums = append(out[i].sums, strings.ToLower(x.SHA256))
		}
	}
	for i := range out {
		if free[out[i].path] {
			out[i].sums = nil
		}
	}
	return out
}

// resolveExes finds the files of the apps' pinned binaries that hold their
// grants now: every existing file of a pin without sha256, and of a pin
// with one only a version hashed and found to match. A binary that is
// missing, not yet hashed or of another hash holds nothing. Reconciler only.
func (d *Daemon) resolveExes(rs *ruleset.Ruleset) map[string][]bpf.FileID {
	out := map[string][]bpf.FileID{}
	seen := map[string]bool{}
	keep := map[exeVersion]bool{}
	for _, app := range rs.Apps {
		for _, p := range pinnedPaths(app) {
			key := app.Name + "\x00" + p.path
			seen[key] = true
			v, sum, err := d.exeHashes.lookup(p.path, p.sums != nil)
			if err != nil {
				d.exeTransition(app.Name, p, exeState{kind: "missing"}, "", err)
				continue
			}
			keep[v] = true
			switch {
			case p.sums == nil:
				d.exeTransition(app.Name, p, exeState{kind: "ok", ver: v}, "", nil)
			case sum == "":
				d.exeTransition(app.Name, p, exeState{kind: "pending", ver: v}, "", nil)
				continue
			case !slices.Contains(p.sums, sum):
				d.exeTransition(app.Name, p, exeState{kind: "mismatch", ver: v}, sum, nil)
				continue
			default:
				d.exeTransition(app.Name, p, exeState{kind: "ok", ver: v}, sum, nil)
			}
			out[app.Name] = append(out[app.Name], v.id)
		}
	}
	for key := range d.exeStates {
		if !seen[key] {
			delete(d.exeStates, key)
		}
	}
	d.exeHashes.retain(keep)
	return out
}

// exeTransition logs, and for hashes audits, a pinned path's change of
// state. Reconciler only.
func (d *Daemon) exeTransition(app string, p pinnedPath, now exeState, sum string, err error) {
	key := app + "\x00" + p.path
	was, known := d.exeStates[key]
	want := strings.Join(p.sums, " or ")
	switch now.kind {
	case "mismatch":
		now.mismatched = true
	case "pending":
		now.mismatched = was.mismatched
	}
	if known && was.kind == now.kind && was.ver == now.ver {
		if was.unaudited && d.auditor != nil {
			d.auditExe(ruleset.VerdictDeny, app, p.path, "sha256 "+sum+", the policy wants "+want)
			was.unaudited = false
			d.exeStates[key] = was
		}
		return
	}
	switch now.kind {
	case "missing":
		d.log.Warn("pinned binary not found; no process of the app holds its grants through it", "app", app, "exe", p.path, "err", err)
	case "pending":
		d.log.Info("pinned binary new or changed; it holds no grants until its sha256 is checked", "app", app, "exe", p.path)
	case "mismatch":
		d.log.Warn("pinned binary does not match its sha256; it holds no grants", "app", app, "exe", p.path, "want", want, "sha256", sum)
		if d.auditor == nil {
			now.unaudited = true
		} else {
			d.auditExe(ruleset.VerdictDeny, app, p.path, "sha256 "+sum+", the policy wants "+want)
		}
	case "ok":
		if was.kind == "mismatch" || (was.kind == "pending" && sum != "") {
			d.log.Info("pinned binary matches its sha256; it holds the app's grants", "app", app, "exe", p.path, "sha256", sum)
		}
		if was.mismatched && d.auditor != nil {
			d.auditExe(ruleset.VerdictAllow, app, p.path, "sha256 "+sum+" matches the policy again")
		}
	}
	d.exeStates[key] = now
}

// auditExe queues the daemon's record of a pinned binary's hash check,
// for flushExeRecords. Reconciler only.
func (d *Daemon) auditExe(verdict, app, path, rule string) {
	d.exeRecords = append(d.exeRecords, audit.Record{
		Time:    time.Now().UTC(),
		Verdict: verdict, Reason: ruleset.ReasonExeHash.String(), App: app, Hook: "exe", Kind: audit.KindExe,
		Exe: path, Rule: rule,
	})
}

// flushExeRecords appends the queued hash records to the audit log: after
// the generation that acts on them is in the kernel, so that a reader of
// "holds no grants" (or of "matches again") finds the kernel agreeing.
// Reconciler only.
func (d *Daemon) flushExeRecords() {
	for _, r := range d.exeRecords {
		d.auditor.Append(r)
	}
	d.exeRecords = nil
}

// exeDirs are the directories whose entries make up the apps' pinned
// binaries: each path's directory and, where it is a symlink, its
// target's (which an upgrade replaces in place of the link).
func exeDirs(rs *ruleset.Ruleset) []string {
	var dirs []string
	for _, app := range rs.Apps {
		for _, x := range app.Exe {
			p := filepath.Clean(x.Path)
			dirs = append(dirs, filepath.Dir(p))
			if real, err := filepath.EvalSymlinks(p); err == nil {
				dirs = append(dirs, filepath.Dir(real))
			}
		}
	}
	slices.Sort(dirs)
	return slices.Compact(dirs)
}

// exeWatch reports settled changes in the directories of the pinned
// binaries, as policyWatch does for the policy: directories, not files,
// since an upgrade renames a new file over the binary. The poll still looks
// at every tick: a directory that cannot be watched is followed by it.
type exeWatch struct {
	w       *fsnotify.Watcher
	settle  time.Duration
	log     *slog.Logger
	changed chan struct{}

	mu      sync.Mutex
	watched []string
}

func newExeWatch(settle time.Duration, log *slog.Logger) (*exeWatch, error) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, err
	}
	return &exeWatch{w: w, settle: settle, log: log, changed: make(chan struct{}, 1)}, nil
}

// watch makes the watched directories dirs.
func (xw *exeWatch) watch(dirs []string) {
	if xw == nil {
		return
	}
	xw.mu.Lock()
	defer xw.mu.Unlock()
	for _, d := range xw.watched {
		if !slices.Contains(dirs, d) {
			_ = xw.w.Remove(d)
		}
	}
	have := xw.w.WatchList()
	xw.watched = xw.watched[:0]
	for _, d := range dirs {
		if !slices.Contains(have, d) {
			if err := xw.w.Add(d); err != nil {
				xw.log.Warn("cannot watch the directory of a pinned binary; polling it", "dir", d, "err", err)
				continue
			}
		}
		xw.watched = append(xw.watched, d)
	}
}

// events is the channel of settled changes (nil, never ready, without a
// watch).
func (xw *exeWatch) events() <-chan struct{} {
	if xw == nil {
		return nil
	}
	return xw.changed
}

func (xw *exeWatch) run(ctx context.Context) {
	defer xw.w.Close()
	settleLoop(ctx, xw.w, xw.settle, func(err error) {
		xw.log.Warn("pinned binaries watch", "err", err)
	}, func() { wake(xw.changed) })
}

// exeKinds is what was last said of each pinned path, for a State.
// Reconciler only.
func (d *Daemon) exeKinds() map[string]string {
	out := make(map[string]string, len(d.exeStates))
	for k, st := range d.exeStates {
		out[k] = st.kind
	}
	return out
}

// exeWhy says why a process of app running target holds none of the app's
// grants, for explain.
func (s *State) exeWhy(app, target string) string {
	switch s.exeKinds[app+"\x00"+target] {
	case "mismatch":
		return "a pinned path whose file does not have the sha256 the policy wants (" + ruleset.ReasonExeHash.String() + ")"
	case "pending":
		return "a pinned path whose new file is not yet checked against its sha256"
	}
	return "not one of the app's exe:"
}
