package main

import (
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"
)

// classDNS: forged DNS answers for a name the app is granted. A name grant
// stands for the addresses of the answers the daemon's proxy relayed
// (docs/policy.md, DNS names); an answer that reaches the app any other
// way must grant nothing. The technique forges an answer that names the
// run's target for grantedName, then connects to the address it names:
// "reached" means the forged answer opened the target.
const classDNS = "dns"

// grantedName is the name the attack policy grants the apps of the roles
// (tcp, the target's TCP port), and resolver the everyone-granted resolver
// the technique asks it of. Nothing answers there: the answers are forged.
const grantedName = "db.corp.example."

var resolver = netip.AddrPortFrom(mustAddr("10.0.0.53"), 53)

// dnsForgedAnswerTry sends a query for grantedName to the resolver from an
// unconnected socket, as a stub resolver may send it, and answers it
// first from a second socket of the process, bound to 127.0.0.1: an
// address that is not the resolver. The socket takes the answer (nothing
// checks where an unconnected socket's datagram came from); the process
// then connects to the address it names. Forged answers sent at the proxy
// itself are cmd/procgate's TestNameGrantsEndToEnd: the roles here run in
// a network namespace the daemon's proxy does not serve.
func (e *env) dnsForgedAnswerTry() attempt {
	dst := e.cfg.target4
	a := attempt{Dest: destString(dst, e.cfg.tcpPort, "tcp") + " (named by a forged answer for " + grantedName + ")"}
	q := new(dns.Msg)
	q.SetQuestion(grantedName, dns.TypeA)
	query, err := q.Pack()
	if err != nil {
		return a.failed("pack the query", err)
	}
	forged := new(dns.Msg)
	forged.SetReply(q)
	forged.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: grantedName, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300},
		A: net.IP(dst.AsSlice())}}
	answer, err := forged.Pack()
	if err != nil {
		return a.failed("pack the forged answer", err)
	}

	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return a.failed("socket", err)
	}
	defer unix.Close(fd)
	setTimeouts(fd, e.cfg.timeout)
	forger, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return a.failed("socket (forger)", err)
	}
	defer unix.Close(forger)
	if err := unix.Bind(forger, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return a.failed("bind the forger to 127.0.0.1", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{}); err != nil {
		return a.failed("bind", err)
	}
	// Refused or not, the query may go; the forged answer is what counts.
	if err := unix.Sendto(fd, query, 0, sockaddr(resolver.Addr(), resolver.Port(), 0)); err != nil {
		a.Detail = "query to the resolver: " + errnoName(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return a.failed("getsockname", err)
	}
	self, _ := addrPortOf(sa)
	if err := unix.Sendto(forger, answer, 0, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: int(self.Port())}); err != nil {
		return a.failed("send the forged answer to the app's socket", err)
	}
	got, err := readAnswer(fd)
	if err != nil {
		return a.failed("receive the forged answer", err)
	}
	a.Detail = joinDetail(a.Detail, "the app got "+got)
	t := e.tcp(tcpCase{dst: dst})
	t.Dest, t.Detail = a.Dest, joinDetail(a.Detail, t.Detail)
	return t
}

// readAnswer reads one DNS message from fd and says what it answers.
func readAnswer(fd int) (string, error) {
	buf := make([]byte, 1500)
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return "", err
		}
		var m dns.Msg
		if m.Unpack(buf[:n]) != nil || !m.Response {
			continue
		}
		src, _ := addrPortOf(from)
		out := fmt.Sprintf("rcode %s from %s", dns.RcodeToString[m.Rcode], src)
		for _, rr := range m.Answer {
			if r, ok := rr.(*dns.A); ok {
				out += " A " + r.A.String()
			}
		}
		return out, nil
	}
	return "", unix.ETIMEDOUT
}
