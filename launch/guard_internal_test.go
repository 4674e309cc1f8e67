package launch

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
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
		{uid: 5, gid: 6, rgid: 6, caller: &shimCaller{App: "db", Exe: []ruleset.Exe{{Path: "/usr/bin/psql", SHA256: "ab"}}, Umask: 0o027},
			dir: "/", path: "psql", argv: []string{"psql", "-h", "x"}},
		{uid: 5, gid: 6, rgid: 6, tty: true, dir: "/", path: "/bin/sh", argv: []string{"sh"}},
		{uid: 5, gid: 6, rgid: 6, tty: true, caller: &shimCaller{App: "db"}, dir: "/", path: "sh", argv: []string{"sh"}},
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
			!slices.Equal(got.conf.Drop, a.conf.Drop) || got.conf.NoNewPrivs != a.conf.NoNewPrivs ||
			!reflect.DeepEqual(got.caller, a.caller) || got.tty != a.tty {
			t.Errorf("round trip of %+v gave %+v", a, got)
		}
	}
	for _, bad := range [][]string{{"1", "2"}, {"x", "1", "2", "-", ",", "0", "-", "/", "/bin/true", "true"}, {"1", "1", "1", ",a", ",", "0", "-", "/", "/bin/true", "true"},
		{"1", "1", "1", "-", ",chown", "0", "-", "/", "/bin/true", "true"}, {"1", "1", "1", "-", ",", "2", "-", "/", "/bin/true", "true"},
		{"1", "1", "1", "-", ",", "0", `{"app":"a","pidfd":3}`, "/", "/bin/true", "true"}, {"1", "1", "1", "-", ",", "0", "{", "/", "/bin/true", "true"}} {
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

// TestHoldsPeer: on kernels without SO_PEERPIDFD, a pid is taken for the
// caller only if that process holds the other end of the connection.
func TestHoldsPeer(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("sock_diag of unix sockets and /proc/PID/fd of others need root")
	}
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	if err := holdsPeer(server, os.Getpid(), 0); err != nil {
		t.Errorf("this process holds the client end, yet: %v", err)
	}
	sleeper := exec.Command("sleep", "100")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sleeper.Process.Kill(); _ = sleeper.Wait() }()
	if err := holdsPeer(server, sleeper.Process.Pid, 0); err == nil {
		t.Error("a process without the client end was taken for the caller")
	}
	if err := holdsPeer(server, os.Getpid(), 65534); err == nil {
		t.Error("a process of another uid was taken for the caller")
	}
}

func TestUmaskOf(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		status string
		want   uint32
		ok     bool
	}{
		{"Name:\tsh\nUmask:\t0027\nState:\tS\n", 0o027, true},
		{"Umask:\t0000\n", 0, true},
		{"Name:\tsh\n", 0, false},
		{"Umask:\t0x9\n", 0, false},
	} {
		p := filepath.Join(dir, "status")
		if err := os.WriteFile(p, []byte(tc.status), 0o644); err != nil {
			t.Fatal(err)
		}
		got, err := umaskOf(p)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("umaskOf(%q) = %o, %v; want %o, ok %v", tc.status, got, err, tc.want, tc.ok)
		}
	}
}
