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

// Redirect is what the kernel knows of a query that came to the proxy at
// one loopback address: the resolver the app asked and the app.
type Redirect struct {
	Resolver netip.AddrPort
	App      string
}

// Config wires the proxy to the kernel.
type Config struct {
	// Lookup finds the socket redirected to a loopback address.
	Lookup func(dst netip.Addr) (Redirect, error)
	// Learn puts an answer's addresses in force; the answer is relayed
	// only after it returns nil.
	Learn func([]ruleset.Learned) error
	// Timeout bounds one exchange with a resolver; 0: 5 s.
	Timeout time.Duration
	Log     *slog.Logger
}

// Proxy listens on one port, UDP and TCP, of every address of its network
// namespace, and answers only queries from and to loopback.
type Proxy struct {
	cfg  Config
	udp  *ipv4.PacketConn
	raw  net.PacketConn
	tcp  net.Listener
	Port uint16
	wg   sync.WaitGroup
}

// Listen binds the proxy's sockets on a port the kernel picks, the same
// for UDP and TCP.
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
	// reaches it.
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
		port := raw.LocalAddr().(*net.UDPAddr).Port
		tcp, err := lc.Listen(ctx, "tcp4", fmt.Sprintf("0.0.0.0:%d", port))
		if err != nil {
			raw.Close()
			lastErr = err
			continue
		}
		p := &Proxy{cfg: cfg, raw: raw, udp: ipv4.NewPacketConn(raw), tcp: tcp, Port: uint16(port)}
		if err := p.udp.SetControlMessage(ipv4.FlagDst, true); err != nil {
			p.Close()
			return nil, fmt.Errorf("dns proxy: IP_PKTINFO: %w", err)
		}
		return p, nil
	}
	return nil, fmt.Errorf("dns proxy: no port free for both udp and tcp: %w", lastErr)
}

// Close stops the proxy and waits for the queries in flight.
func (p *Proxy) Close() error {
	err := errors.Join(p.raw.Close(), p.tcp.Close())
	p.wg.Wait()
	return err
}

// Serve answers queries until ctx ends or Close.
func (p *Proxy) Serve(ctx context.Context) {
	go func() {
		<-ctx.Done()
		p.raw.Close()
		p.tcp.Close()
	}()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.serveTCP()
	}()
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
		q := append([]byte(nil), buf[:n]...)
		dst := cm.Dst
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			reply := p.handle(q, dst, "udp")
			if reply != nil {
				_, _ = p.udp.WriteTo(reply, &ipv4.ControlMessage{Src: dst}, from)
			}
		}()
	}
}

func (p *Proxy) serveTCP() {
	for {
		c, err := p.tcp.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
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
				reply := p.handle(buf, local.IP, "tcp")
				if reply == nil {
					return
				}
				if _, err := conn.Write(reply); err != nil {
					return
				}
			}
		}()
	}
}

// handle answers one query that came to dst: nil to drop it.
func (p *Proxy) handle(query []byte, dst net.IP, network string) []byte {
	var m dns.Msg
	if err := m.Unpack(query); err != nil || m.Response || len(m.Question) != 1 {
		return nil
	}
	d, ok := netip.AddrFromSlice(dst)
	if !ok {
		return nil
	}
	r, err := p.cfg.Lookup(d.Unmap())
	if err != nil {
		p.cfg.Log.Warn("DNS query at an address no app socket was redirected to", "dst", d, "err", err)
		return nil
	}
	c := &dns.Client{Net: network, Timeout: p.cfg.Timeout}
	resp, _, err := c.Exchange(&m, r.Resolver.String())
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
		var addr netip.Addr
		switch a := rr.(type) {
		case *dns.A:
			addr, _ = netip.AddrFromSlice(a.A.To4())
		case *dns.AAAA:
			addr, _ = netip.AddrFromSlice(a.AAAA)
		default:
			continue
		}
		owner := strings.ToLower(rr.Header().Name)
		t, have := ttl[owner]
		if !have || !addr.IsValid() {
			continue
		}
		t = min(t, rr.Header().Ttl)
		answer := strings.Join(append(append([]string(nil), chain[owner]...), rr.String()), "; ")
		out = append(out, ruleset.Learned{App: app, Name: name, Addr: addr.Unmap(),
			Expires: now.Add(time.Duration(t) * time.Second), Answer: strings.ReplaceAll(answer, "\t", " "), Resolver: resolver})
	}
	return out
}
