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
// way must grant nothing. The techniques forge an answer that names the
// run's target for grantedName, then connect to the address it names:
// "reached" means the forged answer opened the target.
const classDNS = "dns"

// grantedName is the name the attack policy grants the apps of the roles
// (tcp, the target's TCP port), and resolver the everyone-granted resolver
// the technique asks it of. Nothing answers there: the answers are forged.
const grantedName = "db.corp.example."

var resolver = netip.AddrPortFrom(mustAddr("10.0.0.53"), 53)

// forgery is where a technique sends its forged answer.
type forgery int

const (
	// forgeToApp: the query goes to the resolver from an unconnected
	// socket, as a stub resolver may send it, and a second socket of the
	// process, bound to 127.0.0.1 (an address that is not the resolver),
	// answers it first. The socket takes the answer: nothing checks where
	// an unconnected socket's datagram came from.
	forgeToApp forgery = iota
	// forgeToProxy: the query's socket is connected to the resolver, which
	// the kernel redirects to the daemon's proxy (the socket's peer says
	// where). The second socket sends the proxy the forged answer there
	// and at 127.0.0.1, the socket itself sends it one too, then asks the
	// name for real (nothing answers at the resolver: SERVFAIL).
	forgeToProxy
)

// proxyWait bounds how long forgeToProxy waits for a proxy in its network
// namespace: the daemon starts one there on the first query it could not
// observe (daemon/dnsnetns.go), which may be this technique's own.
const proxyWait = 2 * time.Second

// dnsForgedAnswerTry forges an answer that names the role's target for
// grantedName, as f says, then connects to the address it names.
func (e *env) dnsForgedAnswerTry(f forgery) attempt {
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
	forger, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return a.failed("socket (forger)", err)
	}
	defer unix.Close(forger)
	if err := unix.Bind(forger, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return a.failed("bind the forger to 127.0.0.1", err)
	}
	var fd int
	if f == forgeToApp {
		fd, a = e.forgeToApp(a, forger, query, answer)
	} else {
		fd, a = e.forgeToProxy(a, forger, query, answer)
	}
	if fd < 0 {
		return a
	}
	defer unix.Close(fd)
	got, err := readAnswer(fd)
	if err != nil {
		a.Detail = joinDetail(a.Detail, "no answer: "+errnoName(err))
	} else {
		a.Detail = joinDetail(a.Detail, "the app got "+got)
	}
	t := e.tcp(tcpCase{dst: dst})
	t.Dest, t.Detail = a.Dest, joinDetail(a.Detail, t.Detail)
	return t
}

// forgeToApp sends the query and the forged answer to the query's socket,
// and returns that socket (-1 on failure).
func (e *env) forgeToApp(a attempt, forger int, query, answer []byte) (int, attempt) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, a.failed("socket", err)
	}
	setTimeouts(fd, e.cfg.timeout)
	if err := unix.Bind(fd, &unix.SockaddrInet4{}); err != nil {
		unix.Close(fd)
		return -1, a.failed("bind", err)
	}
	// Refused or not, the query may go; the forged answer is what counts.
	if err := unix.Sendto(fd, query, 0, sockaddr(resolver.Addr(), resolver.Port(), 0)); err != nil {
		a.Detail = "query to the resolver: " + errnoName(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		unix.Close(fd)
		return -1, a.failed("getsockname", err)
	}
	self, _ := addrPortOf(sa)
	if err := unix.Sendto(forger, answer, 0, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: int(self.Port())}); err != nil {
		unix.Close(fd)
		return -1, a.failed("send the forged answer to the app's socket", err)
	}
	return fd, a
}

// forgeToProxy finds the proxy through a socket connected to the resolver,
// sends it the forged answer, then the query, and returns that socket (-1
// when no proxy takes this process's queries).
func (e *env) forgeToProxy(a attempt, forger int, query, answer []byte) (int, attempt) {
	var proxy netip.AddrPort
	fd := -1
	for deadline := time.Now().Add(proxyWait); ; time.Sleep(100 * time.Millisecond) {
		var err error
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return -1, a.failed("socket", err)
		}
		setTimeouts(fd, e.cfg.timeout)
		if err := unix.Connect(fd, sockaddr(resolver.Addr(), resolver.Port(), 0)); err != nil {
			unix.Close(fd)
			return -1, a.failed("connect to the resolver", err)
		}
		peer, err := unix.Getpeername(fd)
		if err != nil {
			unix.Close(fd)
			return -1, a.failed("getpeername", err)
		}
		if proxy, _ = addrPortOf(peer); proxy != resolver {
			break
		}
		// Not redirected: this query went to the resolver unobserved,
		// and may have the daemon start a proxy here.
		_, _ = unix.Write(fd, query)
		unix.Close(fd)
		if time.Now().After(deadline) {
			return -1, a.unavailable("find the proxy", fmt.Errorf("no DNS proxy took the queries to %s within %v (the role's app has no name grants)", resolver, proxyWait))
		}
	}
	a.Detail = "the proxy took the query at " + proxy.String()
	for _, to := range []netip.AddrPort{proxy, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), proxy.Port())} {
		if err := unix.Sendto(forger, answer, 0, sockaddr(to.Addr(), to.Port(), 0)); err != nil {
			a.Detail = joinDetail(a.Detail, "forged answer to "+to.String()+": "+errnoName(err))
		}
	}
	_, _ = unix.Write(fd, answer)
	if _, err := unix.Write(fd, query); err != nil {
		unix.Close(fd)
		return -1, a.failed("send the query", err)
	}
	return fd, a
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
