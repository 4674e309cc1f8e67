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

// Protect are the protected ranges of the site's gateway: the server's link.
var Protect = []netip.Prefix{netip.MustParsePrefix(nstest.ServerPrefix4), netip.MustParsePrefix(nstest.ServerPrefix6)}

// Gateway is a perimeter gateway, in this process, in the router of an
// nstest.Site, with its API on nstest.RouterToServer4:8443 and a PKI on
// disk. It is the one gateway helper of the tests that run the whole
// chain.
type Gateway struct {
	*perimeter.Gateway
	// URL is the API's address as the server reaches it.
	URL string
	// PKI is the directory of the CA (ca.crt) and of every issued name's
	// NAME.crt and NAME.key; "gateway" and "srv1" (the server's agent) are
	// issued at the start.
	PKI string
	// CA, Cert, Key are the files an agent on the server needs: the CA,
	// and the certificate and key of the delegate "srv1".
	CA, Cert, Key string
	// RulesPath is the site rules' file.
	RulesPath string
	log       *SyncBuffer
	cfg       perimeter.GatewayConfig
	router    string
	port      string
	stopped   bool
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

// StartGateway runs a gateway with rules in the router of site, holes
// leased for at most lease. It is closed when the test ends; its log is
// printed if the test failed.
func StartGateway(t testing.TB, site nstest.Site, rules string, lease time.Duration) *Gateway {
	t.Helper()
	dir := t.TempDir()
	g := &Gateway{log: &SyncBuffer{}, URL: "https://" + nstest.RouterToServer4 + ":8443", PKI: filepath.Join(dir, "pki"),
		RulesPath: filepath.Join(dir, "site.rules"), router: site.Router, port: "8443"}
	if _, err := pki.Init(g.PKI, "site CA", time.Hour); err != nil {
		t.Fatal(err)
	}
	g.Issue(t, pki.IssueRequest{Name: "gateway", Usage: pki.Server, Hosts: []string{nstest.RouterToServer4}})
	agent := g.Issue(t, pki.IssueRequest{Name: "srv1", Usage: pki.Client})
	g.CA, g.Cert, g.Key = agent.CA, agent.Cert, agent.Key
	if err := os.WriteFile(g.RulesPath, []byte(rules), 0o644); err != nil {
		t.Fatal(err)
	}
	serverTLS, err := pki.ServerConfig(g.Files("gateway"))
	if err != nil {
		t.Fatal(err)
	}
	g.cfg = perimeter.GatewayConfig{
		RulesPath: g.RulesPath, NetNS: site.Router, Lease: lease, Protect: Protect, TLS: serverTLS,
		Log: slog.New(slog.NewJSONHandler(g.log, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	g.start(t)
	g.cleanup(t)
	return g
}

func (g *Gateway) cleanup(t testing.TB) {
	t.Cleanup(func() {
		if !g.stopped {
			if err := g.Gateway.Close(); err != nil {
				t.Errorf("close gateway %s: %v", g.URL, err)
			}
		}
		if t.Failed() {
			t.Logf("gateway %s log:\n%s", g.URL, g.log)
		}
	})
}

// Takeover is the site's second router taking over from a dead one: g
// stops, its table is deleted (the router and its state are gone), and a
// second gateway with g's rules, PKI and lease starts on the router with
// its API at port 8444 (BackupURL) and a table of its own, empty: every
// hole the agents need must reach it before traffic passes again.
func (g *Gateway) Takeover(t testing.TB) *Gateway {
	t.Helper()
	g.Stop(t)
	g.wipe(t)
	s := &Gateway{log: &SyncBuffer{}, URL: BackupURL, PKI: g.PKI,
		CA: g.CA, Cert: g.Cert, Key: g.Key, RulesPath: g.RulesPath, router: g.router, port: "8444"}
	s.cfg = g.cfg
	s.cfg.Log = slog.New(slog.NewJSONHandler(s.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	s.start(t)
	s.cleanup(t)
	return s
}

// BackupURL is where Takeover's gateway answers.
const BackupURL = "https://" + nstest.RouterToServer4 + ":8444"

// Stop stops the gateway for good (a dead router's gateway): its API no
// longer answers; its table stays.
func (g *Gateway) Stop(t testing.TB) {
	t.Helper()
	g.stopped = true
	if err := g.Gateway.Close(); err != nil {
		t.Errorf("stop gateway %s: %v", g.URL, err)
	}
}

// Files are name's certificate and key and the CA.
func (g *Gateway) Files(name string) pki.Files {
	return pki.Files{Cert: filepath.Join(g.PKI, name+".crt"), Key: filepath.Join(g.PKI, name+".key"), CA: filepath.Join(g.PKI, pki.CACertFile)}
}

// Issue writes a certificate and key for req (an hour's validity) to the
// PKI directory.
func (g *Gateway) Issue(t testing.TB, req pki.IssueRequest) pki.Files {
	t.Helper()
	req.Validity = time.Hour
	if _, _, err := pki.IssueFiles(g.PKI, req); err != nil {
		t.Fatal(err)
	}
	return g.Files(req.Name)
}

func (g *Gateway) start(t testing.TB) {
	t.Helper()
	err := nstest.InNS(t, g.router, func() (err error) {
		g.cfg.Listener, err = net.Listen("tcp", net.JoinHostPort(nstest.RouterToServer4, g.port))
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
		g.wipe(t)
	}
	g.start(t)
}

// wipe deletes the gateway's nftables table.
func (g *Gateway) wipe(t testing.TB) {
	t.Helper()
	table := g.cfg.Table
	if table == "" {
		table = perimeter.DefaultTableName
	}
	if out, err := exec.Command("nsenter", "--net="+g.router, nstest.Program(t, "nft"), "delete", "table", "inet", table).CombinedOutput(); err != nil {
		t.Fatalf("delete the gateway's table: %v\n%s", err, out)
	}
}

// Client is an API client of the gateway for the delegate name (its
// certificate issued on first use), dialing from the namespace ns (the
// server's, for an agent).
func (g *Gateway) Client(t testing.TB, name, ns string) *perimeter.Client {
	t.Helper()
	f := g.Files(name)
	if _, err := os.Stat(f.Key); err != nil {
		f = g.Issue(t, pki.IssueRequest{Name: name, Usage: pki.Client})
	}
	conf, err := pki.ClientConfig(f)
	if err != nil {
		t.Fatal(err)
	}
	c := perimeter.NewClient(g.URL, conf)
	c.HTTP.Transport.(*http.Transport).DialContext = func(_ context.Context, network, addr string) (net.Conn, error) {
		return nstest.DialIn(ns, network, addr, 10*time.Second)
	}
	return c
}

// Log is what the gateway logged so far.
func (g *Gateway) Log() string { return g.log.String() }
