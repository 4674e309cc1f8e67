// Package dnsproxy is the daemon's DNS proxy for name grants: the kernel
// redirects the DNS queries of apps with name grants to it (bpf,
// dnsredirect.c), it forwards each to the resolver the app asked, learns
// the addresses of the answer for the app (bpf.Enforcer.Learn) and only
// then relays the answer, so the grant is in force before the app can use
// it. An answer it did not relay, or that came from anywhere but the
// resolver it asked, grants nothing.
package dnsproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
)

// Redirect is what the kernel knows of a query that came to the proxy:
// the resolver the app asked and the app.
type Redirect struct {
	Resolver netip.AddrPort
	App      string
}

// Config wires the proxy to the kernel.
type Config struct {
	// Lookup finds the socket redirected to the proxy whose query came
	// from src to dst (127.a.b.c, or [::1] for IPv6 resolvers).
	Lookup func(network string, src, dst netip.AddrPort) (Redirect, error)
	// Learn puts an answer's addresses in force; the answer is relayed
	// only after it returns nil.
	Learn func([]ruleset.Learned) error
	// Dial, if set, makes the socket of one exchange with a resolver
	// (network "udp" or "tcp"), connected to it: a proxy serving another
	// network namespace than the calling thread's makes it there. Nil:
	// net.Dial.
	Dial func(network string, resolver netip.AddrPort) (net.Conn, error)
	// Timeout bounds one exchange with a resolver; 0: 5 s.
	Timeout time.Duration
	Log     *slog.Logger
}

// Proxy listens on one port, UDP and TCP, of every IPv4 address of its
// network namespace and of [::1] (when the namespace has IPv6), and
// answers only queries from and to loopback.
type Proxy struct {
	cfg  Config
	udp  *ipv4.PacketConn
	raw  net.PacketConn
	tcp  net.Listener
	udp6 net.PacketConn // nil without IPv6
	tcp6 net.Listener
	Port uint16
	// mu guards closed and conns. Once Close has begun no goroutine joins wg: an Add
	// racing with Wait could let a query be answered after Close returned,
	// when the daemon has stopped the namespace's thread that Lookup and
	// Dial run on (a send on its closed channel panics).
	mu     sync.Mutex
	closed bool
	// stop is closed by Close: it ends Serve's watch of a ctx that
	// outlives the proxy.
	stop chan struct{}
	// conns are the TCP connections being served: Close ends them, or a
	// client that keeps one open and idle would hold Close for up to
	// twice Timeout.
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// Listen binds the proxy's sockets on a port the kernel picks, the same
// for UDP and TCP, IPv4 and IPv6.
func Listen(cfg Config) (*Proxy, error) {
	if cfg.Lookup == nil || cfg.Learn == nil {
		return nil, errors.New("dnsproxy: Lookup and Learn are required")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	// 0.0.0.0, for each redirected socket comes to its own 127.a.b.c,
	// but bound to the loopback device: nothing from outside the host
	// reaches it. IPv6 loopback is the one address [::1]; the kernel names
	// the socket behind a query there by its source.
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.BindToDevice(int(fd), "lo") })
		return errors.Join(err, serr)
	}}
	ctx := context.Background()
	var lastErr error
	for range 10 {
		raw, err := lc.ListenPacket(ctx, "udp4", "0.0.0.0:0")
		if err != nil {
			return nil, fmt.Errorf("dns proxy: listen udp on lo: %w", err)
		}
		p := &Proxy{cfg: cfg, raw: raw, udp: ipv4.NewPacketConn(raw), Port: uint16(raw.LocalAddr().(*net.UDPAddr).Port), stop: make(chan struct{})}
		if lastErr = p.listenRest(ctx, lc); lastErr != nil {
			p.Close()
			continue
		}
		if err := p.udp.SetControlMessage(ipv4.FlagDst, true); err != nil {
			p.Close()
			return nil, fmt.Errorf("dns proxy: IP_PKTINFO: %w", err)
		}
		return p, nil
	}
	return nil, fmt.Errorf("dns proxy: no port free for udp and tcp, IPv4 and IPv6: %w", lastErr)
}

// listenRest binds TCP on IPv4, and UDP and TCP on [::1], on p.Port. A
// namespace without IPv6 loopback gets no IPv6 sockets: no IPv6 resolver
// is reachable there either.
func (p *Proxy) listenRest(ctx context.Context, lc net.ListenConfig) error {
	var err error
	if p.tcp, err = lc.Listen(ctx, "tcp4", fmt.Sprintf("0.0.0.0:%d", p.Port)); err != nil {
		return err
	}
	at := netip.AddrPortFrom(netip.IPv6Loopback(), p.Port).String()
	if p.udp6, err = lc.ListenPacket(ctx, "udp6", at); err != nil {
		if errors.Is(err, unix.EADDRNOTAVAIL) || errors.Is(err, unix.EAFNOSUPPORT) {
			p.cfg.Log.Info("DNS proxy without IPv6: no [::1] in its network namespace", "err", err)
			return nil
		}
		return err
	}
	p.tcp6, err = lc.Listen(ctx, "tcp6", at)
	return err
}

// Close stops the proxy and waits for the queries in flight.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if !p.closed {
		p.closed = true
		close(p.stop)
	}
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	err := p.closeSockets()
	p.wg.Wait()
	return err
}

// spawn runs f on a goroutine Close waits for, unless Close has begun
// (false).
func (p *Proxy) spawn(f func()) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		f()
	}()
	return true
}

// track records c for Close to end, unless Close has begun (false);
// untrack forgets it.
func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	if p.conns == nil {
		p.conns = map[net.Conn]struct{}{}
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.conns, c)
}

func (p *Proxy) closeSockets() error {
	errs := []error{p.raw.Close()}
	if p.tcp != nil {
		errs = append(errs, p.tcp.Close())
	}
	if p.udp6 != nil {
		errs = append(errs, p.udp6.Close())
	}
	if p.tcp6 != nil {
		errs = append(errs, p.tcp6.Close())
	}
	return errors.Join(errs...)
}

// Serve answers queries until ctx ends or Close.
func (p *Proxy) Serve(ctx context.Context) {
	p.spawn(func() {
		select {
		case <-ctx.Done():
			_ = p.closeSockets()
		case <-p.stop:
		}
	})
	for _, l := range []net.Listener{p.tcp, p.tcp6} {
		if l == nil {
			continue
		}
		p.spawn(func() { p.serveTCP(l) })
	}
	if p.udp6 != nil {
		p.spawn(p.serveUDP6)
	}
	buf := make([]byte, 65535)
	for {
		n, cm, src, err := p.udp.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		from, ok := src.(*net.UDPAddr)
		if !ok || cm == nil || !from.IP.IsLoopback() || !cm.Dst.IsLoopback() {
			continue // only redirected queries, from this host's apps
		}
		dst, _ := netip.AddrFromSlice(cm.Dst)
		p.answerUDP(buf[:n], from, netip.AddrPortFrom(dst.Unmap(), p.Port), func(reply []byte) {
			_, _ = p.udp.WriteTo(reply, &ipv4.ControlMessage{Src: cm.Dst}, from)
		})
	}
}

// serveUDP6 answers the queries that come to [::1], each from its own
// socket's address.
func (p *Proxy) serveUDP6() {
	buf := make([]byte, 65535)
	for {
		n, src, err := p.udp6.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		from, ok := src.(*net.UDPAddr)
		if !ok || !from.IP.IsLoopback() {
			continue
		}
		p.answerUDP(buf[:n], from, netip.AddrPortFrom(netip.IPv6Loopback(), p.Port), func(reply []byte) {
			_, _ = p.udp6.WriteTo(reply, from)
		})
	}
}

// answerUDP answers one datagram query on a goroutine of its own.
func (p *Proxy) answerUDP(query []byte, from *net.UDPAddr, dst netip.AddrPort, send func([]byte)) {
	q := append([]byte(nil), query...)
	p.spawn(func() {
		if reply := p.handle(q, from.AddrPort(), dst, "udp"); reply != nil {
			send(reply)
		}
	})
}

func (p *Proxy) serveTCP(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			c.Close()
			continue
		}
		if !p.spawn(func() {
			defer p.untrack(c)
			defer c.Close()
			local, _ := c.LocalAddr().(*net.TCPAddr)
			remote, _ := c.RemoteAddr().(*net.TCPAddr)
			if local == nil || remote == nil || !local.IP.IsLoopback() || !remote.IP.IsLoopback() {
				return
			}
			conn := &dns.Conn{Conn: c}
			for {
				_ = c.SetDeadline(time.Now().Add(p.cfg.Timeout * 2))
				buf, err := conn.ReadMsgHeader(nil)
				if err != nil {
					return
				}
				reply := p.handle(buf, remote.AddrPort(), local.AddrPort(), "tcp")
				if reply == nil {
					return
				}
				if _, err := conn.Write(reply); err != nil {
					return
				}
			}
		}) {
			c.Close()
		}
	}
}

// handle answers one query that came from src to dst: nil to drop it.
func (p *Proxy) handle(query []byte, src, dst netip.AddrPort, network string) []byte {
	var m dns.Msg
	if err := m.Unpack(query); err != nil || m.Response || len(m.Question) != 1 {
		return nil
	}
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	r, err := p.cfg.Lookup(network, src, dst)
	if err != nil {
		p.cfg.Log.Warn("DNS query from a socket the kernel did not redirect", "src", src, "dst", dst, "err", err)
		return nil
	}
	resp, err := p.exchange(&m, network, r.Resolver)
	if err != nil {
		p.cfg.Log.Debug("DNS exchange failed", "app", r.App, "resolver", r.Resolver, "name", m.Question[0].Name, "err", err)
		return fail(&m)
	}
	facts := Facts(r.App, m.Question[0].Name, resp, time.Now(), r.Resolver)
	if len(facts) > 0 {
		if err := p.cfg.Learn(facts); err != nil {
			// The answer would name addresses the app may not reach:
			// say so rather than relay it.
			p.cfg.Log.Warn("DNS answer not learned; answering SERVFAIL", "app", r.App, "name", m.Question[0].Name, "err", err)
			return fail(&m)
		}
	}
	out, err := resp.Pack()
	if err != nil {
		return fail(&m)
	}
	return out
}

// exchange asks the resolver over a socket of its own, connected to the
// resolver: an answer from any other address does not reach it.
func (p *Proxy) exchange(m *dns.Msg, network string, resolver netip.AddrPort) (*dns.Msg, error) {
	c := &dns.Client{Net: network, Timeout: p.cfg.Timeout}
	if p.cfg.Dial == nil {
		resp, _, err := c.Exchange(m, resolver.String())
		return resp, err
	}
	conn, err := p.cfg.Dial(network, resolver)
	if err != nil {
		return nil, err
	}
	co := &dns.Conn{Conn: conn}
	defer co.Close()
	resp, _, err := c.ExchangeWithConn(m, co)
	return resp, err
}

func fail(q *dns.Msg) []byte {
	var m dns.Msg
	m.SetRcode(q, dns.RcodeServerFailure)
	out, _ := m.Pack()
	return out
}

// Facts are the addresses resp gives for the name q: A and AAAA records
// of q or of a name q leads to through the answer's CNAME chain, each
// until the least TTL along its chain. Records of other names (and other
// sections) are not facts: a resolver may add them, the app did not ask.
func Facts(app, q string, resp *dns.Msg, now time.Time, resolver netip.AddrPort) []ruleset.Learned {
	if resp == nil || resp.Rcode != dns.RcodeSuccess {
		return nil
	}
	q = strings.ToLower(dns.Fqdn(q))
	ttl := map[string]uint32{q: ^uint32(0)}
	chain := map[string][]string{q: nil}
	for range resp.Answer { // a chain is at most as long as the answer
		grew := false
		for _, rr := range resp.Answer {
			c, ok := rr.(*dns.CNAME)
			if !ok {
				continue
			}
			owner, target := strings.ToLower(c.Hdr.Name), strings.ToLower(dns.Fqdn(c.Target))
			if t, have := ttl[owner]; have {
				if _, seen := ttl[target]; !seen {
					ttl[target] = min(t, c.Hdr.Ttl)
					chain[target] = append(append([]string(nil), chain[owner]...), c.String())
					grew = true
				}
			}
		}
		if !grew {
			break
		}
	}
	name := strings.TrimSuffix(q, ".")
	var out []ruleset.Learned
	for _, rr := range resp.Answer {
		addr, ok := AddrOf(rr)
		if !ok {
			continue
		}
		owner := strings.ToLower(rr.Header().Name)
		t, have := ttl[owner]
		if !have {
			continue
		}
		t = min(t, rr.Header().Ttl)
		answer := strings.Join(append(append([]string(nil), chain[owner]...), rr.String()), "; ")
		out = append(out, ruleset.Learned{App: app, Name: name, Addr: addr.Unmap(),
			Expires: now.Add(time.Duration(t) * time.Second), Answer: strings.ReplaceAll(answer, "\t", " "), Resolver: resolver})
	}
	return out
}

// AddrOf is the address of an A or AAAA record; ok is false for any
// other record.
func AddrOf(rr dns.RR) (addr netip.Addr, ok bool) {
	switch a := rr.(type) {
	case *dns.A:
		addr, ok = netip.AddrFromSlice(a.A.To4())
	case *dns.AAAA:
		addr, ok = netip.AddrFromSlice(a.AAAA)
	}
	return addr, ok && addr.IsValid()
}
