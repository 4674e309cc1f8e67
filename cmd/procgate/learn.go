package main

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/learn"
)

func learnCmd(client func() api.Client) *cobra.Command {
	var o learnOptions
	cmd := &cobra.Command{
		Use:   "learn --app NAME [--since D] [--from-log FILE] [--widen] [--write FILE]",
		Short: "Propose the grants that would have allowed an app's denied attempts, as a policy drop-in",
		Long: `Read the app's deny and would-deny events (from the daemon, or from an
audit log file the daemon wrote) and print the grants that would have
allowed them, as a drop-in for policy.d: each address as /32 or /128, the
ports it tried (a range only for consecutive ports), one grant for tcp and
udp when both were tried at the same ports. --widen joins addresses of one
/24 (IPv4) or /64 (IPv6) with the same ports into the smallest prefix
covering them; nothing else is ever wider than what was tried. Each grant
says how many attempts it covers, first and last seen. Denials no grant
fixes (exe-not-pinned, handover, proto-not-grantable, raw-socket) are
listed as comments.

--write FILE checks FILE with the policy and its drop-ins (the daemon's
policy, or --policy) and writes it only when the whole validates.

To learn a policy without breaking the app, give it mode: audit first: what
its policy refuses then passes as would-deny, which learn reads; set mode:
enforce once nothing new shows.`,
		Example: `  procgate learn --app psql-prod --since 24h
  procgate learn --app web --from-log /var/lib/procgate/audit.jsonl --policy /etc/procgate/policy.yaml
  procgate learn --app web --widen --write /etc/procgate/policy.d/50-learned-web.yaml && procgate reload`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out, err := o.run(client())
			if err != nil {
				return err
			}
			if o.write != "" {
				fmt.Fprintf(cmd.ErrOrStderr(), "wrote %s; run procgate reload (or wait: the daemon follows policy.d)\n", o.write)
				return nil
			}
			_, err = cmd.OutOrStdout().Write(out)
			return err
		},
	}
	cmd.Flags().StringVar(&o.app, "app", "", "the app to learn grants for (required)")
	cmd.Flags().StringVar(&o.since, "since", "", "only events since a duration ago (90m, 24h) or a time (2026-12-06T06:00:00Z)")
	cmd.Flags().StringVar(&o.fromLog, "from-log", "", "read this audit log (JSON lines, as the daemon writes) instead of asking the daemon")
	cmd.Flags().BoolVar(&o.widen, "widen", false, "join addresses with the same ports within a /24 or /64 into the smallest covering prefix")
	cmd.Flags().StringVar(&o.write, "write", "", "write the fragment to this file, once it validates with the policy, instead of printing it")
	cmd.Flags().StringVar(&o.policy, "policy", "", "the policy to validate --write against (default: the daemon's)")
	_ = cmd.MarkFlagRequired("app")
	return cmd
}

type learnOptions struct {
	app, since, fromLog, write, policy string
	widen                              bool
}

func (o learnOptions) run(c api.Client) ([]byte, error) {
	since, err := parseSince(o.since, time.Now())
	if err != nil {
		return nil, err
	}
	var recs []audit.Record
	if o.fromLog != "" {
		if recs, err = audit.ReadLog(o.fromLog, 0); err != nil {
			return nil, fmt.Errorf("learn from %s: %w", o.fromLog, err)
		}
	} else {
		// Both verdicts, filtered by app and time in the daemon.
		err = streamEvents(c, api.Request{Op: api.OpEvents, App: o.app, Since: since}, func(_ json.RawMessage, r audit.Record) {
			recs = append(recs, r)
		})
		if err != nil {
			return nil, fmt.Errorf("learn: events of app %s: %w", o.app, err)
		}
	}
	res := learn.Learn(recs, learn.Options{App: o.app, Since: since, Widen: o.widen})
	out := res.Fragment()
	if o.write == "" {
		return out, nil
	}
	policyPath := o.policy
	if policyPath == "" {
		resp, err := c.Do(api.Request{Op: api.OpStatus})
		if err != nil {
			return nil, fmt.Errorf("learn --write: the daemon's policy, to validate against (or give --policy): %w", err)
		}
		policyPath = resp.Status.Policy
	}
	if err := learn.Write(policyPath, o.write, out); err != nil {
		return nil, err
	}
	return out, nil
}
