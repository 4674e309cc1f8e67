package main

import (
	"encoding/gob"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A client is the bench binary re-executed in a hidden mode: a process in a
// variant's cgroup and network namespace (and, for the uid-based variants,
// with the app's uid) that makes attempts with raw syscalls in a tight loop
// on the coordinator's request, so that what is timed is the syscall and
// the kernel's enforcement, nothing else.

// envClient makes the bench binary a client; its value is the uid to take
// ("" or "0": stay root).
const envClient = "PROCGATE_BENCH_CLIENT"

type op string

const (
	opLatency op = "latency" // time each attempt to Dests, check every verdict
	opVerify  op = "verify"  // attempt Checks until told to stop, count verdicts
	opStop    op = "stop"    // ends a running verify
	opBulk    op = "bulk"    // TCP bulk send to Dests[0] for Duration
	opRR      op = "rr"      // 1-byte request/response with Dests[0] for Duration
	// opUntilDenied sends UDP datagrams to Dests[0] until one is denied
	// (or Duration passes) and says when, on CLOCK_MONOTONIC.
	opUntilDenied op = "until-denied"
	// opUntilVerdict connects fresh UDP sockets to Dests[0] until a
	// connect gets the verdict Allow (or Duration passes) and says when,
	// on CLOCK_MONOTONIC.
	opUntilVerdict op = "until-verdict"
	// opResolve resolves Names at Dests[0] and connects to each answer at
	// once (the dns phase).
	opResolve op = "resolve"
	// opListen makes the client listen on Port itself, for the rest of
	// its life, as an app that connects to its own listener does (the
	// outsider phase).
	opListen op = "listen"
)

type proto string

const (
	tcp proto = "tcp"
	udp proto = "udp"
	// udpConn: send() on a UDP socket connected to the destination (one
	// per destination, connected before the timed attempts).
	udpConn proto = "udp-connected"
)

type request struct {
	Op       op
	Proto    proto
	Dests    []netip.AddrPort
	N        int  // timed attempts
	Warmup   int  // untimed attempts first
	Allow    bool // expected verdict of every attempt (latency)
	Checks   []check
	Duration time.Duration
	// Pause between attempts (until-verdict), or between rounds of checks
	// (verify).
	Pause time.Duration
	// Names to resolve (resolve).
	Names []string
	// Port to listen on (listen).
	Port uint16
}

// check is one destination of a verify loop and the verdicts it may get.
type check struct {
	Dest  netip.AddrPort
	Proto proto
	Must  verdictRule
}

type verdictRule uint8

const (
	mustAllow verdictRule = iota
	mustDeny
	eitherVerdict // differs between the two policies being switched
)

type response struct {
	Err       string
	Latencies []uint32 // ns, one per timed attempt
	Wrong     int      // attempts with the unexpected verdict
	WrongDesc string   // the first of them
	Attempts  int64
	Allowed   []int64 // verify: per check
	Denied    []int64
	Dropped   []int64 // verify: TCP connects without any answer (counted in Denied too)
	Bytes     int64
	Trans     int64
	Elapsed   time.Duration
	// until-denied: CLOCK_MONOTONIC ns at the return of the first denied
	// attempt (0: none) and at the start of the last allowed one.
	FirstDenied int64
	LastAllowed int64
	// until-verdict: CLOCK_MONOTONIC ns at the return of the first
	// attempt with the wanted verdict (0: none), and at the start of the
	// last attempt with the other one.
	Reached   int64
	LastOther int64
	// Ready is the interim answer of until-verdict: an attempt got the
	// old verdict, the change may come (the final answer follows).
	Ready bool
	// resolve: CLOCK_MONOTONIC ns at the receipt of each answer.
	Times []int64
}

// maybeClient turns the process into a client when envClient is set: call
// it first in main and TestMain.
func maybeClient() {
	v, ok := os.LookupEnv(envClient)
	if !ok {
		return
	}
	if err := serveClient(v, os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "bench client:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// benchGuardGID is the clients' real gid, as the launcher's trace guard
// gives every app process it starts one apart from its effective gid
// (launch/guard.go): the clients are measured as `procgate run` apps,
// whose connections the default TCP handover guard leaves to the trace
// guard. No variant but procgate's looks at gids.
const benchGuardGID = 64999

// clientAsLaunched is envClient's value for a client that `procgate run`
// started: its credentials are the launcher's, kept as they are.
const clientAsLaunched = "launched"

func serveClient(uid string, in io.Reader, out io.Writer) error {
	if uid == clientAsLaunched {
		return serveRequests(in, out)
	}
	// After the process was placed in its namespace and cgroup, which
	// needs root. Go applies set*id to every thread.
	uid, open := strings.CutSuffix(uid, ",open")
	id, err := strconv.Atoi(uid)
	if err != nil {
		return fmt.Errorf("client uid %q: %w", uid, err)
	}
	if err := syscall.Setgroups(nil); err != nil {
		return err
	}
	rgid := benchGuardGID
	if open {
		rgid = id
	}
	if err := syscall.Setresgid(rgid, id, id); err != nil {
		return err
	}
	if id != 0 {
		if err := syscall.Setresuid(id, id, id); err != nil {
			return err
		}
	}
	return serveRequests(in, out)
}

// serveRequests answers the coordinator's requests until it is gone.
func serveRequests(in io.Reader, out io.Writer) error {
	dec, enc := gob.NewDecoder(in), gob.NewEncoder(out)
	reqs := make(chan request)
	var stop atomic.Bool
	go func() {
		defer close(reqs)
		for {
			var r request
			if err := dec.Decode(&r); err != nil {
				stop.Store(true) // the coordinator is gone: end a running verify
				return
			}
			if r.Op == opStop {
				stop.Store(true)
				continue
			}
			reqs <- r
		}
	}()
	for r := range reqs {
		stop.Store(false)
		resp := handle(r, &stop, func() error { return enc.Encode(response{Ready: true}) })
		if err := enc.Encode(resp); err != nil {
			return err
		}
	}
	return nil
}

// handle runs one request; ready sends an interim answer (until-verdict).
func handle(r request, stop *atomic.Bool, ready func() error) (resp response) {
	start := time.Now()
	defer func() { resp.Elapsed = time.Since(start) }()
	var err error
	switch r.Op {
	case opLatency:
		err = latencyLoop(r, &resp)
	case opVerify:
		err = verifyLoop(r, stop, &resp)
	case opBulk:
		err = bulk(r, &resp)
	case opRR:
		err = requestResponse(r, &resp)
	case opUntilDenied:
		err = untilDenied(r, &resp)
	case opUntilVerdict:
		err = untilVerdict(r, &resp, ready)
	case opResolve:
		err = resolveLoop(r, &resp)
	case opListen:
		var lfd int
		if lfd, err = rawListener(int(r.Port)); err == nil {
			go acceptLoop(lfd)
		}
	default:
		err = fmt.Errorf("unknown op %q", r.Op)
	}
	if err != nil {
		resp.Err = err.Error()
	}
	return resp
}

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
}

// allowed reads a verdict from an attempt's error: EPERM (procgate,
// nftables drop), EACCES (prohibit routes), EINVAL (blackhole routes),
// ECONNABORTED (procgate ended the socket) are denials; ECONNREFUSED is a denial only when refusedDenies (a listener
// exists, so only an nftables `reject with tcp reset` refuses).
func allowed(err error, refusedDenies bool) (bool, error) {
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES), errors.Is(err, unix.EINVAL):
		return false, nil
	case errors.Is(err, unix.ECONNABORTED):
		// procgate's live-socket revocation ended the connecting socket
		// after a reload withdrew its destination.
		return false, nil
	case errors.Is(err, unix.ECONNREFUSED):
		return !refusedDenies, nil
	}
	return false, err
}

var lingerRST = &unix.Linger{Onoff: 1, Linger: 0}

// verifyTimeout bounds a verify connect to a port without a listener, which
// is refused in microseconds unless its SYN is dropped.
const verifyTimeout = 100 * time.Millisecond

// tcpConnect makes one blocking connect from a fresh socket and returns its
// error and how long connect() took. SO_LINGER {1, 0}: the close sends RST,
// so hundreds of thousands of attempts leave no TIME_WAIT behind.
func tcpConnect(sa unix.Sockaddr, timeout time.Duration) (time.Duration, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, lingerRST); err != nil {
		return 0, fmt.Errorf("SO_LINGER: %w", err)
	}
	// A dropped SYN would block for minutes; a bound, not a measurement.
	// When it expires, connect fails with EINPROGRESS.
	tv := unix.NsecToTimeval(int64(timeout))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
		return 0, fmt.Errorf("SO_SNDTIMEO: %w", err)
	}
	t0 := time.Now()
	err = unix.Connect(fd, sa)
	if errors.Is(err, unix.EINTR) {
		// A signal interrupted the wait, not the connection: it goes on,
		// and its outcome is in SO_ERROR once the socket is writable.
		err = awaitConnect(fd)
	}
	return time.Since(t0), err
}

func awaitConnect(fd int) error {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	for {
		n, err := unix.Poll(pfd, 2000)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return unix.ETIMEDOUT
		}
		soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			return err
		}
		if soErr != 0 {
			return unix.Errno(soErr)
		}
		return nil
	}
}

func udpSocket() (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	return fd, nil
}

var payload = []byte("procgate-bench")

func udpSend(fd int, sa unix.Sockaddr) (time.Duration, error) {
	t0 := time.Now()
	err := unix.Sendto(fd, payload, 0, sa)
	return time.Since(t0), err
}

func latencyLoop(r request, resp *response) error {
	if len(r.Dests) == 0 {
		return errors.New("no destinations")
	}
	sas := make([]unix.Sockaddr, len(r.Dests))
	for i, d := range r.Dests {
		sas[i] = sockaddr(d)
	}
	attempt := func(sa unix.Sockaddr) (time.Duration, error) { return tcpConnect(sa, 2*time.Second) }
	switch r.Proto {
	case udp:
		fd, err := udpSocket()
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		attempt = func(sa unix.Sockaddr) (time.Duration, error) { return udpSend(fd, sa) }
	case udpConn:
		send, closeAll, err := connectedSenders(sas)
		if err != nil {
			return err
		}
		defer closeAll()
		attempt = send
	}
	resp.Latencies = make([]uint32, 0, r.N)
	for i := range r.Warmup + r.N {
		k := i % len(sas)
		d, err := attempt(sas[k])
		ok, err := allowed(err, true)
		if err != nil {
			return fmt.Errorf("%s %s: %w", r.Proto, r.Dests[k], err)
		}
		if ok != r.Allow {
			if resp.Wrong == 0 {
				resp.WrongDesc = fmt.Sprintf("%s %s: allowed=%v, want %v", r.Proto, r.Dests[k], ok, r.Allow)
			}
			resp.Wrong++
		}
		if i >= r.Warmup {
			resp.Latencies = append(resp.Latencies, uint32(min(d.Nanoseconds(), 1<<32-1)))
		}
	}
	resp.Attempts = int64(r.Warmup + r.N)
	return nil
}

// verifyLoop cycles through the checks until stop is set, UDP sends every
// time and TCP connects every fourth time (to a port without a listener, so
// an allowed connect is refused at once), and counts verdicts per check.
func verifyLoop(r request, stop *atomic.Bool, resp *response) error {
	fd, err := udpSocket()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	sas := make([]unix.Sockaddr, len(r.Checks))
	for i, c := range r.Checks {
		sas[i] = sockaddr(c.Dest)
	}
	resp.Allowed = make([]int64, len(r.Checks))
	resp.Denied = make([]int64, len(r.Checks))
	resp.Dropped = make([]int64, len(r.Checks))
	for round := 0; !stop.Load(); round++ {
		if round > 0 && r.Pause > 0 {
			time.Sleep(r.Pause)
		}
		for i, c := range r.Checks {
			var err error
			if c.Proto == udp {
				_, err = udpSend(fd, sas[i])
			} else if round%4 == 0 {
				// A connect costs several sends: fewer of them, so that
				// the attempts' count is not all one path.
				_, err = tcpConnect(sas[i], verifyTimeout)
			} else {
				continue
			}
			resp.Attempts++
			if errors.Is(err, unix.EINPROGRESS) {
				// No answer at all: the SYN was dropped, which only the
				// egress backstop does here. A denial, but a silent one.
				resp.Dropped[i]++
				err = unix.EPERM
			}
			ok, err := allowed(err, false)
			if err != nil {
				return fmt.Errorf("%s %s: %w", c.Proto, c.Dest, err)
			}
			if ok {
				resp.Allowed[i]++
			} else {
				resp.Denied[i]++
			}
			if (c.Must == mustAllow && !ok) || (c.Must == mustDeny && ok) {
				if resp.Wrong == 0 {
					resp.WrongDesc = fmt.Sprintf("%s %s: allowed=%v", c.Proto, c.Dest, ok)
				}
				resp.Wrong++
			}
		}
	}
	return nil
}

// monotonic is CLOCK_MONOTONIC in ns, comparable across processes (Go's
// own monotonic readings are not).
func monotonic() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

func untilDenied(r request, resp *response) error {
	if len(r.Dests) == 0 {
		return errors.New("no destination")
	}
	fd, err := udpSocket()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	sa := sockaddr(r.Dests[0])
	deadline := monotonic() + r.Duration.Nanoseconds()
	for {
		t := monotonic()
		if t > deadline {
			return nil
		}
		_, err := udpSend(fd, sa)
		ok, err := allowed(err, false)
		if err != nil {
			return fmt.Errorf("udp %s: %w", r.Dests[0], err)
		}
		resp.Attempts++
		if !ok {
			// When it returned: the denial was in force by then (its
			// start may precede the switch when the client was
			// preempted in the syscall).
			resp.FirstDenied = monotonic()
			return nil
		}
		resp.LastAllowed = t
	}
}

// untilVerdict answers Ready at the first attempt with the old verdict;
// with the new one first, it ends at once with LastOther 0.
func untilVerdict(r request, resp *response, ready func() error) error {
	if len(r.Dests) == 0 {
		return errors.New("no destination")
	}
	sa := sockaddr(r.Dests[0])
	deadline := monotonic() + r.Duration.Nanoseconds()
	for {
		t := monotonic()
		if t > deadline {
			return nil
		}
		ok, err := allowed(udpConnect(sa), false)
		if err != nil {
			return fmt.Errorf("udp connect %s: %w", r.Dests[0], err)
		}
		resp.Attempts++
		if ok == r.Allow {
			resp.Reached = monotonic()
			return nil
		}
		if resp.LastOther == 0 {
			if err := ready(); err != nil {
				return err
			}
		}
		resp.LastOther = t
		if r.Pause > 0 {
			time.Sleep(r.Pause)
		}
	}
}

// udpConnect connects a fresh UDP socket to sa: the connect hook decides
// at once, with no handshake to wait for and no packet sent. (A TCP
// connect allowed just before a generation switch waits for its SYN, which
// the egress backstop decides again in the new generation; a denied SYN
// leaves it hanging until the sweep ends it.)
// connectedSenders connects a UDP socket to each of sas; send then sends
// one datagram on the socket of its destination. A destination whose
// connect was refused is tried again (a fresh socket's connect, timed) at
// each attempt, so that a denial has its own latency.
func connectedSenders(sas []unix.Sockaddr) (send func(unix.Sockaddr) (time.Duration, error), closeAll func(), err error) {
	fds := map[unix.Sockaddr]int{}
	closeAll = func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	for _, sa := range sas {
		fd, err := udpSocket()
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		if err := unix.Connect(fd, sa); err != nil {
			unix.Close(fd)
			continue
		}
		fds[sa] = fd
	}
	send = func(sa unix.Sockaddr) (time.Duration, error) {
		t0 := time.Now()
		fd, ok := fds[sa]
		if !ok {
			err := udpConnect(sa)
			return time.Since(t0), err
		}
		_, err := unix.Write(fd, payload)
		return time.Since(t0), err
	}
	return send, closeAll, nil
}

func udpConnect(sa unix.Sockaddr) error {
	fd, err := udpSocket()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Connect(fd, sa)
}

func dialTCP(d netip.AddrPort) (*net.TCPConn, error) {
	c, err := net.DialTimeout("tcp4", d.String(), 5*time.Second)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

func bulk(r request, resp *response) error {
	c, err := dialTCP(r.Dests[0])
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 128<<10)
	deadline := time.Now().Add(r.Duration)
	for time.Now().Before(deadline) {
		n, err := c.Write(buf)
		resp.Bytes += int64(n)
		if err != nil {
			return fmt.Errorf("bulk write: %w", err)
		}
	}
	return nil
}

func requestResponse(r request, resp *response) error {
	c, err := dialTCP(r.Dests[0])
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SetNoDelay(true); err != nil {
		return err
	}
	b := []byte{1}
	deadline := time.Now().Add(r.Duration)
	for resp.Trans&255 != 0 || time.Now().Before(deadline) {
		if _, err := c.Write(b); err != nil {
			return fmt.Errorf("rr write: %w", err)
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return fmt.Errorf("rr read: %w", err)
		}
		resp.Trans++
	}
	return nil
}

// client is the coordinator's handle on a client process.
type client struct {
	name string
	cmd  *exec.Cmd
	enc  *gob.Encoder
	dec  *gob.Decoder
	in   io.Closer
}

// startClient starts a client in cgroup dir and the namespace at ns, with
// uid (0: root).
// startLaunchedClient starts a client as an outsider would run an app:
// `procgate run --app APP -- <bench binary>` against the daemon d, from ns.
func startLaunchedClient(name string, d *daemonProc, app, ns string) (*client, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	cmd := exec.Command(d.bin, "--socket", d.socket, "run", "--app", app, "--", self)
	cmd.Env = append(os.Environ(), envClient+"="+clientAsLaunched, "GODEBUG=asyncpreemptoff=1")
	return startClientCmd(name, cmd, ns)
}

func startClient(name, cgroupDir, ns string, uid int, openToTracing bool) (*client, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	cg, err := os.Open(cgroupDir)
	if err != nil {
		return nil, fmt.Errorf("open cgroup %s: %w", cgroupDir, err)
	}
	defer cg.Close()
	cmd := exec.Command(self)
	// No asynchronous preemption: its signals interrupt blocking connects
	// and add noise to what is timed.
	who := strconv.Itoa(uid)
	if openToTracing {
		who += ",open"
	}
	cmd.Env = append(os.Environ(), envClient+"="+who, "GODEBUG=asyncpreemptoff=1")
	// Created in the cgroup (clone3), so it never runs anywhere else. No
	// Pdeathsig: it fires when the forking *thread* ends, and the Go runtime
	// ends threads whose goroutine exits locked (newNetNS does), which
	// would kill clients at random. A client whose parent is gone exits at
	// its next read or write of the pipes; cleanup kills the cgroup.
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	return startClientCmd(name, cmd, ns)
}

// startClientCmd starts cmd, a client, in ns, talking to it over pipes.
func startClientCmd(name string, cmd *exec.Cmd, ns string) (*client, error) {
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := inNS(ns, cmd.Start); err != nil {
		return nil, fmt.Errorf("start client %s: %w", name, err)
	}
	return &client{name: name, cmd: cmd, enc: gob.NewEncoder(in), dec: gob.NewDecoder(out), in: in}, nil
}

func (c *client) send(r request) error {
	if err := c.enc.Encode(r); err != nil {
		return fmt.Errorf("client %s: send %s: %w", c.name, r.Op, err)
	}
	return nil
}

func (c *client) receive() (response, error) {
	var resp response
	if err := c.dec.Decode(&resp); err != nil {
		return resp, fmt.Errorf("client %s: read answer: %w", c.name, err)
	}
	if resp.Err != "" {
		return resp, fmt.Errorf("client %s: %s", c.name, resp.Err)
	}
	return resp, nil
}

func (c *client) do(r request) (response, error) {
	if err := c.send(r); err != nil {
		return response{}, err
	}
	return c.receive()
}

// close ends the client; its cgroup's cleanup kills it if it hangs.
func (c *client) close() error {
	c.in.Close()
	done := make(chan error, 1)
	go func() { done <- c.cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(5 * time.Second):
		_ = c.cmd.Process.Kill()
		return <-done
	}
}
