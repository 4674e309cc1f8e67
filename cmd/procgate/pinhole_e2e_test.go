package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/daemon"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/pinholetest"
	"github.com/procgate/procgate/perimeter"
)

// The site's rules: srv1 (the agent) may open holes to itself on the
// auxiliary ports; the control port is a service for the client's
// networks (the gateway drops every other new inbound connection that no
// hole lets in).
const pinholeRules = `host srv1 10.9.0.5,fd09::5
allow srv1 * * * * self 40000-40100
service srv1 tcp 2121 from 198.51.100.0/24,2001:db8:c::/64
deny * * * 203.0.113.66 * * *
`

const pinholePolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: xfer
    inbound:
      dynamic:
        control: [2121]
        ports: [40000-40100]
        lease: 3s
`

// pinholeLease is the policy's lease: a dead agent's holes close within it.
const pinholeLease = 3 * time.Second

// blocked is how long an attempt the perimeter or the host guard drops is
// given; that it was dropped is checked by counters too.
const blocked = 500 * time.Millisecond

// until polls cond (a hang guard, not a timing assertion: the test binary's
// -timeout bounds it).
func until(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; !cond(); i++ {
		if i == 3000 {
			t.Fatalf("%s: not after 30s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (e *e2e) pinholes() []api.Pinhole {
	e.t.Helper()
	out, err := e.procgate("pinholes", "--json")
	if err != nil {
		e.t.Fatalf("procgate pinholes: %v\n%s", err, out)
	}
	var hs []api.Pinhole
	if err := json.Unmarshal([]byte(out), &hs); err != nil {
		e.t.Fatalf("procgate pinholes --json: %v\n%s", err, out)
	}
	return hs
}

func hasHole(hs []api.Pinhole, state, proto, peer string, port uint16) bool {
	host := nstest.Server4
	if strings.Contains(peer, ":") {
		host = nstest.Server6
	}
	return slices.ContainsFunc(hs, func(h api.Pinhole) bool {
		return h.State == state && h.Proto == proto && h.Peer == peer && h.Port == port && h.Host == host
	})
}

// gatewayHoles is what the gateway holds for the agent's delegate.
func gatewayHoles(t *testing.T, c *perimeter.Client) []perimeter.Key {
	t.Helper()
	hs, err := c.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var ks []perimeter.Key
	for _, h := range hs {
		ks = append(ks, h.Key)
	}
	return ks
}

func holeKey(peer, proto string, port uint16) perimeter.Key {
	p, _ := perimeter.ParseProto(proto)
	host := nstest.Server4
	if strings.Contains(peer, ":") {
		host = nstest.Server6
	}
	return perimeter.Key{Peer: netip.MustParseAddr(peer), Proto: p, Host: netip.MustParseAddr(host), Port: port}
}

// holdConn has the app keep connections on the aux port, waits for the
// client's hole and holds a connection from the client open (until the
// test ends, or Close) once the server has accepted it.
func holdConn(t *testing.T, e *e2e, app *pinholetest.Server, client string, port uint16) net.Conn {
	t.Helper()
	app.Do("keep " + strconv.Itoa(int(port)))
	until(t, "hole of the held port", func() bool { return hasHole(e.pinholes(), "open", "tcp", nstest.Client4, port) })
	c, err := nstest.DialIn(client, "tcp", net.JoinHostPort(nstest.Server4, strconv.Itoa(int(port))), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Read(make([]byte, 8)); err != nil { // accepted: the server wrote
		t.Fatal(err)
	}
	return c
}

func mustReach(t *testing.T, ns, network, addr, want, why string) {
	t.Helper()
	if out, err := pinholetest.Exchange(ns, network, addr, 5*time.Second); err != nil || out != want {
		t.Errorf("%s: %s %s answered %q, %v; want %q", why, network, addr, out, err, want)
	}
}

func mustNotReach(t *testing.T, ns, network, addr, why string) {
	t.Helper()
	if out, err := pinholetest.Exchange(ns, network, addr, blocked); err == nil {
		t.Errorf("%s: %s %s answered %q; want it dropped", why, network, addr, out)
	}
}

// TestPinholeEndToEnd runs the whole chain: a static Go server in an app
// with inbound: dynamic, procgate daemon with the agent on the server, the
// gateway on the router, a client and a second external host.
func TestPinholeEndToEnd(t *testing.T) {
	top := nstest.NewSite(t)
	gw := pinholetest.StartGateway(t, top, pinholeRules, time.Minute)
	srv1 := gw.Client(t, "srv1", top.Server)

	e := newE2EIn(t, pinholePolicy, top.Server, true,
		"--gateway", gw.URL, "--gateway-ca", gw.CA, "--gateway-cert", gw.Cert, "--gateway-key", gw.Key)
	if st := e.status(); st.Pinholes == nil || st.Pinholes.Gateway != gw.URL {
		t.Fatalf("status shows no pinhole agent for %s: %+v", gw.URL, st.Pinholes)
	}
	app := pinholetest.Start(t, filepath.Join(e.cgroup, daemon.AppsDir, "xfer"), top.Server)
	app.Do("control 2121")
	ctl, err := nstest.DialIn(top.Client, "tcp", nstest.Server4+":2121", 5*time.Second)
	if err != nil {
		t.Fatalf("control connection: %v", err)
	}
	defer ctl.Close()

	aux := nstest.Server4 + ":40000"
	udpAux := nstest.Server4 + ":40001"
	app.Do("listen 40000")
	until(t, "tcp hole for the client", func() bool { return hasHole(e.pinholes(), "open", "tcp", nstest.Client4, 40000) })
	if got, want := gatewayHoles(t, srv1), []perimeter.Key{holeKey(nstest.Client4, "tcp", 40000)}; !slices.Equal(got, want) {
		t.Errorf("gateway holds %v, want %v: the client's hole only", got, want)
	}
	mustReach(t, top.Client, "tcp", aux, "data\n", "the client through its hole")
	mustNotReach(t, top.Other, "tcp", aux, "the second external host at the gateway")

	// The host guard: the router reaches the server without crossing its
	// own forward chain; a port outside the app's ranges answers it, the
	// aux port not. (Not the control port: a control connection from the
	// router would rightly give the router a hole.)
	drops := e.status().Pinholes.GuardDrops
	app.Do("listen 41000")
	mustReach(t, top.Router, "tcp", nstest.Server4+":41000", "data\n", "the router on a port that is not auxiliary")
	mustNotReach(t, top.Router, "tcp", aux, "the router at the host guard")
	if now := e.status().Pinholes.GuardDrops; now <= drops {
		t.Errorf("host guard drops %d -> %d: the router's attempt was not dropped by the guard", drops, now)
	}

	app.Do("bind 40001")
	until(t, "udp hole for the client", func() bool { return hasHole(e.pinholes(), "open", "udp", nstest.Client4, 40001) })
	mustReach(t, top.Client, "udp", udpAux, "ping\n", "udp through the hole")
	mustNotReach(t, top.Other, "udp", udpAux, "udp from the second external host")

	// IPv6: a control connection over IPv6 gets holes to the server's IPv6
	// address; the IPv4 client's to its IPv4 address.
	ctl6, err := nstest.DialIn(top.Client, "tcp", "["+nstest.Server6+"]:2121", 5*time.Second)
	if err != nil {
		t.Fatalf("IPv6 control connection: %v", err)
	}
	app.Do("listen 40002")
	until(t, "holes for both families", func() bool {
		hs := e.pinholes()
		return hasHole(hs, "open", "tcp", nstest.Client6, 40002) && hasHole(hs, "open", "tcp", nstest.Client4, 40002)
	})
	aux6 := "[" + nstest.Server6 + "]:40002"
	mustReach(t, top.Client, "tcp", aux6, "data\n", "IPv6 through the hole")
	mustNotReach(t, top.Other, "tcp", aux6, "IPv6 from the second external host")
	ctl6.Close()
	until(t, "IPv6 hole closed with its control connection", func() bool {
		return !hasHole(e.pinholes(), "open", "tcp", nstest.Client6, 40002)
	})
	app.Do("close 40002")

	// A peer named through the API, from inside the app.
	out, err := e.procgate("run", "--app", "xfer", "--", e.bin, "--socket", e.socket,
		"pinhole", "open", "--peer", nstest.Other4, "--port", "40001", "--proto", "udp")
	if err != nil || !strings.HasPrefix(out, "open udp "+nstest.Other4+" -> "+nstest.Server4+":40001") {
		t.Fatalf("pinhole open: %v\n%s", err, out)
	}
	mustReach(t, top.Other, "udp", udpAux, "ping\n", "the named peer")
	out, err = e.procgate("run", "--app", "xfer", "--", e.bin, "--socket", e.socket,
		"pinhole", "open", "--peer", "203.0.113.66", "--port", "40001", "--proto", "udp")
	if err == nil || !strings.Contains(out, "refused") || !strings.Contains(out, "site.rules:4") {
		t.Errorf("a peer the rules deny: %v\n%s", err, out)
	}
	for _, bad := range [][]string{
		{"--peer", "0.0.0.0", "--port", "40001"},
		{"--peer", "198.51.100.0/24", "--port", "40001"},
		{"--peer", nstest.Other4, "--port", "2121"},
	} {
		args := append([]string{"run", "--app", "xfer", "--", e.bin, "--socket", e.socket, "pinhole", "open"}, bad...)
		if out, err := e.procgate(args...); err == nil {
			t.Errorf("pinhole open %v was accepted:\n%s", bad, out)
		}
	}
	if out, err := e.procgate("pinhole", "open", "--peer", nstest.Other4, "--port", "40001"); err == nil {
		t.Errorf("pinhole open from outside any app was accepted:\n%s", out)
	}
	if out, err := e.procgate("pinholes"); err != nil || !strings.Contains(out, "xfer") || !strings.Contains(out, nstest.Other4) {
		t.Errorf("procgate pinholes: %v\n%s", err, out)
	}

	// The router, named as a peer of 40003: only the host guard stands
	// between it and the server (it does not cross its own forward chain).
	// TCP: the policy's internal prefixes hold the router's address, and
	// the app has no grant to send a UDP answer there.
	app.Do("listen 40003")
	routerAux := nstest.Server4 + ":40003"
	if out, err := e.procgate("run", "--app", "xfer", "--", e.bin, "--socket", e.socket,
		"pinhole", "open", "--peer", nstest.RouterToServer4, "--port", "40003", "--proto", "tcp"); err != nil {
		t.Fatalf("pinhole open for the router: %v\n%s", err, out)
	}
	mustReach(t, top.Router, "tcp", routerAux, "data\n", "the router, named")

	// A restarted daemon finds the sockets that exist and keeps their holes,
	// named peers included; the host guard, emptied at the start, lets
	// their peers in again. A socket released while the daemon was down
	// takes its named peer and its old allow entry with it.
	e.stopDaemon(syscall.SIGTERM)
	app.Do("close 40003")
	e.startDaemon()
	until(t, "holes kept over a daemon restart", func() bool {
		hs := e.pinholes()
		return hasHole(hs, "open", "tcp", nstest.Client4, 40000) && hasHole(hs, "open", "udp", nstest.Client4, 40001) &&
			hasHole(hs, "open", "udp", nstest.Other4, 40001)
	})
	mustReach(t, top.Client, "udp", udpAux, "ping\n", "after the daemon's restart")
	mustReach(t, top.Client, "tcp", aux, "data\n", "after the daemon's restart")
	mustReach(t, top.Other, "udp", udpAux, "ping\n", "the named peer after the daemon's restart")
	until(t, "the router's named peer forgotten", func() bool {
		b, err := os.ReadFile(filepath.Join(e.state, "pinhole-named.json"))
		return err == nil && !strings.Contains(string(b), nstest.RouterToServer4)
	})
	app.Do("listen 40003")
	mustNotReach(t, top.Router, "tcp", routerAux, "the router after the restart: its named peer and allow entry are gone")
	app.Do("close 40003")

	// A gateway that restarts without its table (every hole gone): the
	// agent's next renewal finds its holes missing and syncs them back.
	gw.Restart(t, true)
	until(t, "holes back after the gateway lost them", func() bool {
		ks := gatewayHoles(t, srv1)
		return slices.Contains(ks, holeKey(nstest.Client4, "tcp", 40000)) && slices.Contains(ks, holeKey(nstest.Client4, "udp", 40001))
	})
	mustReach(t, top.Client, "udp", udpAux, "ping\n", "after the gateway's restart")

	// Closing the aux socket closes its hole, at the gateway and on the host.
	app.Do("close 40000")
	until(t, "tcp hole closed", func() bool {
		return !slices.Contains(gatewayHoles(t, srv1), holeKey(nstest.Client4, "tcp", 40000))
	})
	app.Do("listen 40000") // listening again, but the client's hole is asked anew
	until(t, "tcp hole again", func() bool { return hasHole(e.pinholes(), "open", "tcp", nstest.Client4, 40000) })
	app.Do("close 40000")
	until(t, "tcp hole closed again", func() bool { return !hasHole(e.pinholes(), "open", "tcp", nstest.Client4, 40000) })
	mustNotReach(t, top.Client, "tcp", aux, "after the close")

	// Stale holes, with a short idle time: a hole whose counters stand
	// still and whose peer holds no connection on its port closes; the
	// hole of a port where the client holds a connection stays open. The
	// held connection's last packet comes before 40008's hole opens, after
	// 40007 closed, so when 40008 is stale the held hole has stood still
	// as long: only the socket view keeps it.
	e.stopDaemon(syscall.SIGTERM)
	e.daemonFlags = append(e.daemonFlags, "--pinhole-idle", "2s")
	e.startDaemon()
	held := holdConn(t, e, app, top.Client, 40006)
	for _, port := range []uint16{40007, 40008} {
		app.Do("listen " + strconv.Itoa(int(port)))
		until(t, "idle hole open", func() bool { return hasHole(e.pinholes(), "open", "tcp", nstest.Client4, port) })
		until(t, "idle hole closed as stale", func() bool {
			return !slices.Contains(gatewayHoles(t, srv1), holeKey(nstest.Client4, "tcp", port))
		})
	}
	if !hasHole(e.pinholes(), "open", "tcp", nstest.Client4, 40006) {
		t.Errorf("the hole of a port where its peer holds a connection was closed as stale")
	}
	held.Close()
	until(t, "the held port's hole stale once its connection ends", func() bool {
		return !slices.Contains(gatewayHoles(t, srv1), holeKey(nstest.Client4, "tcp", 40006))
	})
	mustNotReach(t, top.Client, "tcp", nstest.Server4+":40008", "a stale hole")
	// A hole in use for the agent's death below.
	holdConn(t, e, app, top.Client, 40009)

	events, err := e.procgate("events", "--json", "--last", "0")
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, line := range strings.Split(strings.TrimSpace(events), "\n") {
		var r audit.Record
		if json.Unmarshal([]byte(line), &r) == nil && r.Kind == audit.KindPinhole {
			kinds = append(kinds, r.Verdict+" "+r.Pinhole.Proto+" "+r.Pinhole.Peer)
			if r.Verdict == "close" && r.Reason == "stale" {
				kinds = append(kinds, fmt.Sprintf("stale %d", r.Pinhole.Port))
			}
		}
	}
	for _, want := range []string{"open tcp " + nstest.Client4, "close tcp " + nstest.Client4, "open udp " + nstest.Other4, "refuse udp 203.0.113.66",
		"stale 40007", "stale 40008", "stale 40006"} {
		if !slices.Contains(kinds, want) {
			t.Errorf("audit log lacks %q; pinhole records: %q", want, kinds)
		}
	}

	// The agent killed: its holes stay until their lease ends, then close.
	e.stopDaemon(syscall.SIGKILL)
	if got := gatewayHoles(t, srv1); len(got) == 0 {
		t.Errorf("holes closed at once when the agent died; want them to last their lease")
	}
	killed := time.Now()
	until(t, "holes of a dead agent expire", func() bool { return len(gatewayHoles(t, srv1)) == 0 })
	if held := time.Since(killed); held > 4*pinholeLease {
		t.Logf("holes outlived the agent by %s (lease %s)", held, pinholeLease)
	}
	mustNotReach(t, top.Client, "udp", udpAux, "after the lease")
}

// TestPinholePrincipalEndToEnd: inbound: dynamic for an app with match:
// (a unit here; the pinhole programs use the enforcer's principal lookup,
// which finds unit, cgroup, container and user apps alike). The unit's
// control connection and auxiliary listen open a hole at the gateway, and
// after a restart (a new cgroup, bound in its mkdir) so does the new
// process' listen, with no reload in between.
func TestPinholePrincipalEndToEnd(t *testing.T) {
	top := nstest.NewSite(t)
	gw := pinholetest.StartGateway(t, top, pinholeRules, time.Minute)
	e := newE2EIn(t, `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: ftpd
    match: {unit: ftpd.service}
    inbound:
      dynamic:
        control: [2121]
        ports: [40000-40100]
`, top.Server, true, "--gateway", gw.URL, "--gateway-ca", gw.CA, "--gateway-cert", gw.Cert, "--gateway-key", gw.Key)
	slice := nstest.ChildCgroup(t, e.cgroup, "system.slice")
	for i, port := range []uint16{40000, 40001} {
		unit := nstest.ChildCgroup(t, slice, "ftpd.service")
		app := pinholetest.Start(t, unit, top.Server)
		app.Do("control 2121")
		ctl, err := nstest.DialIn(top.Client, "tcp", nstest.Server4+":2121", 5*time.Second)
		if err != nil {
			t.Fatalf("control connection %d: %v", i, err)
		}
		app.Do(fmt.Sprint("listen ", port))
		until(t, fmt.Sprint("tcp hole for the unit's listen on ", port), func() bool {
			return hasHole(e.pinholes(), "open", "tcp", nstest.Client4, port)
		})
		aux := fmt.Sprintf("%s:%d", nstest.Server4, port)
		mustReach(t, top.Client, "tcp", aux, "data\n", "the client through the unit's hole")
		mustNotReach(t, top.Other, "tcp", aux, "the second external host at the gateway")
		// The unit restarts: its process ends, systemd removes the cgroup
		// and makes it again.
		ctl.Close()
		app.Kill()
		if err := os.Remove(unit); err != nil {
			t.Fatalf("remove the unit's cgroup: %v", err)
		}
	}
}
