package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/api"
)

func TestPrintPinholes(t *testing.T) {
	now := time.Date(2026, 12, 1, 0, 10, 0, 0, time.UTC)
	hs := []api.Pinhole{
		{App: "ftp", User: "alice", Proto: "tcp", Peer: "198.51.100.10", Host: "10.9.0.5", Port: 40017, State: "open",
			Opened: now.Add(-95 * time.Second), Bytes: 1408, Packets: 12},
		{App: "ftp", User: "mallory", Proto: "udp", Peer: "203.0.113.66", Host: "10.9.0.5", Port: 40001, State: "refused",
			Reason: "denied by site.rules:4"},
	}
	var b bytes.Buffer
	printPinholes(&b, hs, now)
	want := []string{
		"APP  USER     PEER           PROTO  HOST      PORT   STATE                             AGE    BYTES  PACKETS",
		"ftp  alice    198.51.100.10  tcp    10.9.0.5  40017  open                              1m35s  1408   12",
		"ftp  mallory  203.0.113.66   udp    10.9.0.5  40001  refused (denied by site.rules:4)  -      0      0",
	}
	if got := strings.Split(strings.TrimRight(b.String(), "\n"), "\n"); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("printPinholes:\n%s\nwant:\n%s", b.String(), strings.Join(want, "\n"))
	}
}

func TestPinholeCLIWithoutDaemon(t *testing.T) {
	for _, args := range [][]string{
		{"pinhole", "open", "--port", "40000"},
		{"pinhole", "open", "--peer", "198.51.100.10"},
	} {
		if out, code := procgateCLI(t, args...); code == 0 || !strings.Contains(out, "required") {
			t.Errorf("procgate %v: exit %d, %q; want a missing-flag error", args, code, out)
		}
	}
	out, code := procgateCLI(t, "--socket", "/nonexistent/procgate.sock", "pinholes")
	if code == 0 || !strings.Contains(out, "is it running?") {
		t.Errorf("procgate pinholes without a daemon: exit %d, %q", code, out)
	}
}
