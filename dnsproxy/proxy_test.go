package dnsproxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/net/ipv4"

	"github.com/procgate/procgate/ruleset"
)

// lookupCounter is a Config whose Lookup counts its calls and refuses
// every query: no test here asks any resolver.
func lookupCounter(n *atomic.Int32) Config {
	return Config{
		Lookup: func(string, netip.AddrPort, netip.AddrPort) (Redirect, error) {
			n.Add(1)
			return Redirect{}, errors.New("not redirected")
		},
		Learn: func([]ruleset.Learned) error { return nil },
		Log:   slog.New(slog.DiscardHandler),
	}
}

func packed(t *testing.T, m *dns.Msg) []byte {
	t.Helper()
	out, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestCloseAnswersNoMore: a query read just before Close is not answered
// once Close has begun. The daemon stops the thread that a namespace's
// proxy runs Lookup and Dial on right after Close returns.
func TestCloseAnswersNoMore(t *testing.T) {
	raw, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var lookups atomic.Int32
	p := &Proxy{cfg: lookupCounter(&lookups), raw: raw, stop: make(chan struct{})}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	q := new(dns.Msg).SetQuestion("example.com.", dns.TypeA)
	from := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
	p.answerUDP(packed(t, q), from, netip.MustParseAddrPort("127.0.0.2:53"), func([]byte) {})
	p.wg.Wait()
	if n := lookups.Load(); n != 0 {
		t.Errorf("%d lookups after Close, want 0", n)
	}
}

// TestCloseEndsServe: Close leaves no goroutine of Serve behind when
// Serve's ctx outlives the proxy (the daemon's own proxy, stopped before
// the daemon's ctx ends). Close waits for its goroutines, so what is left
// after it is a leak, not a goroutine yet to end.
func TestCloseEndsServe(t *testing.T) {
	// Listen's sockets but the one Serve reads, on loopback: no
	// privilege needed to bind it to lo.
	raw, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var lookups atomic.Int32
	p := &Proxy{cfg: lookupCounter(&lookups), raw: raw, udp: ipv4.NewPacketConn(raw), stop: make(chan struct{})}
	served := make(chan struct{})
	go func() {
		defer close(served)
		p.Serve(context.Background())
	}()
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	<-served
	buf := make([]byte, 1<<20)
	stacks := string(buf[:runtime.Stack(buf, true)])
	if strings.Contains(stacks, "dnsproxy.(*Proxy).Serve") {
		t.Errorf("a goroutine of Serve is left after Close:\n%s", stacks)
	}
}

// TestCloseEndsIdleTCP: Close ends a TCP client's connection that waits
// for its next query, rather than waiting for the client or the read
// deadline (twice Timeout, an hour here).
func TestCloseEndsIdleTCP(t *testing.T) {
	raw, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var lookups atomic.Int32
	cfg := lookupCounter(&lookups)
	cfg.Timeout = time.Hour
	p := &Proxy{cfg: cfg, raw: raw, udp: ipv4.NewPacketConn(raw), tcp: l, stop: make(chan struct{})}
	go p.Serve(context.Background())
	client, err := net.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	for served := false; !served; {
		p.mu.Lock()
		served = len(p.conns) == 1
		p.mu.Unlock()
		runtime.Gosched()
	}
	closed := make(chan error)
	go func() { closed <- p.Close() }()
	// A bound on a hang, not on speed: without the fix Close waits an hour.
	select {
	case <-closed:
	case <-time.After(time.Minute):
		t.Fatal("Close waits for an idle TCP client")
	}
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Error("the client's connection is still open")
	}
}

// TestHandleDropsMalformedQueries: what is not one well-formed question is
// dropped before the kernel is asked about its socket, and never panics.
func TestHandleDropsMalformedQueries(t *testing.T) {
	q := new(dns.Msg).SetQuestion("example.com.", dns.TypeA)
	good := packed(t, q)
	resp := new(dns.Msg).SetReply(q)
	two := new(dns.Msg).SetQuestion("example.com.", dns.TypeA)
	two.Question = append(two.Question, dns.Question{Name: "example.org.", Qtype: dns.TypeA, Qclass: dns.ClassINET})
	none := new(dns.Msg)
	none.Id = 1
	// A label that points past the end of the message.
	badPtr := append(append([]byte(nil), good[:12]...), 0xc0, 0xff, 0, 1, 0, 1)
	for _, tc := range []struct {
		name  string
		query []byte
	}{
		{"empty", nil},
		{"one byte", []byte{0}},
		{"short header", good[:11]},
		{"header only", good[:12]},
		{"name cut short", good[:16]},
		{"compression pointer out of bounds", badPtr},
		{"response", packed(t, resp)},
		{"no question", packed(t, none)},
		{"two questions", packed(t, two)},
		{"all ones", []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var lookups atomic.Int32
			p := &Proxy{cfg: lookupCounter(&lookups)}
			src, dst := netip.MustParseAddrPort("127.0.0.1:40000"), netip.MustParseAddrPort("127.0.0.2:53")
			for _, network := range []string{"udp", "tcp"} {
				if reply := p.handle(tc.query, src, dst, network); reply != nil {
					t.Errorf("%s: replied %x, want nothing", network, reply)
				}
			}
			if n := lookups.Load(); n != 0 {
				t.Errorf("%d lookups, want 0", n)
			}
		})
	}
	// The table's well-formed query does reach Lookup: the rows above are
	// dropped for their own fault.
	var lookups atomic.Int32
	p := &Proxy{cfg: lookupCounter(&lookups)}
	p.handle(good, netip.MustParseAddrPort("127.0.0.1:40000"), netip.MustParseAddrPort("127.0.0.2:53"), "udp")
	if lookups.Load() != 1 {
		t.Errorf("a well-formed query: %d lookups, want 1", lookups.Load())
	}
}
