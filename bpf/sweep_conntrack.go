package bpf

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
)

// flowKey is a connection as conntrack's original direction names it: for
// a socket that made the connection, its local and peer addresses.
type flowKey struct {
	proto        uint8
	src, dst     netip.Addr
	sport, dport uint16
}

// flowSet matches the conntrack entries of a set of flows in one pass over
// the table (the library's filters would be tried one by one per entry).
type flowSet map[flowKey]bool

func (f flowSet) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	return f[flowKey{
		proto: flow.Forward.Protocol,
		src:   addrOf(flow.Forward.SrcIP), dst: addrOf(flow.Forward.DstIP),
		sport: flow.Forward.SrcPort, dport: flow.Forward.DstPort,
	}]
}

func addrOf(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

// deleteConntrack removes the conntrack entries of ended sockets in the
// calling thread's network namespace, so that no state of an ended flow
// lingers (a "ct state established" rule would still pass its packets).
// Without conntrack (no module, or nothing tracked) there is nothing to do.
func deleteConntrack(ended []EndedSocket) (int, error) {
	set := flowSet{}
	families := map[netlink.InetFamily]bool{}
	for _, s := range ended {
		proto := uint8(unix.IPPROTO_TCP)
		if s.Proto == ruleset.UDP {
			proto = unix.IPPROTO_UDP
		}
		set[flowKey{proto: proto, src: s.Local.Addr().Unmap(), dst: s.Peer.Addr().Unmap(), sport: s.Local.Port(), dport: s.Peer.Port()}] = true
		fam := netlink.InetFamily(unix.AF_INET6)
		if s.Peer.Addr().Unmap().Is4() {
			fam = unix.AF_INET
		}
		families[fam] = true
	}
	var total int
	var errs []error
	for fam := range families {
		n, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, fam, set)
		total += int(n)
		if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EPROTONOSUPPORT) && !errors.Is(err, unix.EOPNOTSUPP) {
			errs = append(errs, fmt.Errorf("delete conntrack entries (family %d): %w", fam, err))
		}
	}
	return total, errors.Join(errs...)
}
