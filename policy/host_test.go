package policy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/procgate/procgate/internal/nstest"
)

// TestHostCheck: validate's warnings about what the policy names and the
// host lacks or leaves open, each at the entry's file:line:col and field.
// A fake getent stands for a directory that knows bob@EXAMPLE.COM and the
// group dba.
func TestHostCheck(t *testing.T) {
	nstest.RequireRoot(t) // the binaries below must be owned by root, or by someone else
	bin := t.TempDir()
	getent := "#!/bin/sh\ndb=$1; shift\n[ \"$1\" = -- ] && shift\ncase \"$db $*\" in\n" +
		"\"passwd bob@EXAMPLE.COM\") echo 'bob@EXAMPLE.COM:*:70001:70000::/:/bin/sh' ;;\n" +
		"\"group dba\") echo 'dba:*:70002:' ;;\n*) exit 2 ;;\nesac\n"
	if err := os.WriteFile(filepath.Join(bin, "getent"), []byte(getent), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))

	dir := t.TempDir()
	notRoot := filepath.Join(dir, "not-root")
	worldWritable := filepath.Join(dir, "world-writable")
	open := filepath.Join(dir, "open")
	if err := os.Mkdir(open, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	inOpen := filepath.Join(open, "in-open")
	for _, f := range []string{notRoot, worldWritable, inOpen} {
		if err := os.WriteFile(f, []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(notRoot, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(worldWritable, 0o777); err != nil { // past the umask
		t.Fatal(err)
	}
	text := `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: a
    users: [root, bob@EXAMPLE.COM, "@dba", "1234", "@5678", nosuchuser, "@nosuchgroup"]
    exe:
      - /bin/sh
      - /nonexistent/bin/tool
      - ` + notRoot + `
      - {path: ` + worldWritable + `}
      - ` + inOpen + `
`
	rs, warns, check, err := ParseForHost("p.yaml", []byte(text))
	if err != nil || rs == nil || len(warns) != 0 {
		t.Fatalf("ParseForHost: %v, warnings %v", err, warns)
	}
	var got []string
	for _, w := range check() {
		got = append(got, w.String())
	}
	want := []string{
		`p.yaml:6:61: apps[0].users[5]: unknown user "nosuchuser" on this host (files and NSS): procgate run refuses it until it exists`,
		`p.yaml:6:73: apps[0].users[6]: unknown group "nosuchgroup" on this host (files and NSS): it admits no one`,
		"p.yaml:9:9: apps[0].exe[1]: binary /nonexistent/bin/tool does not exist on this host",
		"p.yaml:10:9: apps[0].exe[2]: binary " + notRoot + ": owned by uid 65534, not root: procgate run refuses it",
		"p.yaml:11:16: apps[0].exe[3].path: binary " + worldWritable + ": writable by group or others (mode 0777)",
		"p.yaml:12:9: apps[0].exe[4]: binary " + inOpen + ": directory " + open + ": writable by group or others (mode 0777)",
	}
	if len(got) != len(want) {
		t.Fatalf("got %d warnings, want %d:\n%s", len(got), len(want), strings.Join(got, "\n"))
	}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]) {
			t.Errorf("warning %d:\n got %s\nwant %s...", i, got[i], want[i])
		}
	}
}
