package daemon

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/pinhole"
	"github.com/procgate/procgate/ruleset"
)

func TestRevocationsApply(t *testing.T) {
	p := netip.MustParsePrefix
	rs := &ruleset.Ruleset{Apps: []ruleset.App{
		{Name: "a", Grants: []ruleset.Grant{{Index: 0, Prefix: p("10.0.0.0/8")}, {Index: 1, Prefix: p("10.1.0.0/16")}, {Index: 2, Prefix: p("fd00::/8")}}},
		{Name: "b", Grants: []ruleset.Grant{{Index: 0, Prefix: p("10.2.0.0/16")}}},
	}}
	for _, tc := range []struct {
		name   string
		apps   map[string]bool
		grants map[string][]int
		want   map[string][]int // app -> remaining grant indexes
	}{
		{"nothing revoked", nil, nil, map[string][]int{"a": {0, 1, 2}, "b": {0}}},
		{"whole app", map[string]bool{"a": true}, nil, map[string][]int{"a": {}, "b": {0}}},
		{"one grant keeps its index", nil, map[string][]int{"a": {1}}, map[string][]int{"a": {0, 2}, "b": {0}}},
		{"unknown app is ignored", map[string]bool{"zzz": true}, map[string][]int{"zzz": {0}}, map[string][]int{"a": {0, 1, 2}, "b": {0}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &revocations{Apps: tc.apps, Grants: tc.grants}
			if r.Apps == nil {
				r.Apps = map[string]bool{}
			}
			if r.Grants == nil {
				r.Grants = map[string][]int{}
			}
			before := rs.Clone()
			out := r.apply(rs)
			for app, want := range tc.want {
				got := out.App(app).Grants
				if len(got) != len(want) {
					t.Fatalf("app %s: %d grants, want %v", app, len(got), want)
				}
				for i, g := range got {
					if int(g.Index) != want[i] {
						t.Fatalf("app %s: grant indexes %v, want %v", app, got, want)
					}
				}
			}
			if !reflect.DeepEqual(rs, before) {
				t.Fatalf("apply changed the policy it was given: %+v", rs.Apps)
			}
		})
	}
}

func TestAppIDsStableAcrossRestarts(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app-ids.json")
	ids, err := loadAppIDs(path)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := ids.get("a")
	b, _ := ids.get("b")
	if a == b || a == 0 || b == 0 {
		t.Fatalf("ids a=%d b=%d", a, b)
	}
	if err := ids.save(); err != nil {
		t.Fatal(err)
	}
	again, err := loadAppIDs(path)
	if err != nil {
		t.Fatal(err)
	}
	if a2, _ := again.get("a"); a2 != a {
		t.Fatalf("a: %d after restart, was %d", a2, a)
	}
	c, _ := again.get("c")
	if c == a || c == b {
		t.Fatalf("new app reused an id: %d", c)
	}
	if _, names := again.snapshot(); names[b] != "b" {
		t.Fatalf("name(%d) = %q", b, names[b])
	}
}

func TestWithRoutes(t *testing.T) {
	p := netip.MustParsePrefix
	rs := &ruleset.Ruleset{Internal: []ruleset.InternalPrefix{{Prefix: p("10.0.0.0/8")}}}
	out := withRoutes(rs, []ruleset.InternalPrefix{{Prefix: p("10.0.0.0/8")}, {Prefix: p("100.64.0.0/10")}})
	if len(out.Internal) != 2 || out.Internal[1].Prefix != p("100.64.0.0/10") || len(rs.Internal) != 1 {
		t.Fatalf("withRoutes: %v (policy now %v)", out.Internal, rs.Internal)
	}
}

func TestNamedPeersFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pinhole-named.json")
	if ps, err := loadNamedPeers(path); err != nil || ps != nil {
		t.Fatalf("no file: %v, %v; want none and no error", ps, err)
	}
	want := []pinhole.NamedPeer{{App: "ftp", PID: 7, UID: 1000, Peer: netip.MustParseAddr("198.51.100.10"), Host: netip.MustParseAddr("10.9.0.5"),
		Proto: perimeter.UDP, Port: 40010, Bound: true, Since: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)}}
	if err := writeJSON(path, want); err != nil {
		t.Fatal(err)
	}
	got, err := loadNamedPeers(path)
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("round trip: %+v, %v; want %+v", got, err, want)
	}
	if err := os.WriteFile(path, []byte("[{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadNamedPeers(path); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("corrupt file: %v; want an error naming %s", err, path)
	}
}

// TestPolicyStamp: every way an edit reaches the policy file changes its
// stamp (so the poll reads it), and nothing else does.
func TestPolicyStamp(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "policy.yaml")
	past := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	for _, tc := range []struct {
		name    string
		edit    func() error
		changed bool
	}{
		{"untouched", func() error { return nil }, false},
		{"read", func() error { _, err := os.ReadFile(path); return err }, false},
		{"same bytes written again", func() error {
			if err := os.WriteFile(path, []byte("version: 1\n"), 0o600); err != nil {
				return err
			}
			return os.Chtimes(path, past, past.Add(time.Second))
		}, true},
		{"appended", func() error {
			f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			_, err = f.WriteString("apps: []\n")
			return errors.Join(err, f.Close())
		}, true},
		{"renamed over", func() error {
			next := filepath.Join(dir, "next.yaml")
			if err := os.WriteFile(next, []byte("version: 1\n"), 0o600); err != nil {
				return err
			}
			return os.Rename(next, path)
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(path, []byte("version: 1\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chtimes(path, past, past); err != nil {
				t.Fatal(err)
			}
			before := stampOf(path)
			if !before.valid() {
				t.Fatalf("no stamp of %s", path)
			}
			if err := tc.edit(); err != nil {
				t.Fatal(err)
			}
			if got := stampOf(path) != before; got != tc.changed {
				t.Errorf("stamp changed = %v, want %v", got, tc.changed)
			}
		})
	}
	if stampOf(filepath.Join(dir, "missing")).valid() {
		t.Error("a missing file has a valid stamp")
	}
}
