package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/internal/version"
)

// versions is what `procgate version --json` prints.
type versions struct {
	Client version.Info  `json:"client"`
	Daemon *version.Info `json:"daemon,omitempty"`
	// DaemonError says why the daemon's version is missing.
	DaemonError string `json:"daemon_error,omitempty"`
}

func versionCmd(client func() api.Client) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "version [--json]",
		Short: "Show the versions of this client and of the running daemon",
		Long: `Show this binary's version, git commit and Go version, and the running
daemon's, with a warning when they differ (the package was upgraded and the
daemon not restarted). A daemon that cannot be reached is reported, not an
error: the client's version is still printed.`,
		Example: `  procgate version
  procgate version --json --socket /run/procgate-lab.sock`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v := versions{Client: version.Get()}
			resp, err := client().Do(api.Request{Op: api.OpStatus})
			if err != nil {
				v.DaemonError = err.Error()
			} else if resp.Status != nil {
				v.Daemon = &resp.Status.Version
			}
			out := cmd.OutOrStdout()
			if asJSON {
				if err := json.NewEncoder(out).Encode(v); err != nil {
					return err
				}
			} else {
				fmt.Fprintln(out, "client:", v.Client)
				if v.Daemon != nil {
					fmt.Fprintln(out, "daemon:", *v.Daemon)
				} else {
					fmt.Fprintln(out, "daemon: not reachable:", v.DaemonError)
				}
			}
			if v.Daemon != nil {
				warnVersionMismatch(cmd.ErrOrStderr(), *v.Daemon)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// warnVersionMismatch prints one line when the daemon is not this build:
// its API may lack what this client asks for, or answer differently.
func warnVersionMismatch(w io.Writer, daemon version.Info) {
	client := version.Get()
	if daemon.Version == "" || client.Same(daemon) {
		return
	}
	fmt.Fprintf(w, "warning: procgate client %s differs from daemon %s: restart the daemon (systemctl restart procgate) after an upgrade\n", client, daemon)
}
