//go:build linux && amd64

package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// ptraceInject runs socket(), connect() and write() of the token inside a
// thread of process pid: the connection is the victim's, decided by its
// cgroup and its grants. The thread is one stopped in a system call, so
// that the instruction before its program counter is a `syscall` we can
// execute again with other registers; its registers are restored and the
// interrupted call restarts as the kernel would after a signal. Other
// threads run on untouched.
func ptraceInject(a attempt, pid int, dst unix.Sockaddr, token []byte, timeout time.Duration) attempt {
	// Every ptrace request must come from the thread that attached.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid, saved, err := seizeThreadInSyscall(pid)
	if err != nil {
		return a.failed("ptrace(PTRACE_SEIZE) a thread of the holder", err)
	}
	defer func() {
		_ = unix.PtraceSetRegs(tid, &saved)
		_ = unix.PtraceDetach(tid)
	}()
	inj := injector{tid: tid, saved: saved}

	mem, err := inj.call(unix.SYS_MMAP, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, ^uint64(0), 0)
	if err != nil {
		return a.failed("injected mmap", err)
	}
	defer inj.call(unix.SYS_MUNMAP, mem, 4096)
	name := rawSockaddr(dst)
	const pollAt, tokenAt = 128, 256
	if _, err := unix.PtracePokeData(tid, uintptr(mem), name); err != nil {
		return a.failed("PTRACE_POKEDATA", err)
	}
	if _, err := unix.PtracePokeData(tid, uintptr(mem+tokenAt), token); err != nil {
		return a.failed("PTRACE_POKEDATA", err)
	}
	family := uint64(unix.AF_INET)
	if _, ok := dst.(*unix.SockaddrInet6); ok {
		family = unix.AF_INET6
	}
	fd, err := inj.call(unix.SYS_SOCKET, family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return a.failed("injected socket", err)
	}
	defer inj.call(unix.SYS_CLOSE, fd)
	_, err = inj.call(unix.SYS_CONNECT, fd, mem, uint64(len(name)))
	if errors.Is(err, unix.EINPROGRESS) {
		pfd := make([]byte, 8)
		binary.NativeEndian.PutUint32(pfd[0:], uint32(fd))
		binary.NativeEndian.PutUint16(pfd[4:], unix.POLLOUT)
		if _, err := unix.PtracePokeData(tid, uintptr(mem+pollAt), pfd); err != nil {
			return a.failed("PTRACE_POKEDATA", err)
		}
		var n uint64
		n, err = inj.call(unix.SYS_POLL, mem+pollAt, 1, uint64(timeout.Milliseconds()))
		if err == nil && n == 0 {
			err = unix.ETIMEDOUT
		}
	}
	if err != nil {
		return a.failed("injected connect", err)
	}
	if _, err := inj.call(unix.SYS_WRITE, fd, mem+tokenAt, uint64(len(token))); err != nil {
		return a.failed("injected write", err)
	}
	a.Detail = fmt.Sprintf("ran socket, connect, write in thread %d of pid %d", tid, pid)
	return a
}

// seizeThreadInSyscall attaches to the threads of pid one by one until one
// is stopped inside a system call, and returns it with its registers. The
// others are released again. A thread waiting in futex(2) is preferred (an
// idle Go thread): its wait restarts plainly, where a sleep would restart
// through the restart block.
func seizeThreadInSyscall(pid int) (int, unix.PtraceRegs, error) {
	tasks, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		return 0, unix.PtraceRegs{}, err
	}
	for _, want := range []func(nr uint64) bool{
		func(nr uint64) bool { return nr == unix.SYS_FUTEX },
		func(uint64) bool { return true },
	} {
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			regs, ok, err := seizeIfInSyscall(tid, want)
			if err != nil {
				return 0, unix.PtraceRegs{}, err
			}
			if ok {
				return tid, regs, nil
			}
		}
	}
	return 0, unix.PtraceRegs{}, errors.New("no thread stopped in a system call")
}

// seizeIfInSyscall attaches to tid and stops it; if it stopped inside a
// system call that want accepts, it stays attached and its registers are
// returned, else it is released.
func seizeIfInSyscall(tid int, want func(nr uint64) bool) (unix.PtraceRegs, bool, error) {
	var regs unix.PtraceRegs
	if err := unix.PtraceSeize(tid); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return regs, false, nil // the thread is gone
		}
		return regs, false, err
	}
	err := unix.PtraceInterrupt(tid)
	if err == nil {
		err = waitStop(tid)
	}
	if err == nil {
		err = unix.PtraceGetRegs(tid, &regs)
	}
	if err != nil {
		_ = unix.PtraceDetach(tid)
		return regs, false, err
	}
	insn := make([]byte, 2)
	_, perr := unix.PtracePeekText(tid, uintptr(regs.Rip-2), insn)
	if perr == nil && int64(regs.Orig_rax) >= 0 && want(regs.Orig_rax) && insn[0] == 0x0f && insn[1] == 0x05 {
		return regs, true, nil
	}
	_ = unix.PtraceDetach(tid)
	return regs, false, nil
}

// waitStop waits for the stop PTRACE_INTERRUPT asked for. A signal that
// stops the thread first is delivered, and the wait goes on.
func waitStop(tid int) error {
	for {
		var ws unix.WaitStatus
		if _, err := unix.Wait4(tid, &ws, unix.WALL, nil); err != nil {
			return err
		}
		if !ws.Stopped() {
			return fmt.Errorf("thread %d did not stop: status %#x", tid, ws)
		}
		if ws.StopSignal() == unix.SIGTRAP && ws.TrapCause() == unix.PTRACE_EVENT_STOP {
			return nil
		}
		if err := unix.PtraceCont(tid, int(ws.StopSignal())); err != nil {
			return err
		}
	}
}

type injector struct {
	tid   int
	saved unix.PtraceRegs
}

// call executes one system call in the thread: the registers of the saved
// state, the program counter on the `syscall` instruction, the number and
// arguments set; one single step; the result read back.
func (in injector) call(nr uint64, args ...uint64) (uint64, error) {
	r := in.saved
	r.Rip -= 2
	r.Rax = nr
	r.Orig_rax = ^uint64(0) // no syscall to restart on the way back to user mode
	regs := []*uint64{&r.Rdi, &r.Rsi, &r.Rdx, &r.R10, &r.R8, &r.R9}
	for i, v := range args {
		*regs[i] = v
	}
	if err := unix.PtraceSetRegs(in.tid, &r); err != nil {
		return 0, err
	}
	for {
		if err := unix.PtraceSingleStep(in.tid); err != nil {
			return 0, err
		}
		var ws unix.WaitStatus
		if _, err := unix.Wait4(in.tid, &ws, unix.WALL, nil); err != nil {
			return 0, err
		}
		if !ws.Stopped() {
			return 0, fmt.Errorf("thread %d: status %#x during injection", in.tid, ws)
		}
		if ws.StopSignal() == unix.SIGTRAP && ws.TrapCause() <= 0 {
			break // the single step
		}
		// Another stop came first (the Go runtime's preemption signal, a
		// late interrupt stop): suppress it and step; the runtime asks again.
	}
	var out unix.PtraceRegs
	if err := unix.PtraceGetRegs(in.tid, &out); err != nil {
		return 0, err
	}
	if res := int64(out.Rax); res < 0 && res > -4096 {
		return 0, unix.Errno(-res)
	}
	return out.Rax, nil
}
