package dnsproxy

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"

	"github.com/miekg/dns"

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
	p := &Proxy{cfg: lookupCounter(&lookups), raw: raw}
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
