package probe_test

import (
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

func TestMain(m *testing.M) {
	probe.MaybeServe()
	os.Exit(m.Run())
}

// threadGone waits until the thread tid of this process has ended; the
// limit only guards against hanging.
func threadGone(t *testing.T, tid int) {
	t.Helper()
	path := fmt.Sprintf("/proc/self/task/%d", tid)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("thread %d still alive after its goroutine returned", tid)
		}
	}
}

// TestChildrenOutliveThrowAwayThreads: children started from a thread the
// Go runtime then discards (nstest.InNS does that) keep running. With
// Pdeathsig tied to the forking thread they were killed when it ended.
func TestChildrenOutliveThrowAwayThreads(t *testing.T) {
	cg := nstest.Cgroup(t)
	ns := nstest.NetNS(t)
	dest, err := ruleset.ParseDest("127.0.0.1:9/tcp")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		start func() (interface{ Close() error }, func() error, error)
	}{
		{"prober", func() (interface{ Close() error }, func() error, error) {
			p, err := probe.Start(cg, ns, nil)
			if err != nil {
				return nil, nil, err
			}
			return p, func() error { _, err := p.Try(dest, probe.Connect); return err }, nil
		}},
		{"holder", func() (interface{ Close() error }, func() error, error) {
			h, err := probe.StartHolder(cg, ns)
			if err != nil {
				return nil, nil, err
			}
			return h, func() error { _, err := h.State("none"); return err }, nil
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var child interface{ Close() error }
			var use func() error
			var tid int
			err := nstest.InNS(t, ns, func() error {
				tid = unix.Gettid()
				var err error
				child, use, err = tt.start()
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			defer child.Close()
			threadGone(t, tid)
			if err := use(); err != nil {
				t.Fatalf("child died with the thread that started it: %v", err)
			}
		})
	}
}
