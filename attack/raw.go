package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Paths below the socket layer's connect and sendmsg: ping sockets, raw IP
// sockets, packet sockets, AF_XDP, and a TUN device. Their packets are built
// here, token inside, so the target's capture recognizes them.

// link is what the link-level techniques need of the attacker's interface.
type link struct {
	index int
	mac   net.HardwareAddr
	src4  netip.Addr
	src6  netip.Addr
}

func (e *env) link() (link, error) {
	ifi, err := net.InterfaceByName(e.cfg.ifname)
	if err != nil {
		return link{}, fmt.Errorf("interface %s: %w", e.cfg.ifname, err)
	}
	l := link{index: ifi.Index, mac: ifi.HardwareAddr}
	addrs, err := ifi.Addrs()
	if err != nil {
		return link{}, fmt.Errorf("addresses of %s: %w", e.cfg.ifname, err)
	}
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, _ := netip.AddrFromSlice(ipn.IP)
		ip = ip.Unmap()
		switch {
		case ip.Is4() && !l.src4.IsValid():
			l.src4 = ip
		case ip.Is6() && !ip.IsLinkLocalUnicast() && !l.src6.IsValid():
			l.src6 = ip
		}
	}
	if !l.src4.IsValid() || !l.src6.IsValid() || len(l.mac) != 6 {
		return link{}, fmt.Errorf("interface %s needs an IPv4 address, a global IPv6 address and a MAC", e.cfg.ifname)
	}
	return l, nil
}

// checksum is the Internet checksum of b, starting from sum.
func checksum(b []byte, sum uint32) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// pseudoSum is the sum of the pseudo-header of a transport checksum.
func pseudoSum(src, dst netip.Addr, proto uint8, length int) uint32 {
	var b []byte
	s, d := src.AsSlice(), dst.AsSlice()
	b = append(b, s...)
	b = append(b, d...)
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	return sum + uint32(proto) + uint32(length)
}

// udpHeader returns a UDP datagram (header and payload) with its checksum.
func udpDatagram(src, dst netip.Addr, sport, dport uint16, payload []byte) []byte {
	b := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint16(b[4:], uint16(len(b)))
	copy(b[8:], payload)
	sum := checksum(b, pseudoSum(src, dst, unix.IPPROTO_UDP, len(b)))
	if sum == 0 {
		sum = 0xffff
	}
	binary.BigEndian.PutUint16(b[6:], sum)
	return b
}

// ipPacket wraps a transport payload in an IPv4 or IPv6 header.
func ipPacket(src, dst netip.Addr, proto uint8, l4 []byte) []byte {
	if dst.Is4() {
		h := make([]byte, 20, 20+len(l4))
		h[0], h[8], h[9] = 0x45, 64, proto
		binary.BigEndian.PutUint16(h[2:], uint16(20+len(l4)))
		binary.BigEndian.PutUint16(h[6:], 0x4000) // DF
		s, d := src.As4(), dst.As4()
		copy(h[12:], s[:])
		copy(h[16:], d[:])
		binary.BigEndian.PutUint16(h[10:], checksum(h, 0))
		return append(h, l4...)
	}
	h := make([]byte, 40, 40+len(l4))
	h[0], h[6], h[7] = 0x60, proto, 64
	binary.BigEndian.PutUint16(h[4:], uint16(len(l4)))
	s, d := src.As16(), dst.As16()
	copy(h[8:], s[:])
	copy(h[24:], d[:])
	return append(h, l4...)
}

// udpPacket is a whole IP packet carrying the token to dst's UDP port.
func (e *env) udpPacket(src, dst netip.Addr) []byte {
	return ipPacket(src, dst, unix.IPPROTO_UDP, udpDatagram(src, dst, 40000, e.cfg.udpPort, e.token))
}

func ethFrame(dst, src net.HardwareAddr, etype uint16, payload []byte) []byte {
	b := make([]byte, 14, 14+len(payload))
	copy(b[0:6], dst)
	copy(b[6:12], src)
	binary.BigEndian.PutUint16(b[12:], etype)
	return append(b, payload...)
}

var broadcastMAC = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// icmpEcho is an echo request carrying the token; v4 ones get their
// checksum here (ping sockets and ICMPv6 raw sockets sum themselves).
func (e *env) icmpEcho(v6 bool) []byte {
	b := make([]byte, 8, 8+len(e.token))
	b[0] = 8
	if v6 {
		b[0] = 128
	}
	b[5], b[7] = 1, 1 // identifier, sequence
	b = append(b, e.token...)
	if !v6 {
		binary.BigEndian.PutUint16(b[2:], checksum(b, 0))
	}
	return b
}

// pingTry sends an echo request with the token from an ICMP datagram
// ("ping") socket, with sendto or after connect().
func (e *env) pingTry(v6, connect bool) attempt {
	dst, family, proto := e.cfg.target4, unix.AF_INET, unix.IPPROTO_ICMP
	if v6 {
		dst, family, proto = e.cfg.target6, unix.AF_INET6, unix.IPPROTO_ICMPV6
	}
	a := attempt{Dest: destString(dst, 0, "icmp echo")}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		if errors.Is(err, unix.EACCES) {
			a.Detail = "ping sockets not enabled for this group (net.ipv4.ping_group_range)"
		}
		return a.failed("socket(SOCK_DGRAM, ICMP)", err)
	}
	defer unix.Close(fd)
	sa := sockaddr(dst, 0, 0)
	if connect {
		if err := unix.Connect(fd, sa); err != nil {
			return a.failed("connect", err)
		}
		if _, err := unix.Write(fd, e.icmpEcho(v6)); err != nil {
			return a.failed("write", err)
		}
		return a
	}
	if err := unix.Sendto(fd, e.icmpEcho(v6), 0, sa); err != nil {
		return a.failed("sendto", err)
	}
	return a
}

// rawCase is one raw IP socket attempt: socket(family, SOCK_RAW, proto),
// then sendto of what build returns.
type rawCase struct {
	v6    bool
	proto int
	what  string
	build func(e *env, l link, dst netip.Addr) []byte
	// link: build needs the attacker's interface addresses.
	link bool
}

func (e *env) rawTry(c rawCase) attempt {
	dst, family := e.cfg.target4, unix.AF_INET
	if c.v6 {
		dst, family = e.cfg.target6, unix.AF_INET6
	}
	a := attempt{Dest: destString(dst, 0, c.what)}
	var l link
	if c.link {
		var err error
		if l, err = e.link(); err != nil {
			return a.failed("find interface", err)
		}
	}
	fd, err := unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, c.proto)
	if err != nil {
		return a.failed(fmt.Sprintf("socket(SOCK_RAW, %d)", c.proto), err)
	}
	defer unix.Close(fd)
	if err := unix.Sendto(fd, c.build(e, l, dst), 0, sockaddr(dst, 0, 0)); err != nil {
		return a.failed("sendto", err)
	}
	return a
}

func buildEcho(v6 bool) func(*env, link, netip.Addr) []byte {
	return func(e *env, _ link, _ netip.Addr) []byte { return e.icmpEcho(v6) }
}

// buildICMPUnreachable is an ICMP destination-unreachable message (not an
// echo) with the token as its quoted payload.
func buildICMPUnreachable(e *env, _ link, _ netip.Addr) []byte {
	b := append([]byte{3, 3, 0, 0, 0, 0, 0, 0}, e.token...)
	binary.BigEndian.PutUint16(b[2:], checksum(b, 0))
	return b
}

func buildPayload(e *env, _ link, _ netip.Addr) []byte { return e.token }

func buildUDP(e *env, l link, dst netip.Addr) []byte {
	src := l.src4
	if dst.Is6() {
		src = l.src6
	}
	return udpDatagram(src, dst, 40001, e.cfg.udpPort, e.token)
}

func buildHdrincl(e *env, l link, dst netip.Addr) []byte { return e.udpPacket(l.src4, dst) }

// buildSYN is a TCP SYN to the target port with the token as SYN data.
func buildSYN(e *env, l link, dst netip.Addr) []byte {
	b := make([]byte, 20, 20+len(e.token))
	binary.BigEndian.PutUint16(b[0:], 40002)
	binary.BigEndian.PutUint16(b[2:], e.cfg.tcpPort)
	binary.BigEndian.PutUint32(b[4:], 1)
	b[12], b[13] = 5<<4, 0x02
	binary.BigEndian.PutUint16(b[14:], 65535)
	b = append(b, e.token...)
	binary.BigEndian.PutUint16(b[16:], checksum(b, pseudoSum(l.src4, dst, unix.IPPROTO_TCP, len(b))))
	return b
}

// packetTry sends a whole IP packet from an AF_PACKET socket: SOCK_DGRAM
// (the kernel writes the link header) or SOCK_RAW (we do), to the
// broadcast MAC so that no neighbour lookup is needed.
func (e *env) packetTry(raw, v6 bool) attempt {
	dst, etype := e.cfg.target4, uint16(unix.ETH_P_IP)
	if v6 {
		dst, etype = e.cfg.target6, unix.ETH_P_IPV6
	}
	a := attempt{Dest: destString(dst, e.cfg.udpPort, "udp in a link frame")}
	l, err := e.link()
	if err != nil {
		return a.failed("find interface", err)
	}
	typ := unix.SOCK_DGRAM
	if raw {
		typ = unix.SOCK_RAW
	}
	fd, err := unix.Socket(unix.AF_PACKET, typ|unix.SOCK_CLOEXEC, int(htons(etype)))
	if err != nil {
		return a.failed("socket(AF_PACKET)", err)
	}
	defer unix.Close(fd)
	src := l.src4
	if v6 {
		src = l.src6
	}
	pkt := e.udpPacket(src, dst)
	if raw {
		pkt = ethFrame(broadcastMAC, l.mac, etype, pkt)
	}
	ll := &unix.SockaddrLinklayer{Protocol: htons(etype), Ifindex: l.index, Halen: 6}
	copy(ll.Addr[:], broadcastMAC)
	if err := unix.Sendto(fd, pkt, 0, ll); err != nil {
		return a.failed("sendto", err)
	}
	return a
}

// xdpTry transmits a frame from an AF_XDP socket in copy mode: the frame
// goes straight to the driver (no IP stack, no cgroup egress program).
func (e *env) xdpTry() attempt {
	dst := e.cfg.target4
	a := attempt{Dest: destString(dst, e.cfg.udpPort, "udp in an AF_XDP frame")}
	l, err := e.link()
	if err != nil {
		return a.failed("find interface", err)
	}
	fd, err := unix.Socket(unix.AF_XDP, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return a.failed("socket(AF_XDP)", err)
	}
	defer unix.Close(fd)
	const frames, frameSize, ringSize = 4, 4096, 4
	umem, err := unix.Mmap(-1, 0, frames*frameSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		return a.failed("mmap UMEM", err)
	}
	defer unix.Munmap(umem)
	reg := unix.XDPUmemReg{Addr: uint64(uintptr(unsafe.Pointer(&umem[0]))), Len: uint64(len(umem)), Size: frameSize}
	if err := setsockoptRaw(fd, unix.SOL_XDP, unix.XDP_UMEM_REG, unsafe.Pointer(&reg), unsafe.Sizeof(reg)); err != nil {
		return a.failed("setsockopt XDP_UMEM_REG", err)
	}
	for _, r := range []struct {
		opt  int
		name string
	}{{unix.XDP_UMEM_FILL_RING, "XDP_UMEM_FILL_RING"}, {unix.XDP_UMEM_COMPLETION_RING, "XDP_UMEM_COMPLETION_RING"}, {unix.XDP_TX_RING, "XDP_TX_RING"}} {
		if err := unix.SetsockoptInt(fd, unix.SOL_XDP, r.opt, ringSize); err != nil {
			return a.failed("setsockopt "+r.name, err)
		}
	}
	var off unix.XDPMmapOffsets
	olen := uint32(unsafe.Sizeof(off))
	if _, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_XDP, unix.XDP_MMAP_OFFSETS, uintptr(unsafe.Pointer(&off)), uintptr(unsafe.Pointer(&olen)), 0); errno != 0 {
		return a.failed("getsockopt XDP_MMAP_OFFSETS", errno)
	}
	tx, err := unix.Mmap(fd, unix.XDP_PGOFF_TX_RING, int(off.Tx.Desc)+ringSize*int(unsafe.Sizeof(unix.XDPDesc{})), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return a.failed("mmap TX ring", err)
	}
	defer unix.Munmap(tx)
	if err := unix.Bind(fd, &unix.SockaddrXDP{Flags: unix.XDP_COPY, Ifindex: uint32(l.index)}); err != nil {
		return a.failed("bind AF_XDP (copy mode)", err)
	}
	frame := ethFrame(broadcastMAC, l.mac, unix.ETH_P_IP, e.udpPacket(l.src4, dst))
	copy(umem, frame)
	prod := (*uint32)(unsafe.Pointer(&tx[off.Tx.Producer]))
	p := atomic.LoadUint32(prod)
	*(*unix.XDPDesc)(unsafe.Pointer(&tx[int(off.Tx.Desc)+int(p%ringSize)*int(unsafe.Sizeof(unix.XDPDesc{}))])) = unix.XDPDesc{Addr: 0, Len: uint32(len(frame))}
	atomic.StoreUint32(prod, p+1)
	if err := unix.Sendto(fd, nil, unix.MSG_DONTWAIT, nil); err != nil && !errors.Is(err, unix.EAGAIN) {
		return a.failed("sendto (kick TX)", err)
	}
	e.waitSeen(time.Second)
	return a
}

func setsockoptRaw(fd, level, opt int, p unsafe.Pointer, size uintptr) error {
	_, _, errno := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), size, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// waitSeen gives a packet that leaves after the syscall returned (a queue,
// a forwarded packet) the chance to arrive before the technique's process
// ends or undoes its setup: it waits until the target saw the token, at
// most limit. Without an oracle it returns at once.
func (e *env) waitSeen(limit time.Duration) {
	if e.cfg.oracle == "" {
		return
	}
	o, err := dialOracle(e.cfg.oracle)
	if err != nil {
		return
	}
	defer o.Close()
	_, _ = o.wait(string(e.token), limit)
}

// tunTry creates a TUN device and writes an IP packet into it, as if it had
// arrived from a network: the kernel forwards it out of the interface
// towards the target. Forwarded packets belong to no socket, so no cgroup
// program sees them. It needs CAP_NET_ADMIN (TUNSETIFF, forwarding).
func (e *env) tunTry() attempt {
	dst := e.cfg.target4
	a := attempt{Dest: destString(dst, e.cfg.udpPort, "udp forwarded from a TUN device")}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return a.failed("open /dev/net/tun", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("pgatk%d")
	if err != nil {
		return a.failed("ifreq", err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return a.failed("ioctl TUNSETIFF", err)
	}
	name := ifr.Name()
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return a.failed("socket (for ioctl)", err)
	}
	defer unix.Close(s)
	up, _ := unix.NewIfreq(name)
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, up); err != nil {
		return a.failed("ioctl SIOCGIFFLAGS", err)
	}
	up.SetUint16(up.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, up); err != nil {
		return a.failed("ioctl SIOCSIFFLAGS (up)", err)
	}
	// Forwarding on, reverse-path filtering off, for this network namespace
	// and only while the packet passes; the old values come back.
	for _, sc := range []struct{ path, value string }{
		{"/proc/sys/net/ipv4/conf/all/forwarding", "1"},
		{"/proc/sys/net/ipv4/conf/all/rp_filter", "0"},
		{filepath.Join("/proc/sys/net/ipv4/conf", name, "rp_filter"), "0"},
	} {
		old, err := readFileTrim(sc.path)
		if err != nil {
			return a.failed("read "+sc.path, err)
		}
		if err := os.WriteFile(sc.path, []byte(sc.value), 0); err != nil {
			return a.failed("write "+sc.path, err)
		}
		defer os.WriteFile(sc.path, []byte(old), 0)
	}
	src := mustAddr("100.64.9.9") // not local here, or the kernel drops it as martian
	if _, err := unix.Write(fd, e.udpPacket(src, dst)); err != nil {
		return a.failed("write to the TUN device", err)
	}
	e.waitSeen(time.Second)
	return a
}
