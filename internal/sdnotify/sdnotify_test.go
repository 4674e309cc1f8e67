package sdnotify

import (
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// listen makes a notify socket like systemd's and points $NOTIFY_SOCKET at it.
func listen(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv(SocketEnv, name)
	return conn
}

func read(t *testing.T, conn *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("read notify socket: %v", err)
	}
	return string(buf[:n])
}

func TestNotify(t *testing.T) {
	for _, name := range []string{
		filepath.Join(t.TempDir(), "notify"),
		"@procgate-sdnotify-test-" + strconv.FormatInt(time.Now().UnixNano(), 10),
	} {
		t.Run(name[:1], func(t *testing.T) {
			conn := listen(t, name)
			if err := Ready(); err != nil {
				t.Fatal(err)
			}
			if got := read(t, conn); got != "READY=1" {
				t.Errorf("Ready sent %q", got)
			}
			if err := Reloading(); err != nil {
				t.Fatal(err)
			}
			got := read(t, conn)
			lines := strings.Split(got, "\n")
			if len(lines) != 2 || lines[0] != "RELOADING=1" || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") {
				t.Fatalf("Reloading sent %q", got)
			}
			if usec, err := strconv.ParseInt(strings.TrimPrefix(lines[1], "MONOTONIC_USEC="), 10, 64); err != nil || usec <= 0 {
				t.Errorf("MONOTONIC_USEC %q: %v", lines[1], err)
			}
			if err := Stopping(); err != nil {
				t.Fatal(err)
			}
			if got := read(t, conn); got != "STOPPING=1" {
				t.Errorf("Stopping sent %q", got)
			}
		})
	}
}

func TestNotifyWithoutSystemd(t *testing.T) {
	t.Setenv(SocketEnv, "")
	if err := Ready(); err != nil {
		t.Errorf("no $NOTIFY_SOCKET: %v, want nothing done", err)
	}
	t.Setenv(SocketEnv, "relative/path")
	if err := Ready(); err == nil {
		t.Error("a relative $NOTIFY_SOCKET was accepted")
	}
	t.Setenv(SocketEnv, filepath.Join(t.TempDir(), "gone"))
	if err := Ready(); err == nil {
		t.Error("a missing socket was not reported")
	}
}
