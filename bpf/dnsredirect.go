package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
)

// dnsRedirect is dnsredirect.c: apps' DNS queries to the daemon's proxy.
type dnsRedirect struct {
	DnsConnect4  *ebpf.Program `ebpf:"dns_connect4"`
	DnsSendmsg4  *ebpf.Program `ebpf:"dns_sendmsg4"`
	DnsRecvmsg4  *ebpf.Program `ebpf:"dns_recvmsg4"`
	DnsProxy     *ebpf.Map     `ebpf:"dns_proxy"`
	DnsRedirects *ebpf.Map     `ebpf:"dns_redirects"`
}

// loadDNSRedirect loads dnsredirect.c against the pinned maps.
func (e *Enforcer) loadDNSRedirect() {
	specs, err := loadDnsredirect()
	if err == nil {
		err = specs.LoadAndAssign(&e.dns, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: e.opts.BPFDir}})
	}
	if err != nil {
		e.dns = dnsRedirect{}
		e.dnsErr = fmt.Errorf("load the DNS redirect (dnsredirect.c): %w", err)
	}
}

// ServeDNS tells the kernel where the daemon's DNS proxy listens: on port
// of every loopback address of the network namespace whose cookie
// (SO_NETNS_COOKIE) is netns. Port 0 turns the redirect off.
func (e *Enforcer) ServeDNS(port uint16, netns uint64) error {
	if e.dns.DnsProxy == nil {
		return e.dnsErr
	}
	var v dnsredirectDnsProxyInfo
	v.NetnsCookie = netns
	// Network order, as the kernel compares it with user_port.
	v.Port = binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, port))
	if err := e.dns.DnsProxy.Put(uint32(0), &v); err != nil {
		return fmt.Errorf("write the DNS proxy's port: %w", err)
	}
	return nil
}

// Redirected is what the kernel knows of a query that came to the proxy
// at the loopback address dst: the resolver the app asked, the protocol,
// and the app.
type Redirected struct {
	Resolver netip.AddrPort
	Proto    ruleset.Proto
	App      string
}

// RedirectOf looks up the socket redirected to dst (127.a.b.c).
func (e *Enforcer) RedirectOf(dst netip.Addr) (Redirected, error) {
	if e.dns.DnsRedirects == nil {
		return Redirected{}, e.dnsErr
	}
	a := dst.Unmap().As4()
	if !dst.Unmap().Is4() || a[0] != 127 {
		return Redirected{}, fmt.Errorf("%s is no redirect address", dst)
	}
	key := uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	var r dnsredirectDnsRedirect
	if err := e.dns.DnsRedirects.Lookup(key, &r); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Redirected{}, fmt.Errorf("no redirected socket at %s", dst)
		}
		return Redirected{}, fmt.Errorf("look up the redirect of %s: %w", dst, err)
	}
	var ip [4]byte
	binary.NativeEndian.PutUint32(ip[:], r.Resolver)
	var port [2]byte
	binary.NativeEndian.PutUint16(port[:], r.Port)
	out := Redirected{Resolver: netip.AddrPortFrom(netip.AddrFrom4(ip), binary.BigEndian.Uint16(port[:])), Proto: ruleset.UDP}
	if r.Proto == 1 {
		out.Proto = ruleset.TCP
	}
	e.names.mu.Lock()
	for name, id := range e.names.ids {
		if id == r.AppId {
			out.App = name
		}
	}
	e.names.mu.Unlock()
	if out.App == "" {
		return out, fmt.Errorf("redirect of %s: app id %d is in no policy in force", dst, r.AppId)
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
