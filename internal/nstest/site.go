package nstest

import (
	"errors"
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Site is a perimeter in four namespaces: two external hosts and a
// protected server, each on its own link to the router, which forwards
// between them (and runs a perimeter gateway in the tests that want one).
//
//	Client 198.51.100.10 2001:db8:c::10 ─┐
//	Other  203.0.113.10  2001:db8:e::10 ─┼─ Router (.1 / ::1 on each link) ── Server 10.9.0.5 fd09::5
type Site struct {
	Client, Other, Router, Server string
}

// The site's addresses. RouterToServer4 is the router's address on the
// server's link, where a gateway's API listens.
const (
	Client4, Client6 = "198.51.100.10", "2001:db8:c::10"
	Other4, Other6   = "203.0.113.10", "2001:db8:e::10"
	Server4, Server6 = "10.9.0.5", "fd09::5"
	RouterToServer4  = "10.9.0.1"
	// ServerPrefix4 and ServerPrefix6 are the protected server link's.
	ServerPrefix4, ServerPrefix6 = "10.9.0.0/24", "fd09::/64"
)

// NewSite makes the four namespaces and their links, with forwarding on in
// the router. Everything goes with the test.
func NewSite(t testing.TB) Site {
	t.Helper()
	s := Site{Client: NetNS(t), Other: NetNS(t), Router: NetNS(t), Server: NetNS(t)}
	siteLink(t, s.Client, s.Router, "r-client", [2]string{Client4, Client6}, [2]string{"198.51.100.1", "2001:db8:c::1"})
	siteLink(t, s.Other, s.Router, "r-other", [2]string{Other4, Other6}, [2]string{"203.0.113.1", "2001:db8:e::1"})
	siteLink(t, s.Server, s.Router, "r-server", [2]string{Server4, Server6}, [2]string{RouterToServer4, "fd09::1"})
	err := InNS(t, s.Router, func() error {
		// net sysctls belong to the namespace of the thread that opens them.
		return errors.Join(
			os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0),
			os.WriteFile("/proc/sys/net/ipv6/conf/all/forwarding", []byte("1"), 0))
	})
	if err != nil {
		t.Fatalf("enable forwarding in the router: %v", err)
	}
	return s
}

// siteLink joins the host namespace ns to the router with a veth, gives
// each end one IPv4 and one IPv6 address (host first, router second,
// without duplicate address detection so that they work at once), and
// routes everything from the host via the router.
func siteLink(t testing.TB, ns, router, name string, host, gw [2]string) {
	t.Helper()
	Veth(t, ns, "eth0", router, name)
	for _, side := range []struct {
		ns, dev string
		addrs   [2]string
	}{{ns, "eth0", host}, {router, name, gw}} {
		h := handle(t, side.ns)
		l, err := h.LinkByName(side.dev)
		for i, s := range side.addrs {
			bits := []string{"/24", "/64"}[i]
			var a *netlink.Addr
			if err == nil {
				a, err = netlink.ParseAddr(s + bits)
			}
			if err == nil {
				a.Flags = unix.IFA_F_NODAD
				err = h.AddrAdd(l, a)
			}
		}
		h.Close()
		if err != nil {
			t.Fatalf("addresses %v on %s: %v", side.addrs, side.dev, err)
		}
	}
	h := handle(t, ns)
	defer h.Close()
	for _, g := range gw {
		if err := h.RouteAdd(&netlink.Route{Gw: net.ParseIP(g)}); err != nil {
			t.Fatalf("default route via %s: %v", g, err)
		}
	}
}

// DialIn dials from a thread in the namespace ns; the socket stays there.
// The thread goes back to its namespace afterwards, or, if it cannot, is
// never returned to the Go scheduler (as in InNS): a thread left in another
// namespace may be the main thread, whose namespace is the one
// /proc/PID/net shows. It needs no testing.TB, so that clients (HTTP
// transports, FTP clients) can use it from any goroutine.
func DialIn(ns, network, addr string, timeout time.Duration) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			done <- result{nil, err}
			return
		}
		defer orig.Close()
		h, err := netns.GetFromPath(ns)
		if err == nil {
			err = netns.Set(h)
			h.Close()
		}
		if err != nil {
			done <- result{nil, err}
			return
		}
		c, err := net.DialTimeout(network, addr, timeout)
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		done <- result{c, err}
	}()
	r := <-done
	return r.c, r.err
}
