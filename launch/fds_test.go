package launch_test

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/launch"
)

// socketpair returns the two ends of a connected unix stream socket pair.
func socketpair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]*net.UnixConn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c.(*net.UnixConn)
		t.Cleanup(func() { c.Close() })
	}
	return conns[0], conns[1]
}

// openFds counts this process' open descriptors.
func openFds(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestSendRecvFds(t *testing.T) {
	a, b := socketpair(t)
	dir := t.TempDir()
	var files []*os.File
	for i := range 3 {
		f, err := os.Create(filepath.Join(dir, strconv.Itoa(i)))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files = append(files, f)
	}
	payload := []byte(`{"app":"psql"}`)
	if err := launch.SendWithFds(a, payload, files...); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, got, err := launch.RecvWithFds(b, buf, 3)
	if err != nil {
		t.Fatal(err)
	}
	if string(buf[:n]) != string(payload) {
		t.Errorf("payload %q, want %q", buf[:n], payload)
	}
	if len(got) != 3 {
		t.Fatalf("received %d fds, want 3", len(got))
	}
	for i, f := range got {
		defer f.Close()
		// Writing through the received descriptor lands in the sent file.
		if _, err := f.WriteString("via fd " + strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(files[i].Name())
		if err != nil || string(data) != "via fd "+strconv.Itoa(i) {
			t.Errorf("fd %d: file holds %q (%v)", i, data, err)
		}
		flags, err := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0)
		if err != nil || flags&unix.FD_CLOEXEC == 0 {
			t.Errorf("fd %d is not close-on-exec (flags %#x, %v)", i, flags, err)
		}
	}
}

func TestSendRecvFdsLimits(t *testing.T) {
	a, b := socketpair(t)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	if err := launch.SendWithFds(a, nil, f); err == nil {
		t.Error("sent fds without payload")
	}

	for _, tt := range []struct{ send, max int }{{3, 2}, {2, 1}, {1, 0}} {
		before := openFds(t)
		files := make([]*os.File, tt.send)
		for i := range files {
			files[i] = f
		}
		if err := launch.SendWithFds(a, []byte("x"), files...); err != nil {
			t.Fatal(err)
		}
		_, got, err := launch.RecvWithFds(b, make([]byte, 8), tt.max)
		if err == nil || !strings.Contains(err.Error(), "more than "+strconv.Itoa(tt.max)+" descriptors") || got != nil {
			t.Errorf("%d sent, at most %d: got %d fds, %v; want an error for too many", tt.send, tt.max, len(got), err)
		}
		if after := openFds(t); after != before {
			t.Errorf("%d descriptors open after refusing, %d before", after, before)
		}
	}

	// No fds: a plain message.
	if err := launch.SendWithFds(a, []byte("plain")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	n, got, err := launch.RecvWithFds(b, buf, 3)
	if err != nil || string(buf[:n]) != "plain" || len(got) != 0 {
		t.Errorf("plain message: %q, %d fds, %v", buf[:n], len(got), err)
	}
}

func TestPeerCred(t *testing.T) {
	a, _ := socketpair(t)
	cred, err := launch.PeerCred(a)
	if err != nil {
		t.Fatal(err)
	}
	if int(cred.Pid) != os.Getpid() || int(cred.Uid) != os.Getuid() || int(cred.Gid) != os.Getgid() {
		t.Errorf("peer %+v, want pid %d uid %d gid %d", cred, os.Getpid(), os.Getuid(), os.Getgid())
	}
}
