package main

import (
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A minimal io_uring, with raw syscalls: enough to submit one operation (or
// a linked pair) and read its completions. io_uring runs connect and
// sendmsg from kernel context (inline, an io-wq worker, or the SQPOLL
// thread), which is why it is its own technique family: the hooks must see
// those tasks as the submitter.

// Opcodes and flags of include/uapi/linux/io_uring.h that are used here.
const (
	iorOpSendmsg     = 9
	iorOpLinkTimeout = 15
	iorOpConnect     = 16
	iorOpSend        = 26
	iorOpSocket      = 45 // 5.19
	iorOpSendZC      = 47 // 6.0
	iorOpSendmsgZC   = 48 // 6.1

	iosqeIOLink = 1 << 2
	iosqeAsync  = 1 << 4

	iorSetupSQPoll = 1 << 1

	iorEnterGetevents = 1 << 0
	iorEnterSQWakeup  = 1 << 1
	iorSQNeedWakeup   = 1 << 0

	iorFeatSingleMmap = 1 << 0
	iorCQEFMore       = 1 << 1

	iorOffSQRing = 0
	iorOffSQEs   = 0x10000000
)

type uringParams struct {
	SqEntries, CqEntries, Flags, SqThreadCPU, SqThreadIdle, Features, WqFd uint32
	Resv                                                                   [3]uint32
	SqOff                                                                  struct {
		Head, Tail, RingMask, RingEntries, Flags, Dropped, Array, Resv1 uint32
		UserAddr                                                        uint64
	}
	CqOff struct {
		Head, Tail, RingMask, RingEntries, Overflow, Cqes, Flags, Resv1 uint32
		UserAddr                                                        uint64
	}
}

type uringSQE struct {
	Opcode      uint8
	Flags       uint8
	Ioprio      uint16
	Fd          int32
	Off         uint64 // also addr2
	Addr        uint64
	Len         uint32
	OpFlags     uint32 // msg_flags, rw_flags, ...
	UserData    uint64
	BufIndex    uint16
	Personality uint16
	AddrLen     uint32 // splice_fd_in / file_index / addr_len (low 16 bits)
	Addr3       uint64
	_           uint64
}

type uringCQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

type uring struct {
	fd     int
	ring   []byte
	sqes   []byte
	p      uringParams
	sqpoll bool
	// keep holds what submitted entries point to until they complete.
	keep []any
}

func newURing(sqpoll bool) (*uring, error) {
	u := &uring{sqpoll: sqpoll}
	u.p.Flags = 0
	if sqpoll {
		u.p.Flags = iorSetupSQPoll
		u.p.SqThreadIdle = 2000
	}
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, 8, uintptr(unsafe.Pointer(&u.p)), 0)
	if errno != 0 {
		return nil, errno
	}
	u.fd = int(fd)
	if u.p.Features&iorFeatSingleMmap == 0 {
		unix.Close(u.fd)
		return nil, errors.New("io_uring without IORING_FEAT_SINGLE_MMAP (Linux < 5.4)")
	}
	size := max(u.p.SqOff.Array+u.p.SqEntries*4, u.p.CqOff.Cqes+u.p.CqEntries*uint32(unsafe.Sizeof(uringCQE{})))
	var err error
	if u.ring, err = unix.Mmap(u.fd, iorOffSQRing, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		unix.Close(u.fd)
		return nil, fmt.Errorf("mmap rings: %w", err)
	}
	if u.sqes, err = unix.Mmap(u.fd, iorOffSQEs, int(u.p.SqEntries)*int(unsafe.Sizeof(uringSQE{})), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		unix.Munmap(u.ring)
		unix.Close(u.fd)
		return nil, fmt.Errorf("mmap SQEs: %w", err)
	}
	return u, nil
}

func (u *uring) Close() {
	unix.Munmap(u.sqes)
	unix.Munmap(u.ring)
	unix.Close(u.fd)
	runtime.KeepAlive(u.keep)
}

func (u *uring) u32(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&u.ring[off])) }

// submit queues the entries (linked ones in order) and tells the kernel.
func (u *uring) submit(sqes ...uringSQE) error {
	tail := atomic.LoadUint32(u.u32(u.p.SqOff.Tail))
	mask := *u.u32(u.p.SqOff.RingMask)
	for _, s := range sqes {
		idx := tail & mask
		*(*uringSQE)(unsafe.Pointer(&u.sqes[uintptr(idx)*unsafe.Sizeof(uringSQE{})])) = s
		*u.u32(u.p.SqOff.Array + idx*4) = idx
		tail++
	}
	atomic.StoreUint32(u.u32(u.p.SqOff.Tail), tail)
	if u.sqpoll {
		if atomic.LoadUint32(u.u32(u.p.SqOff.Flags))&iorSQNeedWakeup != 0 {
			return u.enter(0, 0, iorEnterSQWakeup)
		}
		return nil
	}
	return u.enter(uint(len(sqes)), 0, 0)
}

func (u *uring) enter(toSubmit, minComplete uint, flags uintptr) error {
	for {
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(u.fd), uintptr(toSubmit), uintptr(minComplete), flags, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return errno
		}
		return nil
	}
}

// complete waits for the completion of userData, skipping others, and
// returns it; for zero-copy sends it waits for the final one (the
// notification) too and returns the first.
func (u *uring) complete(userData uint64) (uringCQE, error) {
	var first *uringCQE
	for {
		head := atomic.LoadUint32(u.u32(u.p.CqOff.Head))
		if head == atomic.LoadUint32(u.u32(u.p.CqOff.Tail)) {
			if err := u.enter(0, 1, iorEnterGetevents); err != nil {
				return uringCQE{}, err
			}
			continue
		}
		mask := *u.u32(u.p.CqOff.RingMask)
		c := *(*uringCQE)(unsafe.Pointer(&u.ring[u.p.CqOff.Cqes+(head&mask)*uint32(unsafe.Sizeof(uringCQE{}))]))
		atomic.StoreUint32(u.u32(u.p.CqOff.Head), head+1)
		if c.UserData != userData {
			continue
		}
		if first == nil {
			first = &c
		}
		if c.Flags&iorCQEFMore == 0 {
			return *first, nil
		}
	}
}

func (u *uring) ptr(b []byte) uint64 {
	u.keep = append(u.keep, b)
	return uint64(uintptr(unsafe.Pointer(&b[0])))
}

// timeoutSQE is a linked timeout for the entry before it: a connect whose
// SYN is dropped on the way would otherwise wait for the kernel's retries.
func (u *uring) timeoutSQE(d time.Duration) uringSQE {
	ts := new(unix.Timespec)
	*ts = unix.NsecToTimespec(d.Nanoseconds())
	u.keep = append(u.keep, ts)
	return uringSQE{Opcode: iorOpLinkTimeout, Fd: -1, Addr: uint64(uintptr(unsafe.Pointer(ts))), Len: 1, UserData: 99}
}

// cqeErr turns a completion's result into an error (nil for >= 0).
func cqeErr(c uringCQE) error {
	if c.Res < 0 {
		return unix.Errno(-c.Res)
	}
	return nil
}

// uringCase is one io_uring attempt.
type uringCase struct {
	sqpoll bool
	async  bool // IOSQE_ASYNC: run it from an io-wq worker
	op     int  // iorOpConnect, iorOpSendmsg, iorOpSend, iorOpSendZC, iorOpSendmsgZC
	socket bool // create the socket with IORING_OP_SOCKET too
}

// uringTry makes a TCP connection (op connect, then write(2) of the token)
// or sends a UDP datagram (the send ops) to the target through io_uring.
func (e *env) uringTry(c uringCase) attempt {
	udp := c.op != iorOpConnect
	dst, port, typ, proto := e.cfg.target4, e.cfg.tcpPort, unix.SOCK_STREAM, "tcp"
	if udp {
		port, typ, proto = e.cfg.udpPort, unix.SOCK_DGRAM, "udp"
	}
	a := attempt{Dest: destString(dst, port, proto)}
	u, err := newURing(c.sqpoll)
	if err != nil {
		return a.unavailable("io_uring_setup", err)
	}
	defer u.Close()
	var fd int
	if c.socket {
		if err := u.submit(uringSQE{Opcode: iorOpSocket, Fd: unix.AF_INET, Off: uint64(typ | unix.SOCK_CLOEXEC), UserData: 1}); err != nil {
			return a.failed("io_uring_enter (socket)", err)
		}
		cqe, err := u.complete(1)
		if err == nil {
			err = cqeErr(cqe)
		}
		if errors.Is(err, unix.EINVAL) {
			return a.unavailable("IORING_OP_SOCKET", err)
		}
		if err != nil {
			return a.failed("IORING_OP_SOCKET", err)
		}
		fd = int(cqe.Res)
	} else if fd, err = unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0); err != nil {
		return a.failed("socket", err)
	}
	defer unix.Close(fd)
	setTimeouts(fd, e.cfg.timeout)
	aimed := sockaddr(dst, port, 0)
	name := rawSockaddr(aimed)
	sqe := uringSQE{Opcode: uint8(c.op), Fd: int32(fd), UserData: 2}
	if c.async {
		sqe.Flags |= iosqeAsync
	}
	msg := append([]byte(nil), e.token...)
	stage := map[int]string{
		iorOpConnect: "IORING_OP_CONNECT", iorOpSendmsg: "IORING_OP_SENDMSG", iorOpSend: "IORING_OP_SEND with a destination",
		iorOpSendZC: "IORING_OP_SEND_ZC", iorOpSendmsgZC: "IORING_OP_SENDMSG_ZC",
	}[c.op]
	switch c.op {
	case iorOpConnect:
		sqe.Addr, sqe.Off = u.ptr(name), uint64(len(name))
	case iorOpSendmsg, iorOpSendmsgZC:
		iov := &unix.Iovec{Base: &msg[0]}
		iov.SetLen(len(msg))
		hdr := &unix.Msghdr{Name: &name[0], Namelen: uint32(len(name)), Iov: iov}
		hdr.SetIovlen(1)
		u.keep = append(u.keep, iov, hdr, name, msg)
		sqe.Addr, sqe.Len = uint64(uintptr(unsafe.Pointer(hdr))), 1
	case iorOpSend, iorOpSendZC:
		sqe.Addr, sqe.Len = u.ptr(msg), uint32(len(msg))
		sqe.Off, sqe.AddrLen = u.ptr(name), uint32(len(name))
	}
	if c.op == iorOpConnect {
		sqe.Flags |= iosqeIOLink
		err = u.submit(sqe, u.timeoutSQE(e.cfg.timeout))
	} else {
		err = u.submit(sqe)
	}
	if err != nil {
		return a.failed("io_uring_enter", err)
	}
	cqe, err := u.complete(2)
	if err == nil {
		err = cqeErr(cqe)
	}
	if c.op == iorOpConnect {
		a.noteFlow(fd, aimed)
	}
	if err != nil {
		// An opcode this kernel does not know, or a send that does not take
		// a destination here, is a missing path, not a denial.
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			return a.unavailable(stage, err)
		}
		return a.failed(stage, err)
	}
	if c.op == iorOpConnect {
		if _, err := unix.Write(fd, e.token); err != nil {
			return a.failed("write", err)
		}
	}
	return a
}
