package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The target is the other end: it runs in the network the attacker aims at
// and records what arrives there. Its evidence is an AF_PACKET capture on the
// interface that leads to the attacker, so that anything counts that got
// onto the target's wire, whatever protocol carried it and whether or not a
// socket of the target's stack would have taken it: a TCP SYN, a UDP
// datagram to a closed port, an ICMP echo, a raw IP protocol, a broadcast.
// Listeners for TCP, UDP and UDP-Lite on the target ports make handshakes
// complete, so data after a TCP connect arrives too.
//
// Every attempt carries a token (see tokenPrefix). TCP attempts whose data
// never left (the SYN got through, the connection did not) are matched by the
// SYN's source port, which the attacker reports.

// tokenPrefix starts every token: PGATK/<nonce>/<role>/<technique>|
const tokenPrefix = "PGATK/"

// record is one packet the target saw that matters: it carried a token, or
// it was a TCP SYN, a UDP or UDP-Lite datagram, an ICMP echo request, or an
// IP protocol other than TCP, UDP and ICMP.
type record struct {
	Seq   int        `json:"seq"`
	Src   netip.Addr `json:"src"`
	Dst   netip.Addr `json:"dst"`
	Proto string     `json:"proto"` // tcp, udp, udplite, icmp, icmpv6, ip<N>
	Sport uint16     `json:"sport,omitempty"`
	Dport uint16     `json:"dport,omitempty"`
	SYN   bool       `json:"syn,omitempty"`  // TCP SYN without ACK
	Echo  bool       `json:"echo,omitempty"` // ICMP or ICMPv6 echo request
	Token string     `json:"token,omitempty"`
}

func (r record) String() string {
	s := r.Dst.String()
	if r.Dport != 0 || r.Proto == "tcp" || r.Proto == "udp" || r.Proto == "udplite" {
		s = netip.AddrPortFrom(r.Dst, r.Dport).String()
	}
	return s + "/" + r.Proto
}

// targetConfig says where the target listens.
type targetConfig struct {
	Ifname           string // capture on this interface (the one towards the attacker)
	TCPPort, UDPPort uint16
	Oracle           string    // unix socket path for attackers' questions; "" for none
	Log              io.Writer // JSON lines of records; nil for none
}

// target is a running target; create it with startTarget in the target's
// network namespace.
type target struct {
	mu      sync.Mutex
	changed *sync.Cond
	recs    []record
	log     io.Writer
	closers []io.Closer
	closed  bool
	wg      sync.WaitGroup
}

// startTarget opens its sockets in the calling thread's network namespace
// (the goroutines it starts only read from them) and returns once it
// captures.
func startTarget(cfg targetConfig) (_ *target, err error) {
	t := &target{log: cfg.Log}
	t.changed = sync.NewCond(&t.mu)
	defer func() {
		if err != nil {
			t.Close()
		}
	}()
	capture, err := openCapture(cfg.Ifname)
	if err != nil {
		return nil, err
	}
	t.track(capture)
	t.goRun(func() { t.captureLoop(capture) })

	// Dual-stack listeners: IPv4 arrives as ::ffff:a.b.c.d.
	tcp, err := net.Listen("tcp", fmt.Sprintf("[::]:%d", cfg.TCPPort))
	if err != nil {
		return nil, fmt.Errorf("target: listen tcp: %w", err)
	}
	t.track(tcp)
	t.goRun(func() { t.accept(tcp) })
	udp, err := net.ListenPacket("udp", fmt.Sprintf("[::]:%d", cfg.UDPPort))
	if err != nil {
		return nil, fmt.Errorf("target: listen udp: %w", err)
	}
	t.track(udp)
	t.goRun(func() { drainPackets(udp) })
	if lite, err := listenUDPLite(cfg.UDPPort); err == nil {
		t.track(lite)
		t.goRun(func() { drainFile(lite) })
	} // without UDP-Lite the capture still sees the datagrams

	if cfg.Oracle != "" {
		_ = os.Remove(cfg.Oracle)
		ln, err := net.Listen("unix", cfg.Oracle)
		if err != nil {
			return nil, fmt.Errorf("target: oracle socket: %w", err)
		}
		// Attackers run as any user.
		if err := os.Chmod(cfg.Oracle, 0o666); err != nil {
			ln.Close()
			return nil, fmt.Errorf("target: oracle socket: %w", err)
		}
		t.track(ln)
		t.goRun(func() { t.serveOracle(ln) })
	}
	return t, nil
}

// track registers c to be closed by Close; after Close it closes c at once
// and returns false.
func (t *target) track(c io.Closer) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		c.Close()
		return false
	}
	t.closers = append(t.closers, c)
	return true
}

func (t *target) goRun(f func()) {
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		f()
	}()
}

// Close stops the target and waits for its goroutines.
func (t *target) Close() error {
	t.mu.Lock()
	closers := t.closers
	t.closers, t.closed = nil, true
	t.mu.Unlock()
	for _, c := range closers {
		c.Close()
	}
	t.wg.Wait()
	t.mu.Lock()
	t.changed.Broadcast()
	t.mu.Unlock()
	return nil
}

// Mark returns the number of records so far: records since a mark are those
// of the attempts made after it.
func (t *target) Mark() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.recs)
}

// Since returns the records from mark on.
func (t *target) Since(mark int) []record {
	t.mu.Lock()
	defer t.mu.Unlock()
	if mark > len(t.recs) {
		return nil
	}
	return append([]record(nil), t.recs[mark:]...)
}

// WaitToken waits until a record carries token, or limit has passed. The
// limit keeps a blocked attempt from hanging its caller; it is no verdict.
func (t *target) WaitToken(token string, limit time.Duration) bool {
	timer := time.AfterFunc(limit, func() {
		t.mu.Lock()
		t.changed.Broadcast()
		t.mu.Unlock()
	})
	defer timer.Stop()
	deadline := time.Now().Add(limit)
	t.mu.Lock()
	defer t.mu.Unlock()
	for {
		for _, r := range t.recs {
			if r.Token == token {
				return true
			}
		}
		if time.Now().After(deadline) || t.closed {
			return false
		}
		t.changed.Wait()
	}
}

func (t *target) add(rs []record) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, r := range rs {
		r.Seq = len(t.recs)
		t.recs = append(t.recs, r)
		if t.log != nil {
			b, _ := json.Marshal(r)
			t.log.Write(append(b, '\n'))
		}
	}
	t.changed.Broadcast()
}

// openCapture returns an AF_PACKET socket that sees every frame arriving on
// ifname, as an *os.File so that Close ends a blocked read.
func openCapture(ifname string) (*os.File, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("target: capture interface: %w", err)
	}
	proto := int(htons(unix.ETH_P_ALL))
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, fmt.Errorf("target: capture socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: ifi.Index}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("target: bind capture to %s: %w", ifname, err)
	}
	// A burst of attempts must not overflow the default queue.
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 8<<20)
	return os.NewFile(uintptr(fd), "capture-"+ifname), nil
}

func (t *target) captureLoop(f *os.File) {
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	buf := make([]byte, 1<<16)
	for {
		var n int
		var from unix.Sockaddr
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			n, from, rerr = unix.Recvfrom(int(fd), buf, 0)
			return rerr != unix.EAGAIN
		})
		if err != nil {
			return // closed
		}
		if rerr != nil {
			continue
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue // the target's own answers
		}
		if rs := parseFrame(buf[:n]); len(rs) > 0 {
			t.add(rs)
		}
	}
}

// parseFrame reads an Ethernet frame and returns the records it makes: one
// per token it carries, or one without a token when it is a packet of a kind
// that counts (see record).
func parseFrame(frame []byte) []record {
	if len(frame) < 14 {
		return nil
	}
	etype := binary.BigEndian.Uint16(frame[12:14])
	pkt := frame[14:]
	var r record
	var l4 []byte
	var proto uint8
	switch etype {
	case unix.ETH_P_IP:
		if len(pkt) < 20 || pkt[0]>>4 != 4 {
			return nil
		}
		ihl := int(pkt[0]&0x0f) * 4
		if ihl < 20 || len(pkt) < ihl {
			return nil
		}
		r.Src = netip.AddrFrom4([4]byte(pkt[12:16]))
		r.Dst = netip.AddrFrom4([4]byte(pkt[16:20]))
		proto = pkt[9]
		if binary.BigEndian.Uint16(pkt[6:8])&0x1fff == 0 {
			l4 = pkt[ihl:]
		}
	case unix.ETH_P_IPV6:
		if len(pkt) < 40 || pkt[0]>>4 != 6 {
			return nil
		}
		r.Src = netip.AddrFrom16([16]byte(pkt[8:24]))
		r.Dst = netip.AddrFrom16([16]byte(pkt[24:40]))
		proto, l4 = ipv6Payload(pkt[6], pkt[40:])
	default:
		return nil
	}
	r.Proto = protoName(proto)
	counts := false
	switch proto {
	case unix.IPPROTO_TCP:
		if len(l4) >= 20 {
			r.Sport, r.Dport = binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
			r.SYN = l4[13]&0x12 == 0x02
			counts = r.SYN
		}
	case unix.IPPROTO_UDP, unix.IPPROTO_UDPLITE:
		if len(l4) >= 8 {
			r.Sport, r.Dport = binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
		}
		counts = true
	case unix.IPPROTO_ICMP, unix.IPPROTO_ICMPV6:
		r.Echo = len(l4) > 0 && (l4[0] == 8 && proto == unix.IPPROTO_ICMP || l4[0] == 128 && proto == unix.IPPROTO_ICMPV6)
		counts = r.Echo
	case unix.IPPROTO_IGMP:
	default:
		counts = true
	}
	// Tokens are searched in the whole packet: a raw sender may put its
	// token anywhere, and a fragment without a transport header still counts.
	tokens := findTokens(pkt)
	if len(tokens) == 0 {
		if counts {
			return []record{r}
		}
		return nil
	}
	out := make([]record, len(tokens))
	for i, tok := range tokens {
		out[i] = r
		out[i].Token = tok
	}
	return out
}

// ipv6Payload skips the extension headers the kernel may put in front of a
// transport header and returns the transport protocol and its bytes (nil for
// a later fragment).
func ipv6Payload(next uint8, b []byte) (uint8, []byte) {
	for range 8 {
		switch next {
		case 0, 43, 60: // hop-by-hop, routing, destination options
			if len(b) < 8 {
				return next, nil
			}
			n := (int(b[1]) + 1) * 8
			if len(b) < n {
				return next, nil
			}
			next, b = b[0], b[n:]
		case 44: // fragment
			if len(b) < 8 {
				return next, nil
			}
			if binary.BigEndian.Uint16(b[2:4])&^7 != 0 {
				return b[0], nil
			}
			next, b = b[0], b[8:]
		default:
			return next, b
		}
	}
	return next, nil
}

func protoName(p uint8) string {
	switch p {
	case unix.IPPROTO_TCP:
		return "tcp"
	case unix.IPPROTO_UDP:
		return "udp"
	case unix.IPPROTO_UDPLITE:
		return "udplite"
	case unix.IPPROTO_ICMP:
		return "icmp"
	case unix.IPPROTO_ICMPV6:
		return "icmpv6"
	}
	return "ip" + strconv.Itoa(int(p))
}

// findTokens returns every token in b.
func findTokens(b []byte) []string {
	var out []string
	for {
		i := bytes.Index(b, []byte(tokenPrefix))
		if i < 0 {
			return out
		}
		b = b[i:]
		end := bytes.IndexByte(b, '|')
		if end < 0 || end > 200 {
			b = b[len(tokenPrefix):]
			continue
		}
		out = append(out, string(b[:end+1]))
		b = b[end+1:]
	}
}

// accept keeps every connection open until its peer closes it or the
// target stops: a holder's connection must outlive many techniques.
func (t *target) accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		if !t.track(c) {
			return
		}
		t.goRun(func() { _, _ = io.Copy(io.Discard, c) })
	}
}

func drainPackets(pc net.PacketConn) {
	buf := make([]byte, 1<<16)
	for {
		if _, _, err := pc.ReadFrom(buf); err != nil && !errors.Is(err, syscall.EMSGSIZE) {
			return
		}
	}
}

func drainFile(f *os.File) {
	buf := make([]byte, 1<<16)
	for {
		if _, err := f.Read(buf); err != nil {
			return
		}
	}
}

func listenUDPLite(port uint16) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_UDPLITE)
	if err != nil {
		return nil, err
	}
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0)
	if err := unix.Bind(fd, &unix.SockaddrInet6{Port: int(port)}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), "udplite"), nil
}

// The oracle answers attackers over a unix socket, one request per line:
//
//	mark             -> the record count now (a number)
//	wait TOKEN MS    -> "yes" once a record carries TOKEN, "no" after MS ms
//	dump MARK        -> the records since MARK as JSON lines, then "end"
func (t *target) serveOracle(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go t.answer(c)
	}
}

func (t *target) answer(c net.Conn) {
	defer c.Close()
	sc := bufio.NewScanner(c)
	w := bufio.NewWriter(c)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 1 && f[0] == "mark":
			fmt.Fprintln(w, t.Mark())
		case len(f) == 3 && f[0] == "wait":
			ms, _ := strconv.Atoi(f[2])
			if t.WaitToken(f[1], time.Duration(ms)*time.Millisecond) {
				fmt.Fprintln(w, "yes")
			} else {
				fmt.Fprintln(w, "no")
			}
		case len(f) == 2 && f[0] == "dump":
			mark, _ := strconv.Atoi(f[1])
			enc := json.NewEncoder(w)
			for _, r := range t.Since(mark) {
				_ = enc.Encode(r)
			}
			fmt.Fprintln(w, "end")
		default:
			fmt.Fprintf(w, "error: unknown request %q\n", sc.Text())
		}
		if w.Flush() != nil {
			return
		}
	}
}

// oracle is the attacker's side of the target's unix socket.
type oracle struct {
	c  net.Conn
	rd *bufio.Reader
}

func dialOracle(path string) (*oracle, error) {
	c, err := net.Dial("unix", path)
	if err != nil {
		return nil, fmt.Errorf("oracle %s: %w", path, err)
	}
	return &oracle{c: c, rd: bufio.NewReader(c)}, nil
}

func (o *oracle) Close() error { return o.c.Close() }

func (o *oracle) ask(req string) (string, error) {
	if _, err := fmt.Fprintln(o.c, req); err != nil {
		return "", fmt.Errorf("oracle: %w", err)
	}
	line, err := o.rd.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("oracle: %w", err)
	}
	line = strings.TrimSpace(line)
	if strings.HasPrefix(line, "error:") {
		return "", fmt.Errorf("oracle: %s", line)
	}
	return line, nil
}

func (o *oracle) mark() (int, error) {
	s, err := o.ask("mark")
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(s)
}

func (o *oracle) wait(token string, limit time.Duration) (bool, error) {
	s, err := o.ask(fmt.Sprintf("wait %s %d", token, limit.Milliseconds()))
	return s == "yes", err
}

func (o *oracle) dump(mark int) ([]record, error) {
	if _, err := fmt.Fprintf(o.c, "dump %d\n", mark); err != nil {
		return nil, fmt.Errorf("oracle: %w", err)
	}
	var out []record
	for {
		line, err := o.rd.ReadString('\n')
		if err != nil {
			return nil, fmt.Errorf("oracle: %w", err)
		}
		if strings.TrimSpace(line) == "end" {
			return out, nil
		}
		var r record
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			return nil, fmt.Errorf("oracle: bad record %q: %w", line, err)
		}
		out = append(out, r)
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
