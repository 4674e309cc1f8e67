package launch

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Caller is the process an app is launched for when the launcher is not
// that process (the daemon, for an unprivileged `procgate run`): the app
// runs in the caller's namespaces, below its root, in its working directory
// and with its umask, never in the launcher's.
//
// What is entered, and how (Linux 5.8+ for setns with a pidfd):
//   - net, mnt, uts, ipc and cgroup: the shim enters them all at once with
//     setns(pidfd, ...) before anything of the app runs (guard.go,
//     enterCaller). A Go process can join a mount namespace only from a
//     thread that has its own fs_struct (unshare(CLONE_FS) first), which is
//     the thread the shim execs from.
//   - pid: a process cannot move itself into another pid namespace; setns
//     only decides where its children go. The launcher forks the shim from
//     a thread of its own that entered the caller's pid namespace that way,
//     so the shim, and the app, are born in it. That thread is discarded.
//   - user: not entered. The caller must be in the launcher's own user
//     namespace, or the launch is refused: a process in a user namespace
//     it created (a rootless container, unshare -U) controls the mounts of
//     its mount namespace, so it could put its own libraries under a pinned
//     binary (exe:) or its own file at the pinned path, and joining a user
//     namespace needs a single-threaded process besides.
//   - time: not entered (setns of a time namespace needs a single-threaded
//     process too); the app keeps the launcher's clocks.
//
// The caller is held by a pidfd taken from the socket (SO_PEERPIDFD,
// Linux 6.5+), so a pid the caller freed and another process took can never
// stand in for it; on older kernels from pidfd_open(pid) and a check that
// the process holds the other end of the connection. Whatever cannot be
// done refuses the launch: the app never runs in the launcher's namespaces
// instead.
type Caller struct {
	pid   int
	pidfd *os.File
	root  *os.File // O_PATH: the caller's root directory
	cwd   *os.File // O_PATH: the caller's working directory
	umask uint32
}

// callerNS are the namespaces the shim enters, in one setns(2).
const callerNS = unix.CLONE_NEWNET | unix.CLONE_NEWNS | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC | unix.CLONE_NEWCGROUP

// OpenCaller takes hold of the process at the other end of conn: pid and
// uid are its SO_PEERCRED ids, cwd the working directory it sent (opened by
// the caller itself, so that nothing is resolved as root on its behalf). It
// refuses a caller that is gone, not visible in this pid namespace, or in
// another user namespace. The Caller owns cwd from then on, even on error.
func OpenCaller(conn *net.UnixConn, pid int32, uid uint32, cwd *os.File) (_ *Caller, err error) {
	c := &Caller{pid: int(pid), cwd: cwd}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	if cwd == nil {
		return nil, errors.New("the caller sent no working directory")
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(cwd.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil, fmt.Errorf("the caller's working directory descriptor is not a directory (%v)", err)
	}
	if pid <= 0 {
		return nil, errors.New("the caller's process is not visible in the daemon's pid namespace: cannot enter its namespaces")
	}
	if c.pidfd, err = peerPidfd(conn, pid, uid); err != nil {
		return nil, err
	}
	// Linux 6.16+ hands out pidfds of processes that have exited.
	if err := c.alive(); err != nil {
		return nil, err
	}
	proc := "/proc/" + strconv.Itoa(c.pid)
	same, err := sameFile(proc+"/ns/user", "/proc/self/ns/user")
	if err != nil {
		return nil, fmt.Errorf("the caller's user namespace: %w", err)
	}
	if !same {
		return nil, errors.New("the caller runs in a user namespace of its own (a rootless container or unshare -U): apps are launched only for callers in the daemon's user namespace, whose mounts the user cannot change")
	}
	fd, err := unix.Open(proc+"/root", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("the caller's root directory: %w", err)
	}
	c.root = os.NewFile(uintptr(fd), "caller-root")
	if c.umask, err = umaskOf(proc + "/status"); err != nil {
		return nil, err
	}
	// What was read above from /proc/PID is the caller's only if the pid
	// still was its afterwards.
	if err := c.alive(); err != nil {
		return nil, err
	}
	return c, nil
}

// alive fails when the caller has exited.
func (c *Caller) alive() error {
	if err := unix.PidfdSendSignal(int(c.pidfd.Fd()), 0, nil, 0); err != nil {
		return fmt.Errorf("the caller (pid %d) is gone, its namespaces with it: %w", c.pid, err)
	}
	return nil
}

// Close releases the caller's descriptors.
func (c *Caller) Close() {
	for _, f := range []*os.File{c.pidfd, c.root, c.cwd} {
		if f != nil {
			f.Close()
		}
	}
}

// Pid is the caller's pid, as the launcher sees it.
func (c *Caller) Pid() int { return c.pid }

// peerPidfd returns a pidfd of the process that connected conn. On Linux
// 6.5+ the kernel hands it over (SO_PEERPIDFD). Before, pidfd_open(pid)
// may name a process that took the pid after the caller exited; that
// process is accepted only if it runs as uid and holds the other end of
// conn, which a process that merely reused the pid does not.
func peerPidfd(conn *net.UnixConn, pid int32, uid uint32) (*os.File, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("caller's pidfd: %w", err)
	}
	var fd int
	var gerr error
	if err := raw.Control(func(s uintptr) {
		fd, gerr = unix.GetsockoptInt(int(s), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
	}); err != nil {
		return nil, fmt.Errorf("caller's pidfd: %w", err)
	}
	switch {
	case gerr == nil:
		return os.NewFile(uintptr(fd), "caller-pidfd"), nil
	case !errors.Is(gerr, unix.ENOPROTOOPT):
		return nil, fmt.Errorf("the caller (pid %d) is gone, its namespaces with it: SO_PEERPIDFD: %w", pid, gerr)
	}
	fd, err = unix.PidfdOpen(int(pid), 0)
	if err != nil {
		return nil, fmt.Errorf("the caller (pid %d) is gone, its namespaces with it: pidfd_open: %w", pid, err)
	}
	f := os.NewFile(uintptr(fd), "caller-pidfd")
	if err := holdsPeer(conn, int(pid), uid); err != nil {
		f.Close()
		return nil, err
	}
	if err := unix.PidfdSendSignal(fd, 0, nil, 0); err != nil {
		f.Close()
		return nil, fmt.Errorf("the caller (pid %d) is gone: %w", pid, err)
	}
	return f, nil
}

// holdsPeer checks that pid runs as uid and has the socket at the other end
// of conn open (its inode from sock_diag's UNIX_DIAG_PEER).
func holdsPeer(conn *net.UnixConn, pid int, uid uint32) error {
	proc := "/proc/" + strconv.Itoa(pid)
	var st unix.Stat_t
	if err := unix.Stat(proc, &st); err != nil || st.Uid != uid {
		return fmt.Errorf("the caller (pid %d, uid %d) is gone", pid, uid)
	}
	raw, err := conn.SyscallConn()
	if err != nil {
		return fmt.Errorf("caller's socket: %w", err)
	}
	var serr error
	if err := raw.Control(func(s uintptr) { serr = unix.Fstat(int(s), &st) }); err != nil || serr != nil {
		return fmt.Errorf("caller's socket: %w", errors.Join(err, serr))
	}
	socks, err := netlink.UnixSocketDiagInfo()
	if err != nil {
		return fmt.Errorf("find the caller's end of the socket (sock_diag): %w", err)
	}
	var peer uint32
	for _, s := range socks {
		if uint64(s.DiagMsg.INode) == st.Ino && s.Peer != nil {
			peer = *s.Peer
		}
	}
	if peer == 0 {
		return errors.New("find the caller's end of the socket: not in sock_diag's list")
	}
	want := fmt.Sprintf("socket:[%d]", peer)
	ents, err := os.ReadDir(proc + "/fd")
	if err != nil {
		return fmt.Errorf("the caller's descriptors: %w", err)
	}
	for _, e := range ents {
		if l, _ := os.Readlink(proc + "/fd/" + e.Name()); l == want {
			return nil
		}
	}
	return fmt.Errorf("pid %d no longer holds the connection: the caller is gone", pid)
}

// sameFile: do a and b name the same inode (namespace files compare so)?
func sameFile(a, b string) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Stat(a, &sa); err != nil {
		return false, err
	}
	if err := unix.Stat(b, &sb); err != nil {
		return false, err
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}

// umaskOf reads the Umask: line of /proc/PID/status (Linux 4.7+).
func umaskOf(status string) (uint32, error) {
	f, err := os.Open(status)
	if err != nil {
		return 0, fmt.Errorf("the caller's umask: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Umask:"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32)
			if err != nil {
				return 0, fmt.Errorf("the caller's umask %q: %w", v, err)
			}
			return uint32(m), nil
		}
	}
	return 0, fmt.Errorf("the caller's umask: no Umask line in %s (Linux 4.7+)", status)
}
