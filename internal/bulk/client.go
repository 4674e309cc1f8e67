package bulk

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"time"
)

// Client fetches and sends files from and to a Server.
type Client struct {
	// Server is the control address, host:port.
	Server string
	// Rate is the sender's starting rate of a put in bytes/s (0: StartRate).
	Rate float64
	// Timeout bounds the set-up (control connection to the server's
	// "ready"); the transfer itself has none.
	Timeout time.Duration
}

// helloEvery is how often the client repeats its hello until the server
// has it: the perimeter's hole may open a moment after the server binds.
const helloEvery = 50 * time.Millisecond

// start connects, sends req, and gets the data port ready: the UDP socket
// connected to the server's data port, which has seen our hello.
func (cl *Client) start(req message) (net.Conn, conn, message, *net.UDPConn, error) {
	timeout := cl.Timeout
	if timeout == 0 {
		timeout = 60 * time.Second
	}
	c, err := net.DialTimeout("tcp", cl.Server, timeout)
	if err != nil {
		return nil, conn{}, message{}, nil, fmt.Errorf("control %s: %w", cl.Server, err)
	}
	c.SetDeadline(time.Now().Add(timeout))
	cc := conn{enc: json.NewEncoder(c), dec: json.NewDecoder(bufio.NewReader(c))}
	fail := func(err error) (net.Conn, conn, message, *net.UDPConn, error) {
		c.Close()
		return nil, conn{}, message{}, nil, err
	}
	if err := cc.send(req); err != nil {
		return fail(err)
	}
	m, err := cc.recv("port")
	if err != nil {
		return fail(err)
	}
	server := c.RemoteAddr().(*net.TCPAddr)
	udp, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: server.IP, Port: m.Port})
	if err != nil {
		return fail(fmt.Errorf("data port %d: %w", m.Port, err))
	}
	bigBuffers(udp)
	stop := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(helloEvery)
		defer t.Stop()
		for {
			udp.Write(hello) // lost until the hole is open: sent again
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	_, err = cc.recv("ready")
	close(stop)
	<-stopped
	if err != nil {
		udp.Close()
		return fail(err)
	}
	c.SetDeadline(time.Time{})
	return c, cc, m, udp, nil
}

// Get fetches name into dst and checks its SHA-256 against the server's.
func (cl *Client) Get(name string, dst io.WriterAt) (Stats, error) {
	t0 := time.Now()
	c, cc, m, udp, err := cl.start(message{Op: "get", Name: name})
	if err != nil {
		return Stats{}, err
	}
	defer c.Close()
	defer udp.Close()
	st := Stats{Bytes: m.Size, Port: m.Port}
	if err := checkSize(m.Size); err != nil {
		return st, fmt.Errorf("server: %w", err)
	}
	if err := receiver(cc, udp, nil, dst, m.Size, m.ID); err != nil {
		return st, err
	}
	done, err := cc.recv("done")
	if err != nil {
		return st, err
	}
	st.Took, st.Passes, st.Sent = time.Since(t0), done.Pass, done.Sent
	ra, ok := dst.(io.ReaderAt)
	if !ok {
		return st, nil
	}
	if st.SHA256, err = SumOf(ra, m.Size); err != nil {
		return st, err
	}
	if st.SHA256 != m.SHA256 {
		return st, fmt.Errorf("sha256 of %s as received is %s, the server's is %s", name, st.SHA256, m.SHA256)
	}
	return st, nil
}

// Put sends size bytes of src as name; the server checks the SHA-256.
func (cl *Client) Put(name string, src io.ReaderAt, size int64) (Stats, error) {
	t0 := time.Now()
	if err := checkSize(size); err != nil {
		return Stats{}, err
	}
	sum, err := SumOf(src, size)
	if err != nil {
		return Stats{}, err
	}
	c, cc, m, udp, err := cl.start(message{Op: "put", Name: name, Size: size, SHA256: sum})
	if err != nil {
		return Stats{}, err
	}
	defer c.Close()
	defer udp.Close()
	st := Stats{Bytes: size, Port: m.Port, SHA256: sum}
	write := func(b []byte) error { _, err := udp.Write(b); return err }
	if st.Sent, st.Passes, err = sender(cc, write, src, size, m.ID, cl.Rate); err != nil {
		return st, err
	}
	if _, err := cc.recv("done"); err != nil {
		return st, err
	}
	st.Took = time.Since(t0)
	return st, nil
}
