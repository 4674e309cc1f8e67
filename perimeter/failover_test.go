package perimeter

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/pki"
)

// deadAddr is a loopback address where nothing listens (connection
// refused).
func deadAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// silentAddr accepts connections and never answers (a hung gateway: the
// TLS handshake times out).
func silentAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan []net.Conn)
	go func() {
		var conns []net.Conn
		for {
			c, err := ln.Accept()
			if err != nil {
				done <- conns
				return
			}
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		for _, c := range <-done {
			c.Close()
		}
	})
	return ln.Addr().String()
}

func TestFailover(t *testing.T) {
	f := newAPIFixture(t)
	tlsConf := pki.ClientTLS(issuePair(t, f.ca, "srv1", pki.Client), f.ca.Pool())
	live := f.url
	fo, err := NewFailover([]string{"https://" + deadAddr(t), "https://" + silentAddr(t), live}, tlsConf, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range fo.Clients() {
		c.HTTP.Transport.(*http.Transport).TLSHandshakeTimeout = 300 * time.Millisecond
	}
	ctx := context.Background()
	a := req("alice", "tcp 203.0.113.9 10.9.0.5 40000")
	if _, err := fo.Open(ctx, a); err != nil {
		t.Fatalf("open through the third gateway: %v", err)
	}
	if !fo.Switched() || fo.Switched() {
		t.Error("Switched: want true once after the move, then false")
	}
	if fo.Current() != live {
		t.Errorf("current gateway %s, want %s", fo.Current(), live)
	}
	// An answer, even a refusal, is no reason to move.
	var apiErr *APIError
	if _, err := fo.Open(ctx, req("mallory", "tcp 203.0.113.9 10.9.0.5 40001")); !errors.As(err, &apiErr) || apiErr.Status != http.StatusForbidden {
		t.Errorf("refused open: %v, want a 403", err)
	}
	if fo.Switched() || fo.Current() != live {
		t.Error("a refusal moved the client to another gateway")
	}
	hs, err := fo.List(ctx)
	if err != nil || len(hs) != 1 {
		t.Errorf("list: %v %v", hs, err)
	}

	// None answers: the error names every attempt.
	none, err := NewFailover([]string{"https://" + deadAddr(t), "https://" + deadAddr(t)}, tlsConf, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := none.List(ctx); err == nil || !strings.Contains(err.Error(), "no gateway answered") || strings.Count(err.Error(), "connection refused") != 2 {
		t.Errorf("no gateway: %v", err)
	}
	if _, err := NewFailover(nil, tlsConf, nil); err == nil {
		t.Error("NewFailover accepted no URL")
	}
}
