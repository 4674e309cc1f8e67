package demo

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

const (
	// maxLine bounds what Dial reads, so a misbehaving peer cannot make it
	// buffer without end.
	maxLine = 4096
	// udpEchoProbe is what Dial sends to a UDP service.
	udpEchoProbe = "ping"
)

// services are the demo's servers, run as goroutines on sockets opened in
// their namespaces.
type services struct {
	log     *slog.Logger
	wg      sync.WaitGroup
	mu      sync.Mutex
	closers []io.Closer
}

// serveTCP listens on port in ns (both address families) and answers every
// connection with banner(peer) and closes it.
func (s *services) serveTCP(ns, role string, port uint16, banner func(peer netip.AddrPort) string) error {
	return serve(s, ns, role, "tcp", port, net.Listen, func(ln net.Listener) error {
		for {
			c, err := ln.Accept()
			if err != nil {
				return err
			}
			peer := c.RemoteAddr().(*net.TCPAddr).AddrPort()
			peer = netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port())
			// One short write into an empty socket buffer does not block, so
			// answering inline keeps the service to a single goroutine.
			if _, err := io.WriteString(c, banner(peer)); err != nil {
				s.log.Debug("demo service write", "ns", role, "peer", peer, "err", err)
			}
			c.Close()
		}
	})
}

// serveUDPEcho listens on port in ns (both address families) and sends every
// datagram back to its sender.
func (s *services) serveUDPEcho(ns, role string, port uint16) error {
	return s.serveUDP(ns, role, port, func(req []byte) []byte { return req })
}

// serveDNS answers DNS queries over UDP on port in ns from names (FQDN,
// lower case, to IPv4 addresses), with ttl; other names get NXDOMAIN.
func (s *services) serveDNS(ns, role string, port uint16, names map[string]netip.Addr, ttl uint32) error {
	return s.serveUDP(ns, role, port, func(req []byte) []byte {
		var q dns.Msg
		if q.Unpack(req) != nil || q.Response || len(q.Question) != 1 {
			return nil
		}
		m := new(dns.Msg)
		m.SetReply(&q)
		qq := q.Question[0]
		addr, ok := names[strings.ToLower(qq.Name)]
		switch {
		case !ok:
			m.Rcode = dns.RcodeNameError
		case qq.Qtype == dns.TypeA:
			m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: qq.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: ttl}, A: addr.AsSlice()}}
		}
		b, err := m.Pack()
		if err != nil {
			return nil
		}
		return b
	})
}

// serveUDP listens on port in ns (both address families) and sends each
// datagram's sender what answer makes of it; nil sends nothing.
func (s *services) serveUDP(ns, role string, port uint16, answer func(req []byte) []byte) error {
	return serve(s, ns, role, "udp", port, net.ListenPacket, func(pc net.PacketConn) error {
		buf := make([]byte, 64<<10)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return err
			}
			b := answer(buf[:n])
			if b == nil {
				continue
			}
			if _, err := pc.WriteTo(b, from); err != nil {
				s.log.Debug("demo udp write", "ns", role, "port", port, "peer", from, "err", err)
			}
		}
	})
}

// serve opens a socket with listen on a thread in ns, so that it belongs to
// ns, and runs loop on it in a goroutine until close.
func serve[C io.Closer](s *services, ns, role, network string, port uint16, listen func(network, address string) (C, error), loop func(C) error) error {
	var c C
	err := inNS(ns, func() error {
		var err error
		c, err = listen(network, fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		return fmt.Errorf("listen %s :%d in %s: %w", network, port, role, err)
	}
	s.track(c)
	s.wg.Go(func() {
		if err := loop(c); !errors.Is(err, net.ErrClosed) {
			s.log.Warn("demo service stopped", "ns", role, "network", network, "port", port, "err", err)
		}
	})
	return nil
}

func (s *services) track(c io.Closer) {
	s.mu.Lock()
	s.closers = append(s.closers, c)
	s.mu.Unlock()
}

// close stops every service and waits for their goroutines.
func (s *services) close() error {
	s.mu.Lock()
	closers := s.closers
	s.closers = nil
	s.mu.Unlock()
	var errs []error
	for _, c := range closers {
		if err := c.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, fmt.Errorf("stop demo service: %w", err))
		}
	}
	s.wg.Wait()
	return errors.Join(errs...)
}

// Dial connects to addr from a socket created in the network namespace nsPath
// and returns what the service says. For "tcp" (or "tcp4", "tcp6") that is the
// first line it sends; for "udp" (or "udp4", "udp6") Dial sends "ping" and
// returns the reply. The trailing newline is removed. timeout bounds the whole
// exchange. Errors wrap the syscall's errno, so a denial by procgate's hooks
// matches errors.Is(err, syscall.EPERM).
func Dial(nsPath string, network string, addr netip.AddrPort, timeout time.Duration) (banner string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return dialContext(ctx, nsPath, network, addr)
}

func dialContext(ctx context.Context, nsPath, network string, addr netip.AddrPort) (string, error) {
	var udp bool
	switch network {
	case "tcp", "tcp4", "tcp6":
	case "udp", "udp4", "udp6":
		udp = true
	default:
		return "", fmt.Errorf("dial %s %s: unsupported network", network, addr)
	}
	var banner string
	err := inNS(nsPath, func() error {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr.String())
		if err != nil {
			return err
		}
		defer c.Close()
		if deadline, ok := ctx.Deadline(); ok {
			if err := c.SetDeadline(deadline); err != nil {
				return err
			}
		}
		if udp {
			if _, err := io.WriteString(c, udpEchoProbe); err != nil {
				return err
			}
			buf := make([]byte, maxLine)
			n, err := c.Read(buf)
			if err != nil {
				return err
			}
			banner = string(buf[:n])
			return nil
		}
		line, err := bufio.NewReader(io.LimitReader(c, maxLine)).ReadString('\n')
		if err != nil && !(errors.Is(err, io.EOF) && line != "") {
			return err
		}
		banner = strings.TrimSuffix(line, "\n")
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("dial %s %s from %s: %w", network, addr, nsPath, err)
	}
	return banner, nil
}

// StartIn starts cmd (cmd.Start) with its process in the network namespace
// nsPath, and nothing else of it changed: a forked child inherits the
// namespace of the thread that forks it, so cmd is started from a thread
// inside nsPath. Unlike `nsenter --net` it needs no helper binary, and it
// composes with cmd.SysProcAttr (for example CgroupFD with UseCgroupFD).
func StartIn(nsPath string, cmd *exec.Cmd) error {
	if err := inNS(nsPath, cmd.Start); err != nil {
		return fmt.Errorf("start %s in %s: %w", cmd.Path, nsPath, err)
	}
	return nil
}
