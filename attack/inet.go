package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// env is what a technique works with: the command line and its token.
type env struct {
	cfg   *config
	tech  *technique
	token []byte
}

// failed records the step where the attempt stopped. Errors that say the
// kernel has no such socket type or call make the technique unavailable.
func (a attempt) failed(stage string, err error) attempt {
	a.Stage, a.Errno = stage, errnoName(err)
	var errno unix.Errno
	if errors.As(err, &errno) {
		switch errno {
		case unix.EAFNOSUPPORT, unix.EPROTONOSUPPORT, unix.ESOCKTNOSUPPORT, unix.ENOSYS:
			a.Unavailable = true
		}
	}
	return a
}

// unavailable marks the attempt as a path this kernel or setup lacks.
func (a attempt) unavailable(stage string, err error) attempt {
	a = a.failed(stage, err)
	a.Unavailable = true
	return a
}

func errnoName(err error) string {
	if err == nil {
		return ""
	}
	var errno unix.Errno
	if errors.As(err, &errno) {
		if name := unix.ErrnoName(errno); name != "" {
			return name + " (" + errno.Error() + ")"
		}
	}
	return err.Error()
}

// sockaddr returns the socket address of a for its own family.
func sockaddr(a netip.Addr, port uint16, zone uint32) unix.Sockaddr {
	if a.Is4() {
		return &unix.SockaddrInet4{Port: int(port), Addr: a.As4()}
	}
	return &unix.SockaddrInet6{Port: int(port), Addr: a.As16(), ZoneId: zone}
}

// sockaddrIn returns the address of a for a socket of family: an IPv4
// address for an AF_INET6 socket is written IPv4-mapped.
func sockaddrIn(family int, a netip.Addr, port uint16, zone uint32) unix.Sockaddr {
	if family == unix.AF_INET6 {
		return &unix.SockaddrInet6{Port: int(port), Addr: a.As16(), ZoneId: zone}
	}
	return &unix.SockaddrInet4{Port: int(port), Addr: a.Unmap().As4()}
}

// rawSockaddr is the C form of sa, for calls that take a struct sockaddr
// by pointer (sendmmsg, io_uring, injected syscalls).
func rawSockaddr(sa unix.Sockaddr) []byte {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		b := make([]byte, unix.SizeofSockaddrInet4)
		binary.NativeEndian.PutUint16(b[0:], unix.AF_INET)
		binary.BigEndian.PutUint16(b[2:], uint16(sa.Port))
		copy(b[4:8], sa.Addr[:])
		return b
	case *unix.SockaddrInet6:
		b := make([]byte, unix.SizeofSockaddrInet6)
		binary.NativeEndian.PutUint16(b[0:], unix.AF_INET6)
		binary.BigEndian.PutUint16(b[2:], uint16(sa.Port))
		copy(b[8:24], sa.Addr[:])
		binary.NativeEndian.PutUint32(b[24:], sa.ZoneId)
		return b
	}
	return nil
}

func familyOf(a netip.Addr) int {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func destString(a netip.Addr, port uint16, proto string) string {
	if port == 0 {
		return a.String() + "/" + proto
	}
	return netip.AddrPortFrom(a, port).String() + "/" + proto
}

// ifindex returns the index of the attacker's interface towards the target.
func (e *env) ifindex() (int, error) {
	ifi, err := net.InterfaceByName(e.cfg.ifname)
	if err != nil {
		return 0, fmt.Errorf("interface %s: %w", e.cfg.ifname, err)
	}
	return ifi.Index, nil
}

// addrPortOf is the address and port of a socket address, IPv4-mapped
// addresses unmapped (the target's records carry them as IPv4).
func addrPortOf(sa unix.Sockaddr) (netip.AddrPort, bool) {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)), true
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port)), true
	}
	return netip.AddrPort{}, false
}

// noteFlow records the connection fd made or tried towards aimed: its
// local address as the kernel chose it (unspecified once a connect has
// failed), and its peer (the address aimed at when the connection was not
// made). Without a local port (the connect was refused before one was
// taken) there is nothing to match.
func (a *attempt) noteFlow(fd int, aimed unix.Sockaddr) {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return
	}
	src, ok := addrPortOf(sa)
	if !ok || src.Port() == 0 {
		return
	}
	dst, _ := addrPortOf(aimed)
	if peer, err := unix.Getpeername(fd); err == nil {
		if p, ok := addrPortOf(peer); ok {
			dst = p
		}
	}
	a.Flows = append(a.Flows, flow{Src: src, Dst: dst})
}

// setTimeouts bounds blocking connects and sends, so that a SYN dropped on
// the way costs one timeout instead of the kernel's two minutes.
func setTimeouts(fd int, d time.Duration) {
	tv := unix.NsecToTimeval(d.Nanoseconds())
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
}

// waitConnected polls a non-blocking socket until its connection is made or
// the timeout passes, and returns the connection's error.
func waitConnected(fd int, d time.Duration) error {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	for {
		n, err := unix.Poll(pfd, int(d.Milliseconds()))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return unix.ETIMEDOUT
		}
		soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			return err
		}
		if soerr != 0 {
			return unix.Errno(soerr)
		}
		return nil
	}
}

// sockOpt is a setup step before the attempt: it returns the step's name
// and error.
type sockOpt func(e *env, fd int) (string, error)

func optInt(level, name int, v int, what string) sockOpt {
	return func(_ *env, fd int) (string, error) {
		return "setsockopt " + what, unix.SetsockoptInt(fd, level, name, v)
	}
}

// optBind binds to the wildcard address of the socket's family, port 0.
func optBind(family int) sockOpt {
	return func(_ *env, fd int) (string, error) {
		var sa unix.Sockaddr = &unix.SockaddrInet4{}
		if family == unix.AF_INET6 {
			sa = &unix.SockaddrInet6{}
		}
		return "bind", unix.Bind(fd, sa)
	}
}

func optBindToDevice(e *env, fd int) (string, error) {
	return "setsockopt SO_BINDTODEVICE", unix.BindToDevice(fd, e.cfg.ifname)
}

func optMulticastIf4(e *env, fd int) (string, error) {
	idx, err := e.ifindex()
	if err != nil {
		return "find interface", err
	}
	return "setsockopt IP_MULTICAST_IF", unix.SetsockoptIPMreqn(fd, unix.IPPROTO_IP, unix.IP_MULTICAST_IF, &unix.IPMreqn{Ifindex: int32(idx)})
}

func optMulticastIf6(e *env, fd int) (string, error) {
	idx, err := e.ifindex()
	if err != nil {
		return "find interface", err
	}
	return "setsockopt IPV6_MULTICAST_IF", unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_IF, idx)
}

// sockSpec is what TCP and UDP attempts share: where to, and how the
// socket is made.
type sockSpec struct {
	dst    netip.Addr
	zone   bool // scope the address to the attacker's interface (link-local)
	family int  // 0: AF_INET for IPv4, AF_INET6 otherwise
	proto  int  // 0, IPPROTO_MPTCP, IPPROTO_UDPLITE
	opts   []sockOpt
}

// open makes the socket of s with its options set, and the address of
// s.dst at port for it. On failure fd is -1 and the attempt says where.
func (e *env) open(s sockSpec, typ int, port uint16) (int, unix.Sockaddr, attempt) {
	proto := map[[2]int]string{
		{unix.SOCK_STREAM, 0}: "tcp", {unix.SOCK_STREAM, unix.IPPROTO_MPTCP}: "mptcp",
		{unix.SOCK_DGRAM, 0}: "udp", {unix.SOCK_DGRAM, unix.IPPROTO_UDPLITE}: "udplite",
	}[[2]int{typ, s.proto}]
	a := attempt{Dest: destString(s.dst, port, proto)}
	family := s.family
	if family == 0 {
		family = familyOf(s.dst)
	}
	var zone uint32
	if s.zone {
		idx, err := e.ifindex()
		if err != nil {
			return -1, nil, a.failed("find interface", err)
		}
		zone = uint32(idx)
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, s.proto)
	if err != nil {
		return -1, nil, a.failed("socket", err)
	}
	if family == unix.AF_INET6 {
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0)
	}
	setTimeouts(fd, e.cfg.timeout)
	for _, o := range s.opts {
		if stage, err := o(e, fd); err != nil {
			unix.Close(fd)
			if errors.Is(err, unix.ENOPROTOOPT) {
				return -1, nil, a.unavailable(stage, err)
			}
			return -1, nil, a.failed(stage, err)
		}
	}
	return fd, sockaddrIn(family, s.dst, port, zone), a
}

// connectHow is the way a TCP attempt opens its connection.
type connectHow int

const (
	connBlocking        connectHow = iota // connect(), then write the token
	connNonblock                          // O_NONBLOCK connect(), poll, write
	connFastOpenSendto                    // sendto(MSG_FASTOPEN) with the token
	connFastOpenSendmsg                   // sendmsg(MSG_FASTOPEN) with the token
	connFastOpenOpt                       // TCP_FASTOPEN_CONNECT, connect(), write
)

// tcpCase is one TCP connection attempt.
type tcpCase struct {
	dst    netip.Addr
	zone   bool // scope the address to the attacker's interface (link-local)
	family int  // 0: AF_INET for IPv4, AF_INET6 otherwise
	proto  int  // 0 (TCP) or IPPROTO_MPTCP
	how    connectHow
	opts   []sockOpt
}

// tcp makes one TCP connection attempt to the case's destination at the
// target's TCP port and sends the token over it.
func (e *env) tcp(c tcpCase) attempt {
	fd, sa, a := e.open(sockSpec{c.dst, c.zone, c.family, c.proto, c.opts}, unix.SOCK_STREAM, e.cfg.tcpPort)
	if fd < 0 {
		return a
	}
	defer unix.Close(fd)
	var err error
	stage := "connect"
	sent := false
	switch c.how {
	case connBlocking:
		err = unix.Connect(fd, sa)
	case connNonblock:
		if err = unix.SetNonblock(fd, true); err != nil {
			return a.failed("set O_NONBLOCK", err)
		}
		err = unix.Connect(fd, sa)
		if errors.Is(err, unix.EINPROGRESS) {
			a.noteFlow(fd, sa)
			stage, err = "poll for the connection", waitConnected(fd, e.cfg.timeout)
		}
		if err == nil {
			err = unix.SetNonblock(fd, false)
		}
	case connFastOpenSendto:
		stage, sent = "sendto(MSG_FASTOPEN)", true
		err = unix.Sendto(fd, e.token, unix.MSG_FASTOPEN, sa)
	case connFastOpenSendmsg:
		stage, sent = "sendmsg(MSG_FASTOPEN)", true
		_, err = unix.SendmsgN(fd, e.token, nil, sa, unix.MSG_FASTOPEN)
	case connFastOpenOpt:
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_FASTOPEN_CONNECT, 1); err != nil {
			return a.unavailable("setsockopt TCP_FASTOPEN_CONNECT", err)
		}
		// connect() returns at once; the SYN leaves with the first write.
		err = unix.Connect(fd, sa)
	}
	if len(a.Flows) == 0 {
		a.noteFlow(fd, sa)
	}
	if err != nil {
		return a.failed(stage, err)
	}
	if !sent {
		if _, err := unix.Write(fd, e.token); err != nil {
			return a.failed("write", err)
		}
	}
	return a
}

// udpSend sends msg on fd, to sa or (nil sa) to the connected peer, and
// names the step.
type udpSend func(e *env, fd int, sa unix.Sockaddr, msg []byte) (string, error)

// udpCase is one UDP (or UDP-Lite) attempt.
type udpCase struct {
	dst    netip.Addr
	port   uint16 // 0: the target's UDP port
	zone   bool
	family int
	proto  int // 0 (UDP) or IPPROTO_UDPLITE
	opts   []sockOpt
	send   udpSend // nil: sendto
}

func (e *env) udp(c udpCase) attempt {
	port := c.port
	if port == 0 {
		port = e.cfg.udpPort
	}
	fd, sa, a := e.open(sockSpec{c.dst, c.zone, c.family, c.proto, c.opts}, unix.SOCK_DGRAM, port)
	if fd < 0 {
		return a
	}
	defer unix.Close(fd)
	send := c.send
	if send == nil {
		send = sendTo
	}
	if stage, err := send(e, fd, sa, e.token); err != nil {
		return a.failed(stage, err)
	}
	return a
}

func sendTo(_ *env, fd int, sa unix.Sockaddr, msg []byte) (string, error) {
	return "sendto", unix.Sendto(fd, msg, 0, sa)
}

func sendMsg(_ *env, fd int, sa unix.Sockaddr, msg []byte) (string, error) {
	_, err := unix.SendmsgN(fd, msg, nil, sa, 0)
	return "sendmsg", err
}

func connectThenSend(_ *env, fd int, sa unix.Sockaddr, msg []byte) (string, error) {
	if err := unix.Connect(fd, sa); err != nil {
		return "connect", err
	}
	_, err := unix.Write(fd, msg)
	return "write", err
}

// sendMmsg sends the token twice in one sendmmsg(2), each message carrying
// the destination (sa nil: none, on a connected socket).
func sendMmsg(_ *env, fd int, sa unix.Sockaddr, msg []byte) (string, error) {
	type mmsghdr struct {
		hdr unix.Msghdr
		len uint32
		_   [4]byte
	}
	name := rawSockaddr(sa)
	iov := unix.Iovec{Base: &msg[0]}
	iov.SetLen(len(msg))
	var msgs [2]mmsghdr
	for i := range msgs {
		msgs[i].hdr.Iov = &iov
		msgs[i].hdr.SetIovlen(1)
		if name != nil {
			msgs[i].hdr.Name = &name[0]
			msgs[i].hdr.Namelen = uint32(len(name))
		}
	}
	n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&msgs[0])), uintptr(len(msgs)), 0, 0, 0)
	if errno != 0 {
		return "sendmmsg", errno
	}
	if n == 0 {
		return "sendmmsg", errors.New("sent 0 messages")
	}
	return "sendmmsg", nil
}

func connectThenSendmmsg(e *env, fd int, sa unix.Sockaddr, msg []byte) (string, error) {
	if err := unix.Connect(fd, sa); err != nil {
		return "connect", err
	}
	return sendMmsg(e, fd, nil, msg)
}

// sendAfterConnecting connects to the external control address first (no
// hook objects), then sends to the target with an explicit address, which
// a connected UDP socket accepts.
func sendAfterConnecting(disconnect bool) udpSend {
	return func(e *env, fd int, sa unix.Sockaddr, msg []byte) (string, error) {
		ext := e.cfg.external4
		if _, ok := sa.(*unix.SockaddrInet6); ok {
			ext = netip.AddrFrom16(ext.As16())
		}
		family := unix.AF_INET
		if _, ok := sa.(*unix.SockaddrInet6); ok {
			family = unix.AF_INET6
		}
		if err := unix.Connect(fd, sockaddrIn(family, ext, e.cfg.udpPort, 0)); err != nil {
			return "connect to the external address", err
		}
		if disconnect {
			// connect(AF_UNSPEC) dissolves the association.
			var unspec [unix.SizeofSockaddrInet6]byte // family 0: AF_UNSPEC
			if _, _, errno := unix.Syscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&unspec[0])), uintptr(len(unspec))); errno != 0 {
				return "connect(AF_UNSPEC)", errno
			}
		}
		return "sendto the target", unix.Sendto(fd, msg, 0, sa)
	}
}

// sendCorked sends the token in two halves that the kernel joins into one
// datagram: with MSG_MORE on the first, or with the UDP_CORK option.
func sendCorked(sockopt bool) udpSend {
	return func(_ *env, fd int, sa unix.Sockaddr, msg []byte) (string, error) {
		half := len(msg) / 2
		if sockopt {
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_UDP, unix.UDP_CORK, 1); err != nil {
				return "setsockopt UDP_CORK", err
			}
			if err := unix.Sendto(fd, msg[:half], 0, sa); err != nil {
				return "sendto (corked)", err
			}
			if err := unix.Sendto(fd, msg[half:], 0, sa); err != nil {
				return "sendto (corked, second half)", err
			}
			return "uncork", unix.SetsockoptInt(fd, unix.IPPROTO_UDP, unix.UDP_CORK, 0)
		}
		if err := unix.Sendto(fd, msg[:half], unix.MSG_MORE, sa); err != nil {
			return "sendto(MSG_MORE)", err
		}
		_, err := unix.SendmsgN(fd, msg[half:], nil, nil, 0)
		return "send (second half)", err
	}
}

// gsoSize is the segment size of the UDP GSO attempts; each segment starts
// with the token.
const gsoSize = 512

func gsoPayload(msg []byte) []byte {
	b := make([]byte, 2*gsoSize)
	copy(b, msg)
	copy(b[gsoSize:], msg)
	return b
}

// sendGSO sends two segments in one call, segmented by the kernel: via the
// UDP_SEGMENT option, or via a UDP_SEGMENT control message.
func sendGSO(cmsg bool) udpSend {
	return func(_ *env, fd int, sa unix.Sockaddr, msg []byte) (string, error) {
		payload := gsoPayload(msg)
		if !cmsg {
			if err := unix.SetsockoptInt(fd, unix.SOL_UDP, unix.UDP_SEGMENT, gsoSize); err != nil {
				return "setsockopt UDP_SEGMENT", err
			}
			return "sendto (GSO)", unix.Sendto(fd, payload, 0, sa)
		}
		oob := make([]byte, unix.CmsgSpace(2))
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		h.Level, h.Type = unix.SOL_UDP, unix.UDP_SEGMENT
		h.SetLen(unix.CmsgLen(2))
		binary.NativeEndian.PutUint16(oob[unix.CmsgLen(0):], gsoSize)
		_, err := unix.SendmsgN(fd, payload, oob, sa, 0)
		return "sendmsg (UDP_SEGMENT cmsg)", err
	}
}

// sendPktinfo sends with an IP_PKTINFO (or IPV6_PKTINFO) control message
// naming the outgoing interface and, for IPv4, a source address: spec4 nil
// means the kernel picks it.
func sendPktinfo(spec4 func(e *env) netip.Addr) udpSend {
	return func(e *env, fd int, sa unix.Sockaddr, msg []byte) (string, error) {
		idx, err := e.ifindex()
		if err != nil {
			return "find interface", err
		}
		var oob []byte
		if _, v6 := sa.(*unix.SockaddrInet6); v6 {
			oob = make([]byte, unix.CmsgSpace(unix.SizeofInet6Pktinfo))
			h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
			h.Level, h.Type = unix.IPPROTO_IPV6, unix.IPV6_PKTINFO
			h.SetLen(unix.CmsgLen(unix.SizeofInet6Pktinfo))
			pi := (*unix.Inet6Pktinfo)(unsafe.Pointer(&oob[unix.CmsgLen(0)]))
			pi.Ifindex = uint32(idx)
		} else {
			oob = make([]byte, unix.CmsgSpace(unix.SizeofInet4Pktinfo))
			h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
			h.Level, h.Type = unix.IPPROTO_IP, unix.IP_PKTINFO
			h.SetLen(unix.CmsgLen(unix.SizeofInet4Pktinfo))
			pi := (*unix.Inet4Pktinfo)(unsafe.Pointer(&oob[unix.CmsgLen(0)]))
			pi.Ifindex = int32(idx)
			if spec4 != nil {
				pi.Spec_dst = spec4(e).As4()
			}
		}
		_, err = unix.SendmsgN(fd, msg, oob, sa, 0)
		return "sendmsg (PKTINFO)", err
	}
}

func sendZerocopy(_ *env, fd int, sa unix.Sockaddr, msg []byte) (string, error) {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ZEROCOPY, 1); err != nil {
		return "setsockopt SO_ZEROCOPY", err
	}
	_, err := unix.SendmsgN(fd, msg, nil, sa, unix.MSG_ZEROCOPY)
	return "sendmsg(MSG_ZEROCOPY)", err
}

// mapped is a written IPv4-mapped IPv6 (::ffff:a.b.c.d).
func mapped(a netip.Addr) netip.Addr { return netip.AddrFrom16(a.Unmap().As16()) }

// compat is the deprecated IPv4-compatible IPv6 form (::a.b.c.d).
func compat(a netip.Addr) netip.Addr {
	var b [16]byte
	v4 := a.Unmap().As4()
	copy(b[12:], v4[:])
	return netip.AddrFrom16(b)
}

// nat64 is a in the well-known NAT64 prefix 64:ff9b::/96.
func nat64(a netip.Addr) netip.Addr {
	b := [16]byte{0x00, 0x64, 0xff, 0x9b}
	v4 := a.Unmap().As4()
	copy(b[12:], v4[:])
	return netip.AddrFrom16(b)
}

// broadcast4 is the directed broadcast address of a's /8: it lies inside
// the internal prefix when the prefix is 10.0.0.0/8.
func broadcast4(a netip.Addr) netip.Addr {
	b := a.Unmap().As4()
	return netip.AddrFrom4([4]byte{b[0], 255, 255, 255})
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

// readFileTrim reads a small file (sysctls, cgroup files).
func readFileTrim(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return string(b), nil
}
