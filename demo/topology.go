// Package demo builds the network world of `procgate demo` in throw-away
// network namespaces: a laptop, a VPN gateway that the laptop reaches over a
// wireguard-go tunnel, an internal service behind the gateway on the tunnel's
// routes, and an internet service reached over the underlay.
//
//	laptop            gateway                  internal
//	up0 192.0.2.1 --- up0 192.0.2.2   int0 --- eth0 10.20.0.10, fd20::10
//	wg0 100.64.0.2 == wg0 100.64.0.1            (tcp 5432 banner, udp 5353 echo)
//	    fd64::2           fd64::1      inet0 -- eth0 198.51.100.10 (internet)
//	                                            (tcp 80 banner)
//
// The laptop routes 10.20.0.0/16 and fd20::/64 via wg0 and everything else via
// the gateway's underlay address. The gateway forwards without NAT, so the
// internal service sees the laptop's tunnel address as its peer.
//
// Everything runs in this process: wireguard-go devices and the services are
// goroutines whose TUN devices and sockets were opened on threads that had
// joined the right namespace. Nothing is configured in the caller's network
// namespace; the only thing outside the namespaces is a directory of
// bind-mounted namespace files under /run/procgate-demo.
package demo

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// BaseDir holds one directory per topology, named <pid>-<n>, with the
// bind-mounted namespace files of that topology.
const BaseDir = "/run/procgate-demo"

// TunnelIface is the name of the WireGuard interface on the laptop and on
// the gateway.
const TunnelIface = "wg0"

// readyTimeout bounds the end-to-end check at the end of Up (it includes the
// first WireGuard handshake).
const readyTimeout = 3 * time.Second

type role int

const (
	laptop role = iota
	gateway
	internal
	internet
	numRoles
)

var roleNames = [numRoles]string{"laptop", "gateway", "internal", "internet"}

func (r role) String() string { return roleNames[r] }

var (
	gatewayUnderlay = netip.MustParseAddr("192.0.2.2")
	laptopTunnel    = netip.MustParseAddr("100.64.0.2")
	laptopTunnel6   = netip.MustParseAddr("fd64::2")
	gatewayTunnel   = netip.MustParseAddr("100.64.0.1")
	gatewayTunnel6  = netip.MustParseAddr("fd64::1")
	internalPrefix  = netip.MustParsePrefix("10.20.0.0/16")
	internalPrefix6 = netip.MustParsePrefix("fd20::/64")
	internalGW      = netip.MustParseAddr("10.20.0.1")
	internalGW6     = netip.MustParseAddr("fd20::1")
	internalHost    = netip.MustParseAddr("10.20.0.10")
	internalHost6   = netip.MustParseAddr("fd20::10")
	internetGW      = netip.MustParseAddr("198.51.100.1")
	internetHost    = netip.MustParseAddr("198.51.100.10")

	anyV4 = netip.MustParsePrefix("0.0.0.0/0")
	anyV6 = netip.MustParsePrefix("::/0")
)

const (
	internalTCPPort = 5432
	internalUDPPort = 5353
	internalDNSPort = 53
	internetTCPPort = 80
	// internalDBName is what the internal DNS server answers with
	// internalHost, for internalDNSTTL seconds.
	internalDBName = "db.corp.example"
	internalDNSTTL = 300
)

// linkEnd is one interface with its addresses.
type linkEnd struct {
	ns    role
	name  string
	addrs []netip.Prefix
}

func prefixes(s ...string) []netip.Prefix {
	ps := make([]netip.Prefix, len(s))
	for i, p := range s {
		ps[i] = netip.MustParsePrefix(p)
	}
	return ps
}

var vethLayout = [][2]linkEnd{
	{{laptop, "up0", prefixes("192.0.2.1/24")}, {gateway, "up0", prefixes("192.0.2.2/24")}},
	{{gateway, "int0", prefixes("10.20.0.1/24", "fd20::1/64")}, {internal, "eth0", prefixes("10.20.0.10/24", "fd20::10/64")}},
	{{gateway, "inet0", prefixes("198.51.100.1/24")}, {internet, "eth0", prefixes("198.51.100.10/24")}},
}

var tunnelLayout = [2]linkEnd{
	{laptop, TunnelIface, prefixes("100.64.0.2/32", "fd64::2/128")},
	{gateway, TunnelIface, prefixes("100.64.0.1/24", "fd64::1/64")},
}

type routeSpec struct {
	ns  role
	dst netip.Prefix
	dev string
	via netip.Addr // zero: on-link
	src netip.Addr // zero: kernel's choice
}

var routeLayout = []routeSpec{
	{ns: laptop, dst: anyV4, dev: "up0", via: gatewayUnderlay},
	// Pinning the source to the tunnel address is what makes the internal
	// service see the laptop's tunnel address.
	{ns: laptop, dst: internalPrefix, dev: TunnelIface, src: laptopTunnel},
	{ns: laptop, dst: internalPrefix6, dev: TunnelIface, src: laptopTunnel6},
	{ns: internal, dst: anyV4, dev: "eth0", via: internalGW},
	{ns: internal, dst: anyV6, dev: "eth0", via: internalGW6},
	{ns: internet, dst: anyV4, dev: "eth0", via: internetGW},
}

// sysctls are written from a thread inside each namespace: /proc/sys/net
// resolves to the namespace of the thread that opens the file. They are set
// before any link exists, so that links inherit the "default" values.
var (
	// Without DAD, link-local addresses are usable at once instead of after
	// ~1 s of tentative state, during which neighbour discovery, and so the
	// first IPv6 connection, stalls. These links have no one to collide with.
	commonSysctls = []string{
		"/proc/sys/net/ipv6/conf/all/accept_dad=0",
		"/proc/sys/net/ipv6/conf/default/accept_dad=0",
	}
	// The gateway routes.
	gatewaySysctls = []string{
		"/proc/sys/net/ipv4/ip_forward=1",
		"/proc/sys/net/ipv6/conf/all/forwarding=1",
	}
)

// gatewayGuards keep the internal network reachable only through the tunnel.
// The gateway forwards between all its links; without these rules a laptop
// whose wg0 route is gone would still reach the internal service over the
// underlay, and so would the internet, and the tunnel's route would authorize
// nothing.
var gatewayGuards = []struct {
	iif string
	dst netip.Prefix
}{
	{"up0", internalPrefix}, {"up0", internalPrefix6},
	{"inet0", internalPrefix}, {"inet0", internalPrefix6},
}

// guardPriority puts the guards before the main table's rule (32766).
const guardPriority = 100

// Topology is a running demo world. Its fields describe it; they must not be
// changed.
type Topology struct {
	// Network namespace files, usable with `nsenter --net=PATH` and setns(2).
	Laptop, Gateway, Internal, Internet string
	// Dir is the directory under BaseDir that holds the namespace files.
	Dir string

	// InternalAddr and InternalAddr6 are the internal TCP service; from the
	// laptop only through the tunnel. It answers
	// "internal-db: hello <peer addr:port>\n" and closes.
	InternalAddr, InternalAddr6 netip.AddrPort
	// InternalUDP and InternalUDP6 are a UDP echo on the internal service.
	InternalUDP, InternalUDP6 netip.AddrPort
	// InternalDNS is the internal DNS server (UDP): it answers InternalDBName
	// with InternalAddr's address, other names with NXDOMAIN.
	InternalDNS    netip.AddrPort
	InternalDBName string
	// InternetAddr is a TCP service that the laptop reaches via the underlay,
	// not the tunnel. It answers "internet-web: hello\n" and closes.
	InternetAddr netip.AddrPort
	// InternalPrefix and InternalPrefix6 are routed on the laptop via
	// TunnelIface.
	InternalPrefix, InternalPrefix6 netip.Prefix
	// LaptopTunnelAddr and LaptopTunnelAddr6 are the laptop's addresses on
	// TunnelIface: the peer address the internal service sees.
	LaptopTunnelAddr, LaptopTunnelAddr6 netip.Addr

	log     *slog.Logger
	mu      sync.Mutex
	closed  bool
	nsPaths []string
	tunnel  []*wgEnd
	// gatewayWG is the gateway's end, whose counters tell tests what came
	// through the tunnel.
	gatewayWG *wgEnd
	svc       services
	stopOnCx  func() bool
	done      chan struct{} // closed when the first Close has finished
}

var runCounter atomic.Uint64

// Up builds the demo world and checks, before returning, that the laptop
// reaches the internal service through the tunnel. On any failure, or if ctx
// is done first, it removes what it made and returns the error. After Up
// returns, the world lives until Close or until ctx is done, whichever comes
// first, like a process started by exec.CommandContext. log may be nil.
func Up(ctx context.Context, log *slog.Logger) (*Topology, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	start := time.Now()
	dir := filepath.Join(BaseDir, fmt.Sprintf("%d-%d", os.Getpid(), runCounter.Add(1)))
	t := &Topology{
		Laptop:            filepath.Join(dir, laptop.String()),
		Gateway:           filepath.Join(dir, gateway.String()),
		Internal:          filepath.Join(dir, internal.String()),
		Internet:          filepath.Join(dir, internet.String()),
		Dir:               dir,
		InternalAddr:      netip.AddrPortFrom(internalHost, internalTCPPort),
		InternalAddr6:     netip.AddrPortFrom(internalHost6, internalTCPPort),
		InternalUDP:       netip.AddrPortFrom(internalHost, internalUDPPort),
		InternalUDP6:      netip.AddrPortFrom(internalHost6, internalUDPPort),
		InternalDNS:       netip.AddrPortFrom(internalHost, internalDNSPort),
		InternalDBName:    internalDBName,
		InternetAddr:      netip.AddrPortFrom(internetHost, internetTCPPort),
		InternalPrefix:    internalPrefix,
		InternalPrefix6:   internalPrefix6,
		LaptopTunnelAddr:  laptopTunnel,
		LaptopTunnelAddr6: laptopTunnel6,
		log:               log,
		svc:               services{log: log},
		done:              make(chan struct{}),
	}
	if err := t.build(ctx); err != nil {
		return nil, errors.Join(fmt.Errorf("demo topology up: %w", err), t.Close())
	}
	t.mu.Lock()
	t.stopOnCx = context.AfterFunc(ctx, func() {
		if err := t.Close(); err != nil {
			log.Warn("demo topology close on cancel", "err", err)
		}
	})
	t.mu.Unlock()
	log.Info("demo topology up", "dir", dir, "took", time.Since(start))
	return t, nil
}

func (t *Topology) path(r role) string {
	return [numRoles]string{t.Laptop, t.Gateway, t.Internal, t.Internet}[r]
}

func (t *Topology) build(ctx context.Context) error {
	if err := mkdirRun(t.Dir); err != nil {
		return err
	}
	for r := range numRoles {
		if err := ctx.Err(); err != nil {
			return err
		}
		// Record before creating: newNS cleans its own failure, and Close
		// tolerates a path that was never made.
		t.nsPaths = append(t.nsPaths, t.path(r))
		if err := newNS(t.path(r)); err != nil {
			return fmt.Errorf("%s namespace: %w", r, err)
		}
	}

	var handles [numRoles]*netlink.Handle
	defer func() {
		for _, h := range handles {
			if h != nil {
				h.Close()
			}
		}
	}()
	for r := range numRoles {
		settings := commonSysctls
		if r == gateway {
			settings = append(slices.Clip(settings), gatewaySysctls...)
		}
		err := inNS(t.path(r), func() error {
			var err error
			if handles[r], err = netlink.NewHandle(unix.NETLINK_ROUTE); err != nil {
				return fmt.Errorf("netlink: %w", err)
			}
			return writeSysctls(settings)
		})
		if err != nil {
			return fmt.Errorf("%s: %w", r, err)
		}
		if err := setUp(handles[r], "lo"); err != nil {
			return fmt.Errorf("%s: %w", r, err)
		}
	}
	for _, pair := range vethLayout {
		if err := t.addVeth(handles[pair[0].ns], pair[0], pair[1]); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := t.startTunnel(); err != nil {
		return err
	}

	ends := append([]linkEnd{tunnelLayout[0], tunnelLayout[1]}, vethEnds()...)
	for _, end := range ends {
		if err := configureEnd(handles[end.ns], end); err != nil {
			return fmt.Errorf("%s: %w", end.ns, err)
		}
	}
	for _, rt := range routeLayout {
		if err := addRoute(handles[rt.ns], rt); err != nil {
			return fmt.Errorf("%s: %w", rt.ns, err)
		}
	}
	for _, g := range gatewayGuards {
		rule := netlink.NewRule()
		rule.Priority = guardPriority
		rule.IifName = g.iif
		rule.Dst = ipNet(g.dst)
		rule.Type = unix.FR_ACT_PROHIBIT
		if err := handles[gateway].RuleAdd(rule); err != nil {
			return fmt.Errorf("gateway: add rule iif %s to %s prohibit: %w", g.iif, g.dst, err)
		}
	}

	if err := ctx.Err(); err != nil {
		return err
	}
	if err := t.startServices(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return t.checkTunnel(ctx)
}

// writeSysctls writes "path=value" settings in the calling thread's namespace.
func writeSysctls(settings []string) error {
	for _, kv := range settings {
		path, value, _ := strings.Cut(kv, "=")
		if err := os.WriteFile(path, []byte(value+"\n"), 0); err != nil {
			return fmt.Errorf("sysctl: %w", err)
		}
	}
	return nil
}

func mkdirRun(dir string) error {
	// Another Close may remove an empty BaseDir between our MkdirAll and Mkdir.
	var err error
	for range 3 {
		if err = os.MkdirAll(BaseDir, 0o755); err != nil {
			break
		}
		if err = os.Mkdir(dir, 0o700); !errors.Is(err, os.ErrNotExist) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	return nil
}

func vethEnds() []linkEnd {
	ends := make([]linkEnd, 0, 2*len(vethLayout))
	for _, pair := range vethLayout {
		ends = append(ends, pair[0], pair[1])
	}
	return ends
}

// addVeth creates the pair from inside a's namespace with its peer created
// directly in b's, so no end ever exists in the caller's namespace.
func (t *Topology) addVeth(h *netlink.Handle, a, b linkEnd) error {
	peerNS, err := os.Open(t.path(b.ns))
	if err != nil {
		return fmt.Errorf("open %s namespace: %w", b.ns, err)
	}
	defer peerNS.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: a.name},
		PeerName:      b.name,
		PeerNamespace: netlink.NsFd(peerNS.Fd()),
	}
	if err := h.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s/%s - %s/%s: %w", a.ns, a.name, b.ns, b.name, err)
	}
	return nil
}

func (t *Topology) startTunnel() error {
	laptopKeys, err := newWGKeyPair()
	if err != nil {
		return err
	}
	gatewayKeys, err := newWGKeyPair()
	if err != nil {
		return err
	}
	gw, err := startWireGuard(t.Gateway, TunnelIface, gateway.String(), wgPeerConfig{
		listenPort: gatewayWGPort,
		self:       gatewayKeys,
		peer:       laptopKeys.public,
		allowedIPs: []netip.Prefix{netip.PrefixFrom(laptopTunnel, 32), netip.PrefixFrom(laptopTunnel6, 128)},
	}, t.log)
	if err != nil {
		return err
	}
	t.tunnel = append(t.tunnel, gw)
	t.gatewayWG = gw
	lp, err := startWireGuard(t.Laptop, TunnelIface, laptop.String(), wgPeerConfig{
		self:     laptopKeys,
		peer:     gatewayKeys.public,
		endpoint: netip.AddrPortFrom(gatewayUnderlay, gatewayWGPort),
		allowedIPs: []netip.Prefix{
			internalPrefix, internalPrefix6,
			netip.PrefixFrom(gatewayTunnel, 32), netip.PrefixFrom(gatewayTunnel6, 128),
		},
	}, t.log)
	if err != nil {
		return err
	}
	t.tunnel = append(t.tunnel, lp)
	return nil
}

func setUp(h *netlink.Handle, name string) error {
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find link %s: %w", name, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

func configureEnd(h *netlink.Handle, end linkEnd) error {
	// Up before addresses, so that the kernel installs the connected routes
	// that the gateways of routeLayout need.
	if err := setUp(h, end.name); err != nil {
		return err
	}
	link, err := h.LinkByName(end.name)
	if err != nil {
		return fmt.Errorf("find link %s: %w", end.name, err)
	}
	for _, p := range end.addrs {
		addr := &netlink.Addr{IPNet: ipNet(p)}
		if p.Addr().Is6() {
			// NODAD makes the kernel add the address as usable at once;
			// otherwise it is tentative until a work queue clears it (even
			// with accept_dad=0), and a route that names it as source fails
			// with EINVAL meanwhile.
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(link, addr); err != nil {
			return fmt.Errorf("add %s to %s: %w", p, end.name, err)
		}
	}
	return nil
}

func addRoute(h *netlink.Handle, rt routeSpec) error {
	link, err := h.LinkByName(rt.dev)
	if err != nil {
		return fmt.Errorf("find link %s: %w", rt.dev, err)
	}
	r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(rt.dst)}
	if rt.via.IsValid() {
		r.Gw = rt.via.AsSlice()
	}
	if rt.src.IsValid() {
		r.Src = rt.src.AsSlice()
	}
	if err := h.RouteAdd(r); err != nil {
		return fmt.Errorf("add route %s dev %s via %v: %w", rt.dst, rt.dev, rt.via, err)
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func (t *Topology) startServices() error {
	if err := t.svc.serveTCP(t.Internal, internal.String(), internalTCPPort, internalBanner); err != nil {
		return err
	}
	if err := t.svc.serveUDPEcho(t.Internal, internal.String(), internalUDPPort); err != nil {
		return err
	}
	if err := t.svc.serveDNS(t.Internal, internal.String(), internalDNSPort, map[string]netip.Addr{internalDBName + ".": internalHost}, internalDNSTTL); err != nil {
		return err
	}
	return t.svc.serveTCP(t.Internet, internet.String(), internetTCPPort, func(netip.AddrPort) string {
		return "internet-web: hello\n"
	})
}

const internalBannerPrefix = "internal-db: hello "

func internalBanner(peer netip.AddrPort) string {
	return internalBannerPrefix + peer.String() + "\n"
}

// ParseInternalBanner returns the peer address that the internal service
// reports in its banner line (with or without the newline): the source
// address it saw, which tells which way a connection came.
func ParseInternalBanner(line string) (netip.AddrPort, error) {
	rest, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), internalBannerPrefix)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("not an internal service banner: %q", line)
	}
	peer, err := netip.ParseAddrPort(rest)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("internal service banner %q: %w", line, err)
	}
	return peer, nil
}

// checkTunnel makes the first connection through the tunnel, which also
// completes the WireGuard handshake, so that the demo's first connection is
// not the one that pays for it.
func (t *Topology) checkTunnel(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	for _, dst := range []netip.AddrPort{t.InternalAddr, t.InternalAddr6} {
		line, err := dialContext(ctx, t.Laptop, "tcp", dst)
		if err != nil {
			return fmt.Errorf("check tunnel: %w", err)
		}
		peer, err := ParseInternalBanner(line)
		if err != nil {
			return fmt.Errorf("check tunnel: %w", err)
		}
		if want := t.tunnelSource(dst.Addr()); peer.Addr() != want {
			return fmt.Errorf("check tunnel: internal service saw %s, want %s (the laptop's tunnel address)", peer.Addr(), want)
		}
	}
	return nil
}

func (t *Topology) tunnelSource(dst netip.Addr) netip.Addr {
	if dst.Is4() {
		return t.LaptopTunnelAddr
	}
	return t.LaptopTunnelAddr6
}

// Close stops the services and the tunnel, and removes the namespaces, their
// mounts and files, and the run directory (and BaseDir when it is left
// empty). It is safe to call more than once and from several goroutines;
// calls after the first return nil.
func (t *Topology) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	defer close(t.done)
	start := time.Now()
	if t.stopOnCx != nil {
		t.stopOnCx()
	}
	errs := []error{t.svc.close()}
	// Each end takes ~20 ms, mostly the kernel unregistering its TUN device;
	// the two ends are independent.
	var wg sync.WaitGroup
	for _, end := range t.tunnel {
		wg.Go(end.close)
	}
	wg.Wait()
	t.tunnel = nil
	for i := len(t.nsPaths) - 1; i >= 0; i-- {
		errs = append(errs, removeNS(t.nsPaths[i]))
	}
	t.nsPaths = nil
	if err := os.Remove(t.Dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove %s: %w", t.Dir, err))
	}
	// Fails while another topology (of this or another process) still uses it.
	if err := os.Remove(BaseDir); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOTEMPTY) && !errors.Is(err, unix.EEXIST) {
		errs = append(errs, fmt.Errorf("remove %s: %w", BaseDir, err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("demo topology close: %w", err)
	}
	t.log.Info("demo topology closed", "dir", t.Dir, "took", time.Since(start))
	return nil
}
