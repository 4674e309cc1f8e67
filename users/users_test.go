package users

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// fakeGetent puts a getent on PATH that knows a directory user
// bob@EXAMPLE.COM (uid 70001, primary group 70000 "staff@EXAMPLE.COM",
// supplementary 70002 "dba"), and nothing else: what sssd would answer.
// It returns the directory of the fake.
func fakeGetent(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	script := `#!/bin/sh
db=$1; shift
[ "$1" = "--" ] && shift
bob='bob@EXAMPLE.COM:*:70001:70000:Bob:/home/bob:/bin/sh'
carol='carol.smith:*:70003:70002:Carol:/home/carol:/bin/sh'
case "$db $*" in
"passwd bob@EXAMPLE.COM"|"passwd 70001") echo "$bob" ;;
"passwd carol.smith"|"passwd 70003") echo "$carol" ;;
"passwd ") echo "$bob"; echo "$carol"; echo 'nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin' ;;
"group staff@EXAMPLE.COM"|"group 70000") echo 'staff@EXAMPLE.COM:*:70000:' ;;
"group dba"|"group 70002") echo 'dba:*:70002:bob@EXAMPLE.COM' ;;
"initgroups bob@EXAMPLE.COM") echo 'bob@EXAMPLE.COM       70002' ;;
"initgroups carol.smith") echo 'carol.smith    ' ;;
*) exit 2 ;;
esac
`
	if err := os.WriteFile(filepath.Join(dir, "getent"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	return dir
}

func TestLookupThroughGetent(t *testing.T) {
	fakeGetent(t)
	bob := User{Name: "bob@EXAMPLE.COM", UID: 70001, GID: 70000}
	for _, tt := range []struct {
		name string
		do   func() (any, error)
		want any
	}{
		{"directory user by name", func() (any, error) { return LookupName("bob@EXAMPLE.COM") }, bob},
		{"directory user by uid", func() (any, error) { return LookupUID(70001) }, bob},
		{"dotted name", func() (any, error) { return LookupName("carol.smith") }, User{Name: "carol.smith", UID: 70003, GID: 70002}},
		{"directory group by name", func() (any, error) { return LookupGroup("dba") }, Group{Name: "dba", GID: 70002}},
		{"directory group by gid", func() (any, error) { return LookupGID(70000) }, Group{Name: "staff@EXAMPLE.COM", GID: 70000}},
		{"files still first", func() (any, error) { return LookupName("root") }, User{Name: "root"}},
		{"files group", func() (any, error) { return LookupGroup("root") }, Group{Name: "root"}},
		{"groups of a directory user", func() (any, error) { return Groups(bob) }, []uint32{70000, 70002}},
		{"groups of a user with none", func() (any, error) { return Groups(User{Name: "carol.smith", GID: 70002}) }, []uint32{70002}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.do()
			if err != nil {
				t.Fatal(err)
			}
			if g, ok := got.([]uint32); ok {
				if !slices.Equal(g, tt.want.([]uint32)) {
					t.Fatalf("got %v, want %v", g, tt.want)
				}
				return
			}
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
	for _, name := range []string{"nosuch@EXAMPLE.COM", "-n"} {
		if _, err := LookupName(name); !errors.Is(err, ErrUnknown) {
			t.Errorf("LookupName(%q): %v, want ErrUnknown", name, err)
		}
	}
	if _, err := LookupGroup("nosuchgroup"); !errors.Is(err, ErrUnknown) {
		t.Errorf("LookupGroup(nosuchgroup): %v, want ErrUnknown", err)
	}
}

func TestWithoutGetent(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	if _, err := LookupName("bob@EXAMPLE.COM"); !errors.Is(err, ErrUnknown) || !strings.Contains(err.Error(), "getent is not installed") {
		t.Errorf("LookupName without getent: %v, want ErrUnknown saying getent is missing", err)
	}
	if u, err := LookupName("root"); err != nil || u.UID != 0 {
		t.Errorf("LookupName(root) without getent: %+v, %v", u, err)
	}
	names, err := WithPrimaryGroup(65534)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(names, "nobody") {
		t.Errorf("WithPrimaryGroup(65534) from %s: %v, want nobody among them", passwdFile, names)
	}
	if _, err := AddSystemGroup("procgate-test-nogroupadd"); err == nil || !strings.Contains(err.Error(), "groupadd is not installed") {
		t.Errorf("AddSystemGroup without groupadd: %v, want a clear error", err)
	}
}

func TestWithPrimaryGroup(t *testing.T) {
	fakeGetent(t)
	for _, tt := range []struct {
		gid  uint32
		want []string
	}{
		{65534, []string{"nobody"}},
		{70002, []string{"carol.smith"}},
		{70000, []string{"bob@EXAMPLE.COM"}},
		{12345, nil},
	} {
		got, err := WithPrimaryGroup(tt.gid)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("WithPrimaryGroup(%d) = %v, want %v", tt.gid, got, tt.want)
		}
	}
}
