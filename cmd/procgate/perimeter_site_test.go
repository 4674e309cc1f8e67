package main

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/pinholetest"
	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/pki"
)

// siteRules let srv1 (the server's agent) open holes to itself on the aux
// range except for the second external host (line 5), and keep the
// control ports (FTP's 21, bulk's 4600) open as services: the gateway
// drops every other new inbound connection to the protected range that no
// hole admits.
const siteRules = `host srv1 10.9.0.5,fd09::5
allow srv1 * * * * self 40000-40100
service srv1 tcp 21,4600
deny * mallory * * * * *
deny srv1 * * 203.0.113.10 * * *
`

// perimeterSite is nstest.Site with pinholetest's gateway in the router
// (in this process), a server certificate for vsftpd, and the agent's API
// client.
type perimeterSite struct {
	nstest.Site
	gw  *pinholetest.Gateway
	pki string // the gateway's PKI: ca.crt, srv1.crt/.key (the agent), ftp.crt/.key (vsftpd)
	// srv1 is a client with the agent's certificate, dialing from the
	// server.
	srv1  *perimeter.Client
	gwURL string
	// rulesPath is the site rules' file.
	rulesPath string
}

func newPerimeterSite(t *testing.T, lease time.Duration) *perimeterSite {
	t.Helper()
	nstest.RequireRoot(t)
	site := nstest.NewSite(t)
	gw := pinholetest.StartGateway(t, site, siteRules, lease)
	gw.Issue(t, pki.IssueRequest{Name: "ftp", Usage: pki.Server, Hosts: []string{nstest.Server4}})
	s := &perimeterSite{Site: site, gw: gw, pki: gw.PKI, gwURL: gw.URL, rulesPath: gw.RulesPath}
	s.srv1 = s.client(t, "srv1")
	return s
}

func (s *perimeterSite) files(name string) pki.Files { return s.gw.Files(name) }

// client is an API client with name's certificate, dialing from the server.
func (s *perimeterSite) client(t *testing.T, name string) *perimeter.Client {
	return s.gw.Client(t, name, s.Server)
}

// serviceLetIn checks that the control port is let in by the
// `service` line: the site's services counted packets and the gateway
// holds no hole for it.
func (s *perimeterSite) serviceLetIn(t *testing.T, port int) {
	t.Helper()
	_, counted, err := s.gw.Table().Counters()
	if err != nil {
		t.Fatal(err)
	}
	if counted[s.rulesPath+":3"] == 0 {
		t.Errorf("the service line %s:3 counted no packets: %v", s.rulesPath, counted)
	}
	els, err := s.gw.Table().Elements()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range els {
		if int(e.Port) == port {
			t.Errorf("a hole %v to the service's port %d: services need none", e.Key, port)
		}
	}
}

// agentHoles are the holes the agent (srv1) holds, from the gateway.
func (s *perimeterSite) agentHoles(t *testing.T) []perimeter.Hole {
	t.Helper()
	holes, err := s.gw.Controller().List("srv1")
	if err != nil {
		t.Fatal(err)
	}
	return holes
}

// waitHole waits until the agent holds a hole for peer to the server's
// port (want) or holds none to that port (!want), and returns it. The
// deadline only bounds a hang; it is not a timing assertion.
func (s *perimeterSite) waitHole(t *testing.T, proto, peer string, port int, want bool, why string) perimeter.Hole {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		holes := s.agentHoles(t)
		i := slices.IndexFunc(holes, func(h perimeter.Hole) bool {
			return int(h.Port) == port && h.Proto.String() == proto && (!want || h.Peer.String() == peer)
		})
		if want == (i >= 0) {
			if want {
				return holes[i]
			}
			return perimeter.Hole{}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: after 30s the gateway lists %+v; want a %s hole from %s to port %d: %v", why, holes, proto, peer, port, want)
		}
	}
}

// waitNoAgentHoles waits until neither the controller nor the kernel holds
// any hole of the agent.
func (s *perimeterSite) waitNoAgentHoles(t *testing.T, why string) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		holes := s.agentHoles(t)
		els, err := s.gw.Table().Elements()
		if err != nil {
			t.Fatal(err)
		}
		agentEls := slices.DeleteFunc(els, func(e perimeter.Element) bool { return e.Key.Port < 40000 })
		if len(holes) == 0 && len(agentEls) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: after 60s the gateway lists %+v and the kernel holds %+v", why, holes, agentEls)
		}
	}
}

// blockTimeout is how long a connection the router drops is given; that
// it was dropped is checked by the drop rule's counter too.
const blockTimeout = 500 * time.Millisecond

// mustBlock checks that a TCP connection from ns to addr is dropped by the
// gateway's default drop.
func (s *perimeterSite) mustBlock(t *testing.T, ns, addr, why string) {
	t.Helper()
	before, err := s.gw.Table().Dropped()
	if err != nil {
		t.Fatal(err)
	}
	c, err := nstest.DialIn(ns, "tcp", addr, blockTimeout)
	if err == nil {
		c.Close()
		t.Fatalf("%s: %s accepted a connection, want the router to drop it", why, addr)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("%s: %v, want a timeout (a drop)", why, err)
	}
	after, err := s.gw.Table().Dropped()
	if err != nil {
		t.Fatal(err)
	}
	if after <= before {
		t.Fatalf("%s: no answer, but the drop rules counted nothing (%d → %d)", why, before, after)
	}
}

// startInServer runs args in the server's namespace until the test ends
// and returns a function that stops it early. Its output goes to the test
// log when the test fails.
func (s *perimeterSite) startInServer(t *testing.T, args ...string) (stop func()) {
	t.Helper()
	cmd := exec.Command("nsenter", append([]string{"--net=" + s.Server}, args...)...)
	cmd.Env = append(os.Environ(), envAsMain+"=1")
	out := &pinholetest.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	// A program started through procgate run is the daemon's child, not
	// this one's: it may hold the output pipe after its launcher is gone.
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			// SIGTERM first: procgate run relays it to the program.
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				cmd.Process.Kill()
				<-done
			}
		})
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("%v:\n%s", args, out.String())
		}
	})
	return stop
}

// waitListen waits until something in the server accepts TCP on port.
func (s *perimeterSite) waitListen(t *testing.T, port int) {
	t.Helper()
	addr := net.JoinHostPort(nstest.Server4, strconv.Itoa(port))
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		c, err := nstest.DialIn(s.Server, "tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listens on %s after 20s: %v", addr, err)
		}
	}
}
