package daemon

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"
)

// TestPolicyWatch: the watch reports a settled change once per burst of
// writes, follows policy.d when it is made later, and says when it lost
// the policy's directory, so that the daemon polls until a resync finds
// it again.
func TestPolicyWatch(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "etc")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(path, []byte("version: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Far above the pauses below, so that a test the scheduler holds back
	// on a loaded machine does not look like a writer that finished.
	const settle = time.Second
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	pw, err := watchPolicy(ctx, &wg, path, settle, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Skipf("no inotify here: %v", err)
	}
	if !pw.watching() {
		t.Fatal("not watching the policy's directory")
	}
	quiet := func(why string) {
		t.Helper()
		select {
		case <-pw.events():
			t.Fatalf("%s: a change was reported before the writes settled", why)
		default:
		}
	}
	settled := func(why string) {
		t.Helper()
		select {
		case <-pw.events():
		case <-time.After(settle + 2*time.Second):
			t.Fatalf("%s: no change reported", why)
		}
	}

	// Pieces written a fiftieth of the settle delay apart: one change, after
	// the last.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, piece := range []string{"version: 1\n", "internal:\n", "  prefixes: [10.0.0.0/8]\n"} {
		if _, err := f.WriteString(piece); err != nil {
			t.Fatal(err)
		}
		time.Sleep(settle / 50)
		quiet("a file written in pieces")
	}
	f.Close()
	settled("a file written in pieces")
	quiet("after the change was reported")

	// policy.d made after the start: watched from the change that made it.
	dropins := filepath.Join(dir, "policy.d")
	if err := os.Mkdir(dropins, 0o755); err != nil {
		t.Fatal(err)
	}
	settled("policy.d made")
	if err := os.WriteFile(filepath.Join(dropins, "10-a.yaml"), []byte("version: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	settled("a drop-in in the new policy.d")
	pw.mu.Lock()
	watched := slices.Clone(pw.watched)
	pw.mu.Unlock()
	if !slices.Contains(watched, dropins) {
		t.Errorf("watched %v, want policy.d among them", watched)
	}

	// The directory goes: the watch says so (the daemon then polls), and a
	// resync after it is back watches it again.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	settled("the policy's directory removed")
	if pw.watching() {
		t.Fatal("still watching a removed directory: the daemon would not poll")
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	pw.resync()
	if !pw.watching() {
		t.Fatal("a resync did not watch the directory made again")
	}
	if err := os.WriteFile(path, []byte("version: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	settled("a policy written in the directory made again")
}
