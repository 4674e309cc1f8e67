package version

import (
	"runtime/debug"
	"testing"
)

func TestResolve(t *testing.T) {
	stamped := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/procgate/procgate", Version: "(devel)"},
		Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "0123456789abcdef0123"}, {Key: "vcs.modified", Value: "false"}}}
	dirty := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"},
		Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "0123456789abcdef0123"}, {Key: "vcs.modified", Value: "true"}}}
	installed := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "v1.2.3"}}
	tests := []struct {
		name string
		v, c string
		bi   *debug.BuildInfo
		want Info
	}{
		{"ldflags win", "1.2.3", "abc", stamped, Info{"1.2.3", "abc", "go1.26.8"}},
		{"vcs fallback", "", "", stamped, Info{"devel", "0123456789ab", "go1.26.8"}},
		{"dirty tree", "", "", dirty, Info{"devel", "0123456789ab-dirty", "go1.26.8"}},
		{"go install @version", "", "", installed, Info{"v1.2.3", "", "go1.26.8"}},
		{"version only from ldflags", "1.2.3", "", stamped, Info{"1.2.3", "0123456789ab", "go1.26.8"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := resolve(tt.v, tt.c, tt.bi); got != tt.want {
				t.Errorf("resolve = %+v, want %+v", got, tt.want)
			}
		})
	}
	if got := resolve("", "", nil); got.Version != "unknown" || got.Go == "" {
		t.Errorf("no build info: %+v", got)
	}
}

func TestSameAndString(t *testing.T) {
	a := Info{"1.2.3", "abc", "go1.26.8"}
	if !a.Same(Info{"1.2.3", "abc", "go1.26.0"}) {
		t.Error("a different Go alone is not a mismatch")
	}
	if a.Same(Info{"1.2.3", "abd", "go1.26.8"}) || a.Same(Info{"1.2.4", "abc", "go1.26.8"}) {
		t.Error("a different version or commit is a mismatch")
	}
	if got, want := a.String(), "1.2.3 (commit abc, go1.26.8)"; got != want {
		t.Errorf("String = %q, want %q", got, want)
	}
	if got, want := (Info{"devel", "", "go1.26.8"}).String(), "devel (go1.26.8)"; got != want {
		t.Errorf("String = %q, want %q", got, want)
	}
}
