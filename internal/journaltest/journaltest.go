// Package journaltest is a fake journald for tests: a datagram socket
// that parses the native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL).
package journaltest

import (
	"bytes"
	"encoding/binary"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Fake listens where journald would and parses what it gets.
type Fake struct {
	t *testing.T
	// Path is the socket: what the sink under test is to send to.
	Path string
	conn *net.UnixConn
}

// New listens on a socket in a temporary directory, closed when t ends.
func New(t *testing.T) *Fake {
	t.Helper()
	path := filepath.Join(t.TempDir(), "journal.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &Fake{t: t, Path: path, conn: conn}
}

// Entry reads one datagram, waiting up to 10 s, and parses the native
// protocol: KEY=value lines, or KEY, a newline, a 64-bit little-endian
// length, the value and a newline. Every key must be one journald takes.
func (j *Fake) Entry() map[string]string {
	j.t.Helper()
	buf := make([]byte, 1<<16)
	j.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, _, err := j.conn.ReadFromUnix(buf)
	if err != nil {
		j.t.Fatalf("fake journald got nothing: %v", err)
	}
	b := buf[:n]
	out := map[string]string{}
	for len(b) > 0 {
		nl := bytes.IndexByte(b, '\n')
		if nl < 0 {
			j.t.Fatalf("entry does not end in a newline: %q", b)
		}
		line := string(b[:nl])
		b = b[nl+1:]
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			if len(b) < 8 {
				j.t.Fatalf("field %s: no length", line)
			}
			size := binary.LittleEndian.Uint64(b[:8])
			// size >= what is left, not size+1 > it: a length near
			// 2^64 would wrap and index past the datagram.
			if size >= uint64(len(b)-8) || b[8+size] != '\n' {
				j.t.Fatalf("field %s: bad length %d", line, size)
			}
			k, v = line, string(b[8:8+size])
			b = b[8+size+1:]
		}
		if k == "" || k[0] == '_' || strings.Trim(k, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") != "" {
			j.t.Errorf("field name %q: journald refuses it", k)
		}
		out[k] = v
	}
	return out
}
