package launch_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/launch"
	"github.com/procgate/procgate/ruleset"
)

// The test uses the accounts every Debian system has: nobody (65534, primary
// group nogroup) and root. It creates none.
func TestAuthorize(t *testing.T) {
	tests := []struct {
		name    string
		users   []string
		uid     uint32
		wantErr string
	}{
		{"root without a list", nil, 0, ""},
		{"listed user", []string{"alice", "nobody"}, 65534, ""},
		{"unlisted user", []string{"alice", "root"}, 65534, "user nobody (uid 65534) is not allowed"},
		{"no list", nil, 65534, "user nobody (uid 65534) is not allowed"},
		{"primary group", []string{"@nogroup"}, 65534, ""},
		{"group user is not in", []string{"@root"}, 65534, "not allowed"},
		{"missing group", []string{"@procgate-no-such-group"}, 65534, "not allowed"},
		{"group name is not a user name", []string{"nogroup"}, 65534, "not allowed"},
		{"uid without a user", []string{"nobody"}, 4000000000, "no user name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			app := ruleset.App{Name: "psql-prod", Users: tt.users}
			err := launch.Authorize(app, tt.uid)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "psql-prod") {
				t.Fatalf("got %v, want an error naming app psql-prod and containing %q", err, tt.wantErr)
			}
		})
	}
}

// groupChildEnv marks the re-executed test process that runs in a mount
// namespace of its own, where /etc/group is replaced.
const groupChildEnv = "PROCGATE_TEST_GROUP_CHILD"

// TestAuthorizeSupplementaryGroup checks membership through /etc/group
// without adding a group to the host: the test re-runs itself in a private
// mount namespace and bind-mounts an extended group file over /etc/group.
func TestAuthorizeSupplementaryGroup(t *testing.T) {
	if os.Getenv(groupChildEnv) != "1" {
		nstest.RequireRoot(t)
		cmd := exec.Command(os.Args[0], "-test.run=^TestAuthorizeSupplementaryGroup$", "-test.v")
		cmd.Env = append(os.Environ(), groupChildEnv+"=1")
		cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--- PASS: TestAuthorizeSupplementaryGroup") {
			t.Fatalf("child in private mount namespace: %v\n%s", err, out)
		}
		return
	}
	orig, err := os.ReadFile("/etc/group")
	if err != nil {
		t.Fatal(err)
	}
	groups := filepath.Join(t.TempDir(), "group")
	extra := "procgate-t-members:x:4242:daemon,nobody\nprocgate-t-others:x:4243:daemon\n"
	if err := os.WriteFile(groups, append(orig, extra...), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(groups, "/etc/group", "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind group file: %v", err)
	}
	tests := []struct {
		users []string
		ok    bool
	}{
		{[]string{"@procgate-t-members"}, true},
		{[]string{"@procgate-t-others"}, false},
		{[]string{"@procgate-t-others", "@procgate-t-members"}, true},
	}
	for _, tt := range tests {
		err := launch.Authorize(ruleset.App{Name: "a", Users: tt.users}, 65534)
		if (err == nil) != tt.ok {
			t.Errorf("users %v: %v, want allowed %v", tt.users, err, tt.ok)
		}
	}
}
