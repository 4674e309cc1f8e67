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

// TestAuthorizeDirectoryUsers: users and groups a directory serves (sssd,
// LDAP), which /etc/passwd lacks, are found through NSS; here a fake
// getent on PATH stands for the directory.
func TestAuthorizeDirectoryUsers(t *testing.T) {
	dir := t.TempDir()
	script := `#!/bin/sh
db=$1; shift
[ "$1" = "--" ] && shift
bob='bob@EXAMPLE.COM:*:70001:70000:Bob:/home/bob:/bin/sh'
case "$db $*" in
"passwd bob@EXAMPLE.COM"|"passwd 70001"|"passwd bob") echo "$bob" ;;
"passwd carol.smith"|"passwd 70003") echo 'carol.smith:*:70003:70003::/:/bin/sh' ;;
"group staff@EXAMPLE.COM"|"group 70000") echo 'staff@EXAMPLE.COM:*:70000:' ;;
"group dba"|"group 70002") echo 'dba:*:70002:bob@EXAMPLE.COM' ;;
"initgroups bob@EXAMPLE.COM") echo 'bob@EXAMPLE.COM       70002' ;;
"initgroups carol.smith") echo 'carol.smith ' ;;
*) exit 2 ;;
esac
`
	if err := os.WriteFile(filepath.Join(dir, "getent"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	for _, tt := range []struct {
		name  string
		users []string
		uid   uint32
		ok    bool
	}{
		{"directory user by name", []string{"bob@EXAMPLE.COM"}, 70001, true},
		{"by uid", []string{"70001"}, 70001, true},
		{"by another name of the same user", []string{"bob"}, 70001, true},
		{"directory group", []string{"@dba"}, 70001, true},
		{"primary directory group", []string{"@staff@EXAMPLE.COM"}, 70001, true},
		{"group by gid", []string{"@70002"}, 70001, true},
		{"dotted name", []string{"carol.smith"}, 70003, true},
		{"another directory user", []string{"@staff@EXAMPLE.COM", "@dba", "70001"}, 70003, false},
		{"unknown name", []string{"nosuch@EXAMPLE.COM"}, 70001, false},
		{"uid without a user, named by number", []string{"70009"}, 70009, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := launch.Authorize(ruleset.App{Name: "a", Users: tt.users}, tt.uid)
			if (err == nil) != tt.ok {
				t.Errorf("users %v, uid %d: %v, want allowed %v", tt.users, tt.uid, err, tt.ok)
			}
		})
	}
}
