package daemon

import (
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestRouteEventRelevance: only events that can change the routes via the
// policy's interfaces start a refresh, and a route via a link whose name
// is not known yet does.
func TestRouteEventRelevance(t *testing.T) {
	rw := &routeWatch{interfaces: func() []string { return []string{"wg0"} }}
	names := map[int]string{}
	link := func(typ uint16, index int, name string) netlink.LinkUpdate {
		return netlink.LinkUpdate{Header: unix.NlMsghdr{Type: typ}, Link: &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: index, Name: name}}}
	}
	steps := []struct {
		name string
		link *netlink.LinkUpdate
		rt   *netlink.Route
		want bool
	}{
		{name: "route via an unknown link", rt: &netlink.Route{LinkIndex: 7}, want: true},
		{name: "route without a link", rt: &netlink.Route{}, want: false},
		{name: "other link appears", link: ptr(link(unix.RTM_NEWLINK, 2, "eth0")), want: false},
		{name: "route via the other link", rt: &netlink.Route{LinkIndex: 2}, want: false},
		{name: "wg0 appears", link: ptr(link(unix.RTM_NEWLINK, 7, "wg0")), want: true},
		{name: "route via wg0", rt: &netlink.Route{LinkIndex: 7}, want: true},
		{name: "multipath route with a hop via wg0", rt: &netlink.Route{MultiPath: []*netlink.NexthopInfo{{LinkIndex: 2}, {LinkIndex: 7}}}, want: true},
		{name: "wg0 renamed away", link: ptr(link(unix.RTM_NEWLINK, 7, "old")), want: true},
		{name: "route via the renamed link", rt: &netlink.Route{LinkIndex: 7}, want: false},
		{name: "other link goes", link: ptr(link(unix.RTM_DELLINK, 2, "eth0")), want: false},
		{name: "route via a link gone", rt: &netlink.Route{LinkIndex: 2}, want: true},
	}
	for _, s := range steps {
		var got bool
		if s.link != nil {
			got = rw.linkRelevant(*s.link, names)
		} else {
			got = rw.routeRelevant(*s.rt, names)
		}
		if got != s.want {
			t.Errorf("%s: relevant = %v, want %v", s.name, got, s.want)
		}
	}
	none := &routeWatch{interfaces: func() []string { return nil }}
	if none.routeRelevant(netlink.Route{LinkIndex: 9}, map[int]string{}) {
		t.Error("a policy without interfaces refreshes on route events")
	}
}

func ptr[T any](v T) *T { return &v }
