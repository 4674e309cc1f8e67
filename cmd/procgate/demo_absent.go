//go:build !procgate_demo

package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// demoCmd of the shipped binary: the demo and its userspace WireGuard
// tunnel are only in a build with the procgate_demo tag (demo.go).
func demoCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "demo",
		Short: demoShort,
		Long: demoShort + `

The demo is not in the installed binary: it carries a userspace WireGuard
tunnel (wireguard-go) that enforcement does not need. Run it from the
source tree.`,
		Example: `  make demo                                             # builds bin/procgate-demo and runs it
  go build -tags procgate_demo -o procgate-demo ./cmd/procgate && sudo ./procgate-demo demo`,
		Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return errors.New("this procgate is built without the demo: run `make demo` in the source tree (or build with -tags procgate_demo)")
		},
	}
}
