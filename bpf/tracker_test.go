package bpf

import (
	"os"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

// TestHandoverTracker: with --tcp-handover=auto the handover guard's sockops
// program is attached to the cgroup only while some app process may be open
// to tracing: a traceable: true app, a principal app (match:), a process
// launched outside the trace guard (KeepTracker, kept until the daemon
// stops), or every app with --tcp-handover=all. With only apps launched
// under the trace guard, no sockops program runs on a TCP connect. A
// restart keeps an earlier daemon's tracker while a process open to
// tracing runs below the cgroup, and detaches it once none does.
// (TestHandoverGuard checks that a traceable process's connection is
// guarded.)
func TestHandoverTracker(t *testing.T) {
	w := newWorld(t, "db")
	rs := mustPolicy(t, handoverPolicy)
	auto := func(g *Generation) { g.TrustTraceGuard = true }
	all := func(*Generation) {}
	w.apply(rs, auto)
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	if w.e.handover.TrackOwnedSockets == nil {
		t.Skip("kernel feature missing: no sockops tracker here (BPF LSM guards handovers, or the guard did not load)")
	}
	withApps := func(mod func([]ruleset.App) []ruleset.App) *ruleset.Ruleset {
		c := *rs
		c.Apps = mod(slices.Clone(rs.Apps))
		return &c
	}
	traceable := withApps(func(apps []ruleset.App) []ruleset.App {
		apps[0].Traceable = true // db
		return apps
	})
	principal := withApps(func(apps []ruleset.App) []ruleset.App {
		return append(apps, ruleset.App{Name: "svc", Match: &ruleset.Match{Kind: ruleset.MatchUser, Value: "12345", UID: 12345}})
	})
	check := func(t *testing.T, want bool) {
		t.Helper()
		if got := sockopsPrograms(t, w.root); got != want {
			t.Errorf("sockops program attached to the cgroup: %v, want %v", got, want)
		}
		if on, why := w.e.Tracker(); on != want {
			t.Errorf("Tracker() = %v (%s), want %v", on, why, want)
		}
	}
	check(t, false)
	for _, step := range []struct {
		name   string
		rs     *ruleset.Ruleset
		opt    func(*Generation)
		launch bool // KeepTracker before the Apply
		want   bool
	}{
		{"traceable app", traceable, auto, false, true},
		{"guarded apps only", rs, auto, false, false},
		{"principal app", principal, auto, false, true},
		{"guarded apps again", rs, auto, false, false},
		{"tcp-handover all", rs, all, false, true},
		{"guarded apps once more", rs, auto, false, false},
		{"launched outside the trace guard", rs, auto, true, true},
		{"guarded apps after that launch", rs, auto, false, true},
	} {
		t.Run(step.name, func(t *testing.T) {
			if step.launch {
				if err := w.e.KeepTracker("a script"); err != nil {
					t.Fatal(err)
				}
				check(t, true)
			}
			w.apply(step.rs, step.opt)
			check(t, step.want)
		})
	}

	// Restarts: the pinned tracker is kept while a process open to
	// tracing (root's equal ids) runs below the cgroup.
	restart := func(t *testing.T) {
		t.Helper()
		if err := w.e.Close(); err != nil {
			t.Fatal(err)
		}
		var err error
		if w.e, err = Open(Options{BPFDir: w.e.opts.BPFDir, CgroupDir: w.root, Log: testLogger(t)}); err != nil {
			t.Fatal(err)
		}
		w.apply(rs, auto)
		if err := w.e.Attach(); err != nil {
			t.Fatal(err)
		}
	}
	h, err := probe.StartHolder(w.cgroups["db/run"], w.netns)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("restart with a process open to tracing", func(t *testing.T) {
		restart(t)
		check(t, true)
	})
	h.Close()
	t.Run("restart without one", func(t *testing.T) {
		restart(t)
		check(t, false)
	})
	t.Run("restart without a pinned tracker", func(t *testing.T) {
		h := w.holder(w.cgroups["db/run"])
		defer h.Close()
		restart(t)
		check(t, false)
	})
}

// sockopsPrograms says whether a sockops program is attached to the cgroup
// dir itself (the kernel's attach query).
func sockopsPrograms(t *testing.T, dir string) bool {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachCGroupSockOps})
	if err != nil {
		t.Fatal(err)
	}
	return len(res.Programs) > 0
}
