package pinholetest

import (
	"io"
	"net"
	"runtime"
	"time"

	"github.com/vishvananda/netns"
)

// DialIn dials from a thread in the network namespace at ns (the socket
// stays there). The thread goes back to its namespace afterwards; if it
// cannot, it stays locked and ends with its goroutine. (A thread left in
// another namespace could be the main thread, whose namespace is what
// /proc/PID/net shows.)
func DialIn(ns, network, addr string, timeout time.Duration) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			done <- result{nil, err}
			return
		}
		defer orig.Close()
		h, err := netns.GetFromPath(ns)
		if err == nil {
			err = netns.Set(h)
			h.Close()
		}
		if err != nil {
			done <- result{nil, err}
			return
		}
		c, err := net.DialTimeout(network, addr, timeout)
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		done <- result{c, err}
	}()
	r := <-done
	return r.c, r.err
}

// Exchange connects from ns to addr and returns the first line the server
// sends (tcp) or the echo of a datagram (udp), within timeout.
func Exchange(ns, network, addr string, timeout time.Duration) (string, error) {
	c, err := DialIn(ns, network, addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if network == "udp" || network == "udp4" || network == "udp6" {
		if _, err := c.Write([]byte("ping\n")); err != nil {
			return "", err
		}
	}
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if n > 0 {
		return string(buf[:n]), nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return "", err
}
