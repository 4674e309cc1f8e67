package main

import (
	"errors"
	"net/netip"
	"strconv"

	"golang.org/x/sys/unix"
)

// classListen: binds of an app whose listen: does not list the port. They
// reach no target: a technique "reaches" when its bind (and listen) went
// through, which the attacker itself observes.
const classListen = "listen"

// The attack policy's listen: apps list listenedPort and nothing near it.
const (
	listenedPort = 7000
	unlistedPort = 7001
)

// iorOpBind is IORING_OP_BIND (6.11).
const iorOpBind = 56

type bindHow int

const (
	bindSyscall    bindHow = iota // bind(2), then listen(2) for TCP
	bindURing                     // IORING_OP_BIND, then listen(2) for TCP
	listenUnbound                 // listen(2) on a socket never bound: the kernel picks a port
	bindThenRebind                // a second bind(2) after a refused one, on the same socket
	bindReusePort                 // SO_REUSEPORT set before the bind
	bindFreeTransp                // IP_FREEBIND, to an address of no interface
)

type bindCase struct {
	family int  // AF_INET or AF_INET6
	mapped bool // AF_INET6 socket, IPv4-mapped loopback
	typ    int  // SOCK_STREAM or SOCK_DGRAM
	proto  int  // 0, IPPROTO_MPTCP, IPPROTO_UDPLITE
	port   uint16
	how    bindHow
}

func bindTo(c bindCase) func(*env) attempt {
	return func(e *env) attempt { return e.bind(c) }
}

// bind binds a socket as c says; the attempt succeeds when every syscall
// does.
func (e *env) bind(c bindCase) attempt {
	addr := netip.MustParseAddr("127.0.0.1")
	if c.family == unix.AF_INET6 && !c.mapped {
		addr = netip.IPv6Loopback()
	}
	if c.how == bindFreeTransp {
		addr = netip.MustParseAddr("192.0.2.99") // not an address of this host
	}
	proto := "tcp"
	if c.typ == unix.SOCK_DGRAM {
		proto = "udp"
	}
	a := attempt{Dest: destString(addr, c.port, proto) + " (bind)"}
	fd, err := unix.Socket(c.family, c.typ|unix.SOCK_CLOEXEC, c.proto)
	if err != nil {
		return a.failed("socket", err)
	}
	defer unix.Close(fd)
	sa := sockaddrIn(c.family, addr, c.port, 0)
	switch c.how {
	case listenUnbound:
		if err := unix.Listen(fd, 1); err != nil {
			return a.failed("listen on an unbound socket", err)
		}
		return a.bound(fd)
	case bindURing:
		return e.uringBind(a, fd, sa, c.typ == unix.SOCK_STREAM)
	case bindThenRebind:
		// A refused bind leaves the socket unbound: does a second try
		// find the hook's answer changed? Where the first goes through,
		// that is the result.
		if err := unix.Bind(fd, sa); err == nil {
			a.Detail = "the first bind went through"
			if c.typ == unix.SOCK_STREAM {
				if err := unix.Listen(fd, 1); err != nil {
					return a.failed("listen", err)
				}
			}
			return a.bound(fd)
		}
	case bindReusePort:
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return a.failed("setsockopt SO_REUSEPORT", err)
		}
	case bindFreeTransp:
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_FREEBIND, 1); err != nil {
			return a.failed("setsockopt IP_FREEBIND", err)
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return a.failed("bind", err)
	}
	if c.typ == unix.SOCK_STREAM {
		if err := unix.Listen(fd, 1); err != nil {
			return a.failed("listen", err)
		}
	}
	return a.bound(fd)
}

// bound notes the port the socket holds.
func (a attempt) bound(fd int) attempt {
	if sa, err := unix.Getsockname(fd); err == nil {
		switch sa := sa.(type) {
		case *unix.SockaddrInet4:
			a.Detail = joinDetail(a.Detail, "bound port "+strconv.Itoa(sa.Port))
		case *unix.SockaddrInet6:
			a.Detail = joinDetail(a.Detail, "bound port "+strconv.Itoa(sa.Port))
		}
	}
	return a
}

// uringBind binds (and listens) through io_uring: the bind then runs in
// the ring's context, which the bind hooks must see as the submitter.
func (e *env) uringBind(a attempt, fd int, sa unix.Sockaddr, listen bool) attempt {
	u, err := newURing(false)
	if err != nil {
		return a.unavailable("io_uring_setup", err)
	}
	defer u.Close()
	name := rawSockaddr(sa)
	if err := u.submit(uringSQE{Opcode: iorOpBind, Fd: int32(fd), Addr: u.ptr(name), Off: uint64(len(name)), UserData: 1}); err != nil {
		return a.failed("io_uring_enter (bind)", err)
	}
	cqe, err := u.complete(1)
	if err == nil {
		err = cqeErr(cqe)
	}
	if errors.Is(err, unix.EINVAL) {
		return a.unavailable("IORING_OP_BIND (6.11+)", err)
	}
	if err != nil {
		return a.failed("IORING_OP_BIND", err)
	}
	if listen {
		if err := unix.Listen(fd, 1); err != nil {
			return a.failed("listen", err)
		}
	}
	return a.bound(fd)
}

// listenCases: binds to a port the app's listen: does not list, by every
// road to inet_bind; to the listed port and to port 0, which the attack
// policy lists (other techniques bind port 0 before they connect); and a
// listen() that binds without bind().
var listenCases = []struct {
	name string
	c    bindCase
}{
	{"bind4-tcp-listed-port", bindCase{family: unix.AF_INET, typ: unix.SOCK_STREAM, port: listenedPort}},
	{"bind4-tcp-port-0", bindCase{family: unix.AF_INET, typ: unix.SOCK_STREAM, port: 0}},
	{"bind4-tcp", bindCase{family: unix.AF_INET, typ: unix.SOCK_STREAM, port: unlistedPort}},
	{"bind6-tcp", bindCase{family: unix.AF_INET6, typ: unix.SOCK_STREAM, port: unlistedPort}},
	{"bind6-v4mapped-tcp", bindCase{family: unix.AF_INET6, mapped: true, typ: unix.SOCK_STREAM, port: unlistedPort}},
	{"bind4-udp", bindCase{family: unix.AF_INET, typ: unix.SOCK_DGRAM, port: unlistedPort}},
	{"bind6-udp", bindCase{family: unix.AF_INET6, typ: unix.SOCK_DGRAM, port: unlistedPort}},
	{"bind4-udplite", bindCase{family: unix.AF_INET, typ: unix.SOCK_DGRAM, proto: unix.IPPROTO_UDPLITE, port: unlistedPort}},
	{"bind4-mptcp", bindCase{family: unix.AF_INET, typ: unix.SOCK_STREAM, proto: unix.IPPROTO_MPTCP, port: unlistedPort}},
	{"bind4-tcp-again-after-refusal", bindCase{family: unix.AF_INET, typ: unix.SOCK_STREAM, port: unlistedPort, how: bindThenRebind}},
	{"bind4-tcp-reuseport", bindCase{family: unix.AF_INET, typ: unix.SOCK_STREAM, port: unlistedPort, how: bindReusePort}},
	{"bind4-tcp-freebind-foreign-address", bindCase{family: unix.AF_INET, typ: unix.SOCK_STREAM, port: unlistedPort, how: bindFreeTransp}},
	{"uring-bind-tcp", bindCase{family: unix.AF_INET, typ: unix.SOCK_STREAM, port: unlistedPort, how: bindURing}},
	{"listen-without-bind", bindCase{family: unix.AF_INET, typ: unix.SOCK_STREAM, how: listenUnbound}},
}

// listenPort is the port a listen technique binds; ok is false for no
// listen technique. listen() without bind() is a bind to port 0: the
// kernel picks the port, as for bind() to 0, and policy judges it so.
func listenPort(name string) (port uint16, ok bool) {
	for _, lc := range listenCases {
		if lc.name == name {
			return lc.c.port, true
		}
	}
	return 0, false
}

func init() {
	for _, lc := range listenCases {
		techniques = append(techniques, technique{name: lc.name, class: classListen, try: bindTo(lc.c)})
	}
}
