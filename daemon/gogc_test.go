package daemon

import (
	"runtime/debug"
	"testing"
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
