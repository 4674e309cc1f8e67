package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"golang.org/x/sys/unix"
)

// servers answer the clients inside one namespace: a TCP acceptor on
// servicePort (accept, close), a UDP socket on servicePort that is never read
// (a full buffer drops datagrams, the cheapest sink), a bulk sink on
// bulkPort, a 1-byte echo on rrPort. They run in the bench process, outside
// every enforced cgroup, so only the client side of a connection is decided.
type servers struct {
	mu      sync.Mutex
	fds     []int
	closers []io.Closer
	wg      sync.WaitGroup
}

// startServers starts the servers in ns; without withService only the
// stream servers (the tunnel's internal namespace has its own service on
// servicePort).
func startServers(ns string, withService bool) (*servers, error) {
	s := &servers{}
	err := inNS(ns, func() error {
		for _, port := range []int{bulkPort, rrPort} {
			l, err := net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", port))
			if err != nil {
				return err
			}
			s.closers = append(s.closers, l)
			s.wg.Go(func() { s.serveStream(l, port == rrPort) })
		}
		if !withService {
			return nil
		}
		lfd, err := rawListener(servicePort)
		if err != nil {
			return err
		}
		s.fds = append(s.fds, lfd)
		ufd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("udp socket: %w", err)
		}
		s.fds = append(s.fds, ufd)
		if err := unix.Bind(ufd, &unix.SockaddrInet4{Port: servicePort}); err != nil {
			return fmt.Errorf("bind udp :%d: %w", servicePort, err)
		}
		s.wg.Go(func() { acceptLoop(lfd) })
		return nil
	})
	if err != nil {
		return nil, errors.Join(fmt.Errorf("servers in %s: %w", ns, err), s.close())
	}
	return s, nil
}

// rawListener is a blocking TCP listener on servicePort, accepted with raw
// syscalls: the cheapest server there is, so that it disturbs the
// measured connects as little as possible.
func rawListener(port int) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("tcp socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		unix.Close(fd)
		return -1, err
	}
	// The clients send nothing and close with RST, so with TCP_DEFER_ACCEPT
	// no connection ever reaches the accept queue: the listener is never
	// woken, and a connect() costs the client's kernel path alone, not an
	// inter-processor wake-up of this process (on a 2-vCPU VM that costs
	// 5-15 µs and varies with where the scheduler put the thread).
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: port}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("bind tcp :%d: %w", port, err)
	}
	if err := unix.Listen(fd, 4096); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("listen: %w", err)
	}
	return fd, nil
}

func acceptLoop(lfd int) {
	for {
		fd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
				continue
			}
			return // shut down
		}
		unix.Close(fd)
	}
}

func (s *servers) serveStream(l net.Listener, echo bool) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.closers = append(s.closers, c)
		s.mu.Unlock()
		s.wg.Go(func() {
			defer c.Close()
			if !echo {
				_, _ = io.Copy(io.Discard, c)
				return
			}
			b := make([]byte, 1)
			for {
				if _, err := io.ReadFull(c, b); err != nil {
					return
				}
				if _, err := c.Write(b); err != nil {
					return
				}
			}
		})
	}
}

func (s *servers) close() error {
	s.mu.Lock()
	for _, fd := range s.fds {
		// Wakes the blocked accept4, which then fails and returns.
		_ = unix.Shutdown(fd, unix.SHUT_RDWR)
	}
	for _, c := range s.closers {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	for _, fd := range s.fds {
		unix.Close(fd)
	}
	return nil
}
