package probe

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
)

// EnvHold makes a prober child a holder: it opens connections on request
// and keeps them, so that a test can see which of them the kernel ends.
const EnvHold = "PROCGATE_PROBE_HOLD"

// Holder is a running holder child.
type Holder struct {
	p *Prober
}

// StartHolder runs the current executable as a holder in cgroupDir (from
// its first instruction) and netns.
func StartHolder(cgroupDir, netns string) (*Holder, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	p, err := StartExe(self, cgroupDir, netns, nil, EnvHold+"=1")
	if err != nil {
		return nil, err
	}
	return &Holder{p: p}, nil
}

// StartHolderAs is StartHolder for a holder that runs as uid (EnvUID).
func StartHolderAs(cgroupDir, netns string, uid int) (*Holder, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	p, err := StartExe(self, cgroupDir, netns, nil, EnvHold+"=1", fmt.Sprintf("%s=%d", EnvUID, uid))
	if err != nil {
		return nil, err
	}
	return &Holder{p: p}, nil
}

// StartHolderEnv is StartHolder with more environment for the child
// (EnvUID, EnvRealGID).
func StartHolderEnv(cgroupDir, netns string, env ...string) (*Holder, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	p, err := StartExe(self, cgroupDir, netns, nil, append([]string{EnvHold + "=1"}, env...)...)
	if err != nil {
		return nil, err
	}
	return &Holder{p: p}, nil
}

// Pid is the holder's process id.
func (h *Holder) Pid() int { return h.p.Pid() }

// Close ends the holder (its sockets close with it) and waits for it.
func (h *Holder) Close() error { return h.p.Close() }

func (h *Holder) ask(line string) (string, error) {
	if _, err := fmt.Fprintln(h.p.in, line); err != nil {
		return "", fmt.Errorf("holder %d: %w", h.Pid(), err)
	}
	ans, err := h.p.out.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("holder %d: read answer: %w", h.Pid(), err)
	}
	ans = strings.TrimSpace(ans)
	if rest, ok := strings.CutPrefix(ans, "ok"); ok {
		return strings.TrimSpace(rest), nil
	}
	return "", fmt.Errorf("holder %d: %s: %s", h.Pid(), line, ans)
}

// Open makes n connections to dest (as ruleset.ParseDest reads it), by
// Connect (TCP: a blocking connect, so each is established on return; UDP:
// connect and one datagram) or Mapped (the same from an AF_INET6 socket to
// the IPv4-mapped address), and keeps them as group.
func (h *Holder) Open(group, dest string, m Method, n int) error {
	_, err := h.ask(fmt.Sprintf("open %s %s %s %d", group, m, dest, n))
	return err
}

// Listen accepts TCP connections on addr and keeps them as group; it returns
// the address bound. With addr "ADDR:PORT/udp" it binds a UDP socket, which
// it keeps (as the one socket of group) and never reads.
func (h *Holder) Listen(group, addr string) (string, error) {
	return h.ask(fmt.Sprintf("listen %s %s", group, addr))
}

// Await waits until group holds n sockets, for a group of Listen whose
// connections the holder accepts in the background.
func (h *Holder) Await(group string, n int) error {
	_, err := h.ask(fmt.Sprintf("await %s %d", group, n))
	return err
}

// Take makes the holder ready to receive sockets by SCM_RIGHTS on a unix
// datagram socket it binds at path; those that come are kept as group (see
// Await).
func (h *Holder) Take(group, path string) error {
	_, err := h.ask(fmt.Sprintf("take %s %s", group, path))
	return err
}

// Give sends the sockets of group by SCM_RIGHTS to path, where another
// holder Takes them; the holder keeps its own descriptors.
func (h *Holder) Give(group, path string) error {
	_, err := h.ask(fmt.Sprintf("give %s %s", group, path))
	return err
}

// HoldState is what became of a group's sockets.
type HoldState struct {
	Alive int `json:"alive"`
	Ended int `json:"ended"`
	// Errors counts, per error, what the owner saw on its next read of an
	// ended socket ("ECONNABORTED", "ECONNRESET", "EOF", "ENOTCONN").
	Errors map[string]int `json:"errors,omitempty"`
}

// State reads every socket of group once, without blocking.
func (h *Holder) State(group string) (HoldState, error) {
	var st HoldState
	ans, err := h.ask("state " + group)
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal([]byte(ans), &st); err != nil {
		return st, fmt.Errorf("holder %d: state %q: %w", h.Pid(), ans, err)
	}
	return st, nil
}

// SendResult counts what one write on each socket of a group gave: sent,
// or the error (by name, e.g. "EPERM" when the kernel refused it).
type SendResult struct {
	Sent   int            `json:"sent"`
	Errors map[string]int `json:"errors,omitempty"`
}

// Send writes one small payload on every socket of group (for connected
// UDP sockets: one datagram that no connect or sendmsg hook sees).
func (h *Holder) Send(group string) (SendResult, error) {
	var r SendResult
	ans, err := h.ask("send " + group)
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal([]byte(ans), &r); err != nil {
		return r, fmt.Errorf("holder %d: send %q: %w", h.Pid(), ans, err)
	}
	return r, nil
}

// Expect checks that group has n sockets, all alive or all ended; an
// ended socket must have said ECONNABORTED, as bpf_sock_destroy and
// SOCK_DESTROY make it say (or ENOTCONN: that was read at an earlier State).
func (h *Holder) Expect(group string, n int, ended bool) error {
	st, err := h.State(group)
	if err != nil {
		return err
	}
	want := HoldState{Alive: n}
	if ended {
		want = HoldState{Ended: n}
	}
	if st.Alive != want.Alive || st.Ended != want.Ended {
		return fmt.Errorf("holder %d, group %s: %d alive, %d ended %v; want %d alive, %d ended", h.Pid(), group, st.Alive, st.Ended, st.Errors, want.Alive, want.Ended)
	}
	for e := range st.Errors {
		if e != "ECONNABORTED" && e != "ENOTCONN" {
			return fmt.Errorf("holder %d, group %s: an ended socket said %s", h.Pid(), group, e)
		}
	}
	return nil
}

// held is one socket of a holder; err is the first sign of its end.
type held struct {
	fd  int
	err error
}

type holder struct {
	mu     sync.Mutex
	groups map[string][]*held
}

func serveHold(in io.Reader, out io.Writer) int {
	h := &holder{groups: map[string][]*held{}}
	sc := bufio.NewScanner(in)
	w := bufio.NewWriter(out)
	for sc.Scan() {
		ans, err := h.do(strings.Fields(sc.Text()))
		if err != nil {
			fmt.Fprintf(w, "error: %v\n", err)
		} else {
			fmt.Fprintf(w, "ok %s\n", ans)
		}
		if err := w.Flush(); err != nil {
			return 1
		}
	}
	return 0
}

func (h *holder) do(f []string) (string, error) {
	switch {
	case len(f) == 5 && f[0] == "open" && Method(f[2]) == Reconnect:
		first, second, ok := strings.Cut(f[3], ">")
		if !ok {
			return "", fmt.Errorf("reconnect: want FIRST>SECOND, got %q", f[3])
		}
		d1, err := ruleset.ParseDest(first)
		if err != nil {
			return "", fmt.Errorf("reconnect: first destination: %w", err)
		}
		d2, err := ruleset.ParseDest(second)
		if err != nil {
			return "", fmt.Errorf("reconnect: second destination: %w", err)
		}
		n, err := strconv.Atoi(f[4])
		if err != nil {
			return "", fmt.Errorf("reconnect: count %q: %w", f[4], err)
		}
		for range n {
			fd, err := dialAgain(d1, d2)
			if err != nil {
				return "", fmt.Errorf("reconnect %s then %s: %w", d1, d2, err)
			}
			h.add(f[1], fd)
		}
		return "", nil
	case len(f) == 5 && f[0] == "open":
		d, err := ruleset.ParseDest(f[3])
		if err != nil {
			return "", err
		}
		n, err := strconv.Atoi(f[4])
		if err != nil {
			return "", err
		}
		for range n {
			fd, err := dial(d, Method(f[2]))
			if err != nil {
				return "", fmt.Errorf("%s %s: %w", f[2], d, err)
			}
			h.add(f[1], fd)
		}
		return "", nil
	case len(f) == 3 && f[0] == "listen":
		return h.listen(f[1], f[2])
	case len(f) == 3 && f[0] == "await":
		n, err := strconv.Atoi(f[2])
		if err != nil {
			return "", fmt.Errorf("await %s: count %q: %w", f[1], f[2], err)
		}
		return "", h.await(f[1], n)
	case len(f) == 3 && f[0] == "take":
		return "", h.take(f[1], f[2])
	case len(f) == 3 && f[0] == "give":
		return "", h.give(f[1], f[2])
	case len(f) == 2 && f[0] == "send":
		h.mu.Lock()
		socks := h.groups[f[1]]
		h.mu.Unlock()
		r := SendResult{Errors: map[string]int{}}
		for _, s := range socks {
			if _, err := unix.Write(s.fd, []byte("more")); err != nil {
				name := err.Error()
				var errno unix.Errno
				if errors.As(err, &errno) {
					name = unix.ErrnoName(errno)
				}
				r.Errors[name]++
				continue
			}
			r.Sent++
		}
		b, err := json.Marshal(r)
		return string(b), err
	case len(f) == 2 && f[0] == "state":
		h.mu.Lock()
		socks := h.groups[f[1]]
		h.mu.Unlock()
		st := HoldState{Errors: map[string]int{}}
		for _, s := range socks {
			if s.err == nil {
				s.err = ended(s.fd)
			}
			if s.err == nil {
				st.Alive++
				continue
			}
			st.Ended++
			name := "EOF"
			var errno unix.Errno
			if errors.As(s.err, &errno) {
				name = unix.ErrnoName(errno)
			}
			st.Errors[name]++
		}
		b, err := json.Marshal(st)
		return string(b), err
	}
	return "", fmt.Errorf("want open GROUP METHOD DEST N, listen GROUP ADDR, await GROUP N, take GROUP PATH, give GROUP PATH, send GROUP or state GROUP, got %q", strings.Join(f, " "))
}

func (h *holder) add(group string, fd int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.groups[group] = append(h.groups[group], &held{fd: fd})
}

func (h *holder) listen(group, addr string) (string, error) {
	addr, udp := strings.CutSuffix(addr, "/udp")
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return "", err
	}
	family := unix.AF_INET6
	var sa unix.Sockaddr = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	if ap.Addr().Is4() {
		family, sa = unix.AF_INET, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	}
	typ := unix.SOCK_STREAM
	if udp {
		typ = unix.SOCK_DGRAM
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	if family == unix.AF_INET6 {
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0) // and IPv4
	}
	if err = unix.Bind(fd, sa); err == nil && !udp {
		err = unix.Listen(fd, 4096)
	}
	var bound unix.Sockaddr
	if err == nil {
		bound, err = unix.Getsockname(fd)
	}
	if err != nil {
		unix.Close(fd)
		return "", err
	}
	if udp {
		h.add(group, fd)
	} else {
		go h.accept(group, fd)
	}
	switch b := bound.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(b.Addr), uint16(b.Port)).String(), nil
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(b.Addr), uint16(b.Port)).String(), nil
	}
	return "", fmt.Errorf("unexpected bound address %T", bound)
}

// take binds a unix datagram socket at path and keeps the descriptors of
// the first message that comes as group.
func (h *holder) take(group, path string) error {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		unix.Close(fd)
		return fmt.Errorf("bind %s: %w", path, err)
	}
	go func() {
		defer unix.Close(fd)
		oob := make([]byte, unix.CmsgSpace(64*4))
		_, oobn, _, _, err := unix.Recvmsg(fd, make([]byte, 1), oob, unix.MSG_CMSG_CLOEXEC)
		if err != nil {
			return
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return
		}
		for _, m := range msgs {
			fds, err := unix.ParseUnixRights(&m)
			if err != nil {
				continue
			}
			for _, fd := range fds {
				h.add(group, fd)
			}
		}
	}()
	return nil
}

// give sends group's descriptors to the unix datagram socket at path.
func (h *holder) give(group, path string) error {
	h.mu.Lock()
	var fds []int
	for _, s := range h.groups[group] {
		fds = append(fds, s.fd)
	}
	h.mu.Unlock()
	if len(fds) == 0 || len(fds) > 64 {
		return fmt.Errorf("give %s: %d sockets, want 1 to 64", group, len(fds))
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Sendmsg(fd, []byte{0}, unix.UnixRights(fds...), &unix.SockaddrUnix{Name: path}, 0); err != nil {
		return fmt.Errorf("send %d sockets to %s: %w", len(fds), path, err)
	}
	return nil
}

// awaitLimit bounds how long await waits for accepts that the kernel has
// already completed; a guard against hanging, not a timing assertion.
const awaitLimit = 10 * time.Second

// await waits until group holds at least n sockets: a peer's connect
// returns when the kernel finished the handshake, before the holder's
// accept loop has taken the connection from the queue.
func (h *holder) await(group string, n int) error {
	for deadline := time.Now().Add(awaitLimit); ; time.Sleep(time.Millisecond) {
		h.mu.Lock()
		got := len(h.groups[group])
		h.mu.Unlock()
		if got >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("group %s: %d sockets after %v, want %d", group, got, awaitLimit, n)
		}
	}
}

func (h *holder) accept(group string, fd int) {
	for {
		c, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC)
		if err != nil {
			return
		}
		h.add(group, c)
	}
}

// dialAgain connects a TCP socket to first, which must refuse, and then
// the same socket to second.
func dialAgain(first, second ruleset.Dest) (int, error) {
	if !first.Addr.Unmap().Is4() || !second.Addr.Unmap().Is4() {
		return -1, fmt.Errorf("reconnect is IPv4 only: %s, %s", first, second)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(first.Port), Addr: first.Addr.Unmap().As4()}); !errors.Is(err, unix.ECONNREFUSED) {
		unix.Close(fd)
		return -1, fmt.Errorf("first connect: %v, want ECONNREFUSED", err)
	}
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(second.Port), Addr: second.Addr.Unmap().As4()}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("second connect: %w", err)
	}
	return fd, nil
}

// dial makes one connection and returns its descriptor.
func dial(d ruleset.Dest, m Method) (int, error) {
	addr := d.Addr.Unmap()
	family := unix.AF_INET
	if m == Mapped {
		family = unix.AF_INET6
	} else if addr.Is6() {
		family = unix.AF_INET6
	}
	typ := unix.SOCK_STREAM
	if d.Proto == ruleset.UDP {
		typ = unix.SOCK_DGRAM
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	if typ == unix.SOCK_STREAM {
		// RST on close: the holder's exit must not leave thousands of
		// connections in TIME_WAIT.
		_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	}
	var sa unix.Sockaddr
	if family == unix.AF_INET6 {
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0)
		sa = &unix.SockaddrInet6{Port: int(d.Port), Addr: addr.As16()}
	} else {
		sa = &unix.SockaddrInet4{Port: int(d.Port), Addr: addr.As4()}
	}
	if err := unix.Connect(fd, sa); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if typ == unix.SOCK_DGRAM {
		// A flow is more than a connect(): one datagram, so that the
		// kernel tracks it as a firewall would see it.
		if _, err := unix.Write(fd, []byte("hold")); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("send: %w", err)
		}
	}
	return fd, nil
}

// ended tells whether a socket was ended, as its owner finds out: the error
// its next read returns (it is reported once), or no peer any more.
func ended(fd int) error {
	var b [1]byte
	n, _, err := unix.Recvfrom(fd, b[:], unix.MSG_DONTWAIT|unix.MSG_PEEK)
	switch {
	case err == nil && n == 0:
		return io.EOF
	case err == nil, errors.Is(err, unix.EAGAIN):
		if _, err := unix.Getpeername(fd); err != nil {
			return err
		}
		return nil
	}
	return err
}
