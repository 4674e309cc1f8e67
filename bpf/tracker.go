package bpf

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// trackerHook names the handover guard's sockops program (track_owned_sockets)
// and its pinned link.
const trackerHook = "handover"

// tracker is the state of the handover guard's sockops program. Once any
// sockops program is attached, the kernel runs it five times for every TCP
// connect below the cgroup (TCP_CONNECT_CB, TIMEOUT_INIT, RWND_INIT,
// NEEDS_ECN, ACTIVE_ESTABLISHED_CB), ~60-80 ns each, the largest item of
// the connect path's floor. The program only moves sockets the connect
// hooks marked into the sockhash, and by default (--tcp-handover=auto,
// Generation.TrustTraceGuard) they mark connections of app processes open
// to tracing only. Those exist only if the policy has apps that match
// processes procgate did not launch (match:) or that are traceable: true,
// or if a process was launched outside the trace guard (a script, the
// guard off): the tracker is attached only then (syncTracker).
//
// An app process that makes itself open to tracing (setresgid to its
// effective gid) is not tracked while the tracker is detached: that is the
// app's own choice, like handing the connection over by SCM_RIGHTS, which
// the default leaves to the app as well.
type tracker struct {
	// mu serializes attaching and detaching (Apply, Attach and KeepTracker
	// of launches running beside a reload). Lock order: names.mu, then mu.
	mu sync.Mutex
	// hooks is this process' link while attached.
	hooks hookSwitch
	// keep says why the tracker stays attached whatever the generation in
	// force ("": nothing keeps it): a process launched outside the trace
	// guard (KeepTracker), which may live until the enforcer is closed, or
	// processes open to tracing found below the cgroup when an earlier
	// daemon's tracker was adopted. Until the daemon restarts: liveness of
	// a launched process and all its descendants is not tracked.
	keep string
	// state is what Guards reports; atomic: status runs beside Apply.
	state atomic.Pointer[trackerState]
}

type trackerState struct {
	on  bool
	why string
}

func (t *tracker) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.hooks.close()
}

// trackerNeed says whether a generation needs the tracker, and why.
func trackerNeed(g *Generation) (bool, string) {
	if !g.TrustTraceGuard {
		return true, "--tcp-handover=all: every app connection to an internal destination is guarded"
	}
	if g.Rules != nil {
		for _, a := range g.Rules.Apps {
			switch {
			case a.AllowHandover: // its connections are not marked
			case a.Match != nil:
				return true, "app " + a.Name + " is processes procgate did not launch (match:), which may be open to tracing"
			case a.Traceable:
				return true, "app " + a.Name + " is traceable: true"
			}
		}
	}
	return false, "no app matches processes procgate did not launch (match:) or is traceable: true, and no process was launched outside the trace guard"
}

// Tracker says whether the handover guard's sockops program is attached,
// and why (or why not).
func (e *Enforcer) Tracker() (on bool, why string) {
	if s := e.tracker.state.Load(); s != nil {
		return s.on, s.why
	}
	return false, "not attached yet"
}

// KeepTracker attaches the tracker if it is not and keeps it attached until
// the enforcer is closed, whatever the generations in force: for a process
// about to be launched into an app outside the trace guard, why says which.
// It returns once the tracker is attached; the launch waits for it. Before
// Attach it only records why, and Attach attaches it.
func (e *Enforcer) KeepTracker(why string) error {
	if e.handover.TrackOwnedSockets == nil {
		return nil // BPF LSM guards handovers, or the guard is missing
	}
	e.tracker.mu.Lock()
	if e.tracker.keep == "" {
		e.tracker.keep = why
	}
	e.tracker.mu.Unlock()
	return e.syncTracker(true, why)
}

// attachTracker syncs the tracker in Attach, for g, the generation this
// process applied (nil: none yet, and the one in force an earlier
// daemon's: kept attached). An earlier daemon's pinned tracker is kept
// for good if a process open to tracing runs below the cgroup: that daemon
// may have launched it outside the trace guard, which the policy does not
// say.
func (e *Enforcer) attachTracker(g *Generation) error {
	if e.handover.TrackOwnedSockets == nil {
		return nil
	}
	if _, err := os.Stat(filepath.Join(e.opts.BPFDir, "link_"+trackerHook)); err == nil {
		pid, err := openToTracingBelow(e.opts.CgroupDir)
		e.tracker.mu.Lock()
		switch {
		case err != nil:
			e.tracker.keep = "adopted, and the processes below the cgroup could not be read: " + err.Error()
		case pid != 0:
			e.tracker.keep = fmt.Sprintf("adopted: process %d below the cgroup is open to tracing (an earlier daemon may have launched it outside the trace guard)", pid)
		}
		e.tracker.mu.Unlock()
	}
	on, why := true, "no policy applied by this daemon yet"
	if g != nil {
		on, why = trackerNeed(g)
	}
	return e.syncTracker(on, why)
}

// syncTracker attaches the tracker (on) or detaches it, unless something
// keeps it (tracker.keep); why is for Guards. A detached tracker's program
// stays pinned (prog_handover), for inspection and the bench. Before
// Attach it does nothing.
func (e *Enforcer) syncTracker(on bool, why string) error {
	if e.handover.TrackOwnedSockets == nil {
		return nil
	}
	t := &e.tracker
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.keep != "" {
		on, why = true, t.keep
	}
	if e.handoverErr != nil {
		on, why = false, "the guard is not active"
	}
	if !e.attached {
		return nil
	}
	changed, err := e.switchHooks(&t.hooks, func(h hook) bool { return h.tracker }, on, true)
	if err != nil {
		return err
	}
	if changed {
		e.opts.Log.Info("TCP handover guard's tracker", "attached", on, "why", why)
	}
	t.state.Store(&trackerState{on: on, why: why})
	return nil
}

// openToTracingBelow returns a process in the cgroup dir or below whose
// uids and gids are all equal (open_to_tracing in decision.h), 0 if none.
func openToTracingBelow(dir string) (int, error) {
	found := 0
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed meanwhile
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		procs, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		for _, f := range strings.Fields(string(procs)) {
			pid, err := strconv.Atoi(f)
			if err != nil {
				return fmt.Errorf("%s/cgroup.procs: %w", path, err)
			}
			if open, err := openToTracing(pid); err != nil {
				return err
			} else if open {
				found = pid
				return filepath.SkipAll
			}
		}
		return nil
	})
	return found, err
}

// openToTracing reads pid's real, effective and saved uids and gids; a
// process gone meanwhile is not open.
func openToTracing(pid int) (bool, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, os.ErrProcessDone) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	equal := map[string]bool{}
	s := bufio.NewScanner(f)
	for s.Scan() {
		name, ids, ok := strings.Cut(s.Text(), ":")
		if !ok || name != "Uid" && name != "Gid" {
			continue
		}
		v := strings.Fields(ids) // real, effective, saved, filesystem
		equal[name] = len(v) >= 3 && v[0] == v[1] && v[0] == v[2]
	}
	if err := s.Err(); err != nil {
		return false, fmt.Errorf("read /proc/%d/status: %w", pid, err)
	}
	if len(equal) < 2 {
		return false, nil // a zombie or a process gone while read
	}
	return equal["Uid"] && equal["Gid"], nil
}
