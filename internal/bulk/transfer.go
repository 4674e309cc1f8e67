package bulk

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Rates of the sender, in bytes per second. It starts at StartRate (or
// the caller's) and adapts after each pass: the losses the receiver
// reports halve it above 10%, and a pass with under 1% raises it by a
// quarter. Pacing is per burst of 16 datagrams.
const (
	StartRate = 400 << 20
	minRate   = 1 << 20
	maxRate   = 10 << 30
	burst     = 16
)

// maxSendErrors in a row ends a transfer: the network is gone, not busy.
const maxSendErrors = 1000

// send sends the blocks of src in ranges (all of them when ranges is nil)
// through write, paced at rate, and returns how many it sent.
func sendPass(write func([]byte) error, src io.ReaderAt, size int64, id uint32, ranges [][2]uint32, rate float64) (int64, error) {
	buf := make([]byte, headerSize+BlockSize)
	if ranges == nil && size > 0 {
		ranges = [][2]uint32{{0, blocks(size) - 1}}
	}
	start := time.Now()
	var sent int64
	var sentBytes float64
	errs := 0
	for _, r := range ranges {
		for b := r[0]; b <= r[1] && b < blocks(size); b++ {
			off := int64(b) * BlockSize
			n := min(BlockSize, size-off)
			putHeader(buf, b, id)
			if _, err := src.ReadAt(buf[headerSize:headerSize+n], off); err != nil && !(errors.Is(err, io.EOF) && n > 0) {
				return sent, fmt.Errorf("read block %d: %w", b, err)
			}
			if err := write(buf[:headerSize+n]); err != nil {
				// ENOBUFS, or an ICMP error of an earlier datagram: the
				// block is lost and comes again in the next pass.
				if errs++; errs > maxSendErrors {
					return sent, fmt.Errorf("send block %d: %w (%d errors in a row)", b, err, errs)
				}
			} else {
				errs = 0
			}
			sent++
			sentBytes += float64(headerSize + n)
			if sent%burst == 0 {
				if ahead := time.Duration(sentBytes/rate*float64(time.Second)) - time.Since(start); ahead > 0 {
					time.Sleep(ahead)
				}
			}
		}
	}
	return sent, nil
}

// sender runs passes until the receiver has every block.
func sender(c conn, write func([]byte) error, src io.ReaderAt, size int64, id uint32, rate float64) (sent int64, passes int, err error) {
	if rate <= 0 {
		rate = StartRate
	}
	var ranges [][2]uint32
	for passes = 1; ; passes++ {
		n, err := sendPass(write, src, size, id, ranges, rate)
		sent += n
		if err != nil {
			return sent, passes, err
		}
		if err := c.send(message{Op: "pass", Pass: passes}); err != nil {
			return sent, passes, err
		}
		m, err := c.recv("missing", "complete")
		if err != nil {
			return sent, passes, err
		}
		if m.Op == "complete" {
			return sent, passes, nil
		}
		ranges = m.Ranges
		var lost int64
		for _, r := range ranges {
			lost += int64(r[1]) - int64(r[0]) + 1
		}
		switch loss := float64(lost) / float64(max(n, 1)); {
		case loss > 0.10:
			rate = max(rate/2, minRate)
		case loss < 0.01:
			rate = min(rate*1.25, maxRate)
		}
	}
}

// receiver keeps what read delivers until every block of size has
// arrived, answering each pass with what is missing. It returns when the
// transfer is complete or fails.
func receiver(c conn, udp *net.UDPConn, from func(*net.UDPAddr) bool, dst io.WriterAt, size int64, id uint32) error {
	n := blocks(size)
	var mu sync.Mutex
	have := make([]bool, n)
	var count uint32
	var last time.Time
	var werr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, headerSize+BlockSize+1)
		for {
			k, addr, err := udp.ReadFromUDP(buf)
			if err != nil {
				return // closed by the caller
			}
			if from != nil && !from(addr) {
				continue
			}
			b, got, err := header(buf[:k])
			if err != nil || got != id || b >= n {
				continue
			}
			off := int64(b) * BlockSize
			if want := min(BlockSize, size-off); int64(k-headerSize) != want {
				continue
			}
			mu.Lock()
			if !have[b] {
				if _, err := dst.WriteAt(buf[headerSize:k], off); err != nil && werr == nil {
					werr = fmt.Errorf("write block %d: %w", b, err)
				}
				have[b] = true
				count++
			}
			last = time.Now()
			mu.Unlock()
		}
	}()
	defer func() { udp.SetReadDeadline(time.Now()); <-done }()
	for {
		if _, err := c.recv("pass"); err != nil {
			return err
		}
		// The pass's last datagrams may be behind its TCP message: wait
		// for a quiet 20 ms, at most 300 ms.
		for t0 := time.Now(); time.Since(t0) < 300*time.Millisecond; time.Sleep(5 * time.Millisecond) {
			mu.Lock()
			quiet := time.Since(last) > 20*time.Millisecond
			mu.Unlock()
			if quiet {
				break
			}
		}
		mu.Lock()
		if werr != nil {
			mu.Unlock()
			return werr
		}
		if count == n {
			mu.Unlock()
			return c.send(message{Op: "complete"})
		}
		var ranges [][2]uint32
		for b := uint32(0); b < n && len(ranges) < maxRanges; b++ {
			if have[b] {
				continue
			}
			if k := len(ranges); k > 0 && ranges[k-1][1] == b-1 {
				ranges[k-1][1] = b
			} else {
				ranges = append(ranges, [2]uint32{b, b})
			}
		}
		mu.Unlock()
		if err := c.send(message{Op: "missing", Ranges: ranges}); err != nil {
			return err
		}
	}
}

// SumOf is the hex SHA-256 of the first size bytes of r.
func SumOf(r io.ReaderAt, size int64) (string, error) {
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(r, 0, size)); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// bigBuffers asks for large socket buffers, beyond the sysctl limits when
// the process may (CAP_NET_ADMIN): at a gigabit and more, the default
// 208 KiB receive buffer overflows between two reads.
func bigBuffers(udp *net.UDPConn) {
	const size = 16 << 20
	udp.SetReadBuffer(size)
	udp.SetWriteBuffer(size)
	if raw, err := udp.SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) {
			unix.SetsockoptInt(int(fd), syscall.SOL_SOCKET, unix.SO_RCVBUFFORCE, size)
			unix.SetsockoptInt(int(fd), syscall.SOL_SOCKET, unix.SO_SNDBUFFORCE, size)
		})
	}
}
