// Package etcdtest runs a real etcd inside a test binary: one member on
// 127.0.0.1, ports chosen free, data in the test's temporary directory,
// stopped at cleanup. Only tests import it: the etcd server stays out of
// the procgate binary (go list -deps ./cmd/procgate).
package etcdtest

import (
	"fmt"
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
	// Endpoint is the member's client URL (http://127.0.0.1:PORT).
	Endpoint string
}

// Start starts a member and stops it at the end of the test.
func Start(t testing.TB) *Server {
	t.Helper()
	s := &Server{t: t, dir: t.TempDir()}
	s.client = url.URL{Scheme: "http", Host: freePort(t)}
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
	cfg := embed.NewConfig()
	cfg.Name = "procgate-test"
	cfg.Dir = s.dir
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{s.client}, []url.URL{s.client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{s.peer}, []url.URL{s.peer}
	cfg.InitialCluster = cfg.Name + "=" + s.peer.String()
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	var err error
	// A port freed by Stop can take a moment to be bound again.
	for i := 0; i < 50; i++ {
		if s.etcd, err = embed.StartEtcd(cfg); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		s.t.Fatalf("start etcd: %v", err)
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

// Client is a client of the member, closed at the end of the test.
func (s *Server) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{s.Endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func freePort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(fmt.Errorf("pick a free port: %w", err))
	}
	defer ln.Close()
	return ln.Addr().String()
}
