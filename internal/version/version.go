// Package version tells which build of procgate is running, so that a
// client can tell when it does not match the daemon it talks to.
//
// The Makefile sets the version and commit at link time:
//
//	-ldflags "-X github.com/procgate/procgate/internal/version.version=1.2.3
//	          -X github.com/procgate/procgate/internal/version.commit=abc123"
//
// A plain `go build` or `go install` falls back to the module's build
// information (the module version, and the VCS revision Go stamps into
// binaries built inside a git checkout).
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Set with -ldflags -X; empty in a build that did not set them.
var (
	version string
	commit  string
)

// Info is one build's identity.
type Info struct {
	Version string `json:"version"`
	Commit  string `json:"commit,omitempty"`
	Go      string `json:"go"`
}

// Get returns this binary's Info.
func Get() Info {
	bi, _ := debug.ReadBuildInfo()
	return resolve(version, commit, bi)
}

// resolve prefers the link-time values and fills what they lack from bi
// (nil when the binary has no build information).
func resolve(v, c string, bi *debug.BuildInfo) Info {
	info := Info{Version: v, Commit: c, Go: runtime.Version()}
	if bi == nil {
		if info.Version == "" {
			info.Version = "unknown"
		}
		return info
	}
	if info.Version == "" {
		info.Version = bi.Main.Version
		if info.Version == "" || info.Version == "(devel)" {
			info.Version = "devel"
		}
	}
	if info.Commit == "" {
		info.Commit = vcsRevision(bi)
	}
	if bi.GoVersion != "" {
		info.Go = bi.GoVersion
	}
	return info
}

// vcsRevision is the short revision Go stamped into the binary, with
// "-dirty" when the tree had uncommitted changes.
func vcsRevision(bi *debug.BuildInfo) string {
	var rev string
	var modified bool
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev != "" && modified {
		rev += "-dirty"
	}
	return rev
}

// String is the one-line form: "1.2.3 (commit abc123, go1.26.0)".
func (i Info) String() string {
	if i.Commit == "" {
		return fmt.Sprintf("%s (%s)", i.Version, i.Go)
	}
	return fmt.Sprintf("%s (commit %s, %s)", i.Version, i.Commit, i.Go)
}

// Same reports whether two builds are the same: version and commit. The Go
// version alone does not make a mismatch worth a warning.
func (i Info) Same(o Info) bool {
	return i.Version == o.Version && i.Commit == o.Commit
}
