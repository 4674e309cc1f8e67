package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/ruleset"
)

// replaceFile renames a new file with data over path, as upgrades do.
func replaceFile(t *testing.T, path string, data []byte) bpf.FileID {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, data, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	id, err := bpf.FileIDOf(path)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func sumOf(data []byte) string {
	s := sha256.Sum256(data)
	return hex.EncodeToString(s[:])
}

// drainHashes runs the hasher until its queue is empty.
func drainHashes(h *exeHashes) {
	for {
		select {
		case j := <-h.work:
			h.hash(j.path)
			h.mu.Lock()
			delete(h.queued, j.ver)
			h.mu.Unlock()
		default:
			return
		}
	}
}

// TestResolveExesHashes: a pin with sha256 puts a file version in the
// kernel's map only once it was hashed and matched, drops it when another
// file is renamed over the path or the file is written in place, and takes
// it back when the right content returns; a pin without sha256 follows the
// path at once, whatever the file holds.
func TestResolveExesHashes(t *testing.T) {
	dir := t.TempDir()
	good, bad := []byte("#!/bin/true good\n"), []byte("#!/bin/true other\n")
	hashed, free := filepath.Join(dir, "hashed"), filepath.Join(dir, "free")
	rs := &ruleset.Ruleset{Apps: []ruleset.App{
		{Name: "pinned", Exe: []ruleset.Exe{{Path: hashed, SHA256: sumOf(good)}}},
		{Name: "followed", Exe: []ruleset.Exe{{Path: free}}},
	}}
	d := &Daemon{log: slog.New(slog.DiscardHandler), exeStates: map[string]exeState{}, exeHashes: newExeHashes(slog.New(slog.DiscardHandler))}

	type step struct {
		name     string
		change   func() (pinned, followed bpf.FileID) // zero: not expected in the map
		hash     bool                                 // let the hasher run before looking again
		wantKind string                               // of the pinned path
	}
	var goodID bpf.FileID
	steps := []step{
		{"first look: not yet hashed, denied", func() (bpf.FileID, bpf.FileID) {
			goodID = replaceFile(t, hashed, good)
			return bpf.FileID{}, replaceFile(t, free, good)
		}, false, "pending"},
		{"hashed and matching", func() (bpf.FileID, bpf.FileID) {
			id, _ := bpf.FileIDOf(free)
			return goodID, id
		}, true, "ok"},
		{"another binary renamed over both", func() (bpf.FileID, bpf.FileID) {
			replaceFile(t, hashed, bad)
			return bpf.FileID{}, replaceFile(t, free, bad)
		}, true, "mismatch"},
		{"right content back", func() (bpf.FileID, bpf.FileID) {
			id := replaceFile(t, hashed, good)
			fid, _ := bpf.FileIDOf(free)
			return id, fid
		}, true, "ok"},
		{"written in place: same inode, other content", func() (bpf.FileID, bpf.FileID) {
			// A ctime tick between the write that made the file and this
			// one, so that the new version is told from the old.
			time.Sleep(20 * time.Millisecond)
			if err := os.WriteFile(hashed, bad, 0o755); err != nil {
				t.Fatal(err)
			}
			fid, _ := bpf.FileIDOf(free)
			return bpf.FileID{}, fid
		}, true, "mismatch"},
		{"removed", func() (bpf.FileID, bpf.FileID) {
			os.Remove(hashed)
			fid, _ := bpf.FileIDOf(free)
			return bpf.FileID{}, fid
		}, false, "missing"},
	}
	for _, s := range steps {
		wantPinned, wantFollowed := s.change()
		if s.hash {
			d.resolveExes(rs) // sees the change, queues the hash
			drainHashes(d.exeHashes)
		}
		got := d.resolveExes(rs)
		var want []bpf.FileID
		if (wantPinned != bpf.FileID{}) {
			want = []bpf.FileID{wantPinned}
		}
		if !slices.Equal(got["pinned"], want) {
			t.Errorf("%s: pinned app's files %v, want %v", s.name, got["pinned"], wantPinned)
		}
		if !slices.Equal(got["followed"], []bpf.FileID{wantFollowed}) {
			t.Errorf("%s: followed app's files %v, want [%v]", s.name, got["followed"], wantFollowed)
		}
		if k := d.exeStates["pinned\x00"+hashed].kind; k != s.wantKind {
			t.Errorf("%s: state %q, want %q", s.name, k, s.wantKind)
		}
	}
}

// TestPinnedPaths: a path listed with and without a hash is followed as
// it is, as launch.CheckExe admits it; several hashes admit any of them.
func TestPinnedPaths(t *testing.T) {
	for _, tc := range []struct {
		name string
		exe  []ruleset.Exe
		want []pinnedPath
	}{
		{"one hash", []ruleset.Exe{{Path: "/a", SHA256: "AA"}}, []pinnedPath{{path: "/a", sums: []string{"aa"}}}},
		{"two hashes", []ruleset.Exe{{Path: "/a", SHA256: "aa"}, {Path: "/a", SHA256: "bb"}}, []pinnedPath{{path: "/a", sums: []string{"aa", "bb"}}}},
		{"hash and none", []ruleset.Exe{{Path: "/a", SHA256: "aa"}, {Path: "/a"}}, []pinnedPath{{path: "/a"}}},
		{"two paths", []ruleset.Exe{{Path: "/a"}, {Path: "/b", SHA256: "bb"}}, []pinnedPath{{path: "/a"}, {path: "/b", sums: []string{"bb"}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := pinnedPaths(ruleset.App{Exe: tc.exe})
			if !slices.EqualFunc(got, tc.want, func(a, b pinnedPath) bool { return a.path == b.path && slices.Equal(a.sums, b.sums) }) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestExeWatch: a rename over a pinned binary shows as one settled change.
func TestExeWatch(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	replaceFile(t, bin, []byte("a"))
	xw, err := newExeWatch(100*time.Millisecond, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Skipf("no inotify here: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		xw.run(ctx)
	}()
	defer wg.Wait()
	defer cancel()
	xw.watch(exeDirs(&ruleset.Ruleset{Apps: []ruleset.App{{Name: "a", Exe: []ruleset.Exe{{Path: bin}}}}}))
	replaceFile(t, bin, []byte("b"))
	select {
	case <-xw.events():
	case <-time.After(5 * time.Second):
		t.Fatal("no change reported within 5s of a rename over the binary")
	}
	select {
	case <-xw.events():
		t.Fatal("one rename reported twice")
	case <-time.After(300 * time.Millisecond):
	}
}
