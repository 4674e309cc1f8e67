package main

import (
	"context"
	"errors"
	"io"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

// runDemo runs the demo; nil in the shipped binary. Only a build with the
// procgate_demo tag has it (demo_run.go; make demo builds bin/procgate-demo
// so): the demo brings a userspace WireGuard tunnel (wireguard-go, a TUN
// device) that enforcement has no use for.
var runDemo func(context.Context, io.Writer) error

func demoCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Show the whole story in throw-away namespaces (needs root), then remove everything",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if runDemo == nil {
				return errors.New("this procgate is built without the demo: run `make demo` in the source tree (or build with -tags procgate_demo)")
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return runDemo(ctx, cmd.OutOrStdout())
		},
	}
	if runDemo == nil {
		cmd.Long = cmd.Short + `

The demo is not in the installed binary: it carries a userspace WireGuard
tunnel (wireguard-go) that enforcement does not need. Run it from the
source tree.`
		cmd.Example = `  make demo    # builds bin/procgate-demo and runs it
  go build -tags procgate_demo -o procgate-demo ./cmd/procgate && sudo ./procgate-demo demo`
	}
	return cmd
}
