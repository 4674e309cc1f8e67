package main

import (
	"net/netip"

	"golang.org/x/sys/unix"
)

// Technique classes.
const (
	classControl  = "control"   // must reach: proves the target hears this role
	classAddress  = "address"   // address forms
	classTCP      = "transport" // transports and syscalls
	classURing    = "io_uring"
	classRaw      = "raw"      // ICMP, raw IP, packet, XDP, TUN
	classIdentity = "identity" // another process's grant
	classCgroupNS = "cgroup-ns"
)

// technique is one way to try to reach the target.
type technique struct {
	name  string
	class string
	// grantable: an ordinary TCP or UDP path to the run's target (-target4
	// or -target6 at -tcp-port or -udp-port), so a process granted that
	// destination must reach it this way. Run against a granted target, it
	// proves the technique works and the target hears it.
	grantable bool
	try       func(e *env) attempt
}

// The fixed destinations of address-form techniques; each lies in a prefix
// a policy may call internal (the test's does).
var (
	orgMulticast4  = mustAddr("239.1.2.3")
	linkMulticast4 = mustAddr("224.0.0.251")
	limitedBcast4  = mustAddr("255.255.255.255")
	siteMulticast6 = mustAddr("ff05::1:3")
	linkMulticast6 = mustAddr("ff02::1")
	zero4          = mustAddr("0.0.0.0")
	zero6          = mustAddr("::")
)

func tcpTo(dst func(*config) netip.Addr, c tcpCase) func(*env) attempt {
	return func(e *env) attempt {
		c := c
		c.dst = dst(e.cfg)
		return e.tcp(c)
	}
}

func udpTo(dst func(*config) netip.Addr, c udpCase) func(*env) attempt {
	return func(e *env) attempt {
		c := c
		c.dst = dst(e.cfg)
		return e.udp(c)
	}
}

func t4(c *config) netip.Addr { return c.target4 }
func t6(c *config) netip.Addr { return c.target6 }
func fixed(a netip.Addr) func(*config) netip.Addr {
	return func(*config) netip.Addr { return a }
}

var techniques = []technique{
	// Controls: outside the internal prefixes, so nothing stops them.
	{name: "control-tcp4-external", class: classControl, try: tcpTo(func(c *config) netip.Addr { return c.external4 }, tcpCase{})},
	{name: "control-udp4-external", class: classControl, try: udpTo(func(c *config) netip.Addr { return c.external4 }, udpCase{})},
	{name: "control-tcp6-external", class: classControl, try: tcpTo(func(c *config) netip.Addr { return c.external6 }, tcpCase{})},

	// Address forms.
	{name: "tcp4-connect", class: classAddress, grantable: true, try: tcpTo(t4, tcpCase{})},
	{name: "tcp6-connect", class: classAddress, grantable: true, try: tcpTo(t6, tcpCase{})},
	{name: "tcp6-v4mapped", class: classAddress, grantable: true, try: tcpTo(t4, tcpCase{family: unix.AF_INET6})},
	{name: "udp6-v4mapped-sendto", class: classAddress, grantable: true, try: udpTo(t4, udpCase{family: unix.AF_INET6})},
	{name: "udp6-v4mapped-connect-send", class: classAddress, grantable: true, try: udpTo(t4, udpCase{family: unix.AF_INET6, send: connectThenSend})},
	{name: "tcp6-v4compat", class: classAddress, try: tcpTo(func(c *config) netip.Addr { return compat(c.target4) }, tcpCase{})},
	{name: "udp6-v4compat-sendto", class: classAddress, try: udpTo(func(c *config) netip.Addr { return compat(c.target4) }, udpCase{})},
	{name: "tcp6-nat64-prefix", class: classAddress, try: tcpTo(func(c *config) netip.Addr { return nat64(c.target4) }, tcpCase{})},
	{name: "tcp4-unspecified-0.0.0.0", class: classAddress, try: tcpTo(fixed(zero4), tcpCase{})},
	{name: "tcp6-unspecified-::", class: classAddress, try: tcpTo(fixed(zero6), tcpCase{})},
	{name: "tcp6-v4mapped-0.0.0.0", class: classAddress, try: tcpTo(fixed(zero4), tcpCase{family: unix.AF_INET6})},
	{name: "udp4-unspecified-0.0.0.0", class: classAddress, try: udpTo(fixed(zero4), udpCase{})},
	{name: "udp4-directed-broadcast", class: classAddress, try: udpTo(func(c *config) netip.Addr { return broadcast4(c.target4) }, udpCase{opts: []sockOpt{optInt(unix.SOL_SOCKET, unix.SO_BROADCAST, 1, "SO_BROADCAST")}})},
	{name: "udp6-v4mapped-directed-broadcast", class: classAddress, try: udpTo(func(c *config) netip.Addr { return broadcast4(c.target4) }, udpCase{family: unix.AF_INET6, opts: []sockOpt{optInt(unix.SOL_SOCKET, unix.SO_BROADCAST, 1, "SO_BROADCAST")}})},
	{name: "udp4-limited-broadcast", class: classAddress, try: udpTo(fixed(limitedBcast4), udpCase{opts: []sockOpt{optInt(unix.SOL_SOCKET, unix.SO_BROADCAST, 1, "SO_BROADCAST"), optBindToDevice}})},
	{name: "udp4-multicast-org-local", class: classAddress, try: udpTo(fixed(orgMulticast4), udpCase{opts: []sockOpt{optMulticastIf4}})},
	{name: "udp4-multicast-link-local", class: classAddress, try: udpTo(fixed(linkMulticast4), udpCase{opts: []sockOpt{optMulticastIf4}})},
	{name: "udp6-v4mapped-multicast", class: classAddress, try: udpTo(fixed(orgMulticast4), udpCase{family: unix.AF_INET6, opts: []sockOpt{optMulticastIf4}})},
	{name: "udp6-multicast-site-local", class: classAddress, try: udpTo(fixed(siteMulticast6), udpCase{opts: []sockOpt{optMulticastIf6}})},
	{name: "udp6-multicast-link-local", class: classAddress, try: udpTo(fixed(linkMulticast6), udpCase{zone: true, opts: []sockOpt{optMulticastIf6}})},
	{name: "tcp4-link-local-metadata", class: classAddress, try: tcpTo(func(c *config) netip.Addr { return c.metadata4 }, tcpCase{})},
	{name: "udp4-link-local-metadata", class: classAddress, try: udpTo(func(c *config) netip.Addr { return c.metadata4 }, udpCase{})},
	{name: "tcp6-link-local", class: classAddress, try: tcpTo(func(c *config) netip.Addr { return c.linkLocal6 }, tcpCase{zone: true})},
	{name: "udp6-link-local", class: classAddress, try: udpTo(func(c *config) netip.Addr { return c.linkLocal6 }, udpCase{zone: true})},
	{name: "udp4-connected-external-then-sendto", class: classAddress, grantable: true, try: udpTo(t4, udpCase{send: sendAfterConnecting(false)})},
	{name: "udp4-disconnect-then-sendto", class: classAddress, grantable: true, try: udpTo(t4, udpCase{send: sendAfterConnecting(true)})},

	// TCP variants.
	{name: "tcp4-connect-nonblocking", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{how: connNonblock})},
	{name: "tcp6-connect-nonblocking", class: classTCP, grantable: true, try: tcpTo(t6, tcpCase{how: connNonblock})},
	{name: "tcp4-connect-after-bind", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{opts: []sockOpt{optBind(unix.AF_INET)}})},
	{name: "tcp4-bind-address-no-port", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{opts: []sockOpt{optInt(unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1, "IP_BIND_ADDRESS_NO_PORT"), optBind(unix.AF_INET)}})},
	{name: "tcp4-reuseport-after-bind", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{opts: []sockOpt{optInt(unix.SOL_SOCKET, unix.SO_REUSEPORT, 1, "SO_REUSEPORT"), optBind(unix.AF_INET)}})},
	{name: "tcp4-bindtodevice", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{opts: []sockOpt{optBindToDevice}})},
	{name: "tcp4-freebind", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{opts: []sockOpt{optInt(unix.IPPROTO_IP, unix.IP_FREEBIND, 1, "IP_FREEBIND")}})},
	{name: "tcp4-transparent", class: classTCP, grantable: false, try: tcpTo(t4, tcpCase{opts: []sockOpt{optInt(unix.IPPROTO_IP, unix.IP_TRANSPARENT, 1, "IP_TRANSPARENT")}})},
	{name: "tcp4-repair-mode-connect", class: classTCP, try: tcpTo(t4, tcpCase{opts: []sockOpt{optInt(unix.IPPROTO_TCP, unix.TCP_REPAIR, 1, "TCP_REPAIR")}})},
	{name: "tcp4-fastopen-sendto", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{how: connFastOpenSendto})},
	{name: "tcp4-fastopen-sendmsg", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{how: connFastOpenSendmsg})},
	{name: "tcp4-fastopen-connect-option", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{how: connFastOpenOpt})},
	{name: "tcp6-fastopen-sendto", class: classTCP, grantable: true, try: tcpTo(t6, tcpCase{how: connFastOpenSendto})},
	{name: "tcp6-v4mapped-fastopen-sendto", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{family: unix.AF_INET6, how: connFastOpenSendto})},
	{name: "mptcp4-connect", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{proto: unix.IPPROTO_MPTCP})},
	{name: "mptcp6-connect", class: classTCP, grantable: true, try: tcpTo(t6, tcpCase{proto: unix.IPPROTO_MPTCP})},
	{name: "mptcp4-fastopen-sendto", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{proto: unix.IPPROTO_MPTCP, how: connFastOpenSendto})},
	{name: "mptcp6-v4mapped-connect", class: classTCP, grantable: true, try: tcpTo(t4, tcpCase{proto: unix.IPPROTO_MPTCP, family: unix.AF_INET6})},

	// UDP and UDP-Lite variants.
	{name: "udp4-sendto", class: classTCP, grantable: true, try: udpTo(t4, udpCase{})},
	{name: "udp4-sendmsg", class: classTCP, grantable: true, try: udpTo(t4, udpCase{send: sendMsg})},
	{name: "udp4-sendmmsg", class: classTCP, grantable: true, try: udpTo(t4, udpCase{send: sendMmsg})},
	{name: "udp4-connect-then-send", class: classTCP, grantable: true, try: udpTo(t4, udpCase{send: connectThenSend})},
	{name: "udp4-connect-then-sendmmsg", class: classTCP, grantable: true, try: udpTo(t4, udpCase{send: connectThenSendmmsg})},
	{name: "udp6-sendto", class: classTCP, grantable: true, try: udpTo(t6, udpCase{})},
	{name: "udp6-sendmmsg", class: classTCP, grantable: true, try: udpTo(t6, udpCase{send: sendMmsg})},
	{name: "udp6-connect-then-send", class: classTCP, grantable: true, try: udpTo(t6, udpCase{send: connectThenSend})},
	{name: "udp4-cork-msg-more", class: classTCP, grantable: true, try: udpTo(t4, udpCase{send: sendCorked(false)})},
	{name: "udp4-cork-option", class: classTCP, grantable: true, try: udpTo(t4, udpCase{send: sendCorked(true)})},
	{name: "udp4-gso-option", class: classTCP, grantable: true, try: udpTo(t4, udpCase{send: sendGSO(false)})},
	{name: "udp4-gso-cmsg", class: classTCP, grantable: true, try: udpTo(t4, udpCase{send: sendGSO(true)})},
	{name: "udp6-gso-option", class: classTCP, grantable: true, try: udpTo(t6, udpCase{send: sendGSO(false)})},
	{name: "udp4-pktinfo-ifindex", class: classTCP, grantable: true, try: udpTo(t4, udpCase{send: sendPktinfo(nil)})},
	{name: "udp4-pktinfo-internal-source", class: classTCP, try: udpTo(t4, udpCase{send: sendPktinfo(func(e *env) netip.Addr { return e.cfg.target4 })})},
	{name: "udp6-pktinfo-ifindex", class: classTCP, grantable: true, try: udpTo(t6, udpCase{send: sendPktinfo(nil)})},
	{name: "udp4-zerocopy", class: classTCP, grantable: true, try: udpTo(t4, udpCase{send: sendZerocopy})},
	{name: "udplite4-sendto", class: classTCP, grantable: true, try: udpTo(t4, udpCase{proto: unix.IPPROTO_UDPLITE})},
	{name: "udplite4-connect-then-send", class: classTCP, grantable: true, try: udpTo(t4, udpCase{proto: unix.IPPROTO_UDPLITE, send: connectThenSend})},
	{name: "udplite6-sendto", class: classTCP, grantable: true, try: udpTo(t6, udpCase{proto: unix.IPPROTO_UDPLITE})},
	{name: "udplite6-v4mapped-sendto", class: classTCP, grantable: true, try: udpTo(t4, udpCase{proto: unix.IPPROTO_UDPLITE, family: unix.AF_INET6})},

	// Other transports: present in some kernels, absent here.
	{name: "sctp4-connect", class: classTCP, try: otherTransport(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_SCTP, "sctp")},
	{name: "sctp4-seqpacket-sendto", class: classTCP, try: otherTransport(unix.AF_INET, unix.SOCK_SEQPACKET, unix.IPPROTO_SCTP, "sctp")},
	{name: "dccp4-connect", class: classTCP, try: otherTransport(unix.AF_INET, unix.SOCK_DCCP, unix.IPPROTO_DCCP, "dccp")},
	{name: "smc-connect", class: classTCP, try: otherTransport(unix.AF_SMC, unix.SOCK_STREAM, 0, "smc")},

	// io_uring.
	{name: "uring-connect", class: classURing, grantable: true, try: uringTo(uringCase{op: iorOpConnect})},
	{name: "uring-connect-async-worker", class: classURing, grantable: true, try: uringTo(uringCase{op: iorOpConnect, async: true})},
	{name: "uring-connect-sqpoll", class: classURing, grantable: true, try: uringTo(uringCase{op: iorOpConnect, sqpoll: true})},
	{name: "uring-socket-then-connect", class: classURing, grantable: true, try: uringTo(uringCase{op: iorOpConnect, socket: true})},
	{name: "uring-sendmsg-udp", class: classURing, grantable: true, try: uringTo(uringCase{op: iorOpSendmsg})},
	{name: "uring-sendmsg-udp-async-worker", class: classURing, grantable: true, try: uringTo(uringCase{op: iorOpSendmsg, async: true})},
	{name: "uring-sendmsg-udp-sqpoll", class: classURing, grantable: true, try: uringTo(uringCase{op: iorOpSendmsg, sqpoll: true})},
	{name: "uring-socket-then-sendmsg-udp", class: classURing, grantable: true, try: uringTo(uringCase{op: iorOpSendmsg, socket: true})},
	{name: "uring-send-with-address-udp", class: classURing, grantable: true, try: uringTo(uringCase{op: iorOpSend})},
	{name: "uring-send-zc-udp", class: classURing, grantable: true, try: uringTo(uringCase{op: iorOpSendZC})},
	{name: "uring-sendmsg-zc-udp", class: classURing, grantable: true, try: uringTo(uringCase{op: iorOpSendmsgZC})},

	// ICMP, raw IP, packet, XDP, TUN.
	{name: "ping4-sendto", class: classRaw, try: func(e *env) attempt { return e.pingTry(false, false) }},
	{name: "ping4-connect-then-send", class: classRaw, try: func(e *env) attempt { return e.pingTry(false, true) }},
	{name: "ping6-sendto", class: classRaw, try: func(e *env) attempt { return e.pingTry(true, false) }},
	{name: "raw4-icmp-echo", class: classRaw, try: rawWith(rawCase{proto: unix.IPPROTO_ICMP, what: "icmp echo", build: buildEcho(false)})},
	{name: "raw6-icmp-echo", class: classRaw, try: rawWith(rawCase{v6: true, proto: unix.IPPROTO_ICMPV6, what: "icmpv6 echo", build: buildEcho(true)})},
	{name: "raw4-icmp-unreachable", class: classRaw, try: rawWith(rawCase{proto: unix.IPPROTO_ICMP, what: "icmp unreachable", build: buildICMPUnreachable})},
	{name: "raw4-udp", class: classRaw, try: rawWith(rawCase{proto: unix.IPPROTO_UDP, what: "udp", build: buildUDP, link: true})},
	{name: "raw6-udp", class: classRaw, try: rawWith(rawCase{v6: true, proto: unix.IPPROTO_UDP, what: "udp", build: buildUDP, link: true})},
	{name: "raw4-tcp-syn-with-data", class: classRaw, try: rawWith(rawCase{proto: unix.IPPROTO_TCP, what: "tcp syn", build: buildSYN, link: true})},
	{name: "raw4-ip-proto-253", class: classRaw, try: rawWith(rawCase{proto: 253, what: "ip proto 253", build: buildPayload})},
	{name: "raw6-ip-proto-253", class: classRaw, try: rawWith(rawCase{v6: true, proto: 253, what: "ip proto 253", build: buildPayload})},
	{name: "raw4-hdrincl", class: classRaw, try: rawWith(rawCase{proto: unix.IPPROTO_RAW, what: "udp, own IP header", build: buildHdrincl, link: true})},
	{name: "packet-dgram-ipv4", class: classRaw, try: func(e *env) attempt { return e.packetTry(false, false) }},
	{name: "packet-raw-ipv4", class: classRaw, try: func(e *env) attempt { return e.packetTry(true, false) }},
	{name: "packet-raw-ipv6", class: classRaw, try: func(e *env) attempt { return e.packetTry(true, true) }},
	{name: "xdp-socket-tx", class: classRaw, try: func(e *env) attempt { return e.xdpTry() }},
	{name: "tun-inject-forwarded", class: classRaw, try: func(e *env) attempt { return e.tunTry() }},

	// Another process's grant.
	{name: "scm-rights-tcp-established", class: classIdentity, try: func(e *env) attempt { return e.scmRightsTry(useTCP) }},
	{name: "scm-rights-udp-connected", class: classIdentity, try: func(e *env) attempt { return e.scmRightsTry(useUDP) }},
	{name: "scm-rights-udp-unconnected-sendto", class: classIdentity, try: func(e *env) attempt { return e.scmRightsTry(useFreeUDP) }},
	{name: "scm-rights-tcp-unconnected-connect", class: classIdentity, try: func(e *env) attempt { return e.scmRightsTry(useFreeTCP) }},
	{name: "pidfd-getfd-tcp-established", class: classIdentity, try: func(e *env) attempt { return e.pidfdGetfdTry(useTCP) }},
	{name: "pidfd-getfd-udp-connected", class: classIdentity, try: func(e *env) attempt { return e.pidfdGetfdTry(useUDP) }},
	{name: "pidfd-getfd-udp-unconnected-sendto", class: classIdentity, try: func(e *env) attempt { return e.pidfdGetfdTry(useFreeUDP) }},
	{name: "pidfd-getfd-tcp-unconnected-connect", class: classIdentity, try: func(e *env) attempt { return e.pidfdGetfdTry(useFreeTCP) }},
	{name: "setuid-pidfd-getfd-udp-connected", class: classIdentity, try: func(e *env) attempt { return e.setuidPidfdGetfdTry(useUDP) }},
	{name: "proc-pid-fd-open", class: classIdentity, try: func(e *env) attempt { return e.procFDTry() }},
	{name: "process-vm-writev-send-buffer", class: classIdentity, try: func(e *env) attempt { return e.memWriteTry(false) }},
	{name: "proc-pid-mem-write-send-buffer", class: classIdentity, try: func(e *env) attempt { return e.memWriteTry(true) }},
	{name: "ptrace-inject-connect", class: classIdentity, try: func(e *env) attempt { return e.ptraceTry() }},

	// cgroups and namespaces.
	{name: "cgroup-procs-write", class: classCgroupNS, try: func(e *env) attempt { return e.cgroupWriteTry(false) }},
	{name: "cgroup-threads-write", class: classCgroupNS, try: func(e *env) attempt { return e.cgroupWriteTry(true) }},
	{name: "clone-into-cgroup", class: classCgroupNS, try: func(e *env) attempt { return e.cloneIntoCgroupTry() }},
	{name: "userns-cgroupns-procs-write", class: classCgroupNS, try: func(e *env) attempt { return e.userNSMoveTry(false) }},
	{name: "userns-mount-own-cgroup2", class: classCgroupNS, try: func(e *env) attempt { return e.userNSMoveTry(true) }},
	{name: "netns-new-connect", class: classCgroupNS, try: func(e *env) attempt { return e.netnsTry(false) }},
	{name: "userns-netns-raw-icmp", class: classCgroupNS, try: func(e *env) attempt { return e.netnsTry(true) }},

	// Forged DNS answers for a granted name.
	{name: "dns-forged-answer", class: classDNS, try: func(e *env) attempt { return e.dnsForgedAnswerTry(forgeToApp) }},
	{name: "dns-forged-answer-to-proxy", class: classDNS, try: func(e *env) attempt { return e.dnsForgedAnswerTry(forgeToProxy) }},
}

func uringTo(c uringCase) func(*env) attempt {
	return func(e *env) attempt { return e.uringTry(c) }
}

func rawWith(c rawCase) func(*env) attempt {
	return func(e *env) attempt { return e.rawTry(c) }
}

// otherTransport tries a transport protocol procgate's grants do not name:
// a connection (stream) or a datagram (seqpacket) to the target's TCP port.
func otherTransport(family, typ, proto int, what string) func(*env) attempt {
	return func(e *env) attempt {
		dst := e.cfg.target4
		a := attempt{Dest: destString(dst, e.cfg.tcpPort, what)}
		fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return a.failed("socket", err)
		}
		defer unix.Close(fd)
		setTimeouts(fd, e.cfg.timeout)
		sa := sockaddr(dst, e.cfg.tcpPort, 0)
		if typ == unix.SOCK_SEQPACKET {
			if err := unix.Sendto(fd, e.token, 0, sa); err != nil {
				return a.failed("sendto", err)
			}
			return a
		}
		if err := unix.Connect(fd, sa); err != nil {
			return a.failed("connect", err)
		}
		if _, err := unix.Write(fd, e.token); err != nil {
			return a.failed("write", err)
		}
		return a
	}
}
