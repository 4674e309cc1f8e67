package nstest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/internal/nsthread"
)

// nsDir holds the bind mounts that keep test namespaces alive, beside (not
// in) /run/netns, so that `ip netns` tooling of the host never sees them.
const nsDir = "/run/procgate-test"

// NetNS creates a network namespace with lo up and returns the path of a file
// that names it, usable with `nsenter --net=PATH`, netns.GetFromPath and
// InNS. The calling thread never changes namespace. On cleanup the file is
// unmounted and removed; the namespace ends when nothing else holds it.
func NetNS(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	removeStaleOnce()
	dir := filepath.Join(nsDir, uniqueName(""))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("create netns dir: %v", err)
	}
	path := filepath.Join(dir, "net")
	t.Cleanup(func() {
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			t.Errorf("unmount test netns %s: %v", path, err)
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove test netns %s: %v", dir, err)
		}
		// Other test processes may still use nsDir; only an empty one goes.
		_ = os.Remove(nsDir)
	})
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		t.Fatalf("create netns file: %v", err)
	}
	f.Close()

	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the thread ends in the new namespace, and a locked
		// thread whose goroutine exits is discarded by the Go runtime instead of
		// running other goroutines there.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(self, path, "", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind %s to %s: %w", self, path, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		t.Fatalf("create netns: %v", err)
	}

	h := handle(t, path)
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("set lo up in %s: %v", path, err)
	}
	return path
}

// handle returns a netlink handle whose sockets live in the namespace at
// nsPath; the caller closes it.
func handle(t testing.TB, nsPath string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		t.Fatalf("open netns %s: %v", nsPath, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatalf("netlink in netns %s: %v", nsPath, err)
	}
	return h
}

// InNS runs fn on an OS thread that is in the network namespace at nsPath
// and returns fn's error. Sockets fn opens and processes it starts with
// os/exec belong to that namespace; goroutines fn starts do not. The thread
// is discarded afterwards, so no goroutine ever runs in the wrong namespace.
// Call it from the test's goroutine: it fails t if it cannot enter nsPath.
func InNS(t testing.TB, nsPath string, fn func() error) error {
	t.Helper()
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		t.Fatalf("open netns %s: %v", nsPath, err)
	}
	defer ns.Close()
	type result struct{ enter, fn error }
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked, as in NetNS
		if err := netns.Set(ns); err != nil {
			done <- result{enter: err}
			return
		}
		done <- result{fn: fn()}
	}()
	r := <-done
	if r.enter != nil {
		t.Fatalf("enter netns %s: %v", nsPath, r.enter)
	}
	return r.fn
}

// Thread is a thread that stays in the network namespace at nsPath for the
// whole test, for what InNS's thread, which ends after each call, cannot
// do: a child started from it keeps its Pdeathsig parent. Stopped on
// cleanup.
func Thread(t testing.TB, nsPath string) *nsthread.Thread {
	t.Helper()
	ns, err := os.Open(nsPath)
	if err != nil {
		t.Fatalf("open netns %s: %v", nsPath, err)
	}
	defer ns.Close()
	th, err := nsthread.Start(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(th.Stop)
	return th
}

// Veth creates a veth pair, nameA in nsA and nameB in nsB, both up. It is
// made from inside nsA, so the links never exist in the root namespace. On
// cleanup the pair is deleted.
func Veth(t testing.TB, nsA, nameA, nsB, nameB string) {
	t.Helper()
	peer, err := netns.GetFromPath(nsB)
	if err != nil {
		t.Fatalf("open netns %s: %v", nsB, err)
	}
	defer peer.Close()
	ha := handle(t, nsA)
	defer ha.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: nameA},
		PeerName:      nameB,
		PeerNamespace: netlink.NsFd(int(peer)),
	}
	if err := ha.LinkAdd(veth); err != nil {
		t.Fatalf("create veth %s/%s: %v", nameA, nameB, err)
	}
	t.Cleanup(func() {
		h := handle(t, nsA)
		defer h.Close()
		l, err := h.LinkByName(nameA)
		var notFound netlink.LinkNotFoundError
		if errors.As(err, &notFound) {
			return
		}
		if err == nil {
			err = h.LinkDel(l)
		}
		if err != nil {
			t.Errorf("delete veth %s: %v", nameA, err)
		}
	})
	linkUp(t, nsA, nameA)
	linkUp(t, nsB, nameB)
}

func linkUp(t testing.TB, nsPath, name string) {
	t.Helper()
	h := handle(t, nsPath)
	defer h.Close()
	l, err := h.LinkByName(name)
	if err == nil {
		err = h.LinkSetUp(l)
	}
	if err != nil {
		t.Fatalf("set %s up in %s: %v", name, nsPath, err)
	}
}

// AnyIPLoopback makes every IPv4 and IPv6 address local inside nsPath
// (`local 0.0.0.0/0 dev lo` and `local ::/0 dev lo` in table local), so that
// a test can connect to any address and the traffic never leaves the
// namespace. The routes go with the namespace.
func AnyIPLoopback(t testing.TB, nsPath string) {
	t.Helper()
	h := handle(t, nsPath)
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatalf("find lo in %s: %v", nsPath, err)
	}
	for _, dst := range []*net.IPNet{
		{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
		{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)},
	} {
		r := &netlink.Route{
			LinkIndex: lo.Attrs().Index,
			Dst:       dst,
			Type:      unix.RTN_LOCAL,
			Table:     unix.RT_TABLE_LOCAL,
			Scope:     netlink.SCOPE_HOST,
		}
		if err := h.RouteAdd(r); err != nil {
			t.Fatalf("add route local %s dev lo in %s: %v", dst, nsPath, err)
		}
	}
}

// BPFFS mounts a private bpffs instance on a temporary directory and returns
// it; pins made there vanish with the unmount on cleanup.
func BPFFS(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs on %s: %v", dir, err)
	}
	// Registered after TempDir's cleanup, so it runs before the removal.
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount bpffs %s: %v", dir, err)
		}
	})
	return dir
}
