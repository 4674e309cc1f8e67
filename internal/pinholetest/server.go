// Package pinholetest has what tests of dynamic pinholes share: a static Go
// server that a test runs as a child process inside an app cgroup and a
// network namespace (Serve and Start), driven line by line over its stdin,
// and the four-namespace topology of the perimeter tests (topology.go).
//
// The server is the test binary itself, re-executed: a test package calls
// Serve from TestMain; it returns at once unless the process is such a
// child. So the server is a Go binary without LD_PRELOAD or libc sockets,
// which is what the eBPF observation must see.
package pinholetest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/vishvananda/netns"
)

const (
	envServe = "PROCGATE_PINHOLETEST_SERVE"
	envNetNS = "PROCGATE_PINHOLETEST_NETNS"
)

// Serve runs the server and exits when this process was started by Start;
// otherwise it returns at once. Call it first thing in TestMain.
//
// Commands, one per line on stdin; each is answered by one line on stdout,
// "ok [detail]" or "err reason":
//
//	control PORT   listen on TCP PORT for control connections; each is
//	               greeted "hello\n" and kept open until the peer closes it
//	listen PORT    listen on TCP PORT (auxiliary); each connection gets
//	               "data\n" and is closed
//	keep PORT      as listen, but each connection stays open until the
//	               peer closes it (a transfer in progress)
//	bind PORT      bind UDP PORT (auxiliary); every datagram is echoed
//	connect PORT ADDR  bind UDP PORT and connect it to ADDR (host:port)
//	close PORT     close the auxiliary sockets on PORT
//	hangup         close every accepted control connection
//	pid            answers "ok PID"
//	exit           exits
func Serve() {
	if os.Getenv(envServe) != "1" {
		return
	}
	// Sockets belong to the namespace of the thread that creates them: the
	// command loop creates them all, on this thread.
	runtime.LockOSThread()
	if p := os.Getenv(envNetNS); p != "" {
		h, err := netns.GetFromPath(p)
		if err == nil {
			err = netns.Set(h)
		}
		if err != nil {
			fmt.Println("err enter netns:", err)
			os.Exit(2)
		}
	}
	s := &server{aux: map[string][]io.Closer{}}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		fields := strings.Fields(in.Text())
		if len(fields) == 0 {
			continue
		}
		if fields[0] == "exit" {
			fmt.Println("ok")
			os.Exit(0)
		}
		out, err := s.do(fields)
		if err != nil {
			fmt.Println("err", err)
		} else {
			fmt.Println(strings.TrimSpace("ok " + out))
		}
	}
	os.Exit(0)
}

type server struct {
	mu       sync.Mutex
	aux      map[string][]io.Closer
	controls []net.Conn
}

func (s *server) do(f []string) (string, error) {
	arg := ""
	if len(f) > 1 {
		arg = f[1]
	}
	switch f[0] {
	case "pid":
		return strconv.Itoa(os.Getpid()), nil
	case "control":
		ln, err := net.Listen("tcp", ":"+arg)
		if err != nil {
			return "", err
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				s.mu.Lock()
				s.controls = append(s.controls, c)
				s.mu.Unlock()
				c.Write([]byte("hello\n"))
				go func() {
					io.Copy(io.Discard, c)
					c.Close()
				}()
			}
		}()
		return "", nil
	case "listen", "keep":
		keep := f[0] == "keep"
		ln, err := net.Listen("tcp", ":"+arg)
		if err != nil {
			return "", err
		}
		s.mu.Lock()
		s.aux[arg] = append(s.aux[arg], ln)
		s.mu.Unlock()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Write([]byte("data\n"))
				if keep {
					go func() {
						io.Copy(io.Discard, c)
						c.Close()
					}()
					continue
				}
				c.Close()
			}
		}()
		return "", nil
	case "pasv":
		// As an FTP server answers PASV: listen on the port, then name it
		// on every control connection, at once.
		if _, err := s.do([]string{"listen", arg}); err != nil {
			return "", err
		}
		s.mu.Lock()
		cs := slices.Clone(s.controls)
		s.mu.Unlock()
		for _, c := range cs {
			if _, err := c.Write([]byte("227 " + arg + "\n")); err != nil {
				return "", err
			}
		}
		return strconv.Itoa(len(cs)), nil
	case "bind":
		pc, err := net.ListenPacket("udp", ":"+arg)
		if err != nil {
			return "", err
		}
		s.mu.Lock()
		s.aux[arg] = append(s.aux[arg], pc)
		s.mu.Unlock()
		go func() {
			buf := make([]byte, 65536)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(buf[:n], from)
			}
		}()
		return "", nil
	case "connect":
		if len(f) < 3 {
			return "", fmt.Errorf("connect PORT ADDR")
		}
		port, err := strconv.Atoi(arg)
		if err != nil {
			return "", err
		}
		raddr, err := net.ResolveUDPAddr("udp", f[2])
		if err != nil {
			return "", err
		}
		c, err := net.DialUDP("udp", &net.UDPAddr{Port: port}, raddr)
		if err != nil {
			return "", err
		}
		s.mu.Lock()
		s.aux[arg] = append(s.aux[arg], c)
		s.mu.Unlock()
		return "", nil
	case "close":
		s.mu.Lock()
		cs := s.aux[arg]
		delete(s.aux, arg)
		s.mu.Unlock()
		if len(cs) == 0 {
			return "", fmt.Errorf("nothing open on port %s", arg)
		}
		for _, c := range cs {
			c.Close()
		}
		return "", nil
	case "hangup":
		s.mu.Lock()
		cs := s.controls
		s.controls = nil
		s.mu.Unlock()
		for _, c := range cs {
			c.Close()
		}
		return strconv.Itoa(len(cs)), nil
	}
	return "", fmt.Errorf("unknown command %q", f[0])
}

// Server is a running server child.
type Server struct {
	t   testing.TB
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
	PID int
}

// Start runs the server in the cgroup at cgroupDir (from its first
// instruction, CLONE_INTO_CGROUP) and in the network namespace at nsPath
// ("" keeps the test's). The test binary must call Serve in TestMain. The
// child is killed on cleanup.
func Start(t testing.TB, cgroupDir, nsPath string, extraFiles ...*os.File) *Server {
	t.Helper()
	cg, err := os.Open(cgroupDir)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	cmd := exec.Command("/proc/self/exe", "-test.run=^$")
	cmd.Env = append(os.Environ(), envServe+"=1", envNetNS+"="+nsPath)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	cmd.Stderr = os.Stderr
	cmd.ExtraFiles = extraFiles
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pinhole test server: %v", err)
	}
	s := &Server{t: t, cmd: cmd, in: in, out: bufio.NewReader(outPipe), PID: cmd.Process.Pid}
	t.Cleanup(s.Kill)
	return s
}

// Do sends one command and returns the detail of its "ok" answer; an "err"
// answer fails the test.
func (s *Server) Do(cmd string) string {
	s.t.Helper()
	out, err := s.Try(cmd)
	if err != nil {
		s.t.Fatalf("test server %q: %v", cmd, err)
	}
	return out
}

// Try sends one command and returns its answer or its error.
func (s *Server) Try(cmd string) (string, error) {
	if _, err := io.WriteString(s.in, cmd+"\n"); err != nil {
		return "", err
	}
	line, err := s.out.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("no answer: %w", err)
	}
	line = strings.TrimSpace(line)
	if rest, ok := strings.CutPrefix(line, "ok"); ok {
		return strings.TrimSpace(rest), nil
	}
	return "", errors.New(strings.TrimPrefix(line, "err "))
}

// Kill ends the server (SIGKILL: a crash, as far as its sockets go) and
// waits for it.
func (s *Server) Kill() {
	if s.cmd.ProcessState != nil {
		return
	}
	s.cmd.Process.Kill()
	s.cmd.Wait()
}
