package launch

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestTracingWhy(t *testing.T) {
	for _, tc := range []struct {
		scope string
		err   error
		want  string
	}{
		{"", os.ErrNotExist, "no Yama here"},
		{"0", nil, "ptrace_scope is 0"},
		{"1", nil, "ptrace_scope 1 stops"},
		{"3", nil, "ptrace_scope 3 stops"},
	} {
		if got := tracingWhy(tc.scope, tc.err); !strings.Contains(got, tc.want) || !strings.Contains(got, "CAP_SYS_PTRACE") {
			t.Errorf("tracingWhy(%q, %v) = %q, want it to say %q", tc.scope, tc.err, got, tc.want)
		}
	}
}

func TestShimArgs(t *testing.T) {
	for _, a := range []shimArgs{
		{uid: 1000, gid: 1000, rgid: 65534, groups: []uint32{27, 1000}, conf: Confinement{Drop: []string{"net_raw", "sys_ptrace"}, NoNewPrivs: true},
			dir: "/home/a b", path: "/usr/bin/env", argv: []string{"env", "-i", ""}},
		{uid: 0, gid: 0, rgid: 65534, dir: "/", path: "/bin/true", argv: []string{"true"}},
		{uid: 5, gid: 6, rgid: 7, groups: []uint32{}, dir: "/", path: "/bin/x", argv: []string{"-"}},
	} {
		enc := a.encode()
		if enc[0] != shimArg0 {
			t.Fatalf("encode(%+v)[0] = %q", a, enc[0])
		}
		got, err := decodeShimArgs(enc[1:])
		if err != nil {
			t.Fatalf("decode(%q): %v", enc, err)
		}
		if got.uid != a.uid || got.gid != a.gid || got.rgid != a.rgid || got.dir != a.dir || got.path != a.path ||
			!slices.Equal(got.argv, a.argv) || (got.groups == nil) != (a.groups == nil) || !slices.Equal(got.groups, a.groups) ||
			!slices.Equal(got.conf.Drop, a.conf.Drop) || got.conf.NoNewPrivs != a.conf.NoNewPrivs {
			t.Errorf("round trip of %+v gave %+v", a, got)
		}
	}
	for _, bad := range [][]string{{"1", "2"}, {"x", "1", "2", "-", ",", "0", "/", "/bin/true", "true"}, {"1", "1", "1", ",a", ",", "0", "/", "/bin/true", "true"},
		{"1", "1", "1", "-", ",chown", "0", "/", "/bin/true", "true"}, {"1", "1", "1", "-", ",", "2", "/", "/bin/true", "true"}} {
		if _, err := decodeShimArgs(bad); err == nil {
			t.Errorf("decodeShimArgs(%q) = nil error", bad)
		}
	}
}

// TestIsScript: only a regular file starting with "#!" is a script, and
// nothing else is opened for reading: a FIFO put in the binary's place
// would block a read-open forever.
func TestIsScript(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path string
		want bool
	}{
		{write("script", "#!/bin/sh\nexit 0\n"), true},
		{write("elf", "\x7fELF..."), false},
		{write("short", "#"), false},
		{write("empty", ""), false},
		{fifo, false},
		{"/dev/null", false},
		{dir, false},
		{filepath.Join(dir, "missing"), false},
	} {
		done := make(chan bool, 1)
		go func() { done <- isScript(tc.path) }()
		select {
		case got := <-done:
			if got != tc.want {
				t.Errorf("isScript(%s) = %v, want %v", tc.path, got, tc.want)
			}
		case <-time.After(10 * time.Second): // a guard against hanging, not a timing assertion
			t.Fatalf("isScript(%s) blocked", tc.path)
		}
	}
}
