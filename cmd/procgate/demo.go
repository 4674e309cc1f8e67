//go:build procgate_demo

// The demo's command, in a build with the procgate_demo tag only (make demo
// builds bin/procgate-demo so): the demo brings a userspace WireGuard
// tunnel (wireguard-go, a TUN device) that the shipped binary has no use
// for. demo_absent.go is the command without the tag.

package main

import (
	"context"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/procgate/procgate/demo"
)

func demoCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "demo",
		Short: demoShort,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return demo.Run(ctx, cmd.OutOrStdout())
		},
	}
}
