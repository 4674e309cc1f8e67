package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/probe"
)

const namesE2EPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8, fd00::/8]
everyone:
  allow:
    - to: 10.0.0.53
      ports: [53]
    - to: 10.0.0.54
      ports: [53]
    - to: fd00::53
      ports: [53]
apps:
  - name: web
    users: [nobody]
    allow:
      - to: db.corp.example
        proto: tcp
        ports: [5432]
      - to: "*.svc.example"
        proto: tcp
        ports: [443]
`

// zone is a test DNS server's records: name (FQDN) -> addresses, answered
// as A or AAAA records as the question asks.
type zone struct {
	mu  sync.Mutex
	a   map[string][]string
	ttl map[string]uint32
	cn  map[string]string // CNAMEs
}

func (z *zone) set(name string, ttl uint32, addrs ...string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.a[dns.Fqdn(name)], z.ttl[dns.Fqdn(name)] = addrs, ttl
}

func (z *zone) ServeDNS(w dns.ResponseWriter, q *dns.Msg) {
	z.mu.Lock()
	defer z.mu.Unlock()
	m := new(dns.Msg)
	m.SetReply(q)
	name := strings.ToLower(q.Question[0].Name)
	for hops := 0; hops < 8; hops++ {
		target, ok := z.cn[name]
		if !ok {
			break
		}
		m.Answer = append(m.Answer, &dns.CNAME{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeCNAME, Class: dns.ClassINET, Ttl: 300}, Target: target})
		name = target
	}
	qtype := q.Question[0].Qtype
	for _, a := range z.a[name] {
		ip := net.ParseIP(a)
		hdr := dns.RR_Header{Name: name, Rrtype: qtype, Class: dns.ClassINET, Ttl: z.ttl[name]}
		switch {
		case qtype == dns.TypeA && ip.To4() != nil:
			m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: ip})
		case qtype == dns.TypeAAAA && ip.To4() == nil:
			m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr, AAAA: ip})
		}
	}
	_ = w.WriteMsg(m)
}

// startZone serves z on addr (UDP and TCP) inside the test's namespace.
// The namespace's addresses are local routes (nstest.AnyIPLoopback), which
// IPv6 binds only with IPV6_FREEBIND.
func startZone(t *testing.T, ns, addr string, z *zone) {
	t.Helper()
	var pc net.PacketConn
	var ln net.Listener
	lc := net.ListenConfig{Control: func(network, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if strings.HasSuffix(network, "6") {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, 1)
			}
		})
		return errors.Join(err, serr)
	}}
	if err := nstest.InNS(t, ns, func() (err error) {
		if pc, err = lc.ListenPacket(context.Background(), "udp", addr); err != nil {
			return err
		}
		ln, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*dns.Server{{PacketConn: pc, Handler: z}, {Listener: ln, Handler: z}} {
		go s.ActivateAndServe()
		t.Cleanup(func() { s.Shutdown() })
	}
}

// startForger answers every query on addr (UDP) with forged, a record of
// its own, sent from from: an answer from an address that is not the
// resolver asked.
func startForger(t *testing.T, ns, addr, from, forged string) {
	t.Helper()
	var pc net.PacketConn
	if err := nstest.InNS(t, ns, func() (err error) {
		pc, err = net.ListenPacket("udp4", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		p := ipv4.NewPacketConn(pc)
		buf := make([]byte, 65535)
		for {
			n, _, src, err := p.ReadFrom(buf)
			if err != nil {
				return
			}
			var q dns.Msg
			if q.Unpack(buf[:n]) != nil || len(q.Question) != 1 {
				continue
			}
			m := new(dns.Msg)
			m.SetReply(&q)
			m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300}, A: net.ParseIP(forged)}}
			b, _ := m.Pack()
			_, _ = p.WriteTo(b, &ipv4.ControlMessage{Src: net.ParseIP(from)}, src)
		}
	}()
}

// TestNameGrantsEndToEnd: an app with name grants resolving through a real
// DNS server in the test namespace, with the daemon's proxy in between.
func TestNameGrantsEndToEnd(t *testing.T) {
	e := newE2EWith(t, namesE2EPolicy, true, "--poll", "1h", "--dns-grace", "0s", "--dns-cap", "4")
	z := &zone{a: map[string][]string{}, ttl: map[string]uint32{}, cn: map[string]string{
		"api.svc.example.":           "backend.elsewhere.example.",
		"backend.elsewhere.example.": "pool.elsewhere.example.",
	}}
	z.set("pool.elsewhere.example", 60, "10.2.0.7")
	z.set("other.corp.example", 60, "10.1.9.9")
	z.set("nogrant.example", 60, "10.3.0.1")
	startZone(t, e.netns, "10.0.0.53:53", z)
	startZone(t, e.netns, "[fd00::53]:53", z)
	startForger(t, e.netns, "10.0.0.54:53", "10.0.0.66", "10.6.6.6")
	web := e.prober("web")
	resolve := func(name, proto string, port uint16) []string {
		t.Helper()
		got, err := web.Resolve(name, "10.0.0.53:53", proto, port)
		if err != nil {
			t.Fatalf("resolve %s over %s: %v\n%s", name, proto, err, e.daemonLog())
		}
		return got
	}
	resolve6 := func(name, proto string, port uint16) []string {
		t.Helper()
		got, err := web.Resolve(name, "[fd00::53]:53", proto, port, "A", "AAAA")
		if err != nil {
			t.Fatalf("resolve %s over %s at [fd00::53]:53: %v\n%s", name, proto, err, e.daemonLog())
		}
		return got
	}

	t.Run("never resolved", func(t *testing.T) {
		mustTry(t, web, "10.1.2.3:5432/tcp", probe.Denied)
		mustTry(t, web, "10.1.9.9:5432/tcp", probe.Denied)
	})
	t.Run("grant before use, rotating", func(t *testing.T) {
		// Each answer names an address never seen before, and the app
		// connects the moment it has it.
		for i := range 50 {
			addr := fmt.Sprintf("10.1.3.%d", i+1)
			z.set("db.corp.example", 60, addr)
			proto := "udp"
			if i%5 == 4 {
				proto = "tcp"
			}
			if got := resolve("db.corp.example", proto, 5432); !slices.Equal(got, []string{addr + "=allowed"}) {
				t.Fatalf("round %d over %s: %v, want %s allowed", i, proto, got, addr)
			}
		}
		mustTry(t, web, "10.1.3.1:5433/tcp", probe.Denied) // not the grant's port
	})
	t.Run("round robin and cap", func(t *testing.T) {
		z.set("rr.svc.example", 60, "10.4.0.1", "10.4.0.2", "10.4.0.3", "10.4.0.4", "10.4.0.5", "10.4.0.6")
		got := resolve("rr.svc.example", "udp", 443)
		want := []string{"10.4.0.1=allowed", "10.4.0.2=allowed", "10.4.0.3=allowed", "10.4.0.4=allowed", "10.4.0.5=denied", "10.4.0.6=denied"}
		if !slices.Equal(got, want) {
			t.Fatalf("got %v, want %v (--dns-cap 4)", got, want)
		}
		waitEvent(t, e, `"verdict":"deny"`, `"reason":"name-cap"`, `"app":"web"`, `"dest":"10.4.0.5"`, `"kind":"name"`)
	})
	t.Run("cname chain", func(t *testing.T) {
		if got := resolve("api.svc.example", "udp", 443); !slices.Equal(got, []string{"10.2.0.7=allowed"}) {
			t.Fatalf("got %v", got)
		}
		out, err := e.procgate("explain", "--app", "web", "10.2.0.7:443")
		for _, want := range []string{"allow (granted-name)", "*.svc.example", "api.svc.example is 10.2.0.7", "CNAME", "from 10.0.0.53:53"} {
			if err != nil || !strings.Contains(out, want) {
				t.Errorf("explain: %v\n%s\nwant %q", err, out, want)
			}
		}
	})
	t.Run("a name without a grant", func(t *testing.T) {
		if got := resolve("nogrant.example", "udp", 5432); !slices.Equal(got, []string{"10.3.0.1=denied"}) {
			t.Fatalf("got %v", got)
		}
	})
	t.Run("ttl expiry", func(t *testing.T) {
		z.set("short.svc.example", 1, "10.5.0.1")
		if got := resolve("short.svc.example", "udp", 443); !slices.Equal(got, []string{"10.5.0.1=allowed"}) {
			t.Fatalf("got %v", got)
		}
		time.Sleep(1200 * time.Millisecond)
		mustTry(t, web, "10.5.0.1:443/tcp", probe.Denied)
	})
	t.Run("ipv6 resolver", func(t *testing.T) {
		// Queries to an IPv6 resolver go to the proxy at [::1]; both an
		// A and an AAAA answer grant, over UDP and TCP, each address
		// new when asked.
		for i, proto := range []string{"udp", "tcp"} {
			v4, v6 := fmt.Sprintf("10.1.6.%d", i+1), fmt.Sprintf("fd00:6::%d", i+1)
			z.set("db.corp.example", 60, v4, v6)
			got := resolve6("db.corp.example", proto, 5432)
			if want := []string{v4 + "=allowed", v6 + "=allowed"}; !slices.Equal(got, want) {
				t.Fatalf("over %s: %v, want %v", proto, got, want)
			}
		}
		// An IPv6 socket asking an IPv4 resolver through its mapped
		// address.
		z.set("db.corp.example", 60, "10.1.6.3")
		got, err := web.Resolve("db.corp.example", "[::ffff:10.0.0.53]:53", "udp", 5432)
		if err != nil || !slices.Equal(got, []string{"10.1.6.3=allowed"}) {
			t.Fatalf("through [::ffff:10.0.0.53]:53: %v, %v; want 10.1.6.3 allowed", got, err)
		}
		mustTry(t, web, "[fd00:6::9]:5432/tcp", probe.Denied) // never answered
		out, err := e.procgate("explain", "--app", "web", "[fd00:6::1]:5432")
		if err != nil || !strings.Contains(out, "from [fd00::53]:53") {
			t.Errorf("explain: %v\n%s\nwant the answer from [fd00::53]:53", err, out)
		}
	})
	t.Run("forged answer", func(t *testing.T) {
		// 10.0.0.54 answers from 10.0.0.66: the proxy's exchange takes
		// no answer from elsewhere than the resolver it asked.
		if got, err := web.Resolve("db.corp.example", "10.0.0.54:53", "udp", 5432); err == nil {
			t.Fatalf("resolving through a forger: %v, want an error", got)
		}
		// Forged answers sent at the proxy itself are not queries.
		if err := nstest.InNS(t, e.netns, func() error {
			m := new(dns.Msg)
			m.SetQuestion("db.corp.example.", dns.TypeA)
			m.Response = true
			m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: "db.corp.example.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300}, A: net.ParseIP("10.6.6.6")}}
			b, _ := m.Pack()
			port := proxyPort(t, e)
			for _, dst := range []string{"127.0.0.1", "127.0.0.2", "10.0.0.1"} {
				c, err := net.Dial("udp4", net.JoinHostPort(dst, port))
				if err != nil {
					return err
				}
				_, _ = c.Write(b)
				c.Close()
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
		mustTry(t, web, "10.6.6.6:5432/tcp", probe.Denied)
	})
}

// proxyPort is the DNS proxy's port, from the daemon's log.
func proxyPort(t *testing.T, e *e2e) string {
	t.Helper()
	log := e.daemonLog()
	i := strings.Index(log, "guard=dns-names")
	if i < 0 {
		t.Fatalf("no dns-names guard in the daemon log:\n%s", log)
	}
	line := log[i:]
	line = line[:strings.IndexByte(line+"\n", '\n')]
	_, after, ok := strings.Cut(line, " port=")
	if !ok {
		t.Fatalf("no port in %q", line)
	}
	return strings.Fields(after)[0]
}

// TestNameGrantsOtherNetns: an app whose processes live in another network
// namespace than the daemon's (a container's), with its own resolver
// there. Its first query goes unobserved (dns-unobserved); from it the
// daemon starts a proxy in that namespace, and later answers grant, from
// IPv4 and IPv6 resolvers. Once no process is left there, the proxy stops.
// An app the daemon launches in its caller's namespace has the proxy there
// before it starts: its first answer grants.
func TestNameGrantsOtherNetns(t *testing.T) {
	e := newE2EWith(t, namesE2EPolicy, true, "--poll", "1h", "--dns-grace", "0s")

	t.Run("launched", func(t *testing.T) {
		callerNS := nstest.NetNS(t)
		nstest.AnyIPLoopback(t, callerNS)
		z := &zone{a: map[string][]string{}, ttl: map[string]uint32{}, cn: map[string]string{}}
		z.set("launched.svc.example", 60, "10.1.8.1")
		startZone(t, callerNS, "10.0.0.53:53", z)
		// Run by nobody, the daemon launches it (root launches its
		// apps itself).
		var out string
		if err := nstest.InNS(t, callerNS, func() error {
			out, _ = e.procgateAs(&syscall.Credential{Uid: 65534, Gid: 65534}, nil,
				"run", "--app", "web", "--", e.bin, "dial", "--timeout", "1s", "--resolver", "10.0.0.53:53", "launched.svc.example:443")
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		// Allowed: nothing listens there, so the connection is refused.
		if !strings.Contains(out, "connection refused") {
			t.Fatalf("web launched in another namespace dialing launched.svc.example:443: want the connection refused (allowed), got:\n%s\n%s", out, e.daemonLog())
		}
	})
	other := nstest.NetNS(t)
	nstest.AnyIPLoopback(t, other)
	z := &zone{a: map[string][]string{}, ttl: map[string]uint32{}, cn: map[string]string{}}
	startZone(t, other, "10.0.0.53:53", z)
	startZone(t, other, "[fd00::53]:53", z)
	web, err := probe.Start(filepath.Join(e.cgroup, "procgate.apps", "web"), other, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer web.Close()

	z.set("db.corp.example", 60, "10.1.7.1")
	if got, err := web.Resolve("db.corp.example", "10.0.0.53:53", "udp", 5432); err != nil || !slices.Equal(got, []string{"10.1.7.1=denied"}) {
		t.Fatalf("first query, unobserved: %v, %v; want 10.1.7.1 denied", got, err)
	}
	waitLog(t, e, "DNS proxy started in an app's network namespace", 2) // the launched app's, this one
	for i, tc := range []struct{ resolver, proto, addr string }{
		{"10.0.0.53:53", "udp", "10.1.7.2"},
		{"10.0.0.53:53", "tcp", "10.1.7.3"},
		{"[fd00::53]:53", "udp", "fd00:7::4"},
		{"[fd00::53]:53", "tcp", "fd00:7::5"},
	} {
		z.set("db.corp.example", 60, tc.addr)
		typ := "A"
		if strings.Contains(tc.addr, ":") {
			typ = "AAAA"
		}
		got, err := web.Resolve("db.corp.example", tc.resolver, tc.proto, 5432, typ)
		if err != nil || !slices.Equal(got, []string{tc.addr + "=allowed"}) {
			t.Fatalf("%d: at %s over %s: %v, %v; want %s allowed\n%s", i, tc.resolver, tc.proto, got, err, tc.addr, e.daemonLog())
		}
	}
	if err := web.Close(); err != nil {
		t.Logf("prober: %v", err)
	}
	waitLog(t, e, "DNS proxy of a network namespace stopped", 2)
}

// waitLog waits until the daemon's log has want n times.
func waitLog(t *testing.T, e *e2e, want string, n int) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for strings.Count(e.daemonLog(), want) < n {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the daemon's log:\n%s", want, e.daemonLog())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestNameGrantsContainerNetns: a match.container app whose process runs
// in a network namespace of its own, found at its container's start
// event. The daemon starts the namespace's proxy as it binds the
// container's cgroup, so the container's very first query, once the
// daemon answered the event, is learned and its answer connects at once.
func TestNameGrantsContainerNetns(t *testing.T) {
	nstest.RequireRoot(t)
	rt := newFakeRuntime(t)
	e := newE2EWith(t, `version: 1
internal:
  prefixes: [10.0.0.0/8]
everyone:
  allow:
    - to: 10.0.0.53
      ports: [53]
apps:
  - name: web
    match: {container: web}
    allow:
      - to: db.corp.example
        proto: tcp
        ports: [5432]
`, true, "--container-socket", rt.sock, "--poll", "1h", "--dns-grace", "0s")
	rt.waitSubscribed(t, e)

	own := nstest.NetNS(t)
	nstest.AnyIPLoopback(t, own)
	z := &zone{a: map[string][]string{}, ttl: map[string]uint32{}, cn: map[string]string{}}
	z.set("db.corp.example", 60, "10.1.7.1")
	startZone(t, own, "10.0.0.53:53", z)
	web, err := probe.Start(nstest.ChildCgroup(t, e.cgroup, "ctr"), own, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer web.Close()
	// A runtime tells of a container's start once its process is in the
	// container's namespaces; the prober enters its own after its exec.
	waitNetns(t, web.Pid(), own)

	rt.set("web", fmt.Sprintf(`{"Id":"abc","State":{"Running":true,"Pid":%d}}`, web.Pid()))
	rt.emit("start", "abc", "web")
	// The State that binds the container's cgroup comes after the proxy
	// of its process's namespace started.
	e.waitApp("web", "the container's cgroup bound at its start event", func(a api.AppStatus) bool { return a.Cgroups == 1 })
	if got, err := web.Resolve("db.corp.example", "10.0.0.53:53", "udp", 5432); err != nil || !slices.Equal(got, []string{"10.1.7.1=allowed"}) {
		t.Fatalf("first query: %v, %v; want 10.1.7.1 allowed\n%s", got, err, e.daemonLog())
	}
}

// waitNetns waits until process pid (its main thread, which the daemon
// reads) is in the network namespace at ns.
func waitNetns(t *testing.T, pid int, ns string) {
	t.Helper()
	var want unix.Stat_t
	if err := unix.Stat(ns, &want); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		var st unix.Stat_t
		if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err != nil {
			t.Fatalf("process %d: %v", pid, err)
		}
		if st.Dev == want.Dev && st.Ino == want.Ino {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d not in network namespace %s within 30s", pid, ns)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
