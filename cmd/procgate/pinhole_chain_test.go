package main

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/nstest"
)

// chainPolicy gives the server's two programs dynamic pinholes: vsftpd
// (TCP control 21, TCP passive ports) and bulk (TCP control 4600, UDP data
// ports). Their own connections are not what the tests are about: the
// internal range is one no test touches.
const chainPolicy = `version: 1
internal:
  prefixes: [192.0.2.0/24]
apps:
  - name: ftp
    inbound:
      dynamic:
        control: [21]
        ports: [40000-40100]
        proto: tcp
        lease: %[1]s
  - name: bulk
    inbound:
      dynamic:
        control: [4600]
        ports: [40000-40100]
        proto: udp
        lease: %[1]s
`

// chainSite is the whole chain: the perimeter site, and procgate daemon
// in the server with its agent talking to the gateway as srv1.
type chainSite struct {
	*perimeterSite
	e *e2e
}

func newChainSite(t *testing.T, lease string, moreGateways ...string) *chainSite {
	t.Helper()
	s := newPerimeterSite(t, 30*time.Second)
	f := s.files("srv1")
	e := newE2EIn(t, fmt.Sprintf(chainPolicy, lease), s.Server, true,
		"--gateway", strings.Join(append([]string{s.gwURL}, moreGateways...), ","),
		"--gateway-ca", f.CA, "--gateway-cert", f.Cert, "--gateway-key", f.Key)
	return &chainSite{perimeterSite: s, e: e}
}

// startInApp runs args as app in the server (procgate run, in the
// server's namespace) until the test ends, and returns a stop function.
func (c *chainSite) startInApp(t *testing.T, app string, args ...string) (stop func()) {
	t.Helper()
	return c.startInServer(t, append([]string{c.e.bin, "--socket", c.e.socket, "run", "--app", app, "--"}, args...)...)
}

// TestPinholeFTPRefusedPeer has the second external host, whose address
// the site's rules deny (site.rules:5), log in and ask for a passive port:
// the agent asks for the hole on its own (vsftpd's listen), the gateway
// refuses it naming the rule, the daemon's audit log records the refusal,
// and the port stays closed. (TestPinholeEndToEnd covers a refusal of a
// peer named through the local API, and a killed agent's holes expiring.)
func TestPinholeFTPRefusedPeer(t *testing.T) {
	c := newChainSite(t, "10s")
	site := ftpServer(t, c.perimeterSite, false)
	c.startInApp(t, "ftp", site.Args()...)
	c.waitListen(t, 21)
	_, data := pasvFrom(t, c.Other, nil)
	c.serviceLetIn(t, 21)
	port := fmt.Sprintf(`"port":%d`, data.Port())
	waitEvent(t, c.e, `"kind":"pinhole"`, `"verdict":"refuse"`, `"peer":"`+nstest.Other4+`"`, port)
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(c.gw.Log(), `"msg":"pinhole refused"`); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the gateway logged no refusal")
		}
	}
	if !strings.Contains(c.gw.Log(), "site.rules:5") {
		t.Errorf("the gateway's refusal does not name the deny rule site.rules:5")
	}
	if holes := c.agentHoles(t); len(holes) != 0 {
		t.Fatalf("the gateway holds %+v after a refusal", holes)
	}
	c.mustBlock(t, c.Other, data.String(), "the refused passive port")
}
