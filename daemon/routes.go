package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
)

// interfaceRoutes lists the destinations routed via the named links, in
// every routing table of the daemon's network namespace: with
// internal.interfaces, a route a VPN client adds is internal as soon as the
// daemon sees it. A link that does not exist (the VPN is down) has no routes.
func interfaceRoutes(names []string) ([]ruleset.InternalPrefix, error) {
	var out []ruleset.InternalPrefix
	for _, name := range names {
		link, err := netlink.LinkByName(name)
		if err != nil {
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				continue
			}
			return nil, fmt.Errorf("look up interface %s: %w", name, err)
		}
		filter := &netlink.Route{LinkIndex: link.Attrs().Index, Table: unix.RT_TABLE_UNSPEC}
		routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, filter, netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
		if err != nil {
			return nil, fmt.Errorf("list routes via %s: %w", name, err)
		}
		src := ruleset.Source{File: "route via " + name}
		// The kernel adds a host route for an address put on the link
		// (the tunnel's own address): that is this host, not a network.
		own := map[netip.Addr]bool{}
		if addrs, err := netlink.AddrList(link, netlink.FAMILY_ALL); err == nil {
			for _, a := range addrs {
				if ip, ok := netip.AddrFromSlice(a.IP); ok {
					own[ip.Unmap()] = true
				}
			}
		}
		for _, r := range routes {
			// Local and broadcast routes of the link's own addresses are
			// not routes to other networks.
			if r.Type != unix.RTN_UNICAST {
				continue
			}
			if r.Dst == nil {
				// A default route via the tunnel (full tunnel): every
				// destination of that family is internal.
				def := "0.0.0.0/0"
				if r.Family == netlink.FAMILY_V6 {
					def = "::/0"
				}
				out = append(out, ruleset.InternalPrefix{Prefix: netip.MustParsePrefix(def), Source: src})
				continue
			}
			addr, ok := netip.AddrFromSlice(r.Dst.IP)
			if !ok {
				continue
			}
			bits, _ := r.Dst.Mask.Size()
			pfx := netip.PrefixFrom(addr.Unmap(), bits).Masked()
			if pfx.Addr().IsLinkLocalUnicast() {
				continue // fe80::/64 on every link, not a route to a network
			}
			if pfx.IsSingleIP() && own[pfx.Addr()] {
				continue
			}
			out = append(out, ruleset.InternalPrefix{Prefix: pfx, Source: src})
		}
	}
	slices.SortFunc(out, func(a, b ruleset.InternalPrefix) int {
		return strings.Compare(a.Prefix.String(), b.Prefix.String())
	})
	return slices.CompactFunc(out, func(a, b ruleset.InternalPrefix) bool { return a.Prefix == b.Prefix }), nil
}

// withRoutes returns rs with the routes of its interfaces added to Internal
// (those the policy does not list already).
func withRoutes(rs *ruleset.Ruleset, routes []ruleset.InternalPrefix) *ruleset.Ruleset {
	if len(routes) == 0 {
		return rs
	}
	out := rs.Derive()
	// A new array: rs's prefixes are shared (ruleset.Derive).
	out.Internal = slices.Clip(out.Internal)
	for _, r := range routes {
		if !slices.ContainsFunc(out.Internal, func(p ruleset.InternalPrefix) bool { return p.Prefix == r.Prefix }) {
			out.Internal = append(out.Internal, r)
		}
	}
	return out
}

func samePrefixes(a, b []ruleset.InternalPrefix) bool {
	return slices.EqualFunc(a, b, func(x, y ruleset.InternalPrefix) bool { return x.Prefix == y.Prefix })
}

// Route and link events are coalesced: a VPN client adds its routes in a
// burst, one netlink message each, microseconds apart, and a generation per
// route would be a grace period (about 10 ms) each. A burst's first event
// is refreshed at once, with no timer between a route and its enforcement
// (on a loaded machine a 1 ms timer fires tens of ms late); the burst's
// later events are refreshed once more when it ends: routeQuiet after the
// last, or routeMaxWait after the first. A refresh that finds the routes as
// they were makes no generation, so a burst the first refresh read whole
// costs one generation, any other two.
const (
	routeQuiet   = time.Millisecond
	routeMaxWait = 5 * time.Millisecond
	// routeRcvBuf is the subscriptions' receive buffer: room for a burst
	// of some thousand routes while a refresh runs. Beyond it the kernel
	// drops messages (ENOBUFS) and the watch subscribes again and
	// re-reads everything.
	routeRcvBuf = 1 << 20
)

// routeWatch turns the kernel's route and link notifications of the
// daemon's network namespace into refreshes of the routes via
// internal.interfaces. While it is not subscribed (netlink refused, or the
// subscription broke and is being made again) the daemon polls.
type routeWatch struct {
	log *slog.Logger
	// interfaces is the policy's internal.interfaces, as last installed.
	interfaces func() []string
	retry      time.Duration
	// changed has a value when a burst of relevant events ended, and
	// after each new subscription (whatever changed meanwhile).
	changed chan struct{}
	active  atomic.Bool
}

func watchRoutes(ctx context.Context, wg *sync.WaitGroup, interfaces func() []string, retry time.Duration, log *slog.Logger) *routeWatch {
	rw := &routeWatch{log: log, interfaces: interfaces, retry: retry, changed: make(chan struct{}, 1)}
	wg.Add(1)
	go func() {
		defer wg.Done()
		rw.run(ctx)
	}()
	return rw
}

// watching reports whether route changes come as events; when not, the
// caller polls.
func (rw *routeWatch) watching() bool { return rw != nil && rw.active.Load() }

func (rw *routeWatch) events() <-chan struct{} {
	if rw == nil {
		return nil
	}
	return rw.changed
}

func (rw *routeWatch) signal() { wake(rw.changed) }

func (rw *routeWatch) run(ctx context.Context) {
	last := ""
	for {
		err := rw.subscribe(ctx)
		was := rw.active.Swap(false)
		if ctx.Err() != nil {
			return
		}
		// Said once per reason: a host without netlink events would
		// otherwise log it at every retry.
		if was || err.Error() != last {
			rw.log.Warn("route events not to be had; polling the routes of internal interfaces", "err", err, "retry_in", rw.retry)
		}
		last = err.Error()
		select {
		case <-ctx.Done():
			return
		case <-time.After(rw.retry):
		}
	}
}

// subscribe follows route and link events until the subscription breaks
// or ctx ends.
func (rw *routeWatch) subscribe(ctx context.Context) (err error) {
	done := make(chan struct{})
	routes := make(chan netlink.RouteUpdate, 1024)
	links := make(chan netlink.LinkUpdate, 64)
	failed := make(chan error, 1)
	onErr := func(err error) {
		select {
		case failed <- err:
		default:
		}
	}
	var subscribed []func()
	defer func() {
		close(done)
		// The library's readers block on a full channel: drain them
		// until they see the closed socket and close their channel.
		for _, drain := range subscribed {
			drain()
		}
	}()
	err = netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{ErrorCallback: onErr, ReceiveBufferSize: routeRcvBuf})
	if err != nil {
		return fmt.Errorf("subscribe to route events: %w", err)
	}
	subscribed = append(subscribed, func() {
		for range routes {
		}
	})
	// ListExisting: the links there are now, for the names of the links
	// that routes name by index.
	err = netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{ErrorCallback: onErr, ListExisting: true, ReceiveBufferSize: routeRcvBuf})
	if err != nil {
		return fmt.Errorf("subscribe to link events: %w", err)
	}
	subscribed = append(subscribed, func() {
		for range links {
		}
	})
	rw.active.Store(true)
	rw.log.Info("following routes and links by netlink events", "interfaces", rw.interfaces())
	rw.signal() // whatever changed while not subscribed
	names := map[int]string{}
	var quiet, limit <-chan time.Time
	pending := false // events since the burst's first refresh
	burst := func() {
		if limit == nil {
			rw.signal()
			limit = time.After(routeMaxWait)
		} else {
			pending = true
		}
		quiet = time.After(routeQuiet)
	}
	flush := func() {
		if pending {
			rw.signal()
		}
		quiet, limit, pending = nil, nil, false
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-failed:
			return err
		case u, ok := <-routes:
			if !ok {
				return errors.New("route events ended")
			}
			if rw.routeRelevant(u.Route, names) {
				burst()
			}
		case u, ok := <-links:
			if !ok {
				return errors.New("link events ended")
			}
			if rw.linkRelevant(u, names) {
				burst()
			}
		case <-quiet:
			flush()
		case <-limit:
			flush()
		}
	}
}

// routeRelevant: a route via one of the interfaces, or via a link whose
// name is not known yet (its link event may come after the route's: they
// are two sockets).
func (rw *routeWatch) routeRelevant(r netlink.Route, names map[int]string) bool {
	ifaces := rw.interfaces()
	if len(ifaces) == 0 {
		return false
	}
	via := func(index int) bool {
		name, known := names[index]
		return index != 0 && (!known || slices.Contains(ifaces, name))
	}
	if via(r.LinkIndex) {
		return true
	}
	return slices.ContainsFunc(r.MultiPath, func(h *netlink.NexthopInfo) bool { return via(h.LinkIndex) })
}

// linkRelevant keeps names up to date and says whether one of the
// interfaces came, went, was renamed or changed state (the kernel removes
// IPv4 routes of a link that goes down without a route event for each).
func (rw *routeWatch) linkRelevant(u netlink.LinkUpdate, names map[int]string) bool {
	attrs := u.Link.Attrs()
	old, had := names[attrs.Index]
	if u.Header.Type == unix.RTM_DELLINK {
		delete(names, attrs.Index)
	} else {
		names[attrs.Index] = attrs.Name
	}
	ifaces := rw.interfaces()
	return slices.Contains(ifaces, attrs.Name) || (had && slices.Contains(ifaces, old))
}
