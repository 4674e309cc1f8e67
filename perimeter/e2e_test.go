package perimeter

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/pki"
)

// The e2e topology is nstest.Site: two external hosts and a protected
// server, each on its own link to the router, which runs the gateway (API on
// 10.9.0.1).
var (
	client4, client6 = nstest.Client4, nstest.Client6
	other4, other6   = nstest.Other4, nstest.Other6
	server4, server6 = nstest.Server4, nstest.Server6
	routerAPI        = nstest.RouterToServer4
	e2eProtect       = []netip.Prefix{netip.MustParsePrefix(nstest.ServerPrefix4), netip.MustParsePrefix(nstest.ServerPrefix6)}
)

const (
	auxPort = 40000 // TCP: a greeting server
	udpPort = 40001 // UDP: an echo server
)

const e2eRules = `host srv1 10.9.0.5,fd09::5
allow srv1 * * * * self 40000-40100
deny * mallory * * * * *
`

type topology struct {
	client, other, router, server string
}

func newTopology(t *testing.T) topology {
	t.Helper()
	s := nstest.NewSite(t)
	return topology{client: s.Client, other: s.Other, router: s.Router, server: s.Server}
}

// dialIn dials from a thread in the namespace ns.
func dialIn(ns, network, addr string, timeout time.Duration) (net.Conn, error) {
	return nstest.DialIn(ns, network, addr, timeout)
}

// serve runs, on every address of ns, a TCP server that greets each
// connection on auxPort and a UDP echo server on udpPort.
func serve(t *testing.T, ns string) {
	t.Helper()
	var ln net.Listener
	var pc net.PacketConn
	err := nstest.InNS(t, ns, func() (err error) {
		if ln, err = net.Listen("tcp", ":40000"); err != nil {
			return err
		}
		pc, err = net.ListenPacket("udp", ":40001")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); pc.Close(); wg.Wait() })
	wg.Add(2)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hello\n"))
			c.Close()
		}
	}()
	go func() {
		defer wg.Done()
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
}

type e2e struct {
	top   topology
	cfg   GatewayConfig
	gw    *Gateway
	agent *Client
	log   *syncBuffer
}

// syncBuffer is a log sink the gateway's goroutines may write at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startE2E(t *testing.T) *e2e {
	t.Helper()
	nstest.RequireRoot(t)
	top := newTopology(t)
	serve(t, top.server)

	ca, err := pki.NewCA("e2e CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	rules := filepath.Join(t.TempDir(), "site.rules")
	if err := os.WriteFile(rules, []byte(e2eRules), 0o644); err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("gateway log:\n%s", logs)
		}
	})
	e := &e2e{top: top, log: logs, cfg: GatewayConfig{
		RulesPath: rules, NetNS: top.router, Lease: 30 * time.Second, Protect: e2eProtect,
		TLS: pki.ServerTLS(issuePair(t, ca, "gateway", pki.Server, routerAPI), ca.Pool()),
		Log: slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}}
	e.start(t)
	t.Cleanup(func() {
		if err := e.gw.Close(); err != nil {
			t.Errorf("close gateway: %v", err)
		}
	})
	agentTLS := pki.ClientTLS(issuePair(t, ca, "srv1", pki.Client), ca.Pool())
	e.agent = NewClient("https://"+e.gw.Addr().String(), agentTLS)
	// The agent runs on the server: its requests leave from there.
	e.agent.HTTP.Transport.(*http.Transport).DialContext = func(_ context.Context, network, addr string) (net.Conn, error) {
		return dialIn(top.server, network, addr, 10*time.Second)
	}
	return e
}

// start starts the gateway, its API on a fixed port of the router so that
// a restarted gateway is found where the agent knows it.
func (e *e2e) start(t *testing.T) {
	t.Helper()
	err := nstest.InNS(t, e.top.router, func() (err error) {
		e.cfg.Listener, err = net.Listen("tcp", net.JoinHostPort(routerAPI, "8443"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if e.gw, err = StartGateway(e.cfg); err != nil {
		t.Fatal(err)
	}
}

// blockTimeout is how long a connection attempt that the router drops is
// given. That it failed is checked by the router's drop counter too, so a
// slow machine cannot make the test pass wrongly.
const blockTimeout = 500 * time.Millisecond

// exchange connects from ns to addr over network and returns what the
// server answers: its greeting (tcp) or the echo of a datagram (udp).
func exchange(ns, network, addr string, timeout time.Duration) (string, error) {
	c, err := dialIn(ns, network, addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if network == "udp" {
		if _, err := c.Write([]byte("hello\n")); err != nil {
			return "", err
		}
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		return string(buf[:n]), err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}

// mustBlock checks that traffic from ns to addr is dropped by the gateway's
// default-drop rule.
func (e *e2e) mustBlock(t *testing.T, ns, network, addr, when string) {
	t.Helper()
	before, err := e.gw.Table().Dropped()
	if err != nil {
		t.Fatal(err)
	}
	got, err := exchange(ns, network, addr, blockTimeout)
	if err == nil {
		t.Fatalf("%s: %s %s answered %q, want the router to drop it", when, network, addr, got)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("%s: %v, want a timeout (a drop)", when, err)
	}
	after, err := e.gw.Table().Dropped()
	if err != nil {
		t.Fatal(err)
	}
	if after <= before {
		t.Fatalf("%s: no answer, but the drop rules counted nothing (%d → %d)", when, before, after)
	}
}

// mustPass checks that the server answers traffic from ns to addr.
func (e *e2e) mustPass(t *testing.T, ns, network, addr, when string) {
	t.Helper()
	if got, err := exchange(ns, network, addr, 10*time.Second); err != nil || got != "hello\n" {
		t.Fatalf("%s: %s %s answered %q, %v", when, network, addr, got, err)
	}
}

func waitEmpty(t *testing.T, tab *Table, why string) {
	t.Helper()
	// Waiting for the kernel is not a timing assertion: the deadline only
	// bounds a hang.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		els, err := tab.Elements()
		if err != nil {
			t.Fatal(err)
		}
		if len(els) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the kernel still holds %v: %s", els, why)
		}
	}
}

func TestGatewayEndToEnd(t *testing.T) {
	e := startE2E(t)
	ctx := context.Background()
	aux := net.JoinHostPort(server4, "40000")
	hole := Target{Proto: "tcp", Peer: client4, Host: server4, Port: auxPort}

	e.mustBlock(t, e.top.client, "tcp", aux, "before any hole")
	h, err := e.agent.Open(ctx, Request{Target: hole, User: "alice"})
	if err != nil {
		t.Fatal(err)
	}
	if h.Delegate != "srv1" || h.Rule == "" {
		t.Errorf("opened %+v", h)
	}
	e.mustPass(t, e.top.client, "tcp", aux, "through the hole")
	e.mustBlock(t, e.top.other, "tcp", aux, "another external host while the client's hole is open")
	holes, err := e.agent.List(ctx)
	if err != nil || len(holes) != 1 || holes[0].Packets < 2 {
		t.Errorf("listed %+v, %v; want the hole with the packets of a connection counted", holes, err)
	}

	if res, err := e.agent.Close(ctx, []Target{hole}); err != nil || len(res.Closed) != 1 {
		t.Fatalf("close: %+v, %v", res, err)
	}
	e.mustBlock(t, e.top.client, "tcp", aux, "after the close")

	refusals := []struct {
		name string
		req  Request
		rule string
		msg  string
	}{
		{"denied user", Request{Target: hole, User: "mallory"}, e.cfg.RulesPath + ":3", "denied by " + e.cfg.RulesPath + ":3"},
		{"port no rule allows", Request{Target: Target{Proto: "tcp", Peer: client4, Host: server4, Port: 22}, User: "alice"}, "", "no allow rule matched"},
	}
	for _, r := range refusals {
		_, err := e.agent.Open(ctx, r.req)
		var apiErr *APIError
		if !errors.As(err, &apiErr) || apiErr.Status != 403 || apiErr.Rule != r.rule || !strings.Contains(apiErr.Message, r.msg) {
			t.Errorf("%s: %v (%+v), want 403 naming %q", r.name, err, apiErr, r.msg)
		}
		if !strings.Contains(e.log.String(), `"msg":"pinhole refused","delegate":"srv1","user":"`+r.req.User+`"`) {
			t.Errorf("%s: no audit record of the refusal", r.name)
		}
	}
	e.mustBlock(t, e.top.client, "tcp", aux, "after the refusals")

	// A dead agent: it opens a hole with a short lease and never renews.
	if _, err := e.agent.Open(ctx, Request{Target: hole, User: "alice", LeaseSeconds: 1}); err != nil {
		t.Fatal(err)
	}
	waitEmpty(t, e.gw.Table(), "the lease ran out")
	e.mustBlock(t, e.top.client, "tcp", aux, "after the lease ran out")
}

// TestGatewayIPv6UDP checks the other set and the other protocol: the
// ip6 lookup's register layout and a UDP hole.
func TestGatewayIPv6UDP(t *testing.T) {
	e := startE2E(t)
	ctx := context.Background()
	for _, tc := range []struct {
		network, peer, other, host string
		port                       int
	}{
		{"tcp", client6, other6, server6, auxPort},
		{"udp", client4, other4, server4, udpPort},
		{"udp", client6, other6, server6, udpPort},
	} {
		addr := net.JoinHostPort(tc.host, strconv.Itoa(tc.port))
		name := tc.network + " " + addr
		e.mustBlock(t, e.top.client, tc.network, addr, name+" before the hole")
		hole := Target{Proto: tc.network, Peer: tc.peer, Host: tc.host, Port: tc.port}
		if _, err := e.agent.Open(ctx, Request{Target: hole, User: "alice"}); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		e.mustPass(t, e.top.client, tc.network, addr, name+" through the hole")
		e.mustBlock(t, e.top.other, tc.network, addr, name+" from the other host")
	}
}

// TestGatewayRestart stops the gateway with two holes open and starts a new
// one: it adopts both from the kernel; the agent's sync claims one (the
// other was closed while the gateway was down), and the kernel ends with
// exactly that one.
func TestGatewayRestart(t *testing.T) {
	e := startE2E(t)
	ctx := context.Background()
	tcpHole := Target{Proto: "tcp", Peer: client4, Host: server4, Port: auxPort}
	udpHole := Target{Proto: "udp", Peer: client4, Host: server4, Port: udpPort}
	for _, h := range []Target{tcpHole, udpHole} {
		if _, err := e.agent.Open(ctx, Request{Target: h, User: "alice"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.gw.Close(); err != nil {
		t.Fatal(err)
	}
	e.mustPass(t, e.top.client, "tcp", net.JoinHostPort(server4, "40000"), "while the gateway is down")
	e.start(t)
	if holes, err := e.agent.List(ctx); err != nil || len(holes) != 2 {
		t.Fatalf("after the restart the gateway lists %+v, %v; want both holes adopted", holes, err)
	}
	res, err := e.agent.Sync(ctx, []Request{{Target: udpHole, User: "alice"}})
	if err != nil || len(res.Holes) != 1 || len(res.Closed) != 1 {
		t.Fatalf("sync: %+v, %v", res, err)
	}
	els, err := e.gw.Table().Elements()
	if err != nil || len(els) != 1 || els[0].Key.Target() != udpHole {
		t.Fatalf("kernel after the sync: %+v, %v; want the udp hole only", els, err)
	}
	e.mustPass(t, e.top.client, "udp", net.JoinHostPort(server4, "40001"), "the claimed hole")
	e.mustBlock(t, e.top.client, "tcp", net.JoinHostPort(server4, "40000"), "the hole no agent claimed")
}

// TestGatewayServices: `service` lines let new connections in without a
// hole, from their sources only, counted per line; a reload replaces them.
func TestGatewayServices(t *testing.T) {
	e := startE2E(t)
	svcRules := e2eRules + "service srv1 tcp 40000 from 198.51.100.0/24\nservice srv1 udp 40001\n"
	if err := os.WriteFile(e.cfg.RulesPath, []byte(svcRules), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := e.gw.Reload(); err != nil {
		t.Fatal(err)
	}
	tcp4, tcp6 := net.JoinHostPort(server4, "40000"), net.JoinHostPort(server6, "40000")
	udp4, udp6 := net.JoinHostPort(server4, "40001"), net.JoinHostPort(server6, "40001")
	e.mustPass(t, e.top.client, "tcp", tcp4, "service from the client's range")
	e.mustBlock(t, e.top.other, "tcp", tcp4, "service, other host outside `from`")
	e.mustBlock(t, e.top.client, "tcp", tcp6, "service from an IPv4 range, IPv6 client")
	e.mustPass(t, e.top.other, "udp", udp4, "udp service from anywhere")
	e.mustPass(t, e.top.other, "udp", udp6, "udp service from anywhere, IPv6")
	if els, err := e.gw.Table().Elements(); err != nil || len(els) != 0 {
		t.Fatalf("services opened holes: %v, %v", els, err)
	}
	_, counted, err := e.gw.Table().Counters()
	if err != nil {
		t.Fatal(err)
	}
	rules := e.cfg.RulesPath
	if counted[rules+":4"] == 0 || counted[rules+":5"] < 2 {
		t.Errorf("service counters %v: want packets on %s:4 and on :5 from both families", counted, rules)
	}
	// A (re)starting gateway installs the services with the chain.
	if err := e.gw.Close(); err != nil {
		t.Fatal(err)
	}
	e.start(t)
	e.mustPass(t, e.top.client, "tcp", tcp4, "service after a restart")
	e.mustBlock(t, e.top.other, "tcp", tcp4, "service after a restart, other host")

	if err := os.WriteFile(e.cfg.RulesPath, []byte(e2eRules), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := e.gw.Reload(); err != nil {
		t.Fatal(err)
	}
	e.mustBlock(t, e.top.client, "tcp", tcp4, "after a reload without services")
	if _, counted, err := e.gw.Table().Counters(); err != nil || len(counted) != 0 {
		t.Errorf("after a reload without services the chain counts %v, %v", counted, err)
	}
}
