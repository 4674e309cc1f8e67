package bulk

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Server serves the files of a directory: get sends one, put receives one.
type Server struct {
	Dir string
	// PortMin and PortMax are the UDP data ports (the aux range); each
	// transfer binds one of them, at random, for as long as it lasts.
	PortMin, PortMax int
	// Rate is the sender's starting rate in bytes/s (0: StartRate).
	Rate float64
	Log  *slog.Logger
}

// helloWait bounds how long a server waits for the client's first
// datagram (through the perimeter's hole) before it gives up.
const helloWait = 30 * time.Second

// Serve handles the control connections of ln until it is closed.
func (s *Server) Serve(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		go func() {
			defer c.Close()
			log := cmp.Or(s.Log, slog.Default()).With("peer", c.RemoteAddr().String())
			st, err := s.handle(c, log)
			if err != nil {
				log.Warn("transfer failed", "error", err.Error())
				return
			}
			log.Info("transfer done", "port", st.Port, "bytes", st.Bytes, "passes", st.Passes, "sent", st.Sent,
				"took", st.Took.Round(time.Millisecond).String())
		}()
	}
}

func (s *Server) handle(c net.Conn, log *slog.Logger) (Stats, error) {
	t0 := time.Now()
	cc := conn{enc: json.NewEncoder(c), dec: json.NewDecoder(bufio.NewReader(c))}
	fail := func(err error) (Stats, error) {
		cc.send(message{Op: "error", Error: err.Error()})
		return Stats{}, err
	}
	c.SetDeadline(time.Now().Add(helloWait))
	req, err := cc.recv("get", "put")
	if err != nil {
		return fail(err)
	}
	if req.Name == "" || req.Name != filepath.Base(req.Name) || strings.HasPrefix(req.Name, ".") {
		return fail(fmt.Errorf("name %q: want a plain file name", req.Name))
	}
	local := c.LocalAddr().(*net.TCPAddr)
	peer := c.RemoteAddr().(*net.TCPAddr)
	udp, err := s.bind(local.IP)
	if err != nil {
		return fail(err)
	}
	defer udp.Close()
	port := udp.LocalAddr().(*net.UDPAddr).Port
	log = log.With("op", req.Op, "name", req.Name, "port", port)
	id := transferID()
	path := filepath.Join(s.Dir, req.Name)
	st := Stats{Port: port}

	var f *os.File
	reply := message{Op: "port", Port: port, ID: id}
	if req.Op == "get" {
		if f, err = os.Open(path); err != nil {
			return fail(err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return fail(err)
		}
		st.Bytes = fi.Size()
		if err := checkSize(st.Bytes); err != nil {
			return fail(err)
		}
		if reply.SHA256, err = SumOf(f, st.Bytes); err != nil {
			return fail(err)
		}
		reply.Size = st.Bytes
	} else {
		if err := checkSize(req.Size); err != nil {
			return fail(err)
		}
		st.Bytes = req.Size
		if f, err = os.CreateTemp(s.Dir, ".put-"); err != nil {
			return fail(err)
		}
		defer func() { f.Close(); os.Remove(f.Name()) }()
		if err := f.Truncate(req.Size); err != nil {
			return fail(err)
		}
	}
	if err := cc.send(reply); err != nil {
		return st, err
	}
	// The first datagram from the control connection's peer: its source
	// is where the data goes (the peer's NAT may change the port, never
	// the host).
	client, err := awaitHello(udp, func(a *net.UDPAddr) bool { return a.IP.Equal(peer.IP) })
	if err != nil {
		return fail(err)
	}
	log.Debug("client ready", "udp", client.String())
	if err := cc.send(message{Op: "ready"}); err != nil {
		return st, err
	}
	c.SetDeadline(time.Time{})
	from := func(a *net.UDPAddr) bool { return a.IP.Equal(client.IP) && a.Port == client.Port }
	if req.Op == "get" {
		write := func(b []byte) error { _, err := udp.WriteToUDP(b, client); return err }
		st.Sent, st.Passes, err = sender(cc, write, f, st.Bytes, id, s.Rate)
		if err != nil {
			return st, err
		}
		st.SHA256 = reply.SHA256
	} else {
		if err := receiver(cc, udp, from, f, st.Bytes, id); err != nil {
			return fail(err)
		}
		if st.SHA256, err = SumOf(f, st.Bytes); err != nil {
			return fail(err)
		}
		if st.SHA256 != req.SHA256 {
			return fail(fmt.Errorf("sha256 of what arrived is %s, the client sent %s", st.SHA256, req.SHA256))
		}
		if err := f.Sync(); err != nil {
			return fail(err)
		}
		if err := os.Rename(f.Name(), path); err != nil {
			return fail(err)
		}
	}
	st.Took = time.Since(t0)
	return st, cc.send(message{Op: "done", Pass: st.Passes, Sent: st.Sent})
}

// bind binds a UDP socket on ip at a free port of the range, tried in a
// random order so that concurrent transfers rarely collide.
func (s *Server) bind(ip net.IP) (*net.UDPConn, error) {
	lo, hi := s.PortMin, s.PortMax
	if lo <= 0 || hi < lo || hi > 65535 {
		return nil, fmt.Errorf("data ports %d-%d: want a range within 1-65535", lo, hi)
	}
	var last error
	for _, i := range rand.Perm(hi - lo + 1) {
		udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: ip, Port: lo + i})
		if err == nil {
			bigBuffers(udp)
			return udp, nil
		}
		last = err
	}
	return nil, fmt.Errorf("no free UDP port in %d-%d: %w", lo, hi, last)
}

func awaitHello(udp *net.UDPConn, ok func(*net.UDPAddr) bool) (*net.UDPAddr, error) {
	defer udp.SetReadDeadline(time.Time{})
	udp.SetReadDeadline(time.Now().Add(helloWait))
	buf := make([]byte, 64)
	for {
		n, addr, err := udp.ReadFromUDP(buf)
		if err != nil {
			return nil, fmt.Errorf("no hello datagram from the client on the data port: %w", err)
		}
		if ok(addr) && bytes.Equal(buf[:n], hello) {
			return addr, nil
		}
	}
}

// transferID is a random id that no hello datagram's header can carry.
func transferID() uint32 {
	for {
		id := rand.Uint32()
		_, hid, _ := header(hello)
		if id != 0 && id != hid {
			return id
		}
	}
}
