package daemon

import (
	"context"
	"strconv"
	"sync"
	"time"

	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/bpf"
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
	refused, err := d.enf.Learn(facts, d.cfg.NameCap)
	cap := d.cfg.NameCap
	if cap <= 0 {
		cap = bpf.DefaultNameCap
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
