package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/procgate/procgate/daemon"
)

// The routes phase measures how fast a route added via one of
// internal.interfaces is enforced by the real daemon, and how fast a
// removed one stops being internal: the daemon follows netlink route and
// link events (its poll, the fallback, is set to an hour here).
//
// In a namespace of the bench's own, wg0 is a veth link (up, its peer too)
// and 100.64.0.0/10 is local (table local, on lo), so that a connect to an
// address there needs no route via wg0, whatever the main table says. For
// each of RouteAdds /24s in it: a client in the daemon's app0 cgroup (app0
// has no grant there) connects fresh UDP sockets to an address of the /24
// every routesPause (the connect hook's verdict, TCP's and UDP's alike,
// with no handshake to wait for) while the bench adds `<the /24> dev wg0`
// to the main table by netlink; the time is from just before the add to
// the return of the first denied connect. Then the same for the route's
// removal, until the first allowed connect.

const phaseRoutes = "routes"

// routesLink is the internal interface of the routes phase.
const routesLink = "wg0"

// routesSpace holds the routed /24s; it is local in the phase's namespace.
var routesSpace = netip.MustParsePrefix("100.64.0.0/10")

// routesPause is the client's pause between connects: the resolution of
// the measurement, and CPU left to the daemon being measured (a client that
// connects without pause takes a core of two).
const routesPause = 100 * time.Microsecond

// routesGap separates the changes.
const routesGap = 50 * time.Millisecond

// routesWait bounds one wait for enforcement: far beyond the target, far
// below the daemon's poll.
const routesWait = 2 * time.Second

// routesResult is what the routes phase measured.
type routesResult struct {
	Routes int `json:"routes"`
	// AddMs is, per route, from the RouteAdd call to the return of the
	// first denied connect; DelMs from the RouteDel call to the first
	// allowed one.
	AddMs []float64 `json:"add_ms"`
	DelMs []float64 `json:"del_ms"`
	Add   msSummary `json:"add"`
	Del   msSummary `json:"del"`
	// LoadAvg is /proc/loadavg at the start and the end of the phase: on
	// two CPUs shared with other work, the tail is the scheduler's.
	LoadAvg []string `json:"loadavg"`
}

type msSummary struct {
	P50 float64 `json:"p50_ms"`
	P99 float64 `json:"p99_ms"`
	Max float64 `json:"max_ms"`
}

func summarizeMs(vs []float64) msSummary {
	if len(vs) == 0 {
		return msSummary{}
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	return msSummary{P50: round3(quantileF(s, 0.5)), P99: round3(quantileF(s, 0.99)), Max: s[len(s)-1]}
}

const routesPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8]
  interfaces: [` + routesLink + `]
apps:
  - name: app0
    allow:
      - to: 10.1.0.0/16
`

func (b *bench) routesPhase(ctx context.Context) error {
	bin, err := procgateBinary()
	if err != nil {
		return err
	}
	nsg := netnsGroup{h: b.host}
	defer nsg.close()
	ns, err := nsg.newNetNS("routes")
	if err != nil {
		return err
	}
	if err := anyIPLocal(ns, routesSpace); err != nil {
		return err
	}
	err = withHandle(ns, func(nh *netlink.Handle) error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: routesLink}, PeerName: routesLink + "peer"}
		if err := nh.LinkAdd(veth); err != nil {
			return fmt.Errorf("add link %s: %w", routesLink, err)
		}
		for _, name := range []string{routesLink, routesLink + "peer"} {
			l, err := nh.LinkByName(name)
			if err == nil {
				err = nh.LinkSetUp(l)
			}
			if err != nil {
				return fmt.Errorf("set %s up: %w", name, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	dir, err := b.phaseDir("routes")
	if err != nil {
		return err
	}
	policyPath := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(policyPath, []byte(routesPolicy), 0o600); err != nil {
		return err
	}
	d, err := b.startDaemon(bin, dir, ns, policyPath, "routes", "--poll", "1h")
	if err != nil {
		return err
	}
	defer d.stop()
	cl, err := startClient("routes/app0", filepath.Join(d.cgroupRoot, daemon.AppsDir, appName(0)), ns, 0, false)
	if err != nil {
		return err
	}
	defer cl.close()

	res := &routesResult{Routes: b.cfg.RouteAdds, LoadAvg: []string{loadAvg()}}
	b.res.Routes = res
	err = withHandle(ns, func(nh *netlink.Handle) error {
		link, err := nh.LinkByName(routesLink)
		if err != nil {
			return err
		}
		for i := range b.cfg.RouteAdds {
			if err := ctx.Err(); err != nil {
				return err
			}
			pfx := routePrefix(i)
			dest := netip.AddrPortFrom(pfx.Addr().Next(), refusedPort)
			route := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(pfx)}
			add, err := b.timeRouteChange(cl, dest, false, func() error { return nh.RouteAdd(route) })
			if err != nil {
				return fmt.Errorf("route %d add (%s dev %s): %w", i, pfx, routesLink, err)
			}
			del, err := b.timeRouteChange(cl, dest, true, func() error { return nh.RouteDel(route) })
			if err != nil {
				return fmt.Errorf("route %d del (%s dev %s): %w", i, pfx, routesLink, err)
			}
			res.AddMs, res.DelMs = append(res.AddMs, add), append(res.DelMs, del)
		}
		return nil
	})
	if err != nil {
		return err
	}
	res.Add, res.Del = summarizeMs(res.AddMs), summarizeMs(res.DelMs)
	res.LoadAvg = append(res.LoadAvg, loadAvg())
	b.log.Info("route events", "routes", res.Routes, "add_p50_ms", res.Add.P50, "add_p99_ms", res.Add.P99, "del_p50_ms", res.Del.P50, "del_p99_ms", res.Del.P99)
	return d.stop()
}

// routePrefix is the i-th /24 of routesSpace.
func routePrefix(i int) netip.Prefix {
	a := routesSpace.Addr().As4()
	a[1] += byte(i >> 8)
	a[2] = byte(i)
	return netip.PrefixFrom(netip.AddrFrom4(a), 24)
}

// timeRouteChange starts the client connecting to dest until a connect
// gets the verdict allow, checks that the other verdict holds first, runs
// change, and returns the milliseconds from just before change to the
// first connect with the new verdict.
func (b *bench) timeRouteChange(cl *client, dest netip.AddrPort, allow bool, change func() error) (float64, error) {
	if err := cl.send(request{Op: opUntilVerdict, Dests: []netip.AddrPort{dest}, Allow: allow, Duration: routesWait + time.Second, Pause: routesPause}); err != nil {
		return 0, err
	}
	// The client's first attempt with the old verdict makes it answer
	// Ready; the final answer comes after the change.
	first, err := cl.receive()
	if err != nil {
		return 0, err
	}
	if !first.Ready {
		return 0, fmt.Errorf("%s: allow=%v before the change (%s)", dest, allow, first.Err)
	}
	t0 := monotonic()
	cerr := change()
	resp, err := cl.receive()
	if err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, cerr
	}
	switch {
	case resp.Err != "":
		return 0, fmt.Errorf("client: %s", resp.Err)
	case resp.LastOther == 0:
		return 0, fmt.Errorf("%s: no connect with the old verdict before the change (allow=%v from the start)", dest, allow)
	case resp.Reached == 0:
		return 0, fmt.Errorf("%s: not allow=%v %v after the change", dest, allow, routesWait+time.Second)
	}
	// The new verdict holds from the generation switch on, but Apply
	// returns only after an RCU grace period (about 10 ms here): the next
	// change is measured from an idle daemon, not from inside that wait.
	time.Sleep(routesGap)
	return msOf(resp.Reached - t0), nil
}

// routesTarget judges the route-to-enforcement time.
func (r *results) routesTarget() targetResult {
	tr := targetResult{Name: "route via an internal interface to enforcement", Target: "p99 < 10 ms from `ip route add ... dev wg0` to a denied connect"}
	rt := r.Routes
	if rt == nil || len(rt.AddMs) == 0 {
		return tr
	}
	tr.Value = fmt.Sprintf("p99 %.2f ms (p50 %.2f, max %.2f) over %d route adds", rt.Add.P99, rt.Add.P50, rt.Add.Max, len(rt.AddMs))
	tr.Met = boolp(rt.Add.P99 < 10)
	if !*tr.Met {
		tr.Gap = fmt.Sprintf("%.2f ms over", rt.Add.P99-10)
	}
	tr.Why = fmt.Sprintf("removal to the first allowed connect: p50 %.2f ms, p99 %.2f ms; the daemon re-reads the routes at a burst's first event, at once, and once more when the burst ends, then applies a generation (its switch is what the client sees); on 2 CPUs under load average %s a woken daemon may wait tens of ms for a CPU", rt.Del.P50, rt.Del.P99, strings.Join(rt.LoadAvg, " → "))
	return tr
}

// routesSection writes the routes phase's table.
func (r *results) routesSection(w func(string, ...any)) {
	rt := r.Routes
	if rt == nil {
		return
	}
	w("## Routes of internal.interfaces")
	w("")
	w("The real daemon (bin/procgate, `internal.interfaces: [%s]`, `--poll 1h`: only route and link events can be this fast) in a namespace of its own; a client in its app0 cgroup (no grant there) connects a fresh UDP socket every %v to an address of a /24 that the bench then routes `dev %s` by netlink (the connect hook's verdict, the same for TCP, without a handshake to wait for: a TCP connect allowed just before the switch waits for its SYN, which the egress backstop decides again in the new generation, and a denied SYN hangs until the sweep ends the socket). Times from just before the netlink call (CLOCK_MONOTONIC in both processes) to the return of the first connect with the new verdict, over %d routes: added (denied from then on) and removed (allowed again), %v apart (the daemon's Apply returns an RCU grace period, about 10 ms here, after the switch that the client sees). Load average at the start and the end of the phase: %s (on 2 CPUs: a woken daemon may wait for a CPU).", routesLink, routesPause, routesLink, rt.Routes, routesGap, strings.Join(rt.LoadAvg, " → "))
	w("")
	w("| route | p50 ms | p99 ms | max ms |")
	w("|---|---|---|---|")
	w("| added: first denied connect | %.2f | %.2f | %.2f |", rt.Add.P50, rt.Add.P99, rt.Add.Max)
	w("| removed: first allowed connect | %.2f | %.2f | %.2f |", rt.Del.P50, rt.Del.P99, rt.Del.Max)
	w("")
}
