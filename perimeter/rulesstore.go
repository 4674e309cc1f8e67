package perimeter

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// RulesKey is where a site's gateways may read their rules (the text of a
// rules file) instead of from a file: `procgate gateway --rules-from etcd`.
const RulesKey = "/procgate/perimeter/rules"

// rulesName is how errors name the rules document in etcd.
const rulesName = "etcd:" + RulesKey

// loadEtcdRules reads and parses the rules in etcd, and the revision of
// the read.
func loadEtcdRules(cli *clientv3.Client) (*Rules, int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, RulesKey)
	if err != nil {
		return nil, 0, fmt.Errorf("read rules %s: %w", rulesName, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, resp.Header.Revision, fmt.Errorf("read rules %s: no such key; write the rules file there (etcdctl put %s < FILE)", rulesName, RulesKey)
	}
	rules, err := ParseRules(rulesName, resp.Kvs[0].Value)
	return rules, resp.Header.Revision, err
}

// followRules applies every change of the rules in etcd after rev until
// ctx ends: a document with errors, or a deleted key, is refused whole and
// the rules in force stay (SetRules). A watch that fails reads the key
// again.
func followRules(ctx context.Context, cli *clientv3.Client, rev int64, apply func(*Rules) error, log *slog.Logger) {
	for ctx.Err() == nil {
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for resp := range cli.Watch(wctx, RulesKey, clientv3.WithRev(rev+1)) {
			if err := resp.Err(); err != nil {
				log.Warn("watch of the rules in etcd ended; reading them again", "error", err.Error())
				break
			}
			for _, ev := range resp.Events {
				rev = ev.Kv.ModRevision
				if ev.Type == clientv3.EventTypeDelete {
					log.Error("rules deleted from etcd; the old rules stay in force", "rules", rulesName)
					continue
				}
				rules, err := ParseRules(rulesName, ev.Kv.Value)
				if err == nil {
					err = apply(rules)
				}
				if err != nil {
					log.Error("rules not reloaded; the old rules stay in force", "rules", rulesName, "revision", ev.Kv.ModRevision, "error", err.Error())
					continue
				}
				log.Info("rules reloaded", "rules", rulesName, "revision", ev.Kv.ModRevision, "rule_count", len(rules.List), "service_count", len(rules.Services))
			}
			rev = max(rev, resp.Header.Revision)
		}
		cancel()
		if ctx.Err() != nil {
			return
		}
		// Read the key again: a change missed while the watch was down is
		// applied now (or refused, the old rules staying).
		rules, r, err := loadEtcdRules(cli)
		if err == nil {
			err = apply(rules)
		}
		if err != nil {
			log.Error("rules not reloaded; the old rules stay in force", "rules", rulesName, "error", err.Error())
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
		if r != 0 {
			rev = r
		}
	}
}
