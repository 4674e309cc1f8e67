package daemon

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/dnsproxy"
	"github.com/procgate/procgate/internal/nsthread"
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
// the app's next query (a retry, or the next name) does. An app with name
// grants that the daemon launches in its caller's namespace gets the proxy
// before it starts; the processes in a unit's, cgroup's or container's
// cgroups get theirs when the daemon binds or looks at those cgroups
// (proxyMatchedNetns).
//
// The proxy's sockets hold the namespace: it is closed once no thread is
// left in it (a walk of /proc every reapEvery).

// maxNetnsProxies bounds the proxies in other namespaces (each holds an OS
// thread and four sockets): a user may make network namespaces of its own
// (unshare -rn) as fast as it likes. Past it, new namespaces' queries stay
// unobserved.
const maxNetnsProxies = 256

// dialIn makes a socket in t's namespace and connects it to the resolver
// (UDP and TCP), off the thread: a slow TCP handshake does not hold the
// namespace's other queries.
func dialIn(t *nsthread.Thread, network string, resolver netip.AddrPort) (net.Conn, error) {
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
	t.Do(func() { fd, err = unix.Socket(family, typ|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0) })
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
	thread *nsthread.Thread
	proxy  *dnsproxy.Proxy
	cancel context.CancelFunc
	done   chan struct{}
}

// netnsProxies are the running proxies in other namespaces.
type netnsProxies struct {
	d      *Daemon
	ctx    context.Context
	own    uint64 // the daemon's namespace: its cookie and its id
	ownIno [2]uint64
	// start serializes ensure: one proxy per namespace. mu guards byIno,
	// which the proxies' own goroutines edit when they stop.
	start sync.Mutex
	mu    sync.Mutex
	byIno map[[2]uint64]*nsProxy
}

// followNetns starts proxies in the namespaces of processes whose queries
// went unobserved, until the returned stop. own is the daemon's namespace.
// d.netns serves the launcher (ensure) meanwhile.
func (d *Daemon) followNetns(ctx context.Context, own uint64) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	n := &netnsProxies{d: d, ctx: ctx, own: own, byIno: map[[2]uint64]*nsProxy{}}
	if id, ns, err := netnsOf("/proc/self/ns/net"); err == nil {
		n.ownIno = id
		ns.Close()
	}
	d.netns.Store(n)
	recs, unsubscribe := d.auditor.Subscribe(256)
	reaped := make(chan struct{})
	go func() {
		defer close(reaped)
		n.reap()
	}()
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
				if r.Reason == ruleset.ReasonDNSUnobserved.String() && r.Kind == "" {
					n.ensure(int(r.PID), int(r.TID), r.App)
				}
			}
		}
	}()
	return func() {
		d.netns.Store(nil)
		cancel()
		unsubscribe()
		<-done
		<-reaped
		n.start.Lock() // no ensure under way
		defer n.start.Unlock()
		n.mu.Lock()
		nps := make([]*nsProxy, 0, len(n.byIno))
		for _, np := range n.byIno {
			nps = append(nps, np)
		}
		n.mu.Unlock()
		for _, np := range nps {
			<-np.done
		}
	}
}

// ensure starts a proxy in the network namespace of thread tid of process
// pid (tid 0: its main thread), an app's, unless one runs there, it is the
// daemon's own, or the thread is gone. The thread, not the process: a
// thread may have entered a namespace of its own (setns).
func (n *netnsProxies) ensure(pid, tid int, app string) {
	n.start.Lock()
	defer n.start.Unlock()
	if n.ctx.Err() != nil {
		return
	}
	if tid == 0 {
		tid = pid
	}
	id, ns, err := netnsOf(filepath.Join("/proc", strconv.Itoa(pid), "task", strconv.Itoa(tid), "ns/net"))
	if err != nil {
		return // gone already
	}
	n.mu.Lock()
	_, known := n.byIno[id]
	full := len(n.byIno) >= maxNetnsProxies
	n.mu.Unlock()
	var np *nsProxy
	switch {
	case id == n.ownIno || known: // the daemon's own, or served already
	case full:
		n.d.log.Warn("no DNS proxy in an app's network namespace: as many run as allowed; its name grants stay empty", "pid", pid, "app", app, "max", maxNetnsProxies)
	default:
		np, err = n.d.startNetnsProxy(n.ctx, ns, n.own, pid, id)
		if err != nil {
			n.d.log.Warn("no DNS proxy in an app's network namespace: its name grants stay empty", "pid", pid, "app", app, "err", err)
		}
	}
	if np == nil {
		ns.Close()
		return
	}
	n.mu.Lock()
	n.byIno[id] = np
	n.mu.Unlock()
	go func() {
		<-np.done
		n.mu.Lock()
		delete(n.byIno, id)
		n.mu.Unlock()
	}()
}

// proxyNetnsOf starts a DNS proxy in the network namespace of process pid
// before an app with name grants is launched there (the caller's), so that
// its first query is learned too. A no-op without the DNS proxy.
func (d *Daemon) proxyNetnsOf(pid int, app *ruleset.App) {
	n := d.netns.Load()
	if n == nil || !app.HasNames() {
		return
	}
	n.ensure(pid, 0, app.Name)
}

// proxyMatchedNetns starts a DNS proxy in the network namespace of each
// process now in the cgroups (and their descendants) of eff's unit, cgroup
// and container apps with name grants, where none runs yet: a process the
// daemon did not launch then has its queries learned from the first one
// after the daemon saw it, not only from its second. Called before the
// kernel binds eff (a container's start event, a reload), and at each
// poll. A process's namespace is its main thread's (/proc/PID/ns/net), as
// a runtime or systemd makes it before the exec; a thread that enters
// another one itself is seen by its first query's dns-unobserved event.
// Reconciler only.
func (d *Daemon) proxyMatchedNetns(eff *ruleset.Ruleset) {
	n := d.netns.Load()
	if n == nil || eff == nil {
		return
	}
	seen := map[[2]uint64]bool{}
	for i := range eff.Apps {
		app := &eff.Apps[i]
		m := app.Match
		if m == nil || m.Path == "" || !app.HasNames() ||
			(m.Kind != ruleset.MatchUnit && m.Kind != ruleset.MatchCgroup && m.Kind != ruleset.MatchContainer) {
			continue
		}
		// A glob matches as path.Match does (ruleset.MatchesCgroup).
		dirs, err := filepath.Glob(filepath.Join(d.cfg.CgroupRoot, m.Path))
		if err != nil {
			continue
		}
		for _, dir := range dirs {
			_ = filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
				if err != nil || !e.IsDir() {
					return nil // a cgroup removed meanwhile
				}
				pids, _ := cgroups.Procs(p) // none if it is gone
				for _, pid := range pids {
					var st unix.Stat_t
					if unix.Stat(filepath.Join("/proc", strconv.Itoa(pid), "ns/net"), &st) != nil || seen[[2]uint64{st.Dev, st.Ino}] {
						continue
					}
					seen[[2]uint64{st.Dev, st.Ino}] = true
					n.ensure(pid, 0, app.Name)
				}
				return nil
			})
		}
	}
}

// netnsOf opens the network namespace at path (/proc/.../ns/net), and
// names it by device and inode.
func netnsOf(path string) ([2]uint64, *os.File, error) {
	ns, err := os.Open(path)
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

// startNetnsProxy starts a proxy in ns (pid's, named id), registers it,
// and closes it when ctx ends or its stop is closed (reap). nil, nil: ns
// is the daemon's own.
func (d *Daemon) startNetnsProxy(ctx context.Context, ns *os.File, own uint64, pid int, id [2]uint64) (*nsProxy, error) {
	th, err := nsthread.Start(ns)
	if err != nil {
		return nil, err
	}
	var cookie uint64
	th.Do(func() { cookie, err = bpf.NetnsCookie() })
	if err != nil || cookie == own {
		th.Stop()
		return nil, err
	}
	var p *dnsproxy.Proxy
	th.Do(func() { p, err = dnsproxy.Listen(d.proxyConfig(th)) })
	if err != nil {
		th.Stop()
		return nil, err
	}
	if err := d.enf.ServeDNS(p.Port, cookie); err != nil {
		p.Close()
		th.Stop()
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	np := &nsProxy{ns: ns, thread: th, proxy: p, cancel: cancel, done: make(chan struct{})}
	d.log.Info("DNS proxy started in an app's network namespace", "netns_cookie", cookie, "pid", pid, "port", p.Port)
	go p.Serve(ctx)
	go func() {
		defer close(np.done)
		<-ctx.Done()
		if err := d.enf.ServeDNS(0, cookie); err != nil {
			d.log.Warn("turning the DNS redirect off in a network namespace", "netns_cookie", cookie, "err", err)
		}
		p.Close()
		th.Stop()
		ns.Close()
		d.log.Info("DNS proxy of a network namespace stopped", "netns_cookie", cookie)
	}()
	return np, nil
}

// reapEvery is how often the namespaces with a proxy are checked for
// threads.
const reapEvery = 5 * time.Second

// reap stops, every reapEvery until ctx ends, the proxies of namespaces no
// thread is in any more (only the proxy's sockets hold them).
func (n *netnsProxies) reap() {
	tick := time.NewTicker(reapEvery)
	defer tick.Stop()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-tick.C:
		}
		n.mu.Lock()
		empty := len(n.byIno) == 0
		n.mu.Unlock()
		if empty {
			continue
		}
		n.start.Lock() // no proxy starts while the walk runs
		used, err := netnsInUse()
		if err != nil {
			// An empty walk would stop every proxy: keep them.
			n.start.Unlock()
			n.d.log.Warn("not reaping DNS proxies of network namespaces", "err", err)
			continue
		}
		n.mu.Lock()
		for id, np := range n.byIno {
			if !used[id] {
				np.cancel()
			}
		}
		n.mu.Unlock()
		n.start.Unlock()
	}
}

// netnsInUse are the network namespaces some thread of another process
// than the daemon is in (the daemon's own proxy threads are in theirs), by
// device and inode: every thread's, since a thread may have entered one of
// its own. A process or thread that ends during the walk is passed over.
func netnsInUse() (map[[2]uint64]bool, error) {
	used := map[[2]uint64]bool{}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	self := os.Getpid()
	for _, p := range procs {
		if pid, err := strconv.Atoi(p.Name()); err != nil || pid == self {
			continue
		}
		tasks, err := os.ReadDir(filepath.Join("/proc", p.Name(), "task"))
		if err != nil {
			continue
		}
		for _, t := range tasks {
			var st unix.Stat_t
			if unix.Stat(filepath.Join("/proc", p.Name(), "task", t.Name(), "ns/net"), &st) == nil {
				used[[2]uint64{st.Dev, st.Ino}] = true
			}
		}
	}
	return used, nil
}
