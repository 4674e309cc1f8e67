package daemon

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

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
	out := rs.Clone()
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
