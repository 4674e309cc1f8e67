package main

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/cgroups"
)

// runDir holds, per bench process, the bind-mounted namespace files and the
// private bpffs mount; nothing else the bench makes lives outside its own
// namespaces and cgroups.
const runDir = "/run/procgate-bench"

// undoStack runs cleanups in reverse order of registration, once.
type undoStack struct {
	mu  sync.Mutex
	fns []func() error
}

func (u *undoStack) push(fn func() error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.fns = append(u.fns, fn)
}

// run runs every cleanup registered so far, last first, and returns all
// their errors.
func (u *undoStack) run() error {
	u.mu.Lock()
	fns := u.fns
	u.fns = nil
	u.mu.Unlock()
	var errs []error
	for i := len(fns) - 1; i >= 0; i-- {
		errs = append(errs, fns[i]())
	}
	return errors.Join(errs...)
}

// host is what one bench run made on the machine: a cgroup subtree, a
// directory of namespace files, a private bpffs. Everything is removed by
// close, also after a failure or an interrupt.
type host struct {
	log     *slog.Logger
	mount   string // cgroup2 mount
	cgroup  string // <mount>/procgate-bench-<pid>
	dir     string // runDir/<pid>
	bpffs   string
	seq     int
	undo    undoStack
	closeMu sync.Mutex
}

func newHost(log *slog.Logger) (*host, error) {
	mount, err := cgroups.Mount()
	if err != nil {
		return nil, err
	}
	pid := strconv.Itoa(os.Getpid())
	h := &host{log: log, mount: mount, cgroup: filepath.Join(mount, "procgate-bench-"+pid), dir: filepath.Join(runDir, pid)}
	if err := os.Mkdir(h.cgroup, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", h.cgroup, err)
	}
	h.undo.push(func() error { return killAndRemove(h.cgroup) })
	if err := os.MkdirAll(h.dir, 0o700); err != nil {
		return nil, errors.Join(fmt.Errorf("create %s: %w", h.dir, err), h.close())
	}
	h.undo.push(func() error {
		if err := os.RemoveAll(h.dir); err != nil {
			return fmt.Errorf("remove %s: %w", h.dir, err)
		}
		_ = os.Remove(runDir) // only when no other bench run uses it
		return nil
	})
	h.bpffs = filepath.Join(h.dir, "bpffs")
	if err := os.Mkdir(h.bpffs, 0o700); err != nil {
		return nil, errors.Join(fmt.Errorf("create %s: %w", h.bpffs, err), h.close())
	}
	if err := unix.Mount("bpf", h.bpffs, "bpf", 0, "mode=0700"); err != nil {
		return nil, errors.Join(fmt.Errorf("mount bpffs on %s: %w", h.bpffs, err), h.close())
	}
	h.undo.push(func() error {
		if err := unix.Unmount(h.bpffs, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount bpffs %s: %w", h.bpffs, err)
		}
		return nil
	})
	return h, nil
}

// close removes everything the host made; safe to call more than once.
func (h *host) close() error {
	h.closeMu.Lock()
	defer h.closeMu.Unlock()
	return h.undo.run()
}

// killAndRemove kills every process in the subtree at dir (only the bench
// put processes there), waits for them to go, and removes the subtree.
func killAndRemove(dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0); err != nil {
		return fmt.Errorf("kill processes in %s: %w", dir, err)
	}
	// A guard against hanging, not a measurement.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		populated, err := cgroups.Populated(dir)
		if err != nil {
			return err
		}
		if !populated {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes in %s still alive after cgroup.kill", dir)
		}
	}
	return cgroups.RemoveTree(dir)
}

// mkCgroup creates the cgroup rel below the host's subtree (parents first).
func (h *host) mkCgroup(rel string) (string, error) {
	dir := filepath.Join(h.cgroup, rel)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	return dir, nil
}

// netnsGroup is a set of namespaces closed together.
type netnsGroup struct {
	h     *host
	paths []string
}

// newNetNS creates a network namespace with lo up, pinned on a file below
// the host's directory, and returns that file's path (usable with
// `nsenter --net=PATH`). The namespace ends when the group is closed and
// nothing else (a process, a socket) holds it.
func (g *netnsGroup) newNetNS(name string) (string, error) {
	g.h.seq++
	path := filepath.Join(g.h.dir, fmt.Sprintf("%s-%d", name, g.h.seq))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return "", fmt.Errorf("create netns file: %w", err)
	}
	f.Close()
	g.paths = append(g.paths, path)
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the thread ends in the new namespace, and the Go
		// runtime discards a thread whose locked goroutine exits.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare netns: %w", err)
			return
		}
		if err := unix.Mount("/proc/thread-self/ns/net", path, "", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind netns on %s: %w", path, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		return "", err
	}
	err = withHandle(path, func(nh *netlink.Handle) error { return linkUp(nh, "lo") })
	return path, err
}

func (g *netnsGroup) close() error {
	var errs []error
	for _, p := range g.paths {
		if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount netns %s: %w", p, err))
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	g.paths = nil
	return errors.Join(errs...)
}

// inNS runs fn on a locked OS thread moved into the namespace at path, and
// moves the thread back afterwards (so that a child forked there, whose
// parent-death signal is tied to that thread, outlives fn). Sockets fn opens
// and processes it starts belong to that namespace.
func inNS(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own netns: %w", err)
			return
		}
		defer home.Close()
		target, err := netns.GetFromPath(path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open netns %s: %w", path, err)
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns %s: %w", path, err)
			return
		}
		err = fn()
		if backErr := netns.Set(home); backErr != nil {
			// Exit locked: the runtime ends this thread.
			errc <- errors.Join(err, fmt.Errorf("return from netns %s: %w", path, backErr))
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	return <-errc
}

func withHandle(path string, fn func(*netlink.Handle) error) error {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	nh, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", path, err)
	}
	defer nh.Close()
	return fn(nh)
}

func linkUp(nh *netlink.Handle, name string) error {
	l, err := nh.LinkByName(name)
	if err == nil {
		err = nh.LinkSetUp(l)
	}
	if err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// localNS makes a namespace in which every bench destination is local, the
// one a phase runs its servers, clients and the real daemon in.
func (g *netnsGroup) localNS(name string) (string, error) {
	ns, err := g.newNetNS(name)
	if err != nil {
		return "", err
	}
	if err := anyIPLocal(ns, benchDestinations...); err != nil {
		return "", err
	}
	return ns, nil
}

// phaseDir makes the directory below the host's that holds a phase's
// policy, state and logs.
func (b *bench) phaseDir(name string) (string, error) {
	dir := filepath.Join(b.host.dir, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("make %s directory: %w", name, err)
	}
	return dir, nil
}

// anyIPLocal makes every address of prefixes local in the namespace (local
// routes on lo in table local): a connection to any of them is accepted by a
// wildcard listener there and never leaves.
func anyIPLocal(path string, prefixes ...netip.Prefix) error {
	return withHandle(path, func(nh *netlink.Handle) error {
		lo, err := nh.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("find lo: %w", err)
		}
		for _, p := range prefixes {
			r := &netlink.Route{LinkIndex: lo.Attrs().Index, Dst: ipNet(p), Type: unix.RTN_LOCAL,
				Table: unix.RT_TABLE_LOCAL, Scope: netlink.SCOPE_HOST}
			if err := nh.RouteAdd(r); err != nil {
				return fmt.Errorf("add route local %s dev lo in %s: %w", p, path, err)
			}
		}
		return nil
	})
}

// vethPair links namespace a (address aAddr) to b (bAddr), both /24, made
// from inside a so the links never exist in the bench's own namespace. The
// pair goes with the namespaces.
func vethPair(a, b string, aAddr, bAddr netip.Prefix) error {
	return vethNamed(a, "veth0", b, "veth0", aAddr, bAddr)
}

// vethNamed is vethPair with the links' names (a router has several).
func vethNamed(a, aName, b, bName string, aAddr, bAddr netip.Prefix) error {
	peer, err := netns.GetFromPath(b)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", b, err)
	}
	defer peer.Close()
	err = withHandle(a, func(nh *netlink.Handle) error {
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: aName}, PeerName: bName, PeerNamespace: netlink.NsFd(int(peer))}
		if err := nh.LinkAdd(v); err != nil {
			return fmt.Errorf("add veth %s/%s: %w", aName, bName, err)
		}
		return addrUp(nh, aName, aAddr)
	})
	if err != nil {
		return err
	}
	return withHandle(b, func(nh *netlink.Handle) error { return addrUp(nh, bName, bAddr) })
}

func addrUp(nh *netlink.Handle, name string, addr netip.Prefix) error {
	l, err := nh.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find %s: %w", name, err)
	}
	if err := nh.AddrAdd(l, &netlink.Addr{IPNet: ipNet(addr)}); err != nil {
		return fmt.Errorf("add %s to %s: %w", addr, name, err)
	}
	return linkUp(nh, name)
}

// routeVia routes prefixes via gw in the namespace at path.
func routeVia(path string, gw netip.Addr, prefixes ...netip.Prefix) error {
	return withHandle(path, func(nh *netlink.Handle) error {
		for _, p := range prefixes {
			if err := nh.RouteAdd(&netlink.Route{Dst: ipNet(p), Gw: gw.AsSlice()}); err != nil {
				return fmt.Errorf("add route %s via %s: %w", p, gw, err)
			}
		}
		return nil
	})
}

// nsRun runs name with args inside the network namespace at path (nsenter
// keeps the mount namespace, so /sys/fs/cgroup stays visible to nft), with
// input on stdin. It returns the command's resource usage.
func nsRun(path string, input []byte, name string, args ...string) (*syscall.Rusage, error) {
	cmd := exec.Command("nsenter", append([]string{"--net=" + path, name}, args...)...)
	cmd.Stdin = bytes.NewReader(input)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		msg := out.String()
		if len(msg) > 2000 {
			msg = msg[:2000] + "..."
		}
		return nil, fmt.Errorf("%s %v in %s: %w: %s", name, args, path, err, msg)
	}
	ru, _ := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	return ru, nil
}

// writeSysctl writes a /proc/sys/net setting inside the namespace at path.
func writeSysctl(path, key, value string) error {
	return inNS(path, func() error {
		if err := os.WriteFile("/proc/sys/"+key, []byte(value), 0); err != nil {
			return fmt.Errorf("sysctl %s in %s: %w", key, path, err)
		}
		return nil
	})
}
