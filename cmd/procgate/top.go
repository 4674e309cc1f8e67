package main

import (
	"github.com/spf13/cobra"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/top"
)

func topCmd(client func() api.Client) *cobra.Command {
	return &cobra.Command{
		Use:   "top",
		Short: "Live terminal view: per-app rates, last denials, pinholes, guards",
		Long: `A live view of the daemon, refreshed every second, in 80x24 or more:

  - per app: mode (AUDIT for an app in mode: audit, which is not enforced;
    such apps are also named above the table), principal kind, grants,
    revoked grants, allowed internal, denied (in audit mode: with the
    would-deny attempts, which passed) and external decisions per second
    and in total;
  - the last denials: time, app, pid, comm, destination, reason and rule;
  - the pinhole agent's holes (root): app, peer, port, state, age, bytes;
  - the guards in force, and those this kernel does not give.

Keys: q quit, p pause the denials, a cycle the app filter, v cycle the
verdict filter (deny, would-deny), up/down select a denial, g propose the
narrowest grant that would have allowed it (its address, protocol and
port): on y it is written to policy.d beside the daemon's policy, checked
with the whole policy first, and the daemon reloads. g needs root.

A caller other than root sees only its own apps and its own uid's denials:
the daemon decides, from the socket's credentials.`,
		Example: `  sudo procgate top
  procgate top --socket /run/procgate/procgate.sock`,
		Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return top.Run(client())
		},
	}
}
