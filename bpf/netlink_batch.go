package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"syscall"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// nlBatch is a raw netlink socket that sends many requests to a sendmsg and
// reads the kernel's answers in bulk. mdlayher/netlink frames the messages
// but cannot carry them so: its Receive returns at the first error of a
// read and drops the answers after it, and each call starts a goroutine
// and waits for it, which on a thread locked into a network namespace hands
// the thread off and back (some 50 µs a request).
//
// The socket is in the network namespace of the thread that made it, and
// not safe for concurrent use.
type nlBatch struct {
	fd   int
	seq  uint32
	out  []byte
	recv []byte
}

// nlBatchSize is how many requests go in one sendmsg. Only the errors and
// the last request of a batch are answered; at worst every request is, and
// 128 answers (each well under 1 KiB of receive buffer) fit the default
// 208 KiB buffer with room to spare: an overrun would lose answers.
const nlBatchSize = 128

// dialBatch opens a netlink socket of the given protocol in the calling
// thread's network namespace.
func dialBatch(proto int) (*nlBatch, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	// Errors come without a copy of their request (4.3+; older kernels
	// copy it, which still fits).
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	return &nlBatch{fd: fd, recv: make([]byte, 8192)}, nil
}

func (b *nlBatch) close() { unix.Close(b.fd) }

// dialBatches opens n sockets as dialBatch does (at least one), to send
// requests over them at once (execSplit).
func dialBatches(proto, n int) ([]*nlBatch, error) {
	var bs []*nlBatch
	for range max(n, 1) {
		b, err := dialBatch(proto)
		if err != nil {
			closeBatches(bs)
			return nil, err
		}
		bs = append(bs, b)
	}
	return bs, nil
}

func closeBatches(bs []*nlBatch) {
	for _, b := range bs {
		b.close()
	}
}

// execSplit is exec of msgs cut in contiguous shares, one per socket of
// bs, each share sent on a thread of its own at once. The kernel does the
// work of a request in the sender's thread (for SOCK_DESTROY, a socket's
// teardown): so it runs on several CPUs. Answers as exec's, each in the
// place of its request.
func execSplit(bs []*nlBatch, msgs []netlink.Message) ([]error, error) {
	errs := make([]error, len(msgs))
	failed := make([]error, len(bs))
	share := (len(msgs) + len(bs) - 1) / len(bs)
	var wg sync.WaitGroup
	for i, b := range bs {
		lo, hi := min(i*share, len(msgs)), min((i+1)*share, len(msgs))
		wg.Go(func() {
			answers, err := b.exec(msgs[lo:hi])
			copy(errs[lo:hi], answers)
			failed[i] = err
		})
	}
	wg.Wait()
	return errs, errors.Join(failed...)
}

// errNoAnswer is the answer to a request of a failed exchange.
var errNoAnswer = errors.New("no answer from the kernel")

// exec sends msgs (their headers' length, flags and sequence numbers are
// set here) and returns the kernel's answer to each: nil when done, else
// its errno, or errNoAnswer when the exchange failed (the error) before
// the kernel was known to be through with it.
func (b *nlBatch) exec(msgs []netlink.Message) ([]error, error) {
	errs := make([]error, len(msgs))
	for i := range errs {
		errs[i] = errNoAnswer
	}
	for start := 0; start < len(msgs); start += nlBatchSize {
		end := min(start+nlBatchSize, len(msgs))
		if err := b.execBatch(msgs[start:end], errs[start:end]); err != nil {
			return errs, err
		}
	}
	return errs, nil
}

func (b *nlBatch) execBatch(msgs []netlink.Message, errs []error) error {
	first := b.seq + 1
	b.out = b.out[:0]
	for i := range msgs {
		m := msgs[i]
		m.Header.Length = uint32(unix.NLMSG_HDRLEN + len(m.Data))
		m.Header.Flags |= netlink.Request
		if i == len(msgs)-1 {
			// Its answer says the kernel is through with the batch.
			m.Header.Flags |= netlink.Acknowledge
		}
		b.seq++
		m.Header.Sequence = b.seq
		raw, err := m.MarshalBinary()
		if err != nil {
			return fmt.Errorf("netlink request %d: %w", i, err)
		}
		b.out = append(b.out, raw...)
	}
	last := b.seq
	if err := unix.Sendto(b.fd, b.out, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("send %d netlink requests: %w", len(msgs), err)
	}
	for {
		n, _, err := unix.Recvfrom(b.fd, b.recv, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			// ENOBUFS: the receive buffer overran and answers were lost.
			return fmt.Errorf("receive netlink answers: %w", err)
		}
		answers, err := syscall.ParseNetlinkMessage(b.recv[:n])
		if err != nil {
			return fmt.Errorf("receive netlink answers: %w", err)
		}
		for _, a := range answers {
			seq := a.Header.Seq
			if a.Header.Type != unix.NLMSG_ERROR || seq < first || seq > last || len(a.Data) < 4 {
				continue // not an answer to this batch
			}
			// struct nlmsgerr: a negative errno, 0 for an ack.
			errs[seq-first] = nil
			if errno := -int32(binary.NativeEndian.Uint32(a.Data)); errno != 0 {
				errs[seq-first] = unix.Errno(errno)
			}
			if seq == last {
				// The kernel answers in order: the rest are done.
				for i, err := range errs {
					if err == errNoAnswer {
						errs[i] = nil
					}
				}
				return nil
			}
		}
	}
}
