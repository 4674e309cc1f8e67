package daemon

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/dnsproxy"
	"github.com/procgate/procgate/internal/nsthread"
	"github.com/procgate/procgate/ruleset"
)

// nameExpiry is how often learned DNS answers past their TTL and grace are
// forgotten. The kernel refuses an expired address by itself (decision.h,
// name_allows): this only frees the entries.
const nameExpiry = time.Second

// learnAnswers puts the addresses of DNS answers in force for the apps
// that asked, before the answer is relayed to them: each fact's Expires is
// the answer's TTL from now, to which the grace period is added here. An
// address refused by the cap gets an audit record.
func (d *Daemon) learnAnswers(facts []ruleset.Learned) error {
	for i := range facts {
		facts[i].Expires = facts[i].Expires.Add(d.cfg.DNSGrace)
	}
	refused, evicted, err := d.enf.Learn(facts, d.cfg.NameCap)
	cap := d.cfg.NameCap
	if cap <= 0 {
		cap = bpf.DefaultNameCap
	}
	for _, f := range evicted {
		d.log.Info("DNS answer took the place of an older address of its name (the cap)", "app", f.App, "name", f.Name, "evicted", f.Addr)
	}
	for _, f := range refused {
		d.log.Warn("DNS answer not learned: the name holds as many addresses as the cap allows",
			"app", f.App, "name", f.Name, "addr", f.Addr, "cap", cap)
		if d.auditor != nil {
			d.auditor.Append(audit.Record{
				Verdict: ruleset.VerdictDeny, Reason: ruleset.ReasonNameCap.String(), App: f.App, Hook: "dns", Kind: audit.KindName,
				Dest: f.Addr.String(), Rule: f.Name + ": cap of " + strconv.Itoa(cap) + " addresses (--dns-cap)",
			})
		}
	}
	return err
}

// dnsNamesWhat is what the dns-names guard covers, for the start log: a
// namespace's proxy starts before the app's first query where the daemon
// sees its process there first (proxyNetnsOf, proxyMatchedNetns), else
// at that query's dns-unobserved event (docs/policy.md, "Other network
// namespaces").
const dnsNamesWhat = "apps with name grants resolve through the daemon's DNS proxy, which learns their answers before relaying them; " +
	"in another network namespace, through a proxy started there before the app's first query where the daemon sees its process first " +
	"(procgate run for a caller there; the processes of match.unit, match.cgroup and match.container apps, at start, before each generation binds their cgroups, and at each poll), " +
	"else at its first query, whose answer grants nothing"

// startDNSProxy starts the proxy that learns the answers to apps' DNS
// queries in the daemon's network namespace, points the kernel's redirect
// at it, and follows apps into other network namespaces (dnsnetns.go).
func (d *Daemon) startDNSProxy(ctx context.Context, wg *sync.WaitGroup) (stop func()) {
	// An earlier daemon's proxies are gone.
	err := d.enf.ForgetDNSProxies()
	var p *dnsproxy.Proxy
	if err == nil {
		p, err = dnsproxy.Listen(d.proxyConfig(nil))
	}
	var cookie uint64
	if err == nil {
		if cookie, err = bpf.NetnsCookie(); err == nil {
			err = d.enf.ServeDNS(p.Port, cookie)
		}
		if err != nil {
			p.Close()
		}
	}
	if err != nil {
		d.log.Warn("guard NOT active", "guard", "dns-names", "what", "DNS-name grants learn the answers apps get", "why", err.Error()+": name grants allow nothing")
		return func() {}
	}
	d.log.Info("guard active", "guard", "dns-names", "what", dnsNamesWhat, "port", p.Port)
	wg.Add(1)
	go func() {
		defer wg.Done()
		p.Serve(ctx)
	}()
	others := d.followNetns(ctx, cookie)
	return func() {
		others()
		// Apps' queries go to their resolvers again, unobserved.
		if err := d.enf.ForgetDNSProxies(); err != nil {
			d.log.Warn("turning the DNS redirect off", "err", err)
		}
		p.Close()
	}
}

// proxyConfig wires a DNS proxy to the kernel. in, when set, is the
// thread in the network namespace the proxy serves (not the daemon's):
// the sockets that find a query's sender (sock_diag) and that ask its
// resolver are made there.
func (d *Daemon) proxyConfig(in *nsthread.Thread) dnsproxy.Config {
	cfg := dnsproxy.Config{
		Lookup: func(network string, src, dst netip.AddrPort) (dnsproxy.Redirect, error) {
			proto := ruleset.UDP
			if network == "tcp" {
				proto = ruleset.TCP
			}
			var r bpf.Redirected
			var err error
			lookup := func() { r, err = d.enf.RedirectOf(proto, src, dst) }
			if in != nil {
				in.Do(lookup)
			} else {
				lookup()
			}
			return dnsproxy.Redirect{Resolver: r.Resolver, App: r.App}, err
		},
		Learn: d.learnAnswers,
		Log:   d.log,
	}
	if in != nil {
		cfg.Dial = func(network string, resolver netip.AddrPort) (net.Conn, error) { return dialIn(in, network, resolver) }
	}
	return cfg
}

// expireNames forgets learned answers once their TTL and grace are over,
// until ctx ends.
func (d *Daemon) expireNames(ctx context.Context, wg *sync.WaitGroup) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(nameExpiry)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-tick.C:
				if _, err := d.enf.ExpireLearned(now); err != nil {
					d.log.Warn("forgetting expired DNS answers", "err", err)
				}
			}
		}
	}()
}
