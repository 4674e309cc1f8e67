package probe

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"

	"github.com/procgate/procgate/dnsproxy"
	"github.com/procgate/procgate/ruleset"
)

// resolveLine serves "resolve NAME RESOLVER PROTO PORT [TYPE,...]"
// (Prober.Resolve).
func resolveLine(args string) string {
	f := strings.Fields(args)
	if len(f) != 4 && len(f) != 5 {
		return "error: want resolve NAME RESOLVER udp|tcp PORT [A,AAAA]"
	}
	port, err := strconv.ParseUint(f[3], 10, 16)
	if err != nil {
		return "error: " + err.Error()
	}
	types := []string{"A"}
	if len(f) == 5 {
		types = strings.Split(f[4], ",")
	}
	var addrs []netip.Addr
	for _, typ := range types {
		qtype, ok := dns.StringToType[typ]
		if !ok || (qtype != dns.TypeA && qtype != dns.TypeAAAA) {
			return "error: record type " + typ + ": want A or AAAA"
		}
		got, err := resolveType(f[0], f[1], f[2], qtype)
		if err != nil {
			return "error: " + err.Error()
		}
		addrs = append(addrs, got...)
	}
	var out []string
	for _, a := range addrs {
		v, err := Try(ruleset.Dest{Addr: a, Proto: ruleset.TCP, Port: uint16(port)}, Connect)
		if err != nil {
			return "error: " + err.Error()
		}
		out = append(out, a.String()+"="+string(v))
	}
	return strings.Join(out, " ")
}

func resolveType(name, resolver, proto string, qtype uint16) ([]netip.Addr, error) {
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), qtype)
	var resp *dns.Msg
	switch proto {
	case "udp":
		raddr, err := net.ResolveUDPAddr("udp", resolver)
		if err != nil {
			return nil, err
		}
		// A socket of the resolver's own family, as glibc makes it; for
		// an IPv4-mapped resolver ([::ffff:a.b.c.d]) a dual-stack IPv6
		// socket, as Java makes it.
		network := "udp4"
		if raddr.IP.To4() == nil {
			network = "udp6"
		} else if strings.HasPrefix(resolver, "[::ffff:") {
			network = "udp"
		}
		c, err := net.ListenUDP(network, nil)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		b, _ := q.Pack()
		if _, err := c.WriteToUDP(b, raddr); err != nil {
			return nil, fmt.Errorf("send query: %w", err)
		}
		_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
		buf := make([]byte, 65535)
		n, from, err := c.ReadFromUDP(buf)
		if err != nil {
			return nil, fmt.Errorf("read answer: %w", err)
		}
		if from.String() != raddr.String() {
			return nil, fmt.Errorf("answer from %s, not the resolver %s", from, raddr)
		}
		resp = new(dns.Msg)
		if err := resp.Unpack(buf[:n]); err != nil {
			return nil, err
		}
	case "tcp":
		var err error
		resp, _, err = (&dns.Client{Net: "tcp", Timeout: 3 * time.Second}).Exchange(q, resolver)
		if err != nil {
			return nil, err
		}
	default:
		return nil, errors.New("proto must be udp or tcp")
	}
	if resp.Id != q.Id || resp.Rcode != dns.RcodeSuccess {
		return nil, fmt.Errorf("answer id %d rcode %s", resp.Id, dns.RcodeToString[resp.Rcode])
	}
	var out []netip.Addr
	for _, rr := range resp.Answer {
		if ip, ok := dnsproxy.AddrOf(rr); ok {
			out = append(out, ip)
		}
	}
	return out, nil
}
