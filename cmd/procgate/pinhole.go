package main

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/procgate/procgate/api"
)

func pinholeCmd(client func() api.Client) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pinhole",
		Short: "Ask for a perimeter pinhole for a named peer (run inside an app with inbound: dynamic)",
		Long: `pinhole talks to the daemon's pinhole agent (procgate daemon --gateway URL).
Holes normally follow the app's sockets by themselves: a TCP listen or UDP bind
on an auxiliary port opens a hole for the peers of the process's live control
connections. pinhole open is for a peer the app knows otherwise. See
docs/pinholes.md.`,
		Args: cobra.NoArgs,
	}
	cmd.AddCommand(pinholeOpenCmd(client))
	return cmd
}

func pinholeOpenCmd(client func() api.Client) *cobra.Command {
	var peer, proto string
	var port int
	cmd := &cobra.Command{
		Use:   "open --peer ADDR --port N [--proto tcp|udp]",
		Short: "Name a peer for one of the calling app's auxiliary ports",
		Long: `open names one peer (one IP address, never a network or "any") for an
auxiliary port of the app the calling process runs as (its cgroup decides; the
port must be in the app's inbound.dynamic.ports). The hole is open at the
gateway and on the host while the app has a socket bound (UDP) or listening
(TCP) on the port; it closes when that socket is released or when the calling
process exits. The answer is the hole's state: open, refused (with the
gateway's reason) or pending (the port is not bound yet).`,
		Example: `  # inside the app, before or after binding UDP 40010:
  procgate run --app bulk -- procgate pinhole open --peer 198.51.100.10 --port 40010 --proto udp
  procgate pinhole open --peer 2001:db8:c::10 --port 40000`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := client().Do(api.Request{Op: api.OpPinholeOpen, Peer: peer, Port: port, Proto: proto})
			if err != nil {
				return err
			}
			h := resp.Pinhole
			if h == nil {
				return fmt.Errorf("daemon answered without a hole")
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s %s %s -> %s:%d for app %s (user %s)", h.State, h.Proto, h.Peer, h.Host, h.Port, h.App, h.User)
			if h.Reason != "" {
				fmt.Fprintf(cmd.OutOrStdout(), ": %s", h.Reason)
			}
			fmt.Fprintln(cmd.OutOrStdout())
			if h.State == "refused" {
				return exitCode(1)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&peer, "peer", "", "the peer's IP address; required")
	f.IntVar(&port, "port", 0, "the auxiliary port; required")
	f.StringVar(&proto, "proto", "", "tcp or udp (default tcp, or udp for an app whose auxiliary ports are udp only)")
	_ = cmd.MarkFlagRequired("peer")
	_ = cmd.MarkFlagRequired("port")
	return cmd
}

func pinholesCmd(client func() api.Client) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "pinholes [--json]",
		Short: "List the pinhole agent's holes: app, user, peer, proto, host, port, state, age, bytes",
		Long: `pinholes lists the holes the daemon's pinhole agent holds at the gateway
(open), is refused (refused, with the reason) or waits for (pending), with the
gateway's packet and byte counters of each open hole (root only).`,
		Example: `  procgate pinholes
  procgate pinholes --json | jq '.[] | select(.state=="open") | .peer'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := client().Do(api.Request{Op: api.OpPinholes})
			if err != nil {
				return err
			}
			hs := resp.Pinholes
			if hs == nil {
				hs = []api.Pinhole{}
			}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(hs)
			}
			printPinholes(cmd.OutOrStdout(), hs, time.Now())
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printPinholes(w io.Writer, hs []api.Pinhole, now time.Time) {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "APP\tUSER\tPEER\tPROTO\tHOST\tPORT\tSTATE\tAGE\tBYTES\tPACKETS")
	for _, h := range hs {
		age := "-"
		if !h.Opened.IsZero() {
			age = now.Sub(h.Opened).Truncate(time.Second).String()
		}
		state := h.State
		if h.Reason != "" {
			state += " (" + h.Reason + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%d\t%d\n", h.App, h.User, h.Peer, h.Proto, h.Host, h.Port, state, age, h.Bytes, h.Packets)
	}
	tw.Flush()
}
