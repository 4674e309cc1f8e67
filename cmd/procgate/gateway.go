package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/procgate/procgate/fleet"
	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/pki"
)

// gatewayCmd runs the perimeter controller (issue 6).
func gatewayCmd() *cobra.Command {
	var (
		cfg                 perimeter.GatewayConfig
		protect             string
		files               pki.Files
		check               bool
		logFormat, logLevel string
		etcd                fleet.Config
		etcdEndpoints       string
		rulesFrom           string
	)
	cmd := &cobra.Command{
		Use:   "gateway --rules FILE --listen ADDR --protect PREFIX[,PREFIX] --cert FILE --key FILE --ca FILE",
		Short: "Run the perimeter controller: a default-drop forward policy with pinholes that agents lease over mTLS",
		Long: `gateway runs on the perimeter router. It keeps, in the nftables table inet
procgate_perimeter, a forward policy that drops new inbound connections to the
protected ranges, and opens pinholes in it (one peer, one protocol, one host,
one port) for agents that authenticate with a client certificate and that the
site rules authorize. A hole lives as long as its lease; SIGHUP reloads the
rules (a file with errors is refused and the old rules stay). Stopping the
gateway leaves the table: a restarted gateway adopts its holes. See
docs/pinholes.md.`,
		Example: `  procgate gateway --rules /etc/procgate/pinholes.rules --listen 10.9.0.1:8443 \
      --protect 10.9.0.0/16,fd09::/64 --cert gw.crt --key gw.key --ca ca.crt
  procgate gateway --rules /etc/procgate/pinholes.rules --check`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch rulesFrom {
			case "file":
				if cfg.RulesPath == "" {
					return errors.New("--rules FILE is required (or --rules-from etcd with --etcd-endpoints)")
				}
			case "etcd":
				if etcdEndpoints == "" {
					return errors.New("--rules-from etcd needs --etcd-endpoints")
				}
				if cfg.RulesPath != "" {
					return errors.New("--rules and --rules-from etcd exclude each other")
				}
				cfg.RulesFromEtcd = true
			default:
				return fmt.Errorf("--rules-from %q: want file or etcd", rulesFrom)
			}
			if check {
				if cfg.RulesFromEtcd {
					return errors.New("--check reads a file: check the document before writing it to etcd (procgate gateway --rules FILE --check)")
				}
				rules, err := perimeter.LoadRules(cfg.RulesPath)
				if err != nil {
					fmt.Fprintln(cmd.ErrOrStderr(), err)
					return exitCode(1)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s: ok: %d rules, %d services\n", cfg.RulesPath, len(rules.List), len(rules.Services))
				return nil
			}
			for _, f := range []struct{ flag, v string }{{"listen", cfg.Listen}, {"protect", protect}, {"cert", files.Cert}, {"key", files.Key}, {"ca", files.CA}} {
				if f.v == "" {
					return fmt.Errorf("--%s is required (or --check to only check the rules)", f.flag)
				}
			}
			if cfg.Reconcile <= 0 {
				return fmt.Errorf("--reconcile %v: want a positive interval such as 10s", cfg.Reconcile)
			}
			var err error
			if cfg.Protect, err = parsePrefixes(protect); err != nil {
				return err
			}
			if cfg.TLS, err = pki.ServerConfig(files); err != nil {
				return err
			}
			if cfg.Log, err = newLogger(logFormat, logLevel); err != nil {
				return err
			}
			if etcdEndpoints != "" {
				etcd.Endpoints = fleet.SplitEndpoints(etcdEndpoints)
				if cfg.Etcd, err = etcd.Client(); err != nil {
					return err
				}
				defer cfg.Etcd.Close()
			}
			gw, err := perimeter.StartGateway(cfg)
			if err != nil {
				return err
			}
			sigs := make(chan os.Signal, 1)
			signal.Notify(sigs, syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM)
			defer signal.Stop(sigs)
			for sig := range sigs {
				if sig != syscall.SIGHUP {
					break
				}
				_ = gw.Reload() // logged; the old rules stay
			}
			return gw.Close()
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.RulesPath, "rules", "", "site rules file; required unless --rules-from etcd")
	f.StringVar(&cfg.Listen, "listen", "", "address of the mTLS API (host:port)")
	f.StringVar(&protect, "protect", "", "protected ranges, comma-separated prefixes")
	f.StringVar(&files.Cert, "cert", "", "the gateway's certificate (PEM)")
	f.StringVar(&files.Key, "key", "", "the gateway's key (PEM)")
	f.StringVar(&files.CA, "ca", "", "the CA that signs agent certificates (PEM)")
	f.DurationVar(&cfg.Lease, "lease", perimeter.DefaultLease, "lease of a hole, and the longest an agent may ask for")
	f.StringVar(&cfg.Table, "table", perimeter.DefaultTableName, "nftables table (family inet) the gateway owns")
	f.StringVar(&cfg.NetNS, "netns", "", "network namespace file whose nftables to manage (default: the gateway's own)")
	f.DurationVar(&cfg.Reconcile, "reconcile", perimeter.DefaultReconcile, "how often the table is compared with the holes the gateway holds and repaired (an edited or deleted table)")
	f.StringVar(&cfg.MetricsAddr, "metrics-addr", "", "serve Prometheus /metrics on this address (off by default)")
	f.StringVar(&etcdEndpoints, "etcd-endpoints", "", "etcd of the site's gateways (URL,URL): holes are shared there and every gateway programs all of them (off without it)")
	f.StringVar(&etcd.CA, "etcd-ca", "", "CA of etcd's certificate (PEM)")
	f.StringVar(&etcd.Cert, "etcd-cert", "", "the gateway's etcd client certificate (PEM)")
	f.StringVar(&etcd.Key, "etcd-key", "", "key of --etcd-cert (PEM)")
	f.BoolVar(&check, "check", false, "only check the rules file and exit")
	f.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.StringVar(&rulesFrom, "rules-from", "file", "where the site rules are: file (--rules) or etcd (key "+perimeter.RulesKey+", reloaded on change; a bad document is refused and the old rules stay)")
	return cmd
}

func parsePrefixes(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, item := range strings.Split(s, ",") {
		p, err := netip.ParsePrefix(strings.TrimSpace(item))
		if err != nil {
			return nil, fmt.Errorf("--protect %q: %w", item, err)
		}
		if p.Masked() != p {
			return nil, fmt.Errorf("--protect %s has host bits set; did you mean %s?", p, p.Masked())
		}
		out = append(out, p)
	}
	return out, nil
}

// pkiCmd makes a CA and certificates for the gateway and its agents.
func pkiCmd() *cobra.Command {
	var dir string
	var days int
	cmd := &cobra.Command{
		Use:   "pki init|issue",
		Short: "Make a small CA and certificates for the gateway and its agents (ECDSA P-256, files 0600)",
		Example: `  procgate pki init --dir /etc/procgate/pki
  procgate pki issue --dir /etc/procgate/pki --name gateway --usage server --hosts 10.9.0.1,gw.example.org
  procgate pki issue --dir /etc/procgate/pki --name srv1    # an agent; its name is its delegate name`,
	}
	cmd.PersistentFlags().StringVar(&dir, "dir", "", "PKI directory (ca.crt, ca.key, NAME.crt, NAME.key); required")
	cmd.PersistentFlags().IntVar(&days, "days", 365, "validity in days, 1 to 3650 (a certificate ends no later than its CA)")
	_ = cmd.MarkPersistentFlagRequired("dir")
	validity := func() (time.Duration, error) {
		if maxDays := int(pki.MaxValidity / (24 * time.Hour)); days < 1 || days > maxDays {
			return 0, fmt.Errorf("--days %d: want 1 to %d (0 or less would write a certificate already expired)", days, maxDays)
		}
		return time.Duration(days) * 24 * time.Hour, nil
	}

	var caName string
	initCmd := &cobra.Command{
		Use:   "init --dir DIR",
		Short: "Make a CA in DIR (refuses a directory that has one)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v, err := validity()
			if err != nil {
				return err
			}
			if _, err := pki.Init(dir, caName, v); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s and %s\n", filepath.Join(dir, pki.CACertFile), filepath.Join(dir, pki.CAKeyFile))
			return nil
		},
	}
	initCmd.Flags().StringVar(&caName, "name", "procgate CA", "the CA's common name")

	var req pki.IssueRequest
	var usage, hosts string
	issueCmd := &cobra.Command{
		Use:   "issue --dir DIR --name NAME [--usage client|server|both] [--hosts H,...]",
		Short: "Issue NAME.crt and NAME.key with the CA in DIR",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if req.Validity, err = validity(); err != nil {
				return err
			}
			if req.Usage, err = pki.ParseUsage(usage); err != nil {
				return err
			}
			req.Hosts = pki.Hosts(hosts)
			certPath, keyPath, err := pki.IssueFiles(dir, req)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s and %s\n", certPath, keyPath)
			return nil
		},
	}
	issueCmd.Flags().StringVar(&req.Name, "name", "", "common name: an agent's delegate name, or the gateway's name; required")
	issueCmd.Flags().StringVar(&usage, "usage", "client", "client (an agent), server (the gateway) or both")
	issueCmd.Flags().StringVar(&hosts, "hosts", "", "DNS names and IP addresses the clients dial (server certificates)")
	_ = issueCmd.MarkFlagRequired("name")
	cmd.AddCommand(initCmd, issueCmd)
	return cmd
}
