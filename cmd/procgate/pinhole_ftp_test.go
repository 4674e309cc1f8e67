package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/ftpsite"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/perimeter"
)

// ftpSize is the 100 MB transfer.
const ftpSize = 100 << 20

// holeSource opens the agent's holes for a test. Until the server agent
// exists the test stands in for it through the gateway's API: it opens the
// hole for the data port once it knows it, and closes it when the data
// connection is done.
type holeSource interface {
	// listening: the server listens on port for peer (after PASV).
	listening(t *testing.T, peer string, port int)
	// done: the server's listener on port is gone.
	done(t *testing.T, peer string, port int)
	// anyPort: a client whose data port the test cannot see beforehand
	// (curl, bulk) is about to connect over proto; undo is called after it.
	anyPort(t *testing.T, proto, peer string) (undo func())
}

type apiStandIn struct{ s *perimeterSite }

func (a apiStandIn) target(peer string, port int) perimeter.Target {
	return perimeter.Target{Proto: "tcp", Peer: peer, Host: nstest.Server4, Port: port}
}

func (a apiStandIn) listening(t *testing.T, peer string, port int) {
	t.Helper()
	if _, err := a.s.srv1.Open(context.Background(), perimeter.Request{Target: a.target(peer, port), User: "alice"}); err != nil {
		t.Fatal(err)
	}
}

func (a apiStandIn) done(t *testing.T, peer string, port int) {
	t.Helper()
	if _, err := a.s.srv1.Close(context.Background(), []perimeter.Target{a.target(peer, port)}); err != nil {
		t.Fatal(err)
	}
}

func (a apiStandIn) anyPort(t *testing.T, proto, peer string) func() {
	t.Helper()
	var reqs []perimeter.Request
	for p := 40000; p <= 40100; p++ {
		target := a.target(peer, p)
		target.Proto = proto
		reqs = append(reqs, perimeter.Request{Target: target, User: "alice"})
	}
	if _, err := a.s.srv1.Sync(context.Background(), reqs); err != nil {
		t.Fatal(err)
	}
	return func() {
		if _, err := a.s.srv1.Sync(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
	}
}

// ftpServer sets up a vsftpd site (explicit TLS with the site CA's "ftp"
// certificate when tls is set) on the server's port 21 with the aux range
// as its passive ports.
func ftpServer(t *testing.T, s *perimeterSite, tls bool) *ftpsite.Site {
	t.Helper()
	o := ftpsite.Options{Addr: nstest.Server4, Port: 21, PasvMin: 40000, PasvMax: 40100, PasvAddress: nstest.Server4,
		Size: ftpSize, Seed: 6}
	if tls {
		o.CertFile, o.KeyFile = filepath.Join(s.pki, "ftp.crt"), filepath.Join(s.pki, "ftp.key")
	}
	site, err := ftpsite.Setup(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("vsftpd log:\n%s", site.LogText())
		}
		site.Remove()
	})
	return site
}

func (s *perimeterSite) ftpTLSConfig(t *testing.T) *tls.Config {
	t.Helper()
	ca, err := os.ReadFile(filepath.Join(s.pki, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	return &tls.Config{RootCAs: pool, ServerName: nstest.Server4, MinVersion: tls.VersionTLS12}
}

// ftpThroughPerimeter is the FTP test on one vsftpd site: curl
// lists and downloads the 100 MB file through the perimeter (checksum
// checked); a step-by-step client shows the data port's hole: open for
// the client after PASV, closed to the second external host meanwhile,
// and gone after the transfer.
func ftpThroughPerimeter(t *testing.T, s *perimeterSite, site *ftpsite.Site, holes holeSource) {
	ctx := context.Background()
	var tlsConf *tls.Config
	curl := ftpsite.Curl{NetNS: s.Client}
	if site.TLS {
		tlsConf = s.ftpTLSConfig(t)
		curl.CAFile = filepath.Join(s.pki, "ca.crt")
	}
	url := "ftp://" + nstest.Server4 + "/"

	t.Run("curl lists and downloads", func(t *testing.T) {
		undo := holes.anyPort(t, "tcp", nstest.Client4)
		list, err := curl.List(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(list, strconv.Itoa(ftpSize)) || !strings.Contains(list, ftpsite.BigFile) {
			t.Fatalf("listing lacks %s of %d bytes:\n%s", ftpsite.BigFile, ftpSize, list)
		}
		tr, err := curl.Get(ctx, url+ftpsite.BigFile)
		if err != nil {
			t.Fatal(err)
		}
		if tr.Bytes != ftpSize || tr.Sum != site.Sum {
			t.Fatalf("downloaded %d bytes with sha256 %s, want %d with %s", tr.Bytes, tr.Sum, ftpSize, site.Sum)
		}
		if tr.DataPort < 40000 || tr.DataPort > 40100 {
			t.Errorf("curl's data port %d is outside the pasv range", tr.DataPort)
		}
		t.Logf("100 MB in %v over data port %d", tr.Took.Round(time.Millisecond), tr.DataPort)
		undo()
		s.waitNoAgentHoles(t, "after curl's transfers")
	})

	t.Run("the data port's hole", func(t *testing.T) {
		dial := func(network, addr string) (net.Conn, error) {
			return nstest.DialIn(s.Client, network, addr, 10*time.Second)
		}
		cl, err := ftpsite.Login(dial, net.JoinHostPort(nstest.Server4, "21"), tlsConf)
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		data, err := cl.Pasv()
		if err != nil {
			t.Fatal(err)
		}
		if data.Addr() != netip.MustParseAddr(nstest.Server4) {
			t.Fatalf("PASV names %s, want the server's address", data)
		}
		port := int(data.Port())
		holes.listening(t, nstest.Client4, port)
		h := s.waitHole(t, "tcp", nstest.Client4, port, true, "after PASV")
		if h.Peer.String() != nstest.Client4 {
			t.Fatalf("the hole is for %s, want the control connection's peer %s", h.Peer, nstest.Client4)
		}
		s.mustBlock(t, s.Other, data.String(), "the data port from the second external host while the client's hole is open")
		sum := sha256.New()
		n, err := cl.Retr(ftpsite.BigFile, data, sum)
		if err != nil {
			t.Fatal(err)
		}
		if got := hex.EncodeToString(sum.Sum(nil)); n != ftpSize || got != site.Sum {
			t.Fatalf("RETR gave %d bytes with sha256 %s, want %d with %s", n, got, ftpSize, site.Sum)
		}
		holes.done(t, nstest.Client4, port)
		s.waitHole(t, "tcp", nstest.Client4, port, false, "after the transfer")
		s.waitNoAgentHoles(t, "after the transfer")
		s.mustBlock(t, s.Client, data.String(), "the data port after the transfer")
	})
}

// TestPinholeFTP runs vsftpd in the protected server, passive FTP and
// explicit FTPS (where no conntrack helper can read the PASV answer) from
// the external client through the perimeter gateway.
func TestPinholeFTP(t *testing.T) {
	for _, tc := range []struct {
		name string
		tls  bool
	}{{"plain", false}, {"explicit TLS", true}} {
		t.Run(tc.name, func(t *testing.T) {
			s := newPerimeterSite(t, 30*time.Second)
			s.allowService(t, nstest.Client4, 21)
			site := ftpServer(t, s, tc.tls)
			s.startInServer(t, site.Args()...)
			s.waitListen(t, 21)
			ftpThroughPerimeter(t, s, site, apiStandIn{s})
		})
	}
}
