package main

import (
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/internal/sdnotify"
)

// TestDaemonNotifiesSystemd runs the daemon as procgate.service's
// Type=notify does: READY=1 once the socket serves, RELOADING=1 with
// MONOTONIC_USEC then READY=1 around a SIGHUP reload, STOPPING=1 on
// SIGTERM.
func TestDaemonNotifiesSystemd(t *testing.T) {
	name := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// The daemon inherits the test's environment, as systemd hands it.
	t.Setenv(sdnotify.SocketEnv, name)
	e := newE2E(t, "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\n")
	next := func(what string) string {
		t.Helper()
		buf := make([]byte, 4096)
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %s: %v\n%s", what, err, e.daemonLog())
		}
		return string(buf[:n])
	}

	if got := next("READY=1"); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	if _, err := (api.Client{Socket: e.socket}).Do(api.Request{Op: api.OpStatus}); err != nil {
		t.Fatalf("READY=1 sent before the API serves: %v", err)
	}

	before := e.status().Generation
	_ = e.daemon.Process.Signal(syscall.SIGHUP)
	got := next("RELOADING=1")
	if !strings.HasPrefix(got, "RELOADING=1\nMONOTONIC_USEC=") {
		t.Fatalf("on SIGHUP: %q, want RELOADING=1 and MONOTONIC_USEC", got)
	}
	if got := next("READY=1 after the reload"); got != "READY=1" {
		t.Fatalf("after the reload: %q, want READY=1", got)
	}
	if after := e.status().Generation; after == before {
		t.Errorf("READY=1 after the reload, but generation still %d", after)
	}

	e.stopDaemon(syscall.SIGTERM)
	if got := next("STOPPING=1"); got != "STOPPING=1" {
		t.Fatalf("on SIGTERM: %q, want STOPPING=1", got)
	}
}
