package launch

import (
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// SendWithFds writes msg on c with files attached (SCM_RIGHTS), so that the
// receiver gets its own descriptors of them: how `procgate run` hands its
// stdio to the daemon. With files, msg must not be empty: on a stream socket
// the descriptors travel with the first byte.
func SendWithFds(c *net.UnixConn, msg []byte, files ...*os.File) error {
	if len(files) > 0 && len(msg) == 0 {
		return errors.New("send fds: need at least one byte of payload to carry them")
	}
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := c.WriteMsgUnix(msg, oob, nil)
	if err != nil {
		return fmt.Errorf("send %d bytes with %d fds: %w", len(msg), len(files), err)
	}
	if n != len(msg) || oobn != len(oob) {
		return fmt.Errorf("send %d bytes with %d fds: short write (%d bytes, %d of %d control bytes)", len(msg), len(files), n, oobn, len(oob))
	}
	return nil
}

// RecvWithFds reads one message into buf and returns the descriptors that
// came with it, at most maxFds; the caller owns (and closes) them. More than
// maxFds is an error, and the descriptors that did arrive are closed.
// Received descriptors are close-on-exec.
func RecvWithFds(c *net.UnixConn, buf []byte, maxFds int) (int, []*os.File, error) {
	oob := make([]byte, unix.CmsgSpace(4*max(maxFds, 0)))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return n, nil, fmt.Errorf("receive fds: %w", err)
	}
	var fds []int
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return n, nil, fmt.Errorf("receive fds: parse control message: %w", err)
	}
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			closeFds(fds)
			return n, nil, fmt.Errorf("receive fds: %w", err)
		}
		fds = append(fds, got...)
	}
	// Control space is rounded up to 8 bytes, so one more descriptor than
	// asked for can fit without truncation: count as well.
	if flags&unix.MSG_CTRUNC != 0 || len(fds) > maxFds {
		closeFds(fds)
		return n, nil, fmt.Errorf("receive fds: more than %d descriptors sent", maxFds)
	}
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), fmt.Sprintf("received-fd-%d", i))
	}
	return n, files, nil
}

func closeFds(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// PeerCred returns the credentials of the process at the other end of c, as
// the kernel recorded them when it connected (SO_PEERCRED).
func PeerCred(c *net.UnixConn) (*unix.Ucred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, fmt.Errorf("peer credentials: %w", err)
	}
	if credErr != nil {
		return nil, fmt.Errorf("peer credentials: %w", credErr)
	}
	return cred, nil
}
