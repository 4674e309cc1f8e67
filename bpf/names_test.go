package bpf

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/miekg/dns"
	"golang.org/x/net/ipv4"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

const namesPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8, fd00::/8]
apps:
  - name: web
    allow:
      - to: db.corp.example
        proto: tcp
        ports: [5432]
      - to: "*.corp.example"
        ports: [443]
  - name: box
    outside: deny
    allow:
      - to: api.example.com
        proto: tcp
        ports: [443]
  - name: other
    allow:
      - to: 10.9.0.0/16
`

// TestNameGrants: an address learned for an app's name grant is allowed
// to that app only, on the grant's ports, until it expires (the kernel
// checks the expiry itself), across reloads that renumber the apps; the
// cap refuses addresses past it.
func TestNameGrants(t *testing.T) {
	w := newWorld(t, "web", "box", "other")
	rs := mustPolicy(t, namesPolicy)
	w.apply(rs)
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	web, box, other := w.prober("web"), w.prober("box"), w.prober("other")
	learn := func(app, name, addr string, ttl time.Duration) {
		t.Helper()
		refused, _, err := w.e.Learn([]ruleset.Learned{{App: app, Name: name, Addr: netip.MustParseAddr(addr),
			Expires: time.Now().Add(ttl), Answer: name + " A " + addr}}, 0)
		if err != nil || len(refused) > 0 {
			t.Fatalf("learn %s %s for %s: refused %v, %v", name, addr, app, refused, err)
		}
	}
	check := func(step string, p *probe.Prober, dest string, want probe.Verdict) {
		t.Helper()
		t.Run(step+"/"+dest, func(t *testing.T) { tryAll(t, p, dest, want) })
	}

	check("never resolved", web, "10.1.2.3:5432", probe.Denied)
	learn("web", "db.corp.example", "10.1.2.3", time.Hour)
	learn("web", "DB.corp.example.", "fd00::3", time.Hour)
	learn("web", "www.corp.example", "10.1.2.5", time.Hour)
	learn("box", "api.example.com", "192.0.2.10", time.Hour)
	learn("other", "db.corp.example", "10.1.2.6", time.Hour) // no name grant: ignored
	for _, tc := range []struct {
		step string
		p    *probe.Prober
		dest string
		want probe.Verdict
	}{
		{"learned", web, "10.1.2.3:5432", probe.Allowed},
		{"learned v6", web, "[fd00::3]:5432", probe.Allowed},
		{"learned, grant's proto only", web, "10.1.2.3:5432/udp", probe.Denied},
		{"learned, another port", web, "10.1.2.3:5433", probe.Denied},
		{"learned, the wildcard's port", web, "10.1.2.3:443/udp", probe.Allowed},
		{"wildcard", web, "10.1.2.5:443", probe.Allowed},
		{"wildcard, not db's port", web, "10.1.2.5:5432", probe.Denied},
		{"an address never answered", web, "10.1.2.4:5432", probe.Denied},
		{"another app", other, "10.1.2.3:5432", probe.Denied},
		{"another app's own address", other, "10.1.2.6:5432", probe.Denied},
		{"sandbox, learned", box, "192.0.2.10:443", probe.Allowed},
		{"sandbox, not learned", box, "192.0.2.11:443", probe.Denied},
	} {
		check(tc.step, tc.p, tc.dest, tc.want)
	}

	t.Run("expiry in the kernel", func(t *testing.T) {
		learn("web", "short.corp.example", "10.1.2.7", 300*time.Millisecond)
		tryAll(t, web, "10.1.2.7:443", probe.Allowed)
		time.Sleep(400 * time.Millisecond)
		// The daemon has not expired it yet: the kernel refuses by itself.
		tryAll(t, web, "10.1.2.7:443", probe.Denied)
		n, err := w.e.ExpireLearned(time.Now())
		if err != nil || n != 1 {
			t.Fatalf("ExpireLearned = %d, %v; want 1", n, err)
		}
		var v procgateNameValue
		if err := w.e.objs.NameGrants.Lookup(nameKey(w.e.names.slot, 1, netip.MustParseAddr("10.1.2.7")), &v); err == nil {
			t.Errorf("the expired entry is still in name_grants")
		}
	})

	t.Run("reload renumbering the apps", func(t *testing.T) {
		// other takes web's id, web box's: the learned addresses follow
		// their app, not its old number.
		reordered := mustPolicy(t, namesPolicy)
		reordered.Apps = []ruleset.App{*reordered.App("other"), *reordered.App("web"), *reordered.App("box")}
		w.apply(reordered)
		tryAll(t, web, "10.1.2.3:5432", probe.Allowed)
		tryAll(t, box, "192.0.2.10:443", probe.Allowed)
		tryAll(t, other, "10.1.2.3:5432", probe.Denied)
		tryAll(t, box, "10.1.2.3:5432", probe.Denied)
		// A policy without the name grant takes the address away.
		narrowed := mustPolicy(t, strings.Replace(namesPolicy, "db.corp.example", "db2.corp.example", 1))
		w.apply(narrowed)
		tryAll(t, web, "10.1.2.3:5432", probe.Denied)
		tryAll(t, web, "10.1.2.5:443", probe.Allowed)
		w.apply(rs)
		tryAll(t, web, "10.1.2.3:5432", probe.Allowed)
	})

	t.Run("sweep", func(t *testing.T) {
		// The live-socket sweep after a reload keeps connections to
		// learned addresses, by either method, and ends them once the
		// policy loses the name grant.
		startServers(t, w.netns, []string{"0.0.0.0:5432"}, nil)
		for _, m := range []SweepMethod{SweepIterator, SweepNetlink} {
			if m == SweepIterator && w.e.sweep.err != nil {
				continue // the kernel lacks it; TestSweep says so
			}
			h := w.holder(w.cgroups["web/run"])
			mustOpen(t, h, "db", "10.1.2.3:5432/tcp", probe.Connect, 1)
			if res := w.sweepIn(SweepOptions{Method: m}); len(res.Ended) != 0 {
				t.Fatalf("%s: a sweep ended name-granted sockets: %+v", m, res.Ended)
			}
			w.apply(mustPolicy(t, strings.Replace(namesPolicy, "db.corp.example", "db2.corp.example", 1)))
			if res := w.sweepIn(SweepOptions{Method: m}); len(res.Ended) != 1 {
				t.Fatalf("%s: sweep after the name grant went ended %+v, want the one socket", m, res.Ended)
			}
			w.apply(rs)
		}
	})

	t.Run("cap", func(t *testing.T) {
		fact := func(a string) ruleset.Learned {
			return ruleset.Learned{App: "web", Name: "rr.corp.example", Addr: netip.MustParseAddr(a), Expires: time.Now().Add(time.Hour)}
		}
		// One answer past the cap: the rest is refused.
		refused, _, err := w.e.Learn([]ruleset.Learned{fact("10.3.0.1"), fact("10.3.0.2"), fact("10.3.0.3")}, 2)
		if err != nil {
			t.Fatal(err)
		}
		if len(refused) != 1 || refused[0].Addr != netip.MustParseAddr("10.3.0.3") {
			t.Fatalf("refused %v, want 10.3.0.3", refused)
		}
		tryAll(t, web, "10.3.0.2:443", probe.Allowed)
		tryAll(t, web, "10.3.0.3:443", probe.Denied)
		// A known address only moves its expiry: not refused.
		if refused, evicted, err := w.e.Learn([]ruleset.Learned{fact("10.3.0.1")}, 2); err != nil || len(refused)+len(evicted) != 0 {
			t.Fatalf("relearning a known address: refused %v, evicted %v, %v", refused, evicted, err)
		}
		// A later answer with a new address takes the place of the
		// address that expires first (a rotating name).
		refused, evicted, err := w.e.Learn([]ruleset.Learned{fact("10.3.0.4")}, 2)
		if err != nil || len(refused) != 0 || len(evicted) != 1 || evicted[0].Addr != netip.MustParseAddr("10.3.0.2") {
			t.Fatalf("rotation: refused %v, evicted %v, %v; want 10.3.0.2 evicted", refused, evicted, err)
		}
		tryAll(t, web, "10.3.0.4:443", probe.Allowed)
		tryAll(t, web, "10.3.0.2:443", probe.Denied)
		tryAll(t, web, "10.3.0.1:443", probe.Allowed)
	})
}

// TestNameGrantsScale: 1,000 names of 10 addresses each, learned one
// answer at a time as the proxy does, then expired; it reports the time
// per answer, the kernel map's and the daemon's memory (go test -v).
func TestNameGrantsScale(t *testing.T) {
	w := newWorld(t, "web")
	w.apply(mustPolicy(t, namesPolicy))
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	const names, perName = 1000, 10
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	lat := make([]time.Duration, 0, names)
	start := time.Now()
	for i := range names {
		facts := make([]ruleset.Learned, perName)
		for j := range facts {
			facts[j] = ruleset.Learned{App: "web", Name: fmt.Sprintf("n%d.corp.example", i),
				Addr: netip.AddrFrom4([4]byte{10, 20 + byte(i/250), byte(i % 250), byte(j + 1)}), Expires: time.Now().Add(time.Hour)}
		}
		t0 := time.Now()
		refused, _, err := w.e.Learn(facts, 0)
		lat = append(lat, time.Since(t0))
		if err != nil || len(refused) > 0 {
			t.Fatalf("answer %d: refused %d, %v", i, len(refused), err)
		}
	}
	total := time.Since(start)
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	slices.Sort(lat)
	memlock := mapMemlock(t, w.e.objs.NameGrants)
	t.Logf("learned %d names x %d addresses: %v in all, per answer p50 %v p99 %v max %v; name_grants memlock %d KiB (%d entries); daemon heap +%d KiB",
		names, perName, total, lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1], memlock/1024, names*perName,
		(int64(after.HeapAlloc)-int64(before.HeapAlloc))/1024)
	web := w.prober("web")
	tryAll(t, web, "10.23.249.10:443", probe.Allowed) // the last answer's last address
	tryAll(t, web, "10.23.249.11:443", probe.Denied)
	t0 := time.Now()
	n, err := w.e.ExpireLearned(time.Now().Add(2 * time.Hour))
	if err != nil || n != names*perName {
		t.Fatalf("ExpireLearned = %d, %v", n, err)
	}
	t.Logf("expired %d addresses in %v", n, time.Since(t0))
	tryAll(t, web, "10.23.249.10:443", probe.Denied)
}

// mapMemlock is the kernel's memory accounting of a map (fdinfo memlock).
func mapMemlock(t *testing.T, m *ebpf.Map) int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", m.FD()))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "memlock:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return -1
}

// TestDNSRedirect: the port-53 queries of an app with name grants, and
// only those, go to the proxy, at an address that names the app and the
// resolver; from a network namespace no proxy serves they go on, with a
// dns-unobserved event.
func TestDNSRedirect(t *testing.T) {
	w := newWorld(t, "web", "other")
	w.apply(mustPolicy(t, strings.Replace(namesPolicy, "apps:\n", "everyone:\n  allow:\n    - to: 10.0.0.53\n      ports: [53]\n    - to: fd00::53\n      ports: [53]\napps:\n", 1)))
	rd := w.attachWithEvents()
	var proxy, resolver net.PacketConn
	if err := nstest.InNS(t, w.netns, func() (err error) {
		if proxy, err = net.ListenPacket("udp4", "0.0.0.0:0"); err != nil {
			return err
		}
		resolver, err = net.ListenPacket("udp4", "10.0.0.53:53")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close(); resolver.Close() })
	pp := ipv4.NewPacketConn(proxy)
	if err := pp.SetControlMessage(ipv4.FlagDst, true); err != nil {
		t.Fatal(err)
	}
	cookie, err := nsCookie(t, w.netns)
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(proxy.LocalAddr().(*net.UDPAddr).Port)
	// received says which socket got the next datagram: "proxy DST" or
	// "resolver".
	received := func() string {
		t.Helper()
		buf := make([]byte, 512)
		_ = proxy.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if _, cm, _, err := pp.ReadFrom(buf); err == nil {
			return "proxy " + cm.Dst.String()
		}
		_ = resolver.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if _, _, err := resolver.ReadFrom(buf); err == nil {
			return "resolver"
		}
		return "nobody"
	}
	query := probe.SendTo
	web, other := w.prober("web"), w.prober("other")
	dest := ruleset.Dest{Addr: netip.MustParseAddr("10.0.0.53"), Proto: ruleset.UDP, Port: 53}

	if err := w.e.ServeDNS(port, cookie); err != nil {
		t.Fatal(err)
	}
	for _, m := range []probe.Method{query, probe.Connect} {
		if v, err := web.Try(dest, m); err != nil || v != probe.Allowed {
			t.Fatalf("web's query by %s: %v %v", m, v, err)
		}
		if m == probe.Connect {
			continue // connect alone sends nothing; the redirect is in the next test
		}
		got := received()
		dst, ok := strings.CutPrefix(got, "proxy ")
		if !ok {
			t.Fatalf("web's query went to %s, want the proxy", got)
		}
		r, err := w.e.RedirectOf(ruleset.UDP, netip.AddrPort{}, netip.AddrPortFrom(netip.MustParseAddr(dst), port))
		if err != nil || r.App != "web" || r.Resolver != netip.MustParseAddrPort("10.0.0.53:53") || r.Proto != ruleset.UDP {
			t.Fatalf("RedirectOf(%s) = %+v, %v; want web's query to 10.0.0.53:53", dst, r, err)
		}
	}
	if v, err := other.Try(dest, query); err != nil || v != probe.Allowed {
		t.Fatalf("other's query: %v %v", v, err)
	}
	if got := received(); got != "resolver" {
		t.Fatalf("the query of an app without name grants went to %s, want the resolver", got)
	}

	t.Run("ipv6", func(t *testing.T) { redirect6(t, w, web, port) })

	drainEvents(t, rd)
	// Another namespace's proxy only.
	if err := w.e.ServeDNS(port, cookie+1); err != nil {
		t.Fatal(err)
	}
	if err := w.e.ServeDNS(0, cookie); err != nil {
		t.Fatal(err)
	}
	if v, err := web.Try(dest, query); err != nil || v != probe.Allowed {
		t.Fatalf("web's query: %v %v", v, err)
	}
	if got := received(); got != "resolver" {
		t.Fatalf("a query from a namespace the proxy does not serve went to %s, want the resolver", got)
	}
	evs := drainEvents(t, rd)
	if !slices.ContainsFunc(evs, func(e Event) bool {
		return e.Reason == ruleset.ReasonDNSUnobserved && e.Allowed && e.Dest.Port == 53
	}) {
		t.Fatalf("no dns-unobserved event among %+v", evs)
	}
}

// redirect6: web's query to an IPv6 resolver comes to [::1] on the proxy's
// port, from a socket RedirectOf finds (by its cookie, through sock_diag)
// as web's to the resolver; the answer sent back from [::1] reaches web as
// the resolver's (recvmsg6), over UDP and TCP.
func redirect6(t *testing.T, w *world, web *probe.Prober, port uint16) {
	at := netip.AddrPortFrom(netip.IPv6Loopback(), port)
	var pc net.PacketConn
	var ln net.Listener
	if err := nstest.InNS(t, w.netns, func() (err error) {
		if pc, err = net.ListenPacket("udp6", at.String()); err != nil {
			return err
		}
		ln, err = net.Listen("tcp6", at.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close(); ln.Close() })
	resolver := netip.MustParseAddrPort("[fd00::53]:53")
	answered := make(chan error, 2)
	// answer checks what the kernel says of the query from src and
	// answers it with fd00::7.
	answer := func(proto ruleset.Proto, src netip.AddrPort, query []byte) []byte {
		var r Redirected
		err := nstest.InNS(t, w.netns, func() (err error) {
			r, err = w.e.RedirectOf(proto, src, at)
			return err
		})
		if err == nil && (r.App != "web" || r.Resolver != resolver || r.Proto != proto) {
			err = fmt.Errorf("RedirectOf(%s, %s) = %+v, want web's query to %s", proto, src, r, resolver)
		}
		answered <- err
		var q dns.Msg
		if q.Unpack(query) != nil || len(q.Question) != 1 {
			return nil
		}
		m := new(dns.Msg)
		m.SetReply(&q)
		m.Answer = []dns.RR{&dns.AAAA{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: 60},
			AAAA: net.ParseIP("fd00::7")}}
		b, _ := m.Pack()
		return b
	}
	go func() {
		buf := make([]byte, 512)
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		if b := answer(ruleset.UDP, from.(*net.UDPAddr).AddrPort(), buf[:n]); b != nil {
			_, _ = pc.WriteTo(b, from)
		}
	}()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		conn := &dns.Conn{Conn: c}
		q, err := conn.ReadMsgHeader(nil)
		if err != nil {
			return
		}
		if b := answer(ruleset.TCP, c.RemoteAddr().(*net.TCPAddr).AddrPort(), q); b != nil {
			_, _ = conn.Write(b)
		}
	}()
	for _, proto := range []string{"udp", "tcp"} {
		// The prober checks that a UDP answer comes from the resolver.
		got, err := web.Resolve("db.corp.example", resolver.String(), proto, 5432, "AAAA")
		if err != nil {
			t.Fatalf("web resolving over %s at %s: %v", proto, resolver, err)
		}
		select {
		case err := <-answered:
			if err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("over %s: the query did not come to the proxy at %s; web got %v", proto, at, got)
		}
		// Nothing learned it: the address stays denied.
		if !slices.Equal(got, []string{"fd00::7=denied"}) {
			t.Fatalf("over %s: %v, want fd00::7 denied", proto, got)
		}
	}
}

// nsCookie is the network namespace cookie of the namespace at path.
func nsCookie(t *testing.T, path string) (uint64, error) {
	var c uint64
	err := nstest.InNS(t, path, func() (err error) {
		c, err = NetnsCookie()
		return err
	})
	return c, err
}
