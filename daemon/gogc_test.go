package daemon

import (
	"runtime/debug"
	"slices"
	"testing"

	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/fleet"
)

// TestLowerGC: while reloads run, GOGC is reloadGCPercent or the
// operator's lower one (off stays off), and it is the operator's again
// once the last one ends, whatever their order, on a panic, and when a
// restore is called twice.
func TestLowerGC(t *testing.T) {
	orig := debug.SetGCPercent(100)
	t.Cleanup(func() { debug.SetGCPercent(orig) })
	for _, operator := range []int{100, 200, reloadGCPercent, 10, -1} {
		during := min(operator, reloadGCPercent)
		if operator < 0 {
			during = -1
		}
		for _, tc := range []struct {
			name string
			// run holds the bound as a reload would, calling check
			// while it is held.
			run func(check func())
		}{
			{"one", func(check func()) {
				defer lowerGC()()
				check()
			}},
			{"overlapping", func(check func()) {
				a := lowerGC()
				b := lowerGC()
				check()
				a()
				check()
				b()
			}},
			{"nested", func(check func()) {
				a := lowerGC()
				b := lowerGC()
				b()
				check()
				a()
			}},
			{"restored twice", func(check func()) {
				a := lowerGC()
				b := lowerGC()
				a()
				a()
				check()
				b()
			}},
			{"panic", func(check func()) {
				defer func() { _ = recover() }()
				defer lowerGC()()
				check()
				panic("a reload's bug")
			}},
		} {
			debug.SetGCPercent(operator)
			tc.run(func() {
				if got := gcPercent(); got != during {
					t.Errorf("GOGC=%d, %s: %d during the reload, want %d", operator, tc.name, got, during)
				}
			})
			if got := debug.SetGCPercent(100); got != operator {
				t.Errorf("GOGC=%d, %s: %d after the reloads, want the operator's", operator, tc.name, got)
			}
		}
	}
}

// gcEnforcer is a fakeEnforcer that notes GOGC as each Apply begins.
type gcEnforcer struct {
	*fakeEnforcer
	atApply []int
}

func (g *gcEnforcer) Apply(gen bpf.Generation) (uint32, error) {
	g.atApply = append(g.atApply, gcPercent())
	return g.fakeEnforcer.Apply(gen)
}

// TestReloadsBoundGC: a new policy is parsed and applied under
// reloadGCPercent whether it comes from the file or from etcd, and the
// operator's GOGC is back after it.
func TestReloadsBoundGC(t *testing.T) {
	orig := debug.SetGCPercent(100)
	t.Cleanup(func() { debug.SetGCPercent(orig) })
	for _, tc := range []struct {
		name   string
		reload func(t *testing.T, d *testDaemon, dir string)
	}{
		{"policy file", func(t *testing.T, d *testDaemon, dir string) {
			writePolicy(t, dir, appsPolicy("a", "b"))
			if _, err := d.reload(true); err != nil {
				t.Fatal(err)
			}
		}},
		{"etcd revision", func(t *testing.T, d *testDaemon, dir string) {
			host := fleet.Host{Name: "h"}
			d.fleet = &fleetSource{host: host, agent: fleet.NewAgent(fleet.AgentOptions{Host: host, StateDir: t.TempDir(), Log: d.log})}
			d.applyFleet(fleet.Snapshot{Revision: 2, Docs: map[string][]byte{fleet.FleetKey: []byte(appsPolicy("a", "b"))}})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, fake, d := startOnApps(t, "a")
			// On this goroutine, as the reconciler's own.
			d.stop()
			enf := &gcEnforcer{fakeEnforcer: fake}
			d.Daemon.enf = enf
			tc.reload(t, d, dir)
			if want := []int{reloadGCPercent}; !slices.Equal(enf.atApply, want) {
				t.Errorf("GOGC at Apply: %v, want %v", enf.atApply, want)
			}
			if got := gcPercent(); got != 100 {
				t.Errorf("GOGC after the reload: %d, want the operator's 100", got)
			}
		})
	}
}
