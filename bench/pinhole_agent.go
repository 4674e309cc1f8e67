package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/pki"
)

// The whole chain's open latency: procgate daemon with its pinhole agent
// in the pinhole lane's server, a process of a dynamic app there that binds
// UDP ports, and the time from just before its bind() to the hole in the
// router's nftables set (CLOCK_MONOTONIC on both sides: one machine).

// envBinder makes the bench binary the binder: run by `procgate run` as
// the dynamic app, it serves the control port and binds on command.
const envBinder = "PROCGATE_BENCH_BINDER"

const (
	phControlPort = 4600
	phBindPorts   = 41000 // the binder's aux ports, 41000-41999
)

// phAgentPolicy makes the binder an app with dynamic pinholes.
const phAgentPolicy = `version: 1
internal:
  prefixes: [192.0.2.0/24]
apps:
  - name: bench
    inbound:
      dynamic:
        control: [4600]
        ports: [41000-41999]
        proto: udp
`

func init() {
	if os.Getenv(envBinder) != "1" {
		return
	}
	if err := serveBinder(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "bench binder:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func monotonicNS() int64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

// serveBinder keeps every control connection open and answers, per line
// of in: "bind PORT" (UDP on the server's address) with "ok T0" (the
// CLOCK_MONOTONIC ns just before bind), "close PORT" with "ok".
func serveBinder(in io.Reader, out io.Writer) error {
	ln, err := net.Listen("tcp", net.JoinHostPort(phServer.Addr().String(), strconv.Itoa(phControlPort)))
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go io.Copy(io.Discard, c) // held until the peer closes it
		}
	}()
	fmt.Fprintln(out, "ready")
	socks := map[string]int{}
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		verb, port, _ := strings.Cut(sc.Text(), " ")
		p, err := strconv.Atoi(port)
		if err != nil {
			return fmt.Errorf("command %q", sc.Text())
		}
		switch verb {
		case "bind":
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			sa := &unix.SockaddrInet4{Port: p, Addr: phServer.Addr().As4()}
			t0 := monotonicNS()
			if err := unix.Bind(fd, sa); err != nil {
				return fmt.Errorf("bind %d: %w", p, err)
			}
			socks[port] = fd
			fmt.Fprintln(out, "ok", t0)
		case "close":
			unix.Close(socks[port])
			delete(socks, port)
			fmt.Fprintln(out, "ok")
		default:
			return fmt.Errorf("command %q", sc.Text())
		}
	}
	return sc.Err()
}

type lockedBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// procgateBinary is the procgate the bench runs as the server's daemon:
// $PROCGATE_BIN, or bin/procgate (make bench builds it first).
func procgateBinary() (string, error) {
	p := os.Getenv("PROCGATE_BIN")
	if p == "" {
		p = "bin/procgate"
	}
	p, err := filepath.Abs(p)
	if err == nil {
		_, err = os.Stat(p)
	}
	if err != nil {
		return "", fmt.Errorf("procgate binary (make build, or PROCGATE_BIN): %w", err)
	}
	return p, nil
}

// phStartDaemon writes the agent's certificate, the policy, and starts the
// daemon in the server with --gateway.
func (b *bench) phStartDaemon(l *phLane, g *phGateway) (*daemonProc, error) {
	bin, err := procgateBinary()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(b.host.dir, "agent")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	iss, err := g.ca.Issue(pki.IssueRequest{Name: "srv1", Usage: pki.Client, Validity: 2 * time.Hour})
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{"ca.crt": g.ca.CertPEM(), "srv1.crt": iss.CertPEM, "srv1.key": iss.KeyPEM, "policy.yaml": []byte(phAgentPolicy)}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return nil, err
		}
	}
	return b.startDaemon(bin, dir, l.server, filepath.Join(dir, "policy.yaml"), "pinhole-agent",
		"--gateway", g.url, "--gateway-ca", filepath.Join(dir, "ca.crt"),
		"--gateway-cert", filepath.Join(dir, "srv1.crt"), "--gateway-key", filepath.Join(dir, "srv1.key"))
}

// phBindLatency times bind → hole live through the whole chain.
func (b *bench) phBindLatency(ctx context.Context, res *pinholeResult, l *phLane, g *phGateway) error {
	d, err := b.phStartDaemon(l, g)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command("nsenter", "--net="+l.server, d.bin, "--socket", d.socket, "run", "--app", "bench", "--", self)
	cmd.Env = append(os.Environ(), envBinder+"=1")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	var stderr lockedBuf
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() }()
	lines := bufio.NewScanner(stdout)
	readLine := func() (string, error) {
		if !lines.Scan() {
			return "", fmt.Errorf("binder ended: %v: %s", lines.Err(), stderr.String())
		}
		return lines.Text(), nil
	}
	if l, err := readLine(); err != nil || l != "ready" {
		return fmt.Errorf("binder: %q, %v", l, err)
	}
	// The rules keep the control port open (a service); the client holds
	// a control connection: its peer is who the holes are for.
	cc, err := dialFrom(l.client, "tcp", net.JoinHostPort(phServer.Addr().String(), strconv.Itoa(phControlPort)), 10*time.Second)
	if err != nil {
		return fmt.Errorf("control connection: %w", err)
	}
	defer cc.Close()
	// The hole is live when the router's kernel announces its element
	// (nftables monitor, NFT_MSG_NEWSETELEM after the commit): an event,
	// not a poll. Polling the set in a loop, as earlier versions did, kept
	// one of this machine's two cores busy and slowed the daemon and the
	// gateway it measured eightfold (4.2 ms p50 against 0.5 ms).
	added, stopMonitor, err := phElementMonitor(l.router)
	if err != nil {
		return err
	}
	defer stopMonitor()
	var monitorLag []float64 // µs from the answer to the event: the measurement's own delay
	live := func(port int, want bool) (int64, error) {
		key := perimeter.Target{Proto: "udp", Peer: phClient.Addr().String(), Host: phServer.Addr().String(), Port: port}
		deadline := time.After(10 * time.Second)
		if want {
			for {
				select {
				case a := <-added:
					if a.port == port {
						return a.at, nil
					}
				case <-deadline:
					return 0, fmt.Errorf("hole %+v not added after 10s; daemon log:\n%s", key, d.out.String())
				}
			}
		}
		// Waiting for a close is not measured: poll gently.
		for {
			els, err := g.gw.Table().Elements()
			if err != nil {
				return 0, err
			}
			if !slices.ContainsFunc(els, func(e perimeter.Element) bool { return e.Key.Target() == key }) {
				return monotonicNS(), nil
			}
			select {
			case <-deadline:
				return 0, fmt.Errorf("hole %+v still present after 10s; daemon log:\n%s", key, d.out.String())
			case <-time.After(time.Millisecond):
			}
		}
	}
	// The monitor's own delay: a hole the bench opens itself, from the
	// gateway's answer (the transaction is committed before it) to the
	// event.
	for i := range 20 {
		port := phBindPorts + 999 - i
		t := perimeter.Target{Proto: "udp", Peer: phClient.Addr().String(), Host: phServer.Addr().String(), Port: port}
		if _, err := g.agent.Open(ctx, perimeter.Request{Target: t, User: "bench"}); err != nil {
			return err
		}
		answered := monotonicNS()
		at, err := live(port, true)
		if err != nil {
			return err
		}
		monitorLag = append(monitorLag, float64(at-answered)/1000)
		if _, err := g.agent.Close(ctx, []perimeter.Target{t}); err != nil {
			return err
		}
	}
	var s samples
	var round []uint32
	opens := max(b.cfg.PinholeOpens/4, 5)
	for i := range opens {
		if err := ctx.Err(); err != nil {
			return err
		}
		port := phBindPorts + i%1000
		fmt.Fprintln(stdin, "bind", port)
		line, err := readLine()
		if err != nil {
			return err
		}
		t0, err := strconv.ParseInt(strings.TrimPrefix(line, "ok "), 10, 64)
		if err != nil {
			return fmt.Errorf("binder: %q", line)
		}
		t1, err := live(port, true)
		if err != nil {
			return err
		}
		round = append(round, uint32(min(t1-t0, 1<<32-1)))
		fmt.Fprintln(stdin, "close", port)
		if _, err := readLine(); err != nil {
			return err
		}
		if _, err := live(port, false); err != nil {
			return err
		}
		if len(round) == 50 || i == opens-1 {
			s.add(response{Latencies: round})
			round = nil
		}
	}
	res.BindHow = "a process of a dynamic app (procgate run) binds a UDP aux port while the client holds a control connection: from just before bind() to the router's kernel announcing the hole's element (nftables monitor; CLOCK_MONOTONIC on both sides): eBPF observation, agent, mTLS request, gateway, nftables"
	res.BindLatency = s.summary()
	res.BindPollUS = round3(quantileF(slices.Sorted(slices.Values(monitorLag)), 0.5))
	return nil
}

// phAdded is a hole's element announced by the router's kernel.
type phAdded struct {
	port int
	at   int64 // CLOCK_MONOTONIC ns when the bench received the event
}

// phElementMonitor follows the router's nftables element additions and
// sends the port of each UDP hole from the client to the server.
func phElementMonitor(router string) (<-chan phAdded, func(), error) {
	ns, err := os.Open(router)
	if err != nil {
		return nil, nil, err
	}
	conn, err := nftables.New(nftables.WithNetNSFd(int(ns.Fd())))
	if err != nil {
		ns.Close()
		return nil, nil, fmt.Errorf("nftables conn in %s: %w", router, err)
	}
	mon := nftables.NewMonitor(nftables.WithMonitorObject(nftables.MonitorObjectElements), nftables.WithMonitorAction(nftables.MonitorActionNew))
	events, err := conn.AddMonitor(mon)
	if err != nil {
		ns.Close()
		return nil, nil, fmt.Errorf("nftables monitor in %s: %w", router, err)
	}
	// The key as the hole's set holds it: peer, proto, host, port, each
	// padded to 4 bytes.
	prefix := append(phClient.Addr().AsSlice(), byte(unix.IPPROTO_UDP), 0, 0, 0)
	prefix = append(prefix, phServer.Addr().AsSlice()...)
	out := make(chan phAdded, 4096)
	go func() {
		for ev := range events {
			at := monotonicNS()
			els, ok := ev.Data.([]nftables.SetElement)
			if ev.Type != nftables.MonitorEventTypeNewSetElem || !ok {
				continue
			}
			for _, el := range els {
				if len(el.Key) == len(prefix)+4 && string(el.Key[:len(prefix)]) == string(prefix) {
					select {
					case out <- phAdded{port: int(el.Key[len(prefix)])<<8 | int(el.Key[len(prefix)+1]), at: at}:
					default:
					}
				}
			}
		}
	}()
	return out, func() { mon.Close(); ns.Close() }, nil
}
