package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/daemon"
	"github.com/procgate/procgate/fleet"
)

// etcdFlags are --etcd-endpoints, --etcd-ca, --etcd-cert and --etcd-key,
// each defaulting to its PROCGATE_ETCD_* variable.
type etcdFlags struct{ endpoints, ca, cert, key string }

func (e *etcdFlags) register(f *pflag.FlagSet) {
	f.StringVar(&e.endpoints, "etcd-endpoints", "", "etcd client URLs, comma-separated (default $PROCGATE_ETCD_ENDPOINTS)")
	f.StringVar(&e.ca, "etcd-ca", "", "CA of etcd's certificate, PEM (default $PROCGATE_ETCD_CA)")
	f.StringVar(&e.cert, "etcd-cert", "", "client certificate for etcd, PEM (default $PROCGATE_ETCD_CERT)")
	f.StringVar(&e.key, "etcd-key", "", "key of --etcd-cert, PEM (default $PROCGATE_ETCD_KEY)")
}

func (e *etcdFlags) config() fleet.Config {
	or := func(v, env string) string {
		if v == "" {
			return os.Getenv(env)
		}
		return v
	}
	return fleet.Config{
		Endpoints: fleet.SplitEndpoints(or(e.endpoints, "PROCGATE_ETCD_ENDPOINTS")),
		CA:        or(e.ca, "PROCGATE_ETCD_CA"), Cert: or(e.cert, "PROCGATE_ETCD_CERT"), Key: or(e.key, "PROCGATE_ETCD_KEY"),
	}
}

// with runs fn with a client of etcd and 30 seconds for its requests.
func (e *etcdFlags) with(fn func(ctx context.Context, cli *clientv3.Client) error) error {
	cli, err := e.config().Client()
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return fn(ctx, cli)
}

// fleetDaemonFlags are the daemon's --policy-store etcd flags.
type fleetDaemonFlags struct {
	store, hostName, hostLabels string
	etcd                        etcdFlags
	bootTimeout                 time.Duration
}

func (ff *fleetDaemonFlags) register(f *pflag.FlagSet) {
	f.StringVar(&ff.store, "policy-store", "file", "where the policy comes from: file (--policy and its policy.d) or etcd (docs/fleet.md)")
	ff.etcd.register(f)
	f.StringVar(&ff.hostName, "host-name", "", "this host's name in the fleet, for --policy-store etcd (default: the hostname)")
	f.DurationVar(&ff.bootTimeout, "etcd-boot-timeout", 5*time.Second, "for --policy-store etcd: how long to wait for etcd at start before enforcing the last good policy kept in --state-dir")
	f.StringVar(&ff.hostLabels, "host-labels", "", "this host's labels k=v,... for --policy-store etcd: the groups whose overlays it merges, in key order")
}

// config is the daemon's FleetConfig; nil for the policy file.
func (ff *fleetDaemonFlags) config() (*daemon.FleetConfig, error) {
	switch ff.store {
	case "file":
		if ff.hostName != "" || ff.hostLabels != "" || ff.etcd.endpoints != "" {
			return nil, errors.New("--host-name, --host-labels and --etcd-endpoints go with --policy-store etcd")
		}
		return nil, nil
	case "etcd":
	default:
		return nil, fmt.Errorf("--policy-store %q: want file or etcd", ff.store)
	}
	name := ff.hostName
	if name == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("--host-name not given and no hostname: %w", err)
		}
		name = h
	}
	if err := fleet.CheckHostName(name); err != nil {
		return nil, fmt.Errorf("--host-name: %w", err)
	}
	labels, err := fleet.ParseLabels(ff.hostLabels)
	if err != nil {
		return nil, fmt.Errorf("--host-labels: %w", err)
	}
	cfg := ff.etcd.config()
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("--policy-store etcd needs --etcd-endpoints URL[,URL] (or PROCGATE_ETCD_ENDPOINTS)")
	}
	return &daemon.FleetConfig{Etcd: cfg, Host: fleet.Host{Name: name, Labels: labels}, FirstTimeout: ff.bootTimeout}, nil
}

// targetFlags are --group k=v and --host NAME: which document.
type targetFlags struct{ group, host string }

func (t *targetFlags) register(f *pflag.FlagSet) {
	f.StringVar(&t.group, "group", "", "the overlay of hosts with label k=v (/procgate/policy/groups/k=v)")
	f.StringVar(&t.host, "host", "", "the overlay of one host (/procgate/policy/hosts/NAME)")
}

func (t *targetFlags) target() (fleet.Target, error) {
	switch {
	case t.group != "" && t.host != "":
		return fleet.Target{}, errors.New("--group and --host: one document at a time")
	case t.group != "":
		l, err := fleet.ParseLabel(t.group)
		if err != nil {
			return fleet.Target{}, fmt.Errorf("--group: %w", err)
		}
		return fleet.Target{Group: &l}, nil
	case t.host != "":
		if err := fleet.CheckHostName(t.host); err != nil {
			return fleet.Target{}, fmt.Errorf("--host: %w", err)
		}
		return fleet.Target{Host: t.host}, nil
	}
	return fleet.Target{}, nil
}

// revokeFleet is revoke --fleet: the revocation written to etcd.
func revokeFleet(w io.Writer, e etcdFlags, app string, grant *int, restore bool) error {
	return e.with(func(ctx context.Context, cli *clientv3.Client) error {
		r, rev, err := fleet.Revoke(ctx, cli, app, grant, restore)
		if err != nil {
			return fmt.Errorf("revoke %s fleet-wide: %w", app, err)
		}
		fmt.Fprintf(w, "%s: %s revoked on every host at revision %d (%s); each daemon applies it and ends the live sockets; procgate fleet status shows the hosts behind\n", app, r, rev, fleet.RevokeKey(app))
		return nil
	})
}

func policyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "The fleet's policy in etcd: push a document, diff before pushing",
	}
	cmd.AddCommand(policyPushCmd(), policyDiffCmd())
	return cmd
}

func policyPushCmd() *cobra.Command {
	var e etcdFlags
	var t targetFlags
	var base int64
	cmd := &cobra.Command{
		Use:   "push FILE [--group k=v | --host NAME]",
		Short: "Check a policy document against the fleet's and write it to etcd",
		Long: `Writes FILE as the fleet document (/procgate/policy/fleet), a group's
overlay (--group k=v) or a host's (--host NAME), after checking it: a fleet
document on its own and merged with every overlay in etcd, an overlay merged
with the fleet document. Errors name the document's key and line; nothing
is written then.

The write is a compare-and-swap on the document's revision: the one push
read, or --base (the revision policy diff printed). A document changed
meanwhile is refused; diff and push again.`,
		Example: `  export PROCGATE_ETCD_ENDPOINTS=https://etcd1:2379 PROCGATE_ETCD_CA=ca.crt \
         PROCGATE_ETCD_CERT=admin.crt PROCGATE_ETCD_KEY=admin.key
  procgate policy push fleet.yaml
  procgate policy push paris.yaml --group site=paris
  procgate policy push db-1.yaml --host db-1 --base 1042`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			target, err := t.target()
			if err != nil {
				return err
			}
			data, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			return e.with(func(ctx context.Context, cli *clientv3.Client) error {
				rev, err := fleet.Push(ctx, cli, target, data, base)
				if err != nil {
					return fmt.Errorf("push %s to %s: %w", args[0], target.Key(), err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "pushed %s as %s at revision %d\n", args[0], target.Key(), rev)
				return nil
			})
		},
	}
	e.register(cmd.Flags())
	t.register(cmd.Flags())
	cmd.Flags().Int64Var(&base, "base", 0, "the document's revision this push is based on (policy diff prints it); refused when the document changed since")
	return cmd
}

func policyDiffCmd() *cobra.Command {
	var e etcdFlags
	var t targetFlags
	cmd := &cobra.Command{
		Use:   "diff [FILE] [--group k=v | --host NAME]",
		Short: "What a push would change, or what a host has not applied yet, as a unified diff",
		Long: `With FILE: the diff from the document in etcd (the fleet document, --group's
or --host's overlay) to FILE, headed with the document's revision (push
--base takes it). With --host NAME also the merged policy of that host.
Without FILE, --host NAME: the diff of the host's merged policy from the
revision it applied to the newest (empty when it is up to date).`,
		Example: `  procgate policy diff fleet.yaml
  procgate policy diff db-1.yaml --host db-1
  procgate policy diff --host db-1`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			target, err := t.target()
			if err != nil {
				return err
			}
			var data []byte
			if len(args) == 1 {
				if data, err = os.ReadFile(args[0]); err != nil {
					return err
				}
			} else if target.Host == "" {
				return errors.New("give FILE, or --host NAME for what the host has not applied")
			}
			return e.with(func(ctx context.Context, cli *clientv3.Client) error {
				w := cmd.OutOrStdout()
				if data != nil {
					d, _, err := fleet.DiffDocument(ctx, cli, target, data)
					if err != nil {
						return err
					}
					fmt.Fprint(w, d)
				}
				if target.Host != "" {
					d, err := fleet.DiffHost(ctx, cli, target.Host, data)
					if err != nil {
						return err
					}
					fmt.Fprint(w, d)
				}
				return nil
			})
		},
	}
	e.register(cmd.Flags())
	t.register(cmd.Flags())
	return cmd
}

func fleetCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "fleet",
		Short: "The fleet in etcd: which host applied which revision",
	}
	cmd.AddCommand(fleetStatusCmd(), fleetRBACCmd())
	return cmd
}

func fleetRBACCmd() *cobra.Command {
	var e etcdFlags
	var host, labels, gateway, admin string
	var print bool
	cmd := &cobra.Command{
		Use:   "rbac (--host NAME [--host-labels k=v,...] | --gateway NAME | --admin NAME) [--print]",
		Short: "Set up the etcd user and role of a host, a gateway or an administrator",
		Long: `Sets up, in etcd, the user NAME (no password: it authenticates by the common
name of its client certificate) and a role with exactly what it needs:
  --host NAME     reads /procgate/policy/fleet, the groups of --host-labels,
                  /procgate/policy/hosts/NAME and /procgate/revocations/;
                  writes /procgate/hosts/NAME/status. No other host's overlay.
  --gateway NAME  reads and writes /procgate/perimeter/ (role procgate-gateway).
  --admin NAME    reads and writes /procgate/ (role procgate-admin).
Run it with etcd's root user (--etcd-cert of common name root); running it
again after a host's labels change revokes the groups it lost. --print
prints the etcdctl commands instead. Enable etcd's authentication once, by
hand (docs/fleet.md).`,
		Example: `  procgate fleet rbac --host db-1 --host-labels site=paris,role=db --etcd-cert root.crt --etcd-key root.key
  procgate fleet rbac --gateway gw-1
  procgate fleet rbac --host db-1 --host-labels site=paris --print`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var role fleet.Role
			given := 0
			for _, f := range []struct{ flag, name string }{{"--host", host}, {"--gateway", gateway}, {"--admin", admin}} {
				if f.name != "" {
					given++
					// Users are named as hosts are: an etcd user name
					// and a certificate's common name.
					if err := fleet.CheckHostName(f.name); err != nil {
						return fmt.Errorf("%s: %w", f.flag, err)
					}
				}
			}
			switch {
			case given != 1:
				return errors.New("give one of --host, --gateway and --admin")
			case host != "":
				ls, err := fleet.ParseLabels(labels)
				if err != nil {
					return fmt.Errorf("--host-labels: %w", err)
				}
				role = fleet.HostRole(fleet.Host{Name: host, Labels: ls})
			case labels != "":
				return errors.New("--host-labels goes with --host")
			case gateway != "":
				role = fleet.GatewayRole(gateway)
			default:
				role = fleet.AdminRole(admin)
			}
			w := cmd.OutOrStdout()
			if print {
				for _, c := range role.Commands() {
					fmt.Fprintln(w, c)
				}
				return nil
			}
			return e.with(func(ctx context.Context, cli *clientv3.Client) error {
				if err := role.Apply(ctx, cli); err != nil {
					return err
				}
				fmt.Fprintln(w, role)
				return nil
			})
		},
	}
	e.register(cmd.Flags())
	cmd.Flags().StringVar(&host, "host", "", "a host's user (its --host-name)")
	cmd.Flags().StringVar(&labels, "host-labels", "", "the host's labels k=v,... (its --host-labels)")
	cmd.Flags().StringVar(&gateway, "gateway", "", "a perimeter gateway's user")
	cmd.Flags().StringVar(&admin, "admin", "", "an administrator's user")
	cmd.Flags().BoolVar(&print, "print", false, "print the etcdctl commands instead of running them")
	return cmd
}

func fleetStatusCmd() *cobra.Command {
	var e etcdFlags
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status [--json]",
		Short: "Hosts, the policy revision each applied, drift, errors and when each was last seen",
		Long: `Lists the hosts whose daemons report to etcd (a host that stopped, or was
cut off for longer than its lease, is gone). BEHIND marks a host whose
applied revision is older than the newest change of a document it merges
(the fleet document, its groups' overlays, its own);
SOURCE last-known-good marks a host enforcing the policy it kept on disk
because etcd did not answer at its boot. Exits 1 when a host is behind or
reports an error.`,
		Example: `  procgate fleet status
  procgate fleet status --json | jq '.hosts[] | select(.behind)'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return e.with(func(ctx context.Context, cli *clientv3.Client) error {
				o, err := fleet.FleetStatus(ctx, cli)
				if err != nil {
					return err
				}
				if asJSON {
					enc := json.NewEncoder(cmd.OutOrStdout())
					enc.SetIndent("", "  ")
					if err := enc.Encode(o); err != nil {
						return err
					}
				} else {
					printFleet(cmd.OutOrStdout(), o)
				}
				for _, h := range o.Hosts {
					if h.Behind || h.Error != "" {
						return exitCode(1)
					}
				}
				return nil
			})
		},
	}
	e.register(cmd.Flags())
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printFleet(w io.Writer, o fleet.Overview) {
	behind := 0
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tREVISION\tDRIFT\tGENERATION\tSOURCE\tLAST SEEN\tERROR")
	for _, h := range o.Hosts {
		drift := "-"
		if h.Behind {
			drift, behind = "BEHIND", behind+1
		}
		seen := "-"
		if !h.SeenAt.IsZero() {
			seen = o.At.Sub(h.SeenAt).Round(time.Second).String() + " ago"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\t%s\t%s\n", h.Host, h.Revision, drift, h.Generation, h.Source, seen, strings.ReplaceAll(h.Error, "\n", "; "))
	}
	tw.Flush()
	fmt.Fprintf(w, "newest policy revision %d; %d host(s), %d behind\n", o.Newest, len(o.Hosts), behind)
}

// printFleetSource is status's line on the policy from etcd: a policy from
// the disk (etcd away at boot) is stale and says so.
func printFleetSource(w io.Writer, f *api.FleetSource) {
	conn := "etcd reachable"
	if !f.Connected {
		conn = "ETCD UNREACHABLE"
		if f.EtcdError != "" {
			conn += " (" + f.EtcdError + ")"
		}
	}
	src := "from etcd"
	if f.Source == fleet.SourceLastGood {
		src = "STALE: the last good policy kept on disk"
	}
	fmt.Fprintf(w, "fleet host %s %s, revision %d %s; %s\n", f.Host, strings.Join(f.Labels, ","), f.Revision, src, conn)
}
