package main

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/procgate/procgate/internal/version"
)

func TestVersionCommandWithoutDaemon(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	out, code := procgateCLI(t, "version", "--socket", sock)
	if code != 0 {
		t.Fatalf("version without a daemon: exit %d:\n%s", code, out)
	}
	for _, want := range []string{"client: " + version.Get().String(), "daemon: not reachable", "none.sock"} {
		if !strings.Contains(out, want) {
			t.Errorf("version output lacks %q:\n%s", want, out)
		}
	}

	out, code = procgateCLI(t, "version", "--json", "--socket", sock)
	var v versions
	if err := json.Unmarshal([]byte(out), &v); code != 0 || err != nil {
		t.Fatalf("version --json: exit %d, %v:\n%s", code, err, out)
	}
	if v.Client != version.Get() || v.Daemon != nil || v.DaemonError == "" {
		t.Errorf("version --json = %+v, want the client %+v and a daemon error", v, version.Get())
	}

	out, code = procgateCLI(t, "--version")
	if code != 0 || !strings.Contains(out, version.Get().String()) {
		t.Errorf("--version: exit %d:\n%s", code, out)
	}
}

func TestWarnVersionMismatch(t *testing.T) {
	self := version.Get()
	other := self
	other.Commit += "x"
	tests := []struct {
		name   string
		daemon version.Info
		warn   bool
	}{
		{"same build", self, false},
		{"same build, other Go", version.Info{Version: self.Version, Commit: self.Commit, Go: "go1.0"}, false},
		{"other commit", other, true},
		{"other version", version.Info{Version: self.Version + ".1", Commit: self.Commit, Go: self.Go}, true},
		{"daemon too old to say", version.Info{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			warnVersionMismatch(&b, tt.daemon)
			got := b.String()
			if tt.warn != (got != "") {
				t.Fatalf("warning %q, want one: %v", got, tt.warn)
			}
			if tt.warn && (strings.Count(got, "\n") != 1 || !strings.Contains(got, tt.daemon.String())) {
				t.Errorf("warning %q: want one line naming the daemon's %s", got, tt.daemon)
			}
		})
	}
}
