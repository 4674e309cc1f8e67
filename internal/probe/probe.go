// Package probe makes real connection attempts and reports whether the kernel
// let them through, for tests and benchmarks that check verdicts from a
// process placed in a cgroup and a network namespace of their own.
//
// A prober is a child process (usually the test binary re-executed) that
// reads one attempt per line on stdin and answers one line on stdout, so that
// a test can drive thousands of attempts through one process in the app's
// cgroup.
package probe

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
)

// Method is the syscall path an attempt takes.
type Method string

const (
	Connect    Method = "connect"     // TCP: non-blocking connect(); UDP: connect()
	SendTo     Method = "sendto"      // UDP: sendto() on an unconnected socket
	Mapped     Method = "mapped"      // like Connect, from an AF_INET6 socket to ::ffff:a.b.c.d
	MappedSend Method = "mapped-send" // like SendTo, from an AF_INET6 socket to ::ffff:a.b.c.d
	// Paths around connect() and UDP sendmsg(), for the backstops:
	Ping     Method = "ping"      // ICMP echo from an ICMP datagram (ping) socket
	RawICMP  Method = "raw-icmp"  // ICMP echo from a raw socket (needs CAP_NET_RAW)
	RawProto Method = "raw-proto" // a raw socket of IP protocol 253 (experimental), sendto
	Packet   Method = "packet"    // an AF_PACKET socket (creation is the attempt)
	XDP      Method = "xdp"       // an AF_XDP socket (creation is the attempt)
	TUN      Method = "tun"       // TUNSETIFF of a new TUN device (creation is the attempt; CAP_NET_ADMIN)
	Banner   Method = "banner"    // TCP: blocking connect, then read a line (a server answered)
	// Listen: listen() on a TCP socket never bound, which the kernel binds
	// to an ephemeral port of the destination's family (its address and
	// port are not used). Denied is EACCES, as for Bind.
	Listen Method = "listen"
	// Bind: bind() a TCP or UDP socket to the destination's address and
	// port, as a server does; MappedBind the same from an AF_INET6 socket
	// to ::ffff:a.b.c.d. Denied is EACCES, what procgate's bind hooks say.
	Bind       Method = "bind"
	MappedBind Method = "mapped-bind"
	// Reconnect (holders only), TCP: connect to a first destination that
	// refuses, then the same socket to a second; Open's DEST is FIRST>SECOND.
	Reconnect Method = "reconnect"
)

// Verdict is what the kernel said.
type Verdict string

const (
	Allowed Verdict = "allowed" // the attempt got past the hooks (any result but EPERM)
	Denied  Verdict = "denied"  // EPERM
)

// Try makes one attempt and reports the verdict. Errors other than EPERM
// (refused, unreachable) mean the hooks let it through.
func Try(d ruleset.Dest, m Method) (Verdict, error) {
	err := attempt(d, m)
	switch {
	case err == nil:
		return Allowed, nil
	case m == Bind || m == MappedBind || m == Listen:
		// procgate refuses binds with EACCES: EPERM would be something
		// else's refusal, and is an error here.
		if errors.Is(err, unix.EACCES) {
			return Denied, nil
		}
	case errors.Is(err, unix.EPERM):
		return Denied, nil
	case errors.Is(err, unix.EINPROGRESS), errors.Is(err, unix.ECONNREFUSED),
		errors.Is(err, unix.ENETUNREACH), errors.Is(err, unix.EHOSTUNREACH):
		return Allowed, nil
	}
	return "", fmt.Errorf("%s %s: %w", m, d, err)
}

func attempt(d ruleset.Dest, m Method) error {
	switch m {
	case Ping, RawICMP, RawProto, Packet, XDP:
		return attemptRaw(d, m)
	case TUN:
		return tun()
	case Banner:
		return banner(d)
	}
	addr := d.Addr
	family := unix.AF_INET
	if m == Mapped || m == MappedSend || m == MappedBind {
		addr = netip.AddrFrom16(addr.Unmap().As16())
		family = unix.AF_INET6
	} else if addr.Is6() && !addr.Is4In6() {
		family = unix.AF_INET6
	} else {
		addr = addr.Unmap()
	}
	typ := unix.SOCK_STREAM
	if d.Proto == ruleset.UDP {
		typ = unix.SOCK_DGRAM
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	if typ == unix.SOCK_STREAM {
		// RST on close: thousands of attempts must not pile up in TIME_WAIT.
		_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	}
	if family == unix.AF_INET6 {
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0)
	}
	var sa unix.Sockaddr
	if family == unix.AF_INET {
		sa = &unix.SockaddrInet4{Port: int(d.Port), Addr: addr.As4()}
	} else {
		sa = &unix.SockaddrInet6{Port: int(d.Port), Addr: addr.As16()}
	}
	if m == Bind || m == MappedBind {
		return unix.Bind(fd, sa)
	}
	if m == Listen {
		return unix.Listen(fd, 1)
	}
	if typ == unix.SOCK_DGRAM && (m == SendTo || m == MappedSend) {
		return unix.Sendto(fd, []byte("probe"), 0, sa)
	}
	return unix.Connect(fd, sa)
}

// attemptRaw sends one packet from a socket that bypasses the connect and
// sendmsg hooks; the egress and sock_create backstops must stop it.
func attemptRaw(d ruleset.Dest, m Method) error {
	addr := d.Addr.Unmap()
	switch m {
	case Packet, XDP:
		family, typ := unix.AF_PACKET, unix.SOCK_DGRAM
		if m == XDP {
			family, typ = unix.AF_XDP, unix.SOCK_RAW
		}
		fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		return unix.Close(fd)
	}
	family, typ, proto := unix.AF_INET, unix.SOCK_DGRAM, unix.IPPROTO_ICMP
	echo := []byte{8, 0, 0, 0, 0, 1, 0, 1} // ICMP echo request; ping sockets fix the id and checksum
	if addr.Is6() {
		family, proto = unix.AF_INET6, unix.IPPROTO_ICMPV6
		echo[0] = 128
	}
	switch m {
	case RawICMP:
		typ = unix.SOCK_RAW
		if addr.Is4() {
			sum := ^uint16(0x0800 + 0x0001 + 0x0001)
			echo[2], echo[3] = byte(sum>>8), byte(sum)
		}
	case RawProto:
		typ, proto = unix.SOCK_RAW, 253
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	var sa unix.Sockaddr
	if addr.Is6() {
		sa = &unix.SockaddrInet6{Addr: addr.As16()} // the kernel sums ICMPv6 itself
	} else {
		sa = &unix.SockaddrInet4{Addr: addr.As4()}
	}
	if err := unix.Sendto(fd, echo, 0, sa); err != nil {
		return err
	}
	if m != Ping {
		return nil
	}
	// A dropped IPv6 ping is not reported to the sender (the kernel ignores
	// the error of icmpv6_push_pending_frames): the echo reply is the proof.
	// Destinations in the test namespaces are local, so the kernel answers.
	tv := unix.NsecToTimeval((500 * time.Millisecond).Nanoseconds())
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	buf := make([]byte, 64)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) {
				return fmt.Errorf("no echo reply: %w", unix.EPERM)
			}
			return err
		}
		if n > 0 && (buf[0] == 0 || buf[0] == 129) { // echo reply, v4 or v6
			return nil
		}
	}
}

// tun makes a TUN device, gone with the descriptor.
func tun() error {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /dev/net/tun: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("pgprobe%d")
	if err != nil {
		return err
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	return unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
}

// banner connects (blocking, with a timeout) and reads one line: the peer
// really answered.
func banner(d ruleset.Dest) error {
	c, err := net.DialTimeout("tcp", netip.AddrPortFrom(d.Addr, d.Port).String(), 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read banner: %w", err)
	}
	if line == "" {
		return errors.New("empty banner")
	}
	return nil
}

// Serve answers attempts: each input line is "METHOD DEST" (DEST as
// ruleset.ParseDest reads it), each output line the verdict or "error: ...".
func Serve(in io.Reader, out io.Writer) error {
	sc := bufio.NewScanner(in)
	w := bufio.NewWriter(out)
	for sc.Scan() {
		method, dest, ok := strings.Cut(sc.Text(), " ")
		if method == "resolve" {
			fmt.Fprintln(w, resolveLine(dest))
		} else if !ok {
			fmt.Fprintf(w, "error: want METHOD DEST, got %q\n", sc.Text())
		} else if d, err := ruleset.ParseDest(dest); err != nil {
			fmt.Fprintf(w, "error: %v\n", err)
		} else if v, err := Try(d, Method(method)); err != nil {
			fmt.Fprintf(w, "error: %v\n", err)
		} else {
			fmt.Fprintln(w, v)
		}
		if err := w.Flush(); err != nil {
			return err
		}
	}
	return sc.Err()
}

// EnvUID makes a prober child drop to that uid (real, effective and saved;
// the same number as gid, no supplementary groups) after it entered its
// network namespace, which an unprivileged process could not enter.
const EnvUID = "PROCGATE_PROBE_UID"

func becomeUser(s string) error {
	id, err := strconv.Atoi(s)
	if err != nil {
		return fmt.Errorf("%s=%q: %w", EnvUID, s, err)
	}
	// Go applies these to every thread of the process (Go 1.16+).
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(id, id, id); err != nil {
		return fmt.Errorf("setresgid %d: %w", id, err)
	}
	if err := syscall.Setresuid(id, id, id); err != nil {
		return fmt.Errorf("setresuid %d: %w", id, err)
	}
	return nil
}

// EnvRealGID sets a prober child's real gid alone, after EnvUID, as the
// launcher's trace guard does: real gid apart from effective and saved.
const EnvRealGID = "PROCGATE_PROBE_REAL_GID"

// EnvNetNS names the network namespace a prober child enters before serving.
const EnvNetNS = "PROCGATE_PROBE_NETNS"

// EnvServe makes a binary that calls MaybeServe act as a prober.
const EnvServe = "PROCGATE_PROBE_SERVE"

// A prober enters EnvNetNS on its main thread, as a process made in a
// namespace (a container's) is there: /proc/PID/ns/net, what the daemon
// reads of a process in an app's cgroup, is the main thread's. An init
// that locks the main goroutine has main (and TestMain, MaybeServe) run
// on the main thread (runtime.LockOSThread).
func init() {
	if os.Getenv(EnvServe) != "" {
		runtime.LockOSThread()
	}
}

// MaybeServe turns the current process into a prober when EnvServe is set:
// call it first in TestMain (or main). It enters EnvNetNS on the main
// thread, locked, serves stdin, and exits.
func MaybeServe() {
	if os.Getenv(EnvServe) == "" {
		return
	}
	runtime.LockOSThread() // the namespace is per thread; never leave this one
	if ns := os.Getenv(EnvNetNS); ns != "" {
		f, err := os.Open(ns)
		if err != nil {
			fmt.Fprintln(os.Stderr, "prober:", err)
			os.Exit(2)
		}
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			fmt.Fprintf(os.Stderr, "prober: setns %s: %v\n", ns, err)
			os.Exit(2)
		}
		f.Close()
	}
	if uid := os.Getenv(EnvUID); uid != "" {
		if err := becomeUser(uid); err != nil {
			fmt.Fprintln(os.Stderr, "prober:", err)
			os.Exit(2)
		}
	}
	if gid := os.Getenv(EnvRealGID); gid != "" {
		id, err := strconv.Atoi(gid)
		if err == nil {
			err = syscall.Setresgid(id, -1, -1)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "prober: %s=%q: %v\n", EnvRealGID, gid, err)
			os.Exit(2)
		}
	}
	if os.Getenv(EnvHold) != "" {
		os.Exit(serveHold(os.Stdin, os.Stdout))
	}
	if addr := os.Getenv(EnvListen); addr != "" {
		if err := listenOnce(addr, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "prober:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if err := Serve(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "prober:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// EnvListen makes a prober child a one-connection TCP server on that address
// instead: it prints the bound address, accepts once, writes "hello\n".
const EnvListen = "PROCGATE_PROBE_LISTEN"

func listenOnce(addr string, out io.Writer) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	fmt.Fprintln(out, ln.Addr().String())
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte("hello\n"))
	return err
}

// StartServer runs a one-connection TCP server (see EnvListen) in cgroupDir
// and netns, and returns the address it listens on. wait reports how the
// server ended.
func StartServer(cgroupDir, netns, addr string) (bound string, wait func() error, err error) {
	self, err := os.Executable()
	if err != nil {
		return "", nil, err
	}
	cg, err := os.Open(cgroupDir)
	if err != nil {
		return "", nil, err
	}
	defer cg.Close()
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), EnvServe+"=1", EnvNetNS+"="+netns, EnvListen+"="+addr)
	// Pdeathsig is safe only because start forks on the spawner thread.
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd()), Pdeathsig: syscall.SIGKILL}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return "", nil, err
	}
	if err := start(cmd); err != nil {
		return "", nil, err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return "", nil, fmt.Errorf("server did not start: %w", err)
	}
	return strings.TrimSpace(line), cmd.Wait, nil
}

// Prober is a running prober child.
type Prober struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

// Start runs the current executable as a prober in cgroupDir (created into
// it with clone3(CLONE_INTO_CGROUP), so it never runs elsewhere) and netns.
// Extra SysProcAttr settings (credentials) may be given.
func Start(cgroupDir, netns string, attr *syscall.SysProcAttr) (*Prober, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	return StartExe(self, cgroupDir, netns, attr)
}

// StartExe is Start with another copy of the prober binary (tests of exe
// pinning run the same code from a file with another inode), and extra
// environment variables for the child.
func StartExe(self, cgroupDir, netns string, attr *syscall.SysProcAttr, env ...string) (*Prober, error) {
	cg, err := os.Open(cgroupDir)
	if err != nil {
		return nil, fmt.Errorf("open cgroup %s: %w", cgroupDir, err)
	}
	defer cg.Close()
	if attr == nil {
		attr = &syscall.SysProcAttr{}
	}
	attr.UseCgroupFD, attr.CgroupFD = true, int(cg.Fd())
	// Pdeathsig is safe only because start forks on the spawner thread.
	attr.Pdeathsig = syscall.SIGKILL
	cmd := exec.Command(self)
	cmd.Env = append(append(os.Environ(), EnvServe+"=1", EnvNetNS+"="+netns), env...)
	cmd.SysProcAttr = attr
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := start(cmd); err != nil {
		return nil, fmt.Errorf("start prober in %s: %w", cgroupDir, err)
	}
	return &Prober{cmd: cmd, in: in, out: bufio.NewReader(out)}, nil
}

// Resolve asks resolver (ADDR:PORT) over proto ("udp": an unconnected
// socket of the resolver's family, sendto and recvfrom, and the answer
// must come from resolver, as glibc wants it; "tcp") for the records of
// name of each type (default A; A, AAAA), and connects to port of each
// address at once: what an app does. The answer is the addresses with the
// verdict of each connect, in answer order.
func (p *Prober) Resolve(name, resolver, proto string, port uint16, types ...string) ([]string, error) {
	req := fmt.Sprintf("resolve %s %s %s %d", name, resolver, proto, port)
	if len(types) > 0 {
		req += " " + strings.Join(types, ",")
	}
	if _, err := fmt.Fprintln(p.in, req); err != nil {
		return nil, fmt.Errorf("prober %d: %w", p.Pid(), err)
	}
	line, err := p.out.ReadString('\n')
	if err != nil {
		return nil, fmt.Errorf("prober %d: read answer: %w", p.Pid(), err)
	}
	line = strings.TrimSpace(line)
	if rest, ok := strings.CutPrefix(line, "error: "); ok {
		return nil, errors.New(rest)
	}
	if line == "" {
		return nil, nil
	}
	return strings.Split(line, " "), nil
}

// Pid is the prober's process id.
func (p *Prober) Pid() int { return p.cmd.Process.Pid }

// Try asks the prober for one attempt.
func (p *Prober) Try(d ruleset.Dest, m Method) (Verdict, error) {
	if _, err := fmt.Fprintf(p.in, "%s %s\n", m, d); err != nil {
		return "", fmt.Errorf("prober %d: %w", p.Pid(), err)
	}
	line, err := p.out.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("prober %d: read answer: %w", p.Pid(), err)
	}
	line = strings.TrimSpace(line)
	switch Verdict(line) {
	case Allowed, Denied:
		return Verdict(line), nil
	}
	return "", fmt.Errorf("prober %d: %s", p.Pid(), line)
}

// Close ends the prober and waits for it.
func (p *Prober) Close() error {
	p.in.Close()
	return p.cmd.Wait()
}
