// Package etcdtest runs a real etcd for tests and the bench: one member
// inside the test binary (Start), or a cluster of member processes
// (StartCluster) whose members can be killed, and links to it that can be
// cut (Link). Everything listens on 127.0.0.1, on ports chosen free, with
// data in the test's temporary directory, stopped at cleanup. Only tests
// and the bench import it: the etcd server stays out of the procgate
// binary (go list -deps ./cmd/procgate).
package etcdtest

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Server is one etcd member.
type Server struct {
	t      testing.TB
	dir    string
	client url.URL
	peer   url.URL
	etcd   *embed.Etcd
	tls    *TLSFiles
	// Endpoint is the member's client URL (http://127.0.0.1:PORT).
	Endpoint string
}

// Start starts a member and stops it at the end of the test.
func Start(t testing.TB) *Server {
	t.Helper()
	return start(t, nil)
}

// StartTLS starts a member that serves its clients over TLS and checks
// their certificates: the common name of a client's certificate is its
// etcd user once authentication is enabled. Client does not serve it.
func StartTLS(t testing.TB, files TLSFiles) *Server {
	t.Helper()
	return start(t, &files)
}

func start(t testing.TB, tls *TLSFiles) *Server {
	t.Helper()
	s := &Server{t: t, dir: t.TempDir(), tls: tls}
	s.client = url.URL{Scheme: "http", Host: freePort(t)}
	if tls != nil {
		s.client.Scheme = "https"
	}
	s.peer = url.URL{Scheme: "http", Host: freePort(t)}
	s.Endpoint = s.client.String()
	s.Restart()
	t.Cleanup(s.Stop)
	return s
}

// Restart starts the member again (same ports, same data) after Stop.
func (s *Server) Restart() {
	s.t.Helper()
	if s.etcd != nil {
		return
	}
	m := memberConfig{Name: "procgate-test", Dir: s.dir, Client: s.client.Host, Peer: s.peer.Host, TLS: s.tls}
	m.InitialCluster = m.Name + "=" + s.peer.String()
	var err error
	if s.etcd, err = m.start(); err != nil {
		s.t.Fatal(err)
	}
	select {
	case <-s.etcd.Server.ReadyNotify():
	case <-time.After(20 * time.Second):
		s.etcd.Close()
		s.t.Fatal("etcd did not become ready within 20s")
	}
}

// Stop stops the member; its data stays for Restart.
func (s *Server) Stop() {
	if s.etcd != nil {
		s.etcd.Close()
		s.etcd = nil
	}
}

// Endpoints is the member's client URL, as Cluster.Endpoints.
func (s *Server) Endpoints() []string { return []string{s.Endpoint} }

// Client is a client of the member, closed at the end of the test.
func (s *Server) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	return newClient(t, []string{s.Endpoint})
}

func newClient(t testing.TB, endpoints []string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func freePort(t testing.TB) string {
	t.Helper()
	addr, err := freeAddr()
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// freeAddr is a port on 127.0.0.1 free now. It is picked below the
// kernel's ephemeral range (32768 and up by default): a port the kernel
// handed out and took back could be given again as the source port of
// the next connection, before the member binds it (CI saw "address
// already in use" that way).
func freeAddr() (string, error) {
	var err error
	for range 100 {
		var ln net.Listener
		ln, err = net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", 20000+rand.IntN(12000)))
		if err == nil {
			defer ln.Close()
			return ln.Addr().String(), nil
		}
	}
	return "", fmt.Errorf("pick a free port: %w", err)
}
