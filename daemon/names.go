package daemon

import (
	"context"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/dnsproxy"
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
				Verdict: "deny", Reason: ruleset.ReasonNameCap.String(), App: f.App, Hook: "dns", Kind: audit.KindName,
				Dest: f.Addr.String(), Rule: f.Name + ": cap of " + strconv.Itoa(cap) + " addresses (--dns-cap)",
			})
		}
	}
	return err
}

// startDNSProxy starts the proxy that learns the answers to apps' DNS
// queries, and points the kernel's redirect at it. It serves the daemon's
// network namespace only: apps elsewhere resolve untouched, and their name
// grants stay empty (an audit event, reason dns-unobserved, says so).
func (d *Daemon) startDNSProxy(ctx context.Context, wg *sync.WaitGroup) (stop func()) {
	p, err := dnsproxy.Listen(dnsproxy.Config{
		Lookup: func(network string, src, dst netip.AddrPort) (dnsproxy.Redirect, error) {
			proto := ruleset.UDP
			if network == "tcp" {
				proto = ruleset.TCP
			}
			r, err := d.enf.RedirectOf(proto, src, dst)
			return dnsproxy.Redirect{Resolver: r.Resolver, App: r.App}, err
		},
		Learn: d.learnAnswers,
		Log:   d.log,
	})
	if err == nil {
		var cookie uint64
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
	d.log.Info("guard active", "guard", "dns-names", "what", "apps with name grants resolve through the daemon's DNS proxy, which learns their answers before relaying them; in the daemon's network namespace only",
		"port", p.Port)
	wg.Add(1)
	go func() {
		defer wg.Done()
		p.Serve(ctx)
	}()
	return func() {
		// Apps' queries go to their resolvers again, unobserved.
		if err := d.enf.ServeDNS(0, 0); err != nil {
			d.log.Warn("turning the DNS redirect off", "err", err)
		}
		p.Close()
	}
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
