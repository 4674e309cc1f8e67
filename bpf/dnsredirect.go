package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/internal/bpfpin"
	"github.com/procgate/procgate/ruleset"
)

// dnsRedirect is dnsredirect.c: apps' DNS queries to the daemon's proxy.
type dnsRedirect struct {
	DnsConnect4   *ebpf.Program `ebpf:"dns_connect4"`
	DnsSendmsg4   *ebpf.Program `ebpf:"dns_sendmsg4"`
	DnsRecvmsg4   *ebpf.Program `ebpf:"dns_recvmsg4"`
	DnsConnect6   *ebpf.Program `ebpf:"dns_connect6"`
	DnsSendmsg6   *ebpf.Program `ebpf:"dns_sendmsg6"`
	DnsRecvmsg6   *ebpf.Program `ebpf:"dns_recvmsg6"`
	DnsProxies    *ebpf.Map     `ebpf:"dns_proxies"`
	DnsRedirects  *ebpf.Map     `ebpf:"dns_redirects"`
	DnsRedirects6 *ebpf.Map     `ebpf:"dns_redirects6"`
}

// loadDNSRedirect loads dnsredirect.c against the pinned maps.
func (e *Enforcer) loadDNSRedirect() {
	specs, err := loadDnsredirect()
	if err == nil {
		err = specs.LoadAndAssign(&e.dns, bpfpin.Maps(e.opts.BPFDir))
	}
	if err != nil {
		e.dns = dnsRedirect{}
		e.dnsErr = fmt.Errorf("load the DNS redirect (dnsredirect.c): %w", err)
	}
}

// ServeDNS tells the kernel where a DNS proxy of the daemon listens: on
// port of every loopback address of the network namespace whose cookie
// (SO_NETNS_COOKIE) is netns, IPv4 and IPv6 ([::1]). Port 0 turns the
// redirect off there.
func (e *Enforcer) ServeDNS(port uint16, netns uint64) error {
	if e.dns.DnsProxies == nil {
		return e.dnsErr
	}
	if port == 0 {
		if err := e.dns.DnsProxies.Delete(netns); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("forget the DNS proxy of network namespace %d: %w", netns, err)
		}
		return nil
	}
	var v dnsredirectDnsProxyInfo
	// Network order, as the kernel compares it with user_port.
	v.Port = binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, port))
	if err := e.dns.DnsProxies.Put(netns, &v); err != nil {
		return fmt.Errorf("write the DNS proxy's port: %w", err)
	}
	return nil
}

// ForgetDNSProxies turns the redirect off in every network namespace: the
// proxies of an earlier daemon are gone.
func (e *Enforcer) ForgetDNSProxies() error {
	if e.dns.DnsProxies == nil {
		return e.dnsErr
	}
	var keys []uint64
	var k uint64
	var v dnsredirectDnsProxyInfo
	it := e.dns.DnsProxies.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("walk the DNS proxies: %w", err)
	}
	for _, k := range keys {
		if err := e.dns.DnsProxies.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("forget the DNS proxy of network namespace %d: %w", k, err)
		}
	}
	return nil
}

// Redirected is what the kernel knows of a query that came to the proxy:
// the resolver the app asked, the protocol, and the app.
type Redirected struct {
	Resolver netip.AddrPort
	Proto    ruleset.Proto
	App      string
}

// RedirectOf looks up the socket whose query came to the proxy at dst
// from src, over proto: by dst (127.a.b.c, or ::ffff:127.a.b.c) for a
// query to an IPv4 resolver, by the sending socket's cookie for one that
// came to [::1] (an IPv6 resolver's). The sock_diag socket it may open is
// in the calling thread's network namespace: the proxy's.
func (e *Enforcer) RedirectOf(proto ruleset.Proto, src netip.AddrPort, dst netip.AddrPort) (Redirected, error) {
	if e.dns.DnsRedirects == nil {
		return Redirected{}, e.dnsErr
	}
	if dst.Addr() == netip.IPv6Loopback() {
		return e.redirectOf6(proto, src, dst)
	}
	a := dst.Addr().Unmap().As4()
	if !dst.Addr().Unmap().Is4() || a[0] != 127 {
		return Redirected{}, fmt.Errorf("%s is no redirect address", dst.Addr())
	}
	key := uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	var r dnsredirectDnsRedirect
	if err := e.dns.DnsRedirects.Lookup(key, &r); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Redirected{}, fmt.Errorf("no redirected socket at %s", dst.Addr())
		}
		return Redirected{}, fmt.Errorf("look up the redirect of %s: %w", dst.Addr(), err)
	}
	var ip [4]byte
	binary.NativeEndian.PutUint32(ip[:], r.Resolver)
	return e.redirected(netip.AddrFrom4(ip), r.Port, r.Proto, r.AppId, dst.Addr())
}

func (e *Enforcer) redirectOf6(proto ruleset.Proto, src, dst netip.AddrPort) (Redirected, error) {
	cookie, err := SocketCookie(proto, src, dst)
	if err != nil {
		return Redirected{}, fmt.Errorf("the socket that sent %s a query from %s: %w", dst, src, err)
	}
	var r dnsredirectDnsRedirect6
	if err := e.dns.DnsRedirects6.Lookup(cookie, &r); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Redirected{}, fmt.Errorf("the socket at %s (cookie %d) was not redirected", src, cookie)
		}
		return Redirected{}, fmt.Errorf("look up the redirect of the socket at %s: %w", src, err)
	}
	var ip [16]byte
	for i, w := range r.Resolver {
		binary.NativeEndian.PutUint32(ip[4*i:], w)
	}
	return e.redirected(netip.AddrFrom16(ip), r.Port, r.Proto, r.AppId, src.Addr())
}

// redirected names the app of a redirect entry; port is in network order,
// proto decision.h's.
func (e *Enforcer) redirected(resolver netip.Addr, port uint16, proto uint8, appID uint32, at netip.Addr) (Redirected, error) {
	var p [2]byte
	binary.NativeEndian.PutUint16(p[:], port)
	out := Redirected{Resolver: netip.AddrPortFrom(resolver, binary.BigEndian.Uint16(p[:])), Proto: ruleset.UDP}
	if proto == 1 {
		out.Proto = ruleset.TCP
	}
	e.names.mu.Lock()
	for name, id := range e.names.ids {
		if id == appID {
			out.App = name
		}
	}
	e.names.mu.Unlock()
	if out.App == "" {
		return out, fmt.Errorf("redirect of %s: app id %d is in no policy in force", at, appID)
	}
	return out, nil
}

// NetnsCookie is the cookie of the calling thread's network namespace.
func NetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket for SO_NETNS_COOKIE: %w", err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("SO_NETNS_COOKIE (Linux 5.14+): %w", err)
	}
	return c, nil
}

// SocketCookie is the cookie of the socket of this network namespace at
// local whose peer is peer (for UDP, the socket a datagram from peer to
// local would reach: a connected one, or one bound to local unconnected),
// through sock_diag, in the calling thread's network namespace.
func SocketCookie(proto ruleset.Proto, local, peer netip.AddrPort) (uint64, error) {
	family, ipProto := uint8(unix.AF_INET6), uint8(unix.IPPROTO_UDP)
	if local.Addr().Is4() {
		family = unix.AF_INET
	}
	id := inetDiagSockID{Cookie: [2]uint32{^uint32(0), ^uint32(0)}}
	// The TCP lookup takes the socket's local address as src; the UDP one
	// takes them the other way round, as a datagram's (udp_dump_one:
	// "src and dst are swapped for historical reasons").
	src, dst := peer, local
	if proto == ruleset.TCP {
		ipProto, src, dst = unix.IPPROTO_TCP, local, peer
	}
	putAddr := func(b *[16]byte, a netip.Addr) {
		if family == unix.AF_INET {
			v := a.Unmap().As4()
			copy(b[:], v[:])
		} else {
			*b = a.As16()
		}
	}
	putAddr(&id.Src, src.Addr())
	putAddr(&id.Dst, dst.Addr())
	binary.BigEndian.PutUint16(id.Sport[:], src.Port())
	binary.BigEndian.PutUint16(id.Dport[:], dst.Port())
	req, err := binary.Append(nil, binary.NativeEndian, inetDiagReq{Family: family, Protocol: ipProto, States: ^uint32(0), ID: id})
	if err != nil {
		return 0, err
	}
	c, err := netlink.Dial(unix.NETLINK_SOCK_DIAG, nil)
	if err != nil {
		return 0, fmt.Errorf("open sock_diag socket: %w", err)
	}
	defer c.Close()
	msgs, err := c.Execute(netlink.Message{Header: netlink.Header{Type: unix.SOCK_DIAG_BY_FAMILY, Flags: netlink.Request}, Data: req})
	if err != nil {
		return 0, fmt.Errorf("sock_diag lookup of %s %s-%s: %w", proto, local, peer, err)
	}
	if len(msgs) != 1 {
		return 0, fmt.Errorf("sock_diag lookup of %s %s-%s: %d answers", proto, local, peer, len(msgs))
	}
	var m inetDiagMsg
	if _, err := binary.Decode(msgs[0].Data, binary.NativeEndian, &m); err != nil {
		return 0, fmt.Errorf("sock_diag lookup of %s %s-%s: %w", proto, local, peer, err)
	}
	return uint64(m.ID.Cookie[0]) | uint64(m.ID.Cookie[1])<<32, nil
}
