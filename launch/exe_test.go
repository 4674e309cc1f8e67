package launch_test

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/launch"
	"github.com/procgate/procgate/ruleset"
)

// rootDir makes a directory whose whole chain up to / only root can write
// (t.TempDir is below the world-writable /tmp, which CheckExe refuses).
func rootDir(t *testing.T) string {
	t.Helper()
	nstest.RequireRoot(t)
	dir, err := os.MkdirTemp("/run", "procgate-launch-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// copyExe copies /usr/bin/true to path with mode.
func copyExe(t *testing.T, path string, mode os.FileMode) []byte {
	t.Helper()
	data, err := os.ReadFile("/usr/bin/true")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // past the umask
		t.Fatal(err)
	}
	return data
}

func TestCheckExe(t *testing.T) {
	dir := rootDir(t)
	tool := filepath.Join(dir, "tool")
	data := copyExe(t, tool, 0o755)
	sum := sha256.Sum256(data)
	hash := hex.EncodeToString(sum[:])

	openDir := filepath.Join(dir, "open")
	if err := os.Mkdir(openDir, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(openDir, 0o777); err != nil {
		t.Fatal(err)
	}
	inOpen := filepath.Join(openDir, "tool")
	copyExe(t, inOpen, 0o755)

	worldWritable := filepath.Join(dir, "ww")
	copyExe(t, worldWritable, 0o757)
	groupWritable := filepath.Join(dir, "gw")
	copyExe(t, groupWritable, 0o775)
	notRoot := filepath.Join(dir, "nobodys")
	copyExe(t, notRoot, 0o755)
	if err := os.Chown(notRoot, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(dir, "plain")
	copyExe(t, plain, 0o644)

	// A link in a directory the caller controls still resolves to the file.
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink("/bin/true", link); err != nil {
		t.Fatal(err)
	}
	trueReal, err := filepath.EvalSymlinks("/bin/true")
	if err != nil {
		t.Fatal(err)
	}

	pin := func(entries ...ruleset.Exe) []ruleset.Exe { return entries }
	tests := []struct {
		name    string
		exe     []ruleset.Exe
		path    string
		want    string // resolved path on success
		wantErr string
	}{
		{name: "any binary", path: "/bin/false", want: "/usr/bin/false"},
		{name: "pinned binary", exe: pin(ruleset.Exe{Path: "/bin/true"}), path: "/bin/true", want: trueReal},
		{name: "wrong binary", exe: pin(ruleset.Exe{Path: "/bin/true"}), path: "/bin/false", wantErr: "/usr/bin/false (resolved from /bin/false) is not one of the app's binaries"},
		{name: "symlink resolved", exe: pin(ruleset.Exe{Path: "/bin/true"}), path: link, want: trueReal},
		{name: "other writable", exe: pin(ruleset.Exe{Path: worldWritable}), path: worldWritable, wantErr: worldWritable + " is writable by group or others (mode 0757)"},
		{name: "group writable", exe: pin(ruleset.Exe{Path: groupWritable}), path: groupWritable, wantErr: groupWritable + " is writable by group or others"},
		{name: "not owned by root", exe: pin(ruleset.Exe{Path: notRoot}), path: notRoot, wantErr: notRoot + " is owned by uid 65534"},
		{name: "parent dir writable", exe: pin(ruleset.Exe{Path: inOpen}), path: inOpen, wantErr: openDir + " is writable by group or others"},
		{name: "writable file, unpinned app", path: worldWritable, want: worldWritable},
		{name: "sha256 match", exe: pin(ruleset.Exe{Path: tool, SHA256: hash}), path: tool, want: tool},
		{name: "sha256 match uppercase", exe: pin(ruleset.Exe{Path: tool, SHA256: strings.ToUpper(hash)}), path: tool, want: tool},
		{name: "sha256 mismatch", exe: pin(ruleset.Exe{Path: tool, SHA256: strings.Repeat("0", 64)}), path: tool, wantErr: "has sha256 " + hash + ", the policy wants " + strings.Repeat("0", 64)},
		{name: "second hash matches", exe: pin(ruleset.Exe{Path: tool, SHA256: strings.Repeat("1", 64)}, ruleset.Exe{Path: tool, SHA256: hash}), path: tool, want: tool},
		{name: "entry without hash admits", exe: pin(ruleset.Exe{Path: tool, SHA256: strings.Repeat("1", 64)}, ruleset.Exe{Path: tool}), path: tool, want: tool},
		{name: "not executable", path: plain, wantErr: plain + " is not executable"},
		{name: "directory", path: dir, wantErr: dir + " is not a regular file"},
		{name: "missing", path: filepath.Join(dir, "missing"), wantErr: "resolve binary " + filepath.Join(dir, "missing")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			app := ruleset.App{Name: "db", Exe: tt.exe}
			got, err := launch.CheckExe(app, tt.path, 65534)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %q, %v; want error containing %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}
