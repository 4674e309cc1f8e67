package pinholetest

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/pki"
)

// The topology is nstest.Site: two external hosts and a protected server,
// each on its own link to the router, which runs the gateway (API on
// RouterAPI:8443).
//
//	client 198.51.100.10 2001:db8:c::10 ─┐
//	other  203.0.113.10  2001:db8:e::10 ─┼─ router (.1 / ::1 on each link) ── server 10.9.0.5 fd09::5
const (
	Client4, Client6 = nstest.Client4, nstest.Client6
	Other4, Other6   = nstest.Other4, nstest.Other6
	Server4, Server6 = nstest.Server4, nstest.Server6
	RouterAPI        = nstest.RouterToServer4
)

// Protect are the protected ranges of the topology's gateway.
var Protect = []netip.Prefix{netip.MustParsePrefix(nstest.ServerPrefix4), netip.MustParsePrefix(nstest.ServerPrefix6)}

// Topology is four network namespaces (their files' paths).
type Topology = nstest.Site

// NewTopology makes the four namespaces, removed when the test ends.
func NewTopology(t testing.TB) Topology { return nstest.NewSite(t) }

// Gateway is a perimeter gateway running in the router namespace, and the
// files an agent on the server needs.
type Gateway struct {
	*perimeter.Gateway
	// URL is the API's address as the server reaches it.
	URL string
	// CA, Cert, Key are PEM files: the CA, and the certificate and key of
	// the delegate "srv1" (the agent on the server).
	CA, Cert, Key string
	ca            *pki.CA
	log           *SyncBuffer
	cfg           perimeter.GatewayConfig
	router        string
}

// SyncBuffer is a log sink goroutines may write at once.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// StartGateway runs a gateway with rules in the router namespace of top,
// its API on RouterAPI:8443, holes leased for at most lease. It is closed
// when the test ends; its log is printed if the test failed.
func StartGateway(t testing.TB, top Topology, rules string, lease time.Duration) *Gateway {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.NewCA("pinhole test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	rulesPath := filepath.Join(dir, "site.rules")
	if err := os.WriteFile(rulesPath, []byte(rules), 0o644); err != nil {
		t.Fatal(err)
	}
	g := &Gateway{ca: ca, log: &SyncBuffer{}, URL: "https://" + RouterAPI + ":8443",
		CA: filepath.Join(dir, "ca.crt"), Cert: filepath.Join(dir, "srv1.crt"), Key: filepath.Join(dir, "srv1.key")}
	issued, err := ca.Issue(pki.IssueRequest{Name: "srv1", Usage: pki.Client, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	for path, data := range map[string][]byte{g.CA: ca.CertPEM(), g.Cert: issued.CertPEM, g.Key: issued.KeyPEM} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	server, err := ca.Issue(pki.IssueRequest{Name: "gateway", Usage: pki.Server, Hosts: []string{RouterAPI}, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	pair, err := server.Pair()
	if err != nil {
		t.Fatal(err)
	}
	cfg := perimeter.GatewayConfig{
		RulesPath: rulesPath, NetNS: top.Router, Lease: lease, Protect: Protect,
		TLS: pki.ServerTLS(pair, ca.Pool()),
		Log: slog.New(slog.NewJSONHandler(g.log, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	g.cfg, g.router = cfg, top.Router
	g.start(t)
	t.Cleanup(func() {
		if err := g.Gateway.Close(); err != nil {
			t.Errorf("close gateway: %v", err)
		}
		if t.Failed() {
			t.Logf("gateway log:\n%s", g.log)
		}
	})
	return g
}

func (g *Gateway) start(t testing.TB) {
	t.Helper()
	err := nstest.InNS(t, g.router, func() (err error) {
		g.cfg.Listener, err = net.Listen("tcp", net.JoinHostPort(RouterAPI, "8443"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if g.Gateway, err = perimeter.StartGateway(g.cfg); err != nil {
		t.Fatal(err)
	}
}

// Restart stops the gateway and starts it again on the same address. With
// wipe, its nftables table is deleted in between (a router that lost its
// state): every hole is gone until the agents sync again.
func (g *Gateway) Restart(t testing.TB, wipe bool) {
	t.Helper()
	if err := g.Gateway.Close(); err != nil {
		t.Fatalf("stop gateway: %v", err)
	}
	if wipe {
		table := g.cfg.Table
		if table == "" {
			table = perimeter.DefaultTableName
		}
		if out, err := exec.Command("nsenter", "--net="+g.router, "nft", "delete", "table", "inet", table).CombinedOutput(); err != nil {
			t.Fatalf("delete the gateway's table: %v\n%s", err, out)
		}
	}
	g.start(t)
}

// Client is an API client of the gateway for the delegate name, dialing
// from the namespace ns (the server's, for an agent).
func (g *Gateway) Client(t testing.TB, name, ns string) *perimeter.Client {
	t.Helper()
	issued, err := g.ca.Issue(pki.IssueRequest{Name: name, Usage: pki.Client, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	pair, err := issued.Pair()
	if err != nil {
		t.Fatal(err)
	}
	c := perimeter.NewClient(g.URL, pki.ClientTLS(pair, g.ca.Pool()))
	c.HTTP.Transport.(*http.Transport).DialContext = func(_ context.Context, network, addr string) (net.Conn, error) {
		return DialIn(ns, network, addr, 10*time.Second)
	}
	return c
}

// Log is what the gateway logged so far.
func (g *Gateway) Log() string { return g.log.String() }
