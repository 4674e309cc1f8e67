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
)

// ftpSize is the 100 MB transfer.
const ftpSize = 100 << 20

// ftpServer sets up a vsftpd site (explicit TLS with the site CA's "ftp"
// certificate when tls is set) on the server's port 21 with the aux range
// as its passive ports.
func ftpServer(t *testing.T, s *perimeterSite, tls bool) *ftpsite.Site {
	t.Helper()
	nstest.Program(t, "vsftpd")
	nstest.Program(t, "curl") // the site's client, ftpsite.Curl
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
func ftpThroughPerimeter(t *testing.T, s *perimeterSite, site *ftpsite.Site) {
	ctx := context.Background()
	var tlsConf *tls.Config
	curl := ftpsite.Curl{NetNS: s.Client}
	if site.TLS {
		tlsConf = s.ftpTLSConfig(t)
		curl.CAFile = filepath.Join(s.pki, "ca.crt")
	}
	url := "ftp://" + nstest.Server4 + "/"

	t.Run("curl lists and downloads", func(t *testing.T) {
		list, err := curl.List(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(list, strconv.Itoa(ftpSize)) || !strings.Contains(list, ftpsite.BigFile) {
			t.Fatalf("listing lacks %s of %d bytes:\n%s", ftpsite.BigFile, ftpSize, list)
		}
		// The kernel holds vsftpd's PASV answer until the agent has the
		// hole live at the gateway (docs/pinholes.md, "The race of the
		// first data connection"), so curl's first SYN is never dropped:
		// the router drops nothing during the download.
		dropsBefore, err := s.gw.Table().Dropped()
		if err != nil {
			t.Fatal(err)
		}
		tr, err := curl.Get(ctx, url+ftpsite.BigFile)
		if err != nil {
			t.Fatal(err)
		}
		dropsAfter, err := s.gw.Table().Dropped()
		if err != nil {
			t.Fatal(err)
		}
		if tr.Bytes != ftpSize || tr.Sum != site.Sum {
			t.Fatalf("downloaded %d bytes with sha256 %s, want %d with %s", tr.Bytes, tr.Sum, ftpSize, site.Sum)
		}
		if tr.DataPort < 40000 || tr.DataPort > 40100 {
			t.Errorf("curl's data port %d is outside the pasv range", tr.DataPort)
		}
		if dropsAfter != dropsBefore {
			t.Errorf("the router dropped %d packets during the download: curl's data connection raced its hole", dropsAfter-dropsBefore)
		}
		t.Logf("100 MB in %v over data port %d", tr.Took.Round(time.Millisecond), tr.DataPort)
		s.waitNoAgentHoles(t, "after curl's transfers")
	})

	t.Run("the data port's hole", func(t *testing.T) {
		cl, data := pasvFrom(t, s.Client, tlsConf)
		if data.Addr() != netip.MustParseAddr(nstest.Server4) {
			t.Fatalf("PASV names %s, want the server's address", data)
		}
		port := int(data.Port())
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
		s.waitHole(t, "tcp", nstest.Client4, port, false, "after the transfer")
		s.waitNoAgentHoles(t, "after the transfer")
		s.mustBlock(t, s.Client, data.String(), "the data port after the transfer")
	})
}

// pasvFrom logs in to the server's vsftpd from the namespace ns and asks
// for a passive port; the client is closed when the test ends.
func pasvFrom(t *testing.T, ns string, tlsConf *tls.Config) (*ftpsite.Client, netip.AddrPort) {
	t.Helper()
	dial := func(network, addr string) (net.Conn, error) {
		return nstest.DialIn(ns, network, addr, 10*time.Second)
	}
	cl, err := ftpsite.Login(dial, net.JoinHostPort(nstest.Server4, "21"), tlsConf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	data, err := cl.Pasv()
	if err != nil {
		t.Fatal(err)
	}
	return cl, data
}

// TestPinholeFTP runs vsftpd in the protected server as app ftp (procgate
// run, daemon with --gateway): passive FTP and explicit FTPS (where no
// conntrack helper can read the PASV answer) from the external client
// through the perimeter gateway, every hole opened and closed by the agent
// from the kernel's view of vsftpd's listens.
func TestPinholeFTP(t *testing.T) {
	for _, tc := range []struct {
		name string
		tls  bool
	}{{"plain", false}, {"explicit TLS", true}} {
		t.Run(tc.name, func(t *testing.T) {
			c := newChainSite(t, "10s")
			site := ftpServer(t, c.perimeterSite, tc.tls)
			c.startInApp(t, "ftp", site.Args()...)
			c.waitListen(t, 21)
			ftpThroughPerimeter(t, c.perimeterSite, site)
			c.serviceLetIn(t, 21)
		})
	}
}
