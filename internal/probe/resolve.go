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

	"github.com/procgate/procgate/ruleset"
)

// resolveLine serves "resolve NAME RESOLVER PROTO PORT" (Prober.Resolve).
func resolveLine(args string) string {
	f := strings.Fields(args)
	if len(f) != 4 {
		return "error: want resolve NAME RESOLVER udp|tcp PORT"
	}
	port, err := strconv.ParseUint(f[3], 10, 16)
	if err != nil {
		return "error: " + err.Error()
	}
	addrs, err := resolveA(f[0], f[1], f[2])
	if err != nil {
		return "error: " + err.Error()
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

func resolveA(name, resolver, proto string) ([]netip.Addr, error) {
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), dns.TypeA)
	var resp *dns.Msg
	switch proto {
	case "udp":
		c, err := net.ListenUDP("udp4", nil)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		raddr, err := net.ResolveUDPAddr("udp4", resolver)
		if err != nil {
			return nil, err
		}
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
		if a, ok := rr.(*dns.A); ok {
			if ip, ok := netip.AddrFromSlice(a.A.To4()); ok {
				out = append(out, ip)
			}
		}
	}
	return out, nil
}
