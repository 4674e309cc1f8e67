package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/dnsproxy"
	"github.com/procgate/procgate/ruleset"
)

// DNS proxies in other network namespaces than the daemon's: a container
// principal's own namespace, or a shell's that `procgate run` started an
// app from. The kernel redirects an app's queries only where a proxy of
// the daemon listens (dnsredirect.c, dns_proxies); elsewhere the query goes
// on to its resolver and an audit event (dns-unobserved) names the process.
// From that event the daemon opens the process's namespace, starts a proxy
// there (its sockets made by a thread that entered it) and registers it
// under the namespace's cookie: from then on the namespace's queries are
// learned as the daemon's own. That first query's answer grants nothing;
// the app's next query (a retry, or the next name) does.
//
// The proxy's sockets hold the namespace: it is closed once no process is
// left in it (followed by pidfd, the last process found by a walk of
// /proc).

// maxNetnsProxies bounds the proxies in other namespaces (each holds an OS
// thread and four sockets): a user may make network namespaces of its own
// (unshare -rn) as fast as it likes. Past it, new namespaces' queries stay
// unobserved.
const maxNetnsProxies = 256

// nsThread runs functions on one OS thread that stays in one network
// namespace until stop: sockets made there are the namespace's.
type nsThread struct{ reqs chan func() }

func startNSThread(ns *os.File) (*nsThread, error) {
	t := &nsThread{reqs: make(chan func())}
	entered := make(chan error, 1)
	go func() {
		// Never unlocked: the thread ends with the goroutine, in the
		// namespace, and no other goroutine ever runs on it.
		runtime.LockOSThread()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			entered <- err
			return
		}
		entered <- nil
		for f := range t.reqs {
			f()
		}
	}()
	if err := <-entered; err != nil {
		return nil, fmt.Errorf("enter network namespace %s: %w", ns.Name(), err)
	}
	return t, nil
}

func (t *nsThread) do(f func()) {
	done := make(chan struct{})
	t.reqs <- func() { defer close(done); f() }
	<-done
}

// stop ends the thread; no do may follow.
func (t *nsThread) stop() { close(t.reqs) }

// dial makes a socket in the thread's namespace and connects it to the
// resolver (UDP and TCP), off the thread: a slow TCP handshake does not
// hold the namespace's other queries.
func (t *nsThread) dial(network string, resolver netip.AddrPort) (net.Conn, error) {
	typ := unix.SOCK_DGRAM
	if network == "tcp" {
		typ = unix.SOCK_STREAM
	}
	family := unix.AF_INET6
	var sa unix.Sockaddr = &unix.SockaddrInet6{Port: int(resolver.Port()), Addr: resolver.Addr().As16()}
	if resolver.Addr().Is4() {
		family = unix.AF_INET
		sa = &unix.SockaddrInet4{Port: int(resolver.Port()), Addr: resolver.Addr().As4()}
	}
	var fd int
	var err error
	t.do(func() { fd, err = unix.Socket(family, typ|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0) })
	if err != nil {
		return nil, fmt.Errorf("socket for %s: %w", resolver, err)
	}
	f := os.NewFile(uintptr(fd), "dns-"+network)
	defer f.Close() // FileConn dups it
	if err := unix.Connect(fd, sa); err != nil && !errors.Is(err, unix.EINPROGRESS) {
		return nil, fmt.Errorf("connect to %s: %w", resolver, err)
	}
	// A TCP handshake still under way: the first write waits for it,
	// within the exchange's deadline, and fails if it is refused.
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", resolver, err)
	}
	return c, nil
}

// nsProxy is the proxy of one network namespace.
type nsProxy struct {
	ns     *os.File
	thread *nsThread
	proxy  *dnsproxy.Proxy
	cancel context.CancelFunc
	done   chan struct{}
}

// followNetns starts proxies in the namespaces of processes whose queries
// went unobserved, until the returned stop. own is the daemon's namespace.
func (d *Daemon) followNetns(ctx context.Context, own uint64) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	recs, unsubscribe := d.auditor.Subscribe(256)
	var mu sync.Mutex // guards byIno
	byIno := map[[2]uint64]*nsProxy{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case r, ok := <-recs:
				if !ok {
					return
				}
				if r.Reason != ruleset.ReasonDNSUnobserved.String() || r.Kind != "" {
					continue
				}
				id, ns, err := netnsOf(int(r.PID))
				if err != nil {
					continue // gone already
				}
				mu.Lock()
				_, known := byIno[id]
				full := len(byIno) >= maxNetnsProxies
				mu.Unlock()
				if known || full {
					if full && !known {
						d.log.Warn("no DNS proxy in an app's network namespace: as many run as allowed; its name grants stay empty", "pid", r.PID, "app", r.App, "max", maxNetnsProxies)
					}
					ns.Close()
					continue
				}
				np, err := d.startNetnsProxy(ctx, ns, own, int(r.PID))
				if err != nil {
					d.log.Warn("no DNS proxy in an app's network namespace: its name grants stay empty", "pid", r.PID, "app", r.App, "err", err)
					ns.Close()
					continue
				}
				if np == nil {
					ns.Close()
					continue
				}
				mu.Lock()
				byIno[id] = np
				mu.Unlock()
				go func() {
					<-np.done
					mu.Lock()
					delete(byIno, id)
					mu.Unlock()
				}()
			}
		}
	}()
	return func() {
		cancel()
		unsubscribe()
		<-done
		mu.Lock()
		nps := make([]*nsProxy, 0, len(byIno))
		for _, np := range byIno {
			nps = append(nps, np)
		}
		mu.Unlock()
		for _, np := range nps {
			<-np.done
		}
	}
}

// netnsOf opens the network namespace of process pid, and names it by
// device and inode.
func netnsOf(pid int) ([2]uint64, *os.File, error) {
	ns, err := os.Open(filepath.Join("/proc", strconv.Itoa(pid), "ns/net"))
	if err != nil {
		return [2]uint64{}, nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(ns.Fd()), &st); err != nil {
		ns.Close()
		return [2]uint64{}, nil, err
	}
	return [2]uint64{st.Dev, st.Ino}, ns, nil
}

// startNetnsProxy starts a proxy in ns (pid's), registers it, and closes it
// when the namespace has no process left or ctx ends. nil, nil: ns is the
// daemon's own.
func (d *Daemon) startNetnsProxy(ctx context.Context, ns *os.File, own uint64, pid int) (*nsProxy, error) {
	th, err := startNSThread(ns)
	if err != nil {
		return nil, err
	}
	var cookie uint64
	th.do(func() { cookie, err = bpf.NetnsCookie() })
	if err != nil || cookie == own {
		th.stop()
		return nil, err
	}
	var p *dnsproxy.Proxy
	th.do(func() { p, err = dnsproxy.Listen(d.proxyConfig(th)) })
	if err != nil {
		th.stop()
		return nil, err
	}
	if err := d.enf.ServeDNS(p.Port, cookie); err != nil {
		p.Close()
		th.stop()
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	np := &nsProxy{ns: ns, thread: th, proxy: p, cancel: cancel, done: make(chan struct{})}
	d.log.Info("DNS proxy started in an app's network namespace", "netns_cookie", cookie, "pid", pid, "port", p.Port)
	go p.Serve(ctx)
	go func() {
		defer close(np.done)
		d.whileNetnsLives(ctx, ns, pid)
		cancel()
		if err := d.enf.ServeDNS(0, cookie); err != nil {
			d.log.Warn("turning the DNS redirect off in a network namespace", "netns_cookie", cookie, "err", err)
		}
		p.Close()
		th.stop()
		ns.Close()
		d.log.Info("DNS proxy of a network namespace stopped", "netns_cookie", cookie)
	}()
	return np, nil
}

// whileNetnsLives returns once no process is left in ns, or ctx ends: it
// waits for pid's exit (pidfd), then looks for another process of ns.
func (d *Daemon) whileNetnsLives(ctx context.Context, ns *os.File, pid int) {
	var st unix.Stat_t
	if err := unix.Fstat(int(ns.Fd()), &st); err != nil {
		return
	}
	want := [2]uint64{st.Dev, st.Ino}
	for pid > 0 {
		fd, err := unix.PidfdOpen(pid, 0)
		if err == nil {
			waitExit(ctx, fd)
			unix.Close(fd)
		}
		if ctx.Err() != nil {
			return
		}
		pid = processIn(want)
	}
}

// waitExit waits until the process of pidfd fd exits or ctx ends.
func waitExit(ctx context.Context, fd int) {
	for ctx.Err() == nil {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, int(time.Second.Milliseconds()))
		if err != nil && !errors.Is(err, unix.EINTR) {
			return
		}
		if n > 0 {
			return
		}
	}
}

// processIn is a process in the network namespace want, 0 if none.
func processIn(want [2]uint64) int {
	dir, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	for _, e := range dir {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/proc", e.Name(), "ns/net"), &st) == nil && st.Dev == want[0] && st.Ino == want[1] {
			return pid
		}
	}
	return 0
}
