package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The holder is an app process with a grant for the target: it holds a TCP
// connection and a connected UDP socket to it, hands out sockets on request
// (a cooperative or careless app), and sends a message from a buffer in its
// memory when asked (an app that sends what it holds). The identity
// techniques try to use its grant from outside: take its sockets, write its
// memory, or run code in it.

// holderHeartbeat is what the holder sends when nobody changed its buffer;
// it carries a token of the holder's own, so the target tells it apart.
const holderHeartbeat = tokenPrefix + "holder/holder/heartbeat|"

// holderMsg is the buffer the holder sends on "send": NUL-terminated.
var holderMsg [256]byte

var holderMu sync.Mutex

// holderInfo is the holder's answer to "info".
type holderInfo struct {
	Pid int `json:"pid"`
	// Descriptor numbers in the holder.
	TCP     int `json:"tcp"`      // connected to the target
	UDP     int `json:"udp"`      // connected to the target
	FreeUDP int `json:"free_udp"` // never connected, fresh per request
	FreeTCP int `json:"free_tcp"` // never connected, fresh per request
	// Buf is the address of holderMsg in the holder, BufLen its size.
	Buf    uint64 `json:"buf"`
	BufLen int    `json:"buf_len"`
}

func resetHolderMsg() {
	clear(holderMsg[:])
	copy(holderMsg[:], holderHeartbeat)
}

// serveHolder connects to the target and serves requests on cfg.listen
// until SIGTERM: "info" (JSON), "fds" (JSON and, by SCM_RIGHTS, the
// descriptors named in it, in the order tcp, udp, free_udp, free_tcp),
// "send" (sends holderMsg on both connections, answers "sent").
func serveHolder(cfg *config) error {
	if cfg.listen == "" {
		return errors.New("holder needs -listen SOCKET")
	}
	resetHolderMsg()
	tcp, err := holderConnect(cfg)
	if err != nil {
		return err
	}
	udp, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("holder: %w", err)
	}
	if err := unix.Connect(udp, sockaddr(cfg.target4, cfg.udpPort, 0)); err != nil {
		return fmt.Errorf("holder: connect to %s:%d/udp (is it granted?): %w", cfg.target4, cfg.udpPort, err)
	}
	_ = os.Remove(cfg.listen)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.listen, Net: "unix"})
	if err != nil {
		return fmt.Errorf("holder: %w", err)
	}
	defer ln.Close()
	if err := os.Chmod(cfg.listen, 0o666); err != nil {
		return fmt.Errorf("holder: %w", err)
	}
	fmt.Println("ready")
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		ln.Close()
	}()
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			return nil
		}
		go holderAnswer(c, cfg, tcp, udp)
	}
}

// holderConnect opens one of the holder's TCP connections to the target.
func holderConnect(cfg *config) (int, error) {
	tcp, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("holder: %w", err)
	}
	setTimeouts(tcp, cfg.timeout)
	if err := unix.Connect(tcp, sockaddr(cfg.target4, cfg.tcpPort, 0)); err != nil {
		unix.Close(tcp)
		return -1, fmt.Errorf("holder: connect to %s:%d/tcp (is it granted?): %w", cfg.target4, cfg.tcpPort, err)
	}
	_ = unix.SetsockoptInt(tcp, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	return tcp, nil
}

// holderAnswer serves one client. Its "send" writes on the holder's first
// TCP connection; "info" and "fds" name (and pass) a fresh one each time:
// the kernel cuts a connection that a process outside the app wrote to,
// and one attacker's attempt must not decide the next one's.
func holderAnswer(c *net.UnixConn, cfg *config, tcp, udp int) {
	defer c.Close()
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		info := holderInfo{Pid: os.Getpid(), TCP: tcp, UDP: udp,
			Buf: uint64(uintptr(unsafe.Pointer(&holderMsg[0]))), BufLen: len(holderMsg)}
		var oob []byte
		switch sc.Text() {
		case "info", "fds":
			// Fresh unconnected sockets each time, so that one attacker's
			// connect does not decide the next one's; they stay open for
			// whoever takes them by number.
			var err error
			if info.TCP, err = holderConnect(cfg); err != nil {
				fmt.Fprintf(c, "error: %v\n", err)
				return
			}
			if info.FreeUDP, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
				fmt.Fprintf(c, "error: %v\n", err)
				return
			}
			if info.FreeTCP, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
				fmt.Fprintf(c, "error: %v\n", err)
				return
			}
			if sc.Text() == "fds" {
				oob = unix.UnixRights(info.TCP, udp, info.FreeUDP, info.FreeTCP)
			}
		case "send":
			holderMu.Lock()
			msg := holderMsg[:]
			if i := bytes.IndexByte(msg, 0); i >= 0 {
				msg = msg[:i]
			}
			msg = append([]byte(nil), msg...)
			resetHolderMsg()
			holderMu.Unlock()
			_, errU := unix.Write(udp, msg)
			_, errT := unix.Write(tcp, msg)
			if err := errors.Join(errU, errT); err != nil {
				fmt.Fprintf(c, "error: %v\n", err)
				continue
			}
			fmt.Fprintln(c, "sent")
			continue
		default:
			fmt.Fprintf(c, "error: unknown request %q\n", sc.Text())
			continue
		}
		b, _ := json.Marshal(info)
		if _, _, err := c.WriteMsgUnix(append(b, '\n'), oob, nil); err != nil {
			return
		}
	}
}

// holderClient talks to a holder.
type holderClient struct {
	c  *net.UnixConn
	rd *bufio.Reader
}

func (e *env) dialHolder() (*holderClient, error) {
	if e.cfg.holder == "" {
		return nil, errors.New("no -holder given")
	}
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: e.cfg.holder, Net: "unix"})
	if err != nil {
		return nil, err
	}
	return &holderClient{c: c, rd: bufio.NewReader(c)}, nil
}

func (h *holderClient) Close() error { return h.c.Close() }

// request sends req and reads the JSON answer and any descriptors passed.
func (h *holderClient) request(req string) (holderInfo, []int, error) {
	var info holderInfo
	if _, err := fmt.Fprintln(h.c, req); err != nil {
		return info, nil, err
	}
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*8))
	n, oobn, _, _, err := h.c.ReadMsgUnix(buf, oob)
	if err != nil {
		return info, nil, err
	}
	line := strings.TrimSpace(string(buf[:n]))
	if strings.HasPrefix(line, "error:") {
		return info, nil, errors.New(line)
	}
	if err := json.Unmarshal([]byte(line), &info); err != nil {
		return info, nil, fmt.Errorf("holder answer %q: %w", line, err)
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return info, nil, err
		}
		for _, m := range msgs {
			got, err := unix.ParseUnixRights(&m)
			if err != nil {
				return info, nil, err
			}
			fds = append(fds, got...)
		}
	}
	return info, fds, nil
}

func (h *holderClient) send() error {
	if _, err := fmt.Fprintln(h.c, "send"); err != nil {
		return err
	}
	line, err := h.rd.ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != "sent" {
		return errors.New(strings.TrimSpace(line))
	}
	return nil
}

// askHolder returns the holder's info and an open connection to it (for
// "send"); the caller closes it. On failure the attempt says why.
func (e *env) askHolder(a attempt) (holderInfo, *holderClient, attempt, bool) {
	h, err := e.dialHolder()
	if err != nil {
		return holderInfo{}, nil, a.unavailable("reach the holder", err), false
	}
	info, _, err := h.request("info")
	if err != nil {
		h.Close()
		return holderInfo{}, nil, a.failed("holder info", err), false
	}
	return info, h, a, true
}

// holderFD says which of the holder's descriptors a technique uses and
// what it does with it.
type holderFD int

const (
	useTCP     holderFD = iota // write the token on the established connection
	useUDP                     // write the token on the connected UDP socket
	useFreeUDP                 // sendto the target
	useFreeTCP                 // connect to the target, write
)

func (e *env) holderDest(which holderFD) string {
	if which == useTCP || which == useFreeTCP {
		return destString(e.cfg.target4, e.cfg.tcpPort, "tcp")
	}
	return destString(e.cfg.target4, e.cfg.udpPort, "udp")
}

// useStolen uses a descriptor taken from the holder.
func (e *env) useStolen(a attempt, fd int, which holderFD) attempt {
	switch which {
	case useTCP, useUDP:
		if _, err := unix.Write(fd, e.token); err != nil {
			return a.failed("write on the holder's socket", err)
		}
	case useFreeUDP:
		if err := unix.Sendto(fd, e.token, 0, sockaddr(e.cfg.target4, e.cfg.udpPort, 0)); err != nil {
			return a.failed("sendto on the holder's socket", err)
		}
	case useFreeTCP:
		setTimeouts(fd, e.cfg.timeout)
		sa := sockaddr(e.cfg.target4, e.cfg.tcpPort, 0)
		err := unix.Connect(fd, sa)
		a.noteFlow(fd, sa)
		if err != nil {
			return a.failed("connect the holder's socket", err)
		}
		if _, err := unix.Write(fd, e.token); err != nil {
			return a.failed("write", err)
		}
	}
	return a
}

// scmRightsTry receives the holder's sockets over SCM_RIGHTS and uses one.
func (e *env) scmRightsTry(which holderFD) attempt {
	a := attempt{Dest: e.holderDest(which)}
	h, err := e.dialHolder()
	if err != nil {
		return a.unavailable("reach the holder", err)
	}
	defer h.Close()
	_, fds, err := h.request("fds")
	if err != nil {
		return a.failed("receive descriptors (SCM_RIGHTS)", err)
	}
	for _, fd := range fds {
		defer unix.Close(fd)
	}
	if len(fds) != 4 {
		return a.failed("receive descriptors (SCM_RIGHTS)", fmt.Errorf("got %d descriptors, want 4", len(fds)))
	}
	return e.useStolen(a, fds[which], which)
}

// pidfdGetfdTry copies one of the holder's descriptors with pidfd_getfd(2),
// which asks for ptrace access to the holder.
func (e *env) pidfdGetfdTry(which holderFD) attempt {
	return e.pidfdGetfdAs(which, false)
}

// setuidPidfdGetfdTry is pidfdGetfdTry by root that first becomes the
// holder's user: root without CAP_SYS_PTRACE (as the launcher leaves it)
// keeps CAP_SETUID, and the same uid needs no capability to trace the
// holder where Yama does not stop it. Only this technique's process
// changes user.
func (e *env) setuidPidfdGetfdTry(which holderFD) attempt {
	if os.Geteuid() != 0 {
		return attempt{Dest: e.holderDest(which)}.unavailable("become the holder's user", errors.New("not root"))
	}
	return e.pidfdGetfdAs(which, true)
}

func (e *env) pidfdGetfdAs(which holderFD, asHolderUser bool) attempt {
	info, h, a, ok := e.askHolder(attempt{Dest: e.holderDest(which)})
	if !ok {
		return a
	}
	defer h.Close()
	if asHolderUser {
		// Take the holder's ids exactly, real, effective and saved: the
		// closest any caller can come to the kernel's same-ids test.
		uids, gids, err := procIDs(info.Pid)
		if err != nil {
			return a.failed("find the holder's user", err)
		}
		// Groups first, while still root; Go applies them to every thread.
		if err := syscall.Setgroups(nil); err != nil {
			return a.failed("setgroups", err)
		}
		if err := syscall.Setresgid(gids[0], gids[1], gids[2]); err != nil {
			return a.failed("setresgid", err)
		}
		if err := syscall.Setresuid(uids[0], uids[1], uids[2]); err != nil {
			return a.failed("setresuid", err)
		}
	}
	pidfd, err := unix.PidfdOpen(info.Pid, 0)
	if err != nil {
		return a.failed("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	target := map[holderFD]int{useTCP: info.TCP, useUDP: info.UDP, useFreeUDP: info.FreeUDP, useFreeTCP: info.FreeTCP}[which]
	fd, err := unix.PidfdGetfd(pidfd, target, 0)
	if err != nil {
		return a.failed("pidfd_getfd", err)
	}
	defer unix.Close(fd)
	return e.useStolen(a, fd, which)
}

// procIDs reads the real, effective and saved uids and gids of pid.
func procIDs(pid int) (uids, gids [3]int, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return uids, gids, err
	}
	found := 0
	for _, line := range strings.Split(string(b), "\n") {
		var dst *[3]int
		if v, ok := strings.CutPrefix(line, "Uid:"); ok {
			dst, line = &uids, v
		} else if v, ok := strings.CutPrefix(line, "Gid:"); ok {
			dst, line = &gids, v
		} else {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 3 {
			return uids, gids, fmt.Errorf("/proc/%d/status: short line %q", pid, line)
		}
		for i := range 3 {
			if dst[i], err = strconv.Atoi(f[i]); err != nil {
				return uids, gids, fmt.Errorf("/proc/%d/status: %w", pid, err)
			}
		}
		found++
	}
	if found != 2 {
		return uids, gids, fmt.Errorf("/proc/%d/status: no Uid and Gid lines", pid)
	}
	return uids, gids, nil
}

// procFDTry opens the holder's connected socket through /proc/PID/fd/N,
// which the kernel refuses for sockets whoever asks (ENXIO).
func (e *env) procFDTry() attempt {
	info, h, a, ok := e.askHolder(attempt{Dest: e.holderDest(useUDP)})
	if !ok {
		return a
	}
	defer h.Close()
	fd, err := unix.Open(fmt.Sprintf("/proc/%d/fd/%d", info.Pid, info.UDP), unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return a.failed("open /proc/PID/fd/N", err)
	}
	defer unix.Close(fd)
	return e.useStolen(a, fd, useUDP)
}

// memWriteTry writes the token into the holder's send buffer, with
// process_vm_writev(2) or through /proc/PID/mem, then asks the holder to
// send it: the holder's grant carries the attacker's data.
func (e *env) memWriteTry(procMem bool) attempt {
	info, h, a, ok := e.askHolder(attempt{Dest: e.holderDest(useUDP) + " and " + e.holderDest(useTCP) + " (by the holder)"})
	if !ok {
		return a
	}
	defer h.Close()
	msg := append(append([]byte(nil), e.token...), 0)
	if len(msg) > info.BufLen {
		return a.failed("fit the token", fmt.Errorf("token of %d bytes, buffer of %d", len(msg), info.BufLen))
	}
	if procMem {
		f, err := os.OpenFile("/proc/"+strconv.Itoa(info.Pid)+"/mem", os.O_RDWR, 0)
		if err != nil {
			return a.failed("open /proc/PID/mem", err)
		}
		defer f.Close()
		if _, err := f.WriteAt(msg, int64(info.Buf)); err != nil {
			return a.failed("write /proc/PID/mem", err)
		}
	} else {
		local := []unix.Iovec{{Base: &msg[0]}}
		local[0].SetLen(len(msg))
		remote := []unix.RemoteIovec{{Base: uintptr(info.Buf), Len: len(msg)}}
		if _, err := unix.ProcessVMWritev(info.Pid, local, remote, 0); err != nil {
			return a.failed("process_vm_writev", err)
		}
	}
	if err := h.send(); err != nil {
		return a.failed("ask the holder to send", err)
	}
	return a
}

// ptraceTry injects socket+connect+write into a thread of the holder
// (amd64; see ptrace_amd64.go).
func (e *env) ptraceTry() attempt {
	info, h, a, ok := e.askHolder(attempt{Dest: destString(e.cfg.target4, e.cfg.tcpPort, "tcp") + " (from inside the holder)"})
	if !ok {
		return a
	}
	h.Close()
	return ptraceInject(a, info.Pid, sockaddr(e.cfg.target4, e.cfg.tcpPort, 0), e.token, e.cfg.timeout)
}
