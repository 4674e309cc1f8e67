package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"

	"github.com/procgate/procgate/daemon"
)

// The dns phase measures how long a DNS answer takes from the resolver to
// a grant in the kernel, through the real daemon's DNS proxy. A DNS
// server of the bench's own (10.0.0.53, in the phase's namespace) answers
// every name nI.corp.example with an address never answered before; a
// client in the daemon's cgroup of app0 (granted *.corp.example, tcp 5432)
// asks for DNSAnswers such names one after another, its queries to port 53
// redirected to the proxy, which holds each answer until the grant is in
// the kernel. The time is from just before the server writes the answer
// to the client's receipt of it (CLOCK_MONOTONIC in both processes): the
// answer-to-grant time plus the proxy's relay of the answer. The client
// then connects to the address at once; a denied connect fails the phase
// (the grant was not there before use).

const phaseDNS = "dns"

// dnsResolver is the phase's DNS server.
var dnsResolver = netip.MustParseAddrPort("10.0.0.53:53")

const dnsPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8]
everyone:
  allow:
    - to: 10.0.0.53
      ports: [53]
apps:
  - name: app0
    allow:
      - to: "*.corp.example"
        proto: tcp
        ports: [5432]
`

// dnsResult is what the dns phase measured.
type dnsResult struct {
	Answers int `json:"answers"`
	// AnswerMs is, per name, from the server's write of the answer to the
	// client's receipt of it, through the proxy.
	AnswerMs []float64 `json:"answer_ms"`
	Answer   msSummary `json:"answer"`
	LoadAvg  []string  `json:"loadavg"`
}

// dnsName is the i-th name the phase resolves and dnsAddr its address.
func dnsName(i int) string { return fmt.Sprintf("n%d.corp.example.", i) }

func dnsAddr(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 1, byte(i / 250), byte(i%250 + 1)})
}

// dnsServer answers nI.corp.example with dnsAddr(I) and remembers when
// it wrote each answer.
type dnsServer struct {
	srv  *dns.Server
	mu   sync.Mutex
	sent map[string]int64
}

func (s *dnsServer) ServeDNS(w dns.ResponseWriter, q *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(q)
	if len(q.Question) == 1 {
		name := strings.ToLower(q.Question[0].Name)
		num, ok := strings.CutSuffix(strings.TrimPrefix(name, "n"), ".corp.example.")
		if i, err := strconv.Atoi(num); ok && err == nil && i >= 0 && q.Question[0].Qtype == dns.TypeA {
			m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300},
				A: net.IP(dnsAddr(i).AsSlice())}}
		}
		s.mu.Lock()
		s.sent[name] = monotonic()
		s.mu.Unlock()
	}
	_ = w.WriteMsg(m)
}

func startDNSServer(ns string) (*dnsServer, error) {
	s := &dnsServer{sent: map[string]int64{}}
	var pc net.PacketConn
	if err := inNS(ns, func() (err error) {
		pc, err = net.ListenPacket("udp4", dnsResolver.String())
		return err
	}); err != nil {
		return nil, fmt.Errorf("dns server on %s: %w", dnsResolver, err)
	}
	started := make(chan struct{})
	s.srv = &dns.Server{PacketConn: pc, Handler: s, NotifyStartedFunc: func() { close(started) }}
	go func() { _ = s.srv.ActivateAndServe() }()
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		pc.Close()
		return nil, errors.New("dns server did not start")
	}
	return s, nil
}

// resolveLoop resolves each of r.Names at r.Dests[0] and connects to the
// answer's address on port r.Dests[1].Port() at once; Times are the
// CLOCK_MONOTONIC receipts of the answers, Wrong the denied connects.
func resolveLoop(r request, resp *response) error {
	if len(r.Dests) != 2 {
		return errors.New("want a resolver and a port")
	}
	c := &dns.Client{Net: "udp", Timeout: 2 * time.Second}
	for _, name := range r.Names {
		q := new(dns.Msg)
		q.SetQuestion(name, dns.TypeA)
		a, _, err := c.Exchange(q, r.Dests[0].String())
		t := monotonic()
		if err != nil {
			return fmt.Errorf("resolve %s: %w", name, err)
		}
		var addr netip.Addr
		for _, rr := range a.Answer {
			if v, ok := rr.(*dns.A); ok {
				addr, _ = netip.AddrFromSlice(v.A.To4())
			}
		}
		if !addr.IsValid() {
			return fmt.Errorf("resolve %s: no A record in %v", name, a)
		}
		dest := netip.AddrPortFrom(addr, r.Dests[1].Port())
		_, cerr := tcpConnect(sockaddr(dest), 2*time.Second)
		ok, err := allowed(cerr, true)
		if err != nil {
			return fmt.Errorf("%s (%s): %w", dest, name, err)
		}
		if !ok {
			if resp.Wrong == 0 {
				resp.WrongDesc = fmt.Sprintf("%s (%s) denied right after its answer", dest, name)
			}
			resp.Wrong++
		}
		resp.Times = append(resp.Times, t)
	}
	return nil
}

func (b *bench) dnsPhase(ctx context.Context) error {
	bin, err := procgateBinary()
	if err != nil {
		return err
	}
	nsg := netnsGroup{h: b.host}
	defer nsg.close()
	ns, err := nsg.localNS("dns")
	if err != nil {
		return err
	}
	srv, err := startServers(ns, true)
	if err != nil {
		return err
	}
	defer srv.close()
	ds, err := startDNSServer(ns)
	if err != nil {
		return err
	}
	defer ds.srv.Shutdown()
	dir, err := b.phaseDir("dns")
	if err != nil {
		return err
	}
	policyPath := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(policyPath, []byte(dnsPolicy), 0o600); err != nil {
		return err
	}
	d, err := b.startDaemon(bin, dir, ns, policyPath, "dns", "--poll", "1h")
	if err != nil {
		return err
	}
	defer d.stop()
	cl, err := startClient("dns/app0", filepath.Join(d.cgroupRoot, daemon.AppsDir, appName(0)), ns, 0, false)
	if err != nil {
		return err
	}
	defer cl.close()

	res := &dnsResult{Answers: b.cfg.DNSAnswers, LoadAvg: []string{loadAvg()}}
	b.res.DNS = res
	// In batches, so that an interrupt is seen between them.
	for i := 0; i < b.cfg.DNSAnswers; i += 50 {
		if err := ctx.Err(); err != nil {
			return err
		}
		var names []string
		for j := i; j < min(i+50, b.cfg.DNSAnswers); j++ {
			names = append(names, dnsName(j))
		}
		resp, err := cl.do(request{Op: opResolve, Names: names, Dests: []netip.AddrPort{dnsResolver, netip.AddrPortFrom(netip.IPv4Unspecified(), servicePort)}})
		if err != nil {
			return err
		}
		if resp.Wrong != 0 {
			return fmt.Errorf("%d of %d connects denied right after the answer, first: %s", resp.Wrong, len(names), resp.WrongDesc)
		}
		ds.mu.Lock()
		for k, name := range names {
			sent, ok := ds.sent[name]
			if !ok {
				ds.mu.Unlock()
				return fmt.Errorf("%s answered, but not by the bench's server", name)
			}
			res.AnswerMs = append(res.AnswerMs, msOf(resp.Times[k]-sent))
		}
		ds.mu.Unlock()
	}
	res.Answer = summarizeMs(res.AnswerMs)
	res.LoadAvg = append(res.LoadAvg, loadAvg())
	b.log.Info("dns answers", "answers", res.Answers, "p50_ms", res.Answer.P50, "p99_ms", res.Answer.P99)
	return d.stop()
}

// dnsSection writes the dns phase's table.
func (r *results) dnsSection(w func(string, ...any)) {
	dr := r.DNS
	if dr == nil {
		return
	}
	w("## DNS answer to grant")
	w("")
	w("The real daemon (bin/procgate) in a namespace of its own; a client in its app0 cgroup (granted `*.corp.example`, tcp 5432) resolves %d names, one after another, at a DNS server of the bench's own (%s), each answered with an address never answered before; the daemon redirects the query to its DNS proxy, which holds the answer until the grant is in the kernel. Times from just before the server writes the answer to the client's receipt of it (CLOCK_MONOTONIC in both processes): the answer-to-grant time plus the proxy's relay. The client connects to each address at once: every connect was allowed. Load average at the start and the end of the phase: %s.", dr.Answers, dnsResolver.Addr(), strings.Join(dr.LoadAvg, " → "))
	w("")
	w("| | p50 ms | p99 ms | max ms |")
	w("|---|---|---|---|")
	w("| answer at the resolver → answer at the app, grant in the kernel | %.3f | %.3f | %.3f |", dr.Answer.P50, dr.Answer.P99, dr.Answer.Max)
	w("")
}
