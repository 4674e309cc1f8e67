package pinholetest

import (
	"io"
	"time"

	"github.com/procgate/procgate/internal/nstest"
)

// Exchange connects from ns to addr and returns the first line the server
// sends (tcp) or the echo of a datagram (udp), within timeout.
func Exchange(ns, network, addr string, timeout time.Duration) (string, error) {
	c, err := nstest.DialIn(ns, network, addr, timeout)
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
