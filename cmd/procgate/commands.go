package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/containers"
	"github.com/procgate/procgate/daemon"
	"github.com/procgate/procgate/internal/version"
	"github.com/procgate/procgate/policy"
	"github.com/procgate/procgate/ruleset"
)

// run parses the command line and runs the command it names.
func run(args []string) error {
	root := rootCmd()
	root.SetArgs(args)
	return root.Execute()
}

// rootCmd is the whole command line; the man pages and shell completions
// are generated from it (docs_gen.go).
func rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "procgate",
		Short: "Per-application authorization of internal routes, enforced with cgroup v2 + eBPF",
		Long: `procgate decides, per application, which processes may use the routes to
internal networks. Processes an app claims get its grants (prefix, protocol,
ports); every other process keeps the internet and loses the internal network.
Every connect() and UDP sendmsg() is decided in the kernel.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version.Get().String(),
	}
	var socket string
	client := func() api.Client { return api.Client{Socket: api.SocketFromEnv(socket)} }

	root.AddCommand(
		daemonCmd(),
		uninstallCmd(),
		runCmd(client),
		validateCmd(),
		statusCmd(client),
		explainCmd(client),
		eventsCmd(client),
		learnCmd(client),
		topCmd(client),
		revokeCmd(client),
		reloadCmd(client),
		dialCmd(),
		demoCmd(),
		gatewayCmd(),
		pkiCmd(),
		pinholeCmd(client),
		pinholesCmd(client),
		versionCmd(client),
		policyCmd(),
		fleetCmd(),
	)
	for _, c := range root.Commands() {
		socketFlag(c, &socket)
	}
	return root
}

// notClients are the commands that never talk to the daemon's API.
var notClients = map[string]bool{"uninstall": true, "validate": true, "dial": true, "demo": true, "gateway": true, "pki": true, "policy": true, "fleet": true}

// socketFlag gives cmd and its subcommands --socket: the daemon's socket
// for clients (and the daemon), a hidden deprecated flag for the others,
// which took it until it was per command, so that scripts that pass it
// everywhere keep working. A flag of the command, not of the root, is
// still taken before the command's name (procgate --socket S status).
func socketFlag(cmd *cobra.Command, socket *string) {
	if !notClients[cmd.Name()] {
		cmd.PersistentFlags().StringVar(socket, "socket", "", "daemon API socket (default $PROCGATE_SOCKET or "+api.DefaultSocket+")")
		return
	}
	var unused string
	cmd.PersistentFlags().StringVar(&unused, "socket", "", "ignored: "+cmd.Name()+" does not talk to the daemon")
	_ = cmd.PersistentFlags().MarkDeprecated("socket", cmd.Name()+" does not talk to the daemon; drop it")
}

func newLogger(format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

func daemonCmd() *cobra.Command {
	var cfg daemon.Config
	var logFormat, logLevel string
	var udpHandover bool
	var tcpHandover string
	var guard string
	var ff fleetDaemonFlags
	cmd := &cobra.Command{
		Use:   "daemon [--policy FILE] [flags]",
		Short: "Enforce a policy: load and pin the eBPF programs, reload on change, serve the local API",
		Example: `  procgate daemon    # /etc/procgate/policy.yaml; as a service: systemctl start procgate
  procgate daemon --policy p.yaml --cgroup-root /sys/fs/cgroup/unified/procgate-lab \
      --bpf-dir /sys/fs/bpf/procgate-lab --socket /run/procgate-lab.sock --metrics-addr 127.0.0.1:9464
  # with the pinhole agent (docs/pinholes.md):
  procgate daemon --policy p.yaml --gateway https://10.9.0.1:8443 \
      --gateway-ca ca.crt --gateway-cert srv1.crt --gateway-key srv1.key
  # audit records to journald too, with PROCGATE_* fields (journalctl -t procgate PROCGATE_VERDICT=deny):
  procgate daemon --audit-sink file,journald
  # the policy from etcd (docs/fleet.md):
  procgate daemon --policy-store etcd --etcd-endpoints https://etcd1:2379,https://etcd2:2379 \
      --etcd-ca ca.crt --etcd-cert db-1.crt --etcd-key db-1.key --host-name db-1 --host-labels site=paris,role=db`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(logFormat, logLevel)
			if err != nil {
				return err
			}
			cfg.Log = log
			cfg.NoUDPHandover = !udpHandover
			if cfg.PinholeIdle == 0 {
				cfg.PinholeIdle = -1 // --pinhole-idle 0: never; Config's 0 is the default
			}
			switch tcpHandover {
			case "auto":
				cfg.TrustTraceGuard = true
			case "all":
			default:
				return fmt.Errorf("--tcp-handover %q: want auto or all", tcpHandover)
			}
			if err := parseGuardGID(guard, &cfg); err != nil {
				return err
			}
			if cfg.Fleet, err = ff.config(); err != nil {
				return err
			}
			sock, _ := cmd.Flags().GetString("socket")
			cfg.Socket = api.SocketFromEnv(sock)
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return daemon.Run(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.PolicyPath, "policy", daemon.DefaultPolicyPath, "policy file (YAML)")
	f.StringVar(&cfg.CgroupRoot, "cgroup-root", "", "cgroup2 directory whose subtree is enforced (default: the whole cgroup2 hierarchy)")
	f.StringVar(&cfg.StateDir, "state-dir", daemon.DefaultStateDir, "directory for app ids, revocations and the audit log")
	f.StringVar(&cfg.BPFDir, "bpf-dir", daemon.DefaultBPFDir, "bpffs directory where programs, maps and links are pinned")
	f.StringVar(&cfg.MetricsAddr, "metrics-addr", "", "serve Prometheus /metrics on this address (off by default)")
	f.DurationVar(&cfg.PollInterval, "poll", time.Second, "how often to check pinned binaries, and the policy file and the routes of internal.interfaces where inotify or netlink events are not to be had (a fallback: both follow events)")
	f.DurationVar(&cfg.Settle, "settle", daemon.DefaultSettle, "how long the policy file and its drop-ins must be quiet after a change before they are read (longer for a writer that pauses within a file)")
	f.StringVar(&cfg.GatewayURL, "gateway", "", "perimeter gateway https://HOST:PORT, or several of one site comma-separated (the agent fails over and syncs its holes to the next): runs the pinhole agent for apps with inbound: dynamic (off without it)")
	f.StringVar(&cfg.GatewayCA, "gateway-ca", "", "CA that signed the gateway's certificate (PEM)")
	f.StringVar(&cfg.GatewayCert, "gateway-cert", "", "this host's agent certificate (PEM); its name is the delegate in the gateway's rules")
	f.StringVar(&cfg.GatewayKey, "gateway-key", "", "key of --gateway-cert (PEM)")
	f.DurationVar(&cfg.DNSGrace, "dns-grace", 30*time.Second, "how long an address a DNS answer gave an app for a name grant stays allowed past the answer's TTL")
	f.IntVar(&cfg.NameCap, "dns-cap", bpf.DefaultNameCap, "the most addresses one name holds for an app at once; answers past it are not learned and audited (reason name-cap)")
	f.DurationVar(&cfg.PinholeIdle, "pinhole-idle", daemon.DefaultPinholeIdle, "close a hole as stale when its gateway counters stood still this long and no connection of its peer is on the port (0: never)")
	f.StringVar(&guard, "guard-gid", "", "real gid (or group name) of launched app processes, so that no process without CAP_SYS_PTRACE, same user included, can trace them; refused if it is some user's primary group (default: group "+daemon.DefaultGuardGroup+", created when missing; off or 0: no guard; apps with traceable: true are never guarded)")
	f.StringVar(&tcpHandover, "tcp-handover", "auto", "which app connections the TCP handover guard watches: auto, those of processes open to tracing (traceable: true, scripts, unit, cgroup and user apps, root; the trace guard covers the others); all, every app connection to an internal destination (also refuses connections an app gives away by SCM_RIGHTS, or root with CAP_SYS_PTRACE copies; about 1.3 µs per connection where BPF LSM does not load)")
	f.BoolVar(&udpHandover, "udp-handover", true, "refuse a connected UDP socket's datagrams sent by a process outside the socket's app; false on hosts whose NFQUEUE firewall (an IPS, OpenSnitch) reinjects apps' internal UDP, which it would refuse")
	f.StringSliceVar(&cfg.ContainerSockets, "container-socket", containers.DefaultSockets, "container runtimes' API sockets (docker, podman) asked where match.container apps run")
	f.StringSliceVar(&cfg.AuditSinks, "audit-sink", []string{daemon.SinkFile}, "where audit records go: file, the state dir's audit.jsonl (events and learn read it back); journald, entries with PROCGATE_* fields (journalctl -t procgate); or both, file,journald")
	f.StringVar(&cfg.JournalSocket, "journal-socket", audit.DefaultJournalSocket, "journald's native socket, for --audit-sink journald")
	ff.register(f)
	f.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	return cmd
}

// parseGuardGID reads --guard-gid: a gid, a group name, or off ("0", as
// it was spelled before, is off too); "" leaves the daemon's default.
func parseGuardGID(v string, cfg *daemon.Config) error {
	switch {
	case v == "":
	case v == "off" || v == "0":
		cfg.NoTraceGuard = true
	case strings.Trim(v, "0123456789") == "":
		gid, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return fmt.Errorf("--guard-gid %s: %w", v, err)
		}
		cfg.GuardGID = uint32(gid)
	default:
		cfg.GuardGroup = v
	}
	return nil
}

func uninstallCmd() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "uninstall [--bpf-dir DIR]",
		Short: "Detach and remove everything a daemon pinned (stop the daemon first)",
		Long: `Detaches every hook a daemon pinned in --bpf-dir, removes its pins and
checks that none of its programs is left attached. A hook that stays
attached (a process holds a descriptor of its link) is an error that names
the link and the processes holding it; end them and the kernel lets go.`,
		Example: `  systemctl stop procgate && procgate uninstall
  procgate uninstall --bpf-dir /sys/fs/bpf/procgate-test`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			removed, err := bpf.Uninstall(dir)
			for _, r := range removed {
				fmt.Fprintln(cmd.OutOrStdout(), "removed", r)
			}
			if err != nil {
				return err
			}
			// Uninstall fails if anything it found stays attached.
			fmt.Fprintf(cmd.OutOrStdout(), "uninstalled %s: hooks detached (checked: none left attached), pins removed\n", dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "bpf-dir", daemon.DefaultBPFDir, "bpffs directory the daemon pinned into")
	return cmd
}

func validateCmd() *cobra.Command {
	var noDropins bool
	cmd := &cobra.Command{
		Use:   "validate FILE",
		Short: "Check a policy file with its policy.d drop-ins and explain every error with file:line:col",
		Long: `Checks a policy file and the drop-ins beside it (DIR/policy.d/*.yaml, merged
in name order) as the daemon reads them, lists the files it read, explains
every error with file:line:col and the field, and exits 1 if there is one. A
file inside a policy.d directory is checked alone, by the rules of drop-ins:
validate the main file to check it merged.

It also warns, without failing, about what is legal but probably not meant,
and about what the policy names and this host lacks or leaves open: users and
groups the user database (files, then NSS through getent) does not know, and
exe: binaries that are missing, not executable, not owned by root, or
writable by group or others (or in a directory that is), which procgate run
would refuse. The daemon logs the same warnings when it loads the policy.`,
		Example: `  procgate validate /etc/procgate/policy.yaml
  procgate validate --no-dropins /etc/procgate/policy.yaml
  procgate validate /etc/procgate/policy.d/50-vpn.yaml`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			out := cmd.OutOrStdout()
			files, alone, err := validateFiles(args[0], noDropins)
			if err != nil {
				fmt.Fprintln(cmd.ErrOrStderr(), err)
				return exitCode(1)
			}
			for _, f := range files {
				fmt.Fprintln(out, "read", f.Path)
			}
			var rs *ruleset.Ruleset
			var warnings []policy.Warning
			var check policy.HostCheck
			if alone {
				rs, warnings, check, err = policy.ParseDropin(files[0].Path, files[0].Data)
			} else {
				rs, warnings, check, err = policy.ParseFilesForHost(files)
			}
			if check != nil {
				warnings = append(warnings, check()...)
			}
			for _, w := range warnings {
				fmt.Fprintln(cmd.ErrOrStderr(), "warning:", w.String())
			}
			if err != nil {
				fmt.Fprintln(cmd.ErrOrStderr(), err)
				return exitCode(1)
			}
			grants := 0
			for _, a := range rs.Apps {
				grants += len(a.Grants)
			}
			fmt.Fprintf(out, "%s: ok", args[0])
			switch {
			case alone:
				fmt.Fprint(out, " as a drop-in alone")
			case len(files) > 1:
				fmt.Fprintf(out, " with %d drop-ins", len(files)-1)
			}
			fmt.Fprintf(out, ": %d internal prefixes, %d apps, %d grants", len(rs.Internal), len(rs.Apps), grants)
			if n := len(rs.Everyone); n > 0 {
				fmt.Fprintf(out, ", %d everyone grants", n)
			}
			var audited []string
			for _, a := range rs.Apps {
				if a.AuditOnly {
					audited = append(audited, a.Name)
				}
			}
			if len(audited) > 0 {
				fmt.Fprintf(out, "; in audit mode, not enforced: %s", strings.Join(audited, " "))
			}
			fmt.Fprintln(out)
			return nil
		},
	}
	cmd.Flags().BoolVar(&noDropins, "no-dropins", false, "check FILE alone, without the drop-ins in its policy.d")
	return cmd
}

// validateFiles reads what validate checks: path with its drop-ins, path
// alone (noDropins), or a drop-in alone (path is in a policy.d).
func validateFiles(path string, noDropins bool) (files []policy.File, alone bool, err error) {
	alone = filepath.Base(filepath.Dir(filepath.Clean(path))) == policy.DropinDir
	if !alone && !noDropins {
		files, err = policy.ReadFiles(path)
		return files, false, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, false, fmt.Errorf("read policy %s: %w", path, err)
	}
	return []policy.File{{Path: path, Data: data}}, alone, nil
}

func statusCmd(client func() api.Client) *cobra.Command {
	var asJSON, all bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show attached hooks, the policy generation, apps and their counters",
		Long: `Shows the hooks attached, the policy generation in force, the guards this
kernel does not give, the internal prefixes, and per app its mode, principal,
counters (allowed internal, denied, would-deny, external), grants and
revocations; then the audit statistics and where records go.

Apps in audit mode (mode: audit) are named on a line of their own, AUDIT MODE,
NOT ENFORCED: what their policy refuses passes, counted as would-deny. A
caller other than root sees only the apps it may run or whose user it is.

A large policy's lists are cut short: status names the first internal
prefixes (and, with --json, each app's first grants) with how many there are.
--all lists every one; explain answers for one destination.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := client().Do(api.Request{Op: api.OpStatus, All: all})
			if err != nil {
				return err
			}
			warnVersionMismatch(cmd.ErrOrStderr(), resp.Status.Version)
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(resp.Status)
			}
			printStatus(cmd.OutOrStdout(), resp.Status)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().BoolVar(&all, "all", false, "list every internal prefix and grant, however many")
	return cmd
}

func printStatus(w io.Writer, st *api.Status) {
	var hooks []string
	for _, h := range bpf.HookNames() {
		mark := "-"
		if st.Hooks[h] {
			mark = "+"
		}
		hooks = append(hooks, mark+h)
	}
	fmt.Fprintf(w, "daemon %s\n", st.Version)
	fmt.Fprintf(w, "generation %d, policy %s (sha256 %.12s), loaded %s\n", st.Generation, st.Policy, st.PolicySHA256, st.LoadedAt.Format(time.RFC3339))
	if len(st.PolicyDropins) > 0 {
		fmt.Fprintf(w, "drop-ins %s\n", strings.Join(st.PolicyDropins, " "))
	}
	if f := st.Fleet; f != nil {
		printFleetSource(w, f)
	}
	if st.LastError != "" {
		fmt.Fprintf(w, "LAST RELOAD REJECTED (generation %d stays in force): %s\n", st.Generation, st.LastError)
	}
	fmt.Fprintf(w, "hooks %s on %s (pinned in %s", strings.Join(hooks, " "), st.CgroupRoot, st.BPFDir)
	if st.Adopted {
		fmt.Fprint(w, ", adopted from an earlier daemon")
	}
	fmt.Fprintln(w, ")")
	for _, g := range st.Guards {
		if !g.Active {
			fmt.Fprintf(w, "NOT GUARDED: %s (%s)\n", g.What, g.Why)
		}
	}
	fmt.Fprintf(w, "internal %s", strings.Join(st.Internal, " "))
	if more := st.InternalCount() - len(st.Internal); more > 0 {
		fmt.Fprintf(w, " ... and %d more (procgate status --all lists them)", more)
	}
	fmt.Fprintln(w)
	if audited := st.AuditModeApps(); len(audited) > 0 {
		fmt.Fprintf(w, "AUDIT MODE, NOT ENFORCED: %s (what their policy refuses passes, logged as would-deny)\n", strings.Join(audited, " "))
	}
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "APP\tMODE\tPRINCIPAL\tCGROUPS\tALLOW\tDENY\tWOULD-DENY\tEXTERNAL\tGRANTS\tREVOKED")
	fmt.Fprintf(tw, "(unbound)\t-\t-\t-\t%d\t%d\t-\t%d\t-\t-\n", st.Unbound.Allow, st.Unbound.Deny, st.Unbound.External)
	for _, a := range st.Apps {
		rev := strings.Join(a.Revoked, ",")
		if rev == "" {
			rev = "-"
		}
		principal, cgs := a.Principal, strconv.Itoa(a.Cgroups)
		if principal == "" {
			principal = ruleset.MatchLaunched.String()
		}
		if strings.HasPrefix(principal, ruleset.MatchUser.String()+" ") {
			cgs = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%s\n", a.Name, a.ModeColumn(), principal, cgs, a.Counters.Allow, a.Counters.Deny,
			a.Counters.WouldDeny, a.Counters.External, a.GrantCount(), rev)
	}
	tw.Flush()
	fmt.Fprintf(w, "audit: %d events, %d decode errors, %d dropped; log %s\n", st.Audit.Events, st.Audit.DecodeErrors, st.Audit.Dropped, st.Audit.Log)
	if p := st.Pinholes; p != nil {
		fmt.Fprintf(w, "pinhole agent: gateway %s, %d open holes, %d pending, %d refused; host guard dropped %d packets; held %d control segments until their holes were live\n",
			p.Gateway, p.Open, p.Pending, p.Refused, p.GuardDrops, p.Held)
	} else {
		fmt.Fprintln(w, "pinhole agent: off (no --gateway)")
	}
}

func explainCmd(client func() api.Client) *cobra.Command {
	var app, policyFile string
	var pid int
	var asJSON, withCode bool
	cmd := &cobra.Command{
		Use:   "explain (--app NAME | --pid PID) ADDR:PORT[/tcp|udp]",
		Short: "Show the decision for a destination and the rule or reason behind it",
		Long: `Shows the decision for a destination and the rule or reason behind it. It
exits 0 whatever the decision; with --exit-code it exits 0 on allow, 1 on deny
and 2 when it cannot decide (bad arguments, no daemon, an invalid policy), for
scripts and CI checks of a policy.

For an app in audit mode (mode: audit) it says what enforcement would decide,
and that a denial is not enforced: the attempt passes and is logged as
would-deny. --exit-code follows the decision enforcement would make.`,
		Example: `  procgate explain --app psql-prod 10.1.2.3:5432/tcp
  procgate explain --pid 4242 '[fd00:1::5]:443'
  procgate explain --policy policy.yaml --app psql-prod 10.1.2.3:5432   # offline, without a daemon
  procgate explain --exit-code --policy policy.yaml --app psql-prod 10.1.2.3:5432 && echo allowed`,
		// Checked in RunE, so that --exit-code turns a wrong count into 2.
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ex, err := explain(client, app, pid, policyFile, args)
			if err != nil {
				return explainFailed(cmd, withCode, err)
			}
			if asJSON {
				if err := json.NewEncoder(cmd.OutOrStdout()).Encode(ex); err != nil {
					return explainFailed(cmd, withCode, err)
				}
			} else {
				who := ex.App
				if who == "" {
					who = "(unbound)"
				} else if ex.Principal != "" && ex.Principal != ruleset.MatchLaunched.String() {
					who = "app " + who + " (" + ex.Principal + ")"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s -> %s: %s\n", who, ex.Dest, ex.Decision)
			}
			if withCode && !ex.Allow {
				return exitCode(1)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&app, "app", "", "app name")
	f.IntVar(&pid, "pid", 0, "decide for this process (its cgroup says which app, if any)")
	f.StringVar(&policyFile, "policy", "", "decide from this policy file instead of asking the daemon")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	f.BoolVar(&withCode, "exit-code", false, "exit 0 on allow, 1 on deny, 2 on error (default: 0 whatever the decision)")
	cmd.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return explainFailed(c, withCode, err)
	})
	return cmd
}

// explainFailed reports err; with --exit-code the status is 2, apart from
// deny's 1.
func explainFailed(cmd *cobra.Command, withCode bool, err error) error {
	if !withCode {
		return err
	}
	fmt.Fprintln(cmd.ErrOrStderr(), "procgate:", err)
	return exitCode(2)
}

// explain decides args[0] for app or pid, from policyFile or the daemon.
func explain(client func() api.Client, app string, pid int, policyFile string, args []string) (*api.Explain, error) {
	if len(args) != 1 {
		return nil, fmt.Errorf("want one destination ADDR:PORT[/tcp|udp], got %d arguments", len(args))
	}
	if (app == "") == (pid == 0) && !(policyFile != "" && pid == 0) {
		return nil, fmt.Errorf("give exactly one of --app NAME or --pid PID")
	}
	if policyFile == "" {
		resp, err := client().Do(api.Request{Op: api.OpExplain, App: app, PID: pid, Dest: args[0]})
		if err != nil {
			return nil, err
		}
		return resp.Explain, nil
	}
	if pid != 0 {
		return nil, fmt.Errorf("--pid needs the daemon (it knows the app cgroups); drop --policy")
	}
	rs, _, err := policy.Load(policyFile)
	if err != nil {
		return nil, err
	}
	d, err := ruleset.ParseDest(args[0])
	if err != nil {
		return nil, err
	}
	if app != "" && rs.App(app) == nil {
		return nil, fmt.Errorf("no app %q in %s", app, policyFile)
	}
	dec := rs.Decide(app, d)
	ex := &api.Explain{App: app, Dest: d.String(), Allow: dec.Allow, Reason: dec.Reason.String(), Verdict: dec.Verdict(), Decision: dec.String()}
	if a := rs.App(app); a != nil {
		ex.Mode = a.Mode()
	}
	return ex, nil
}

func eventsCmd(client func() api.Client) *cobra.Command {
	var follow, asJSON bool
	var last int
	var f eventFlags
	cmd := &cobra.Command{
		Use:   "events [--follow] [--json] [--last N] [--app A] [--verdict V] [--since D] [--dest P]",
		Short: "Show audit events: time, verdict, pid, comm, exe, uid, app, destination, rule",
		Long: `Show audit events: time, verdict, pid, comm, exe, uid, app, destination, rule.

The daemon filters: --last counts the events that pass. A caller other than
root sees only the events of its own uid.`,
		Example: `  procgate events --last 20
  procgate events --app psql-prod --verdict deny --since 1h
  procgate events --dest 10.1.0.0/16 --follow
  procgate events --follow --json | jq 'select(.verdict=="deny")'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req, err := f.request()
			if err != nil {
				return err
			}
			req.Follow, req.Last = follow, last
			return streamEvents(client(), req, func(raw json.RawMessage, rec audit.Record) {
				if asJSON {
					fmt.Fprintln(cmd.OutOrStdout(), string(raw))
				} else {
					fmt.Fprintln(cmd.OutOrStdout(), rec.Text())
				}
			})
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new events")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON lines")
	cmd.Flags().IntVar(&last, "last", 100, "print this many past events first (0: all)")
	f.add(cmd, true)
	return cmd
}

// eventFlags are the events filters, shared by events and learn.
type eventFlags struct {
	app, verdict, since, dest string
}

func (f *eventFlags) add(cmd *cobra.Command, all bool) {
	cmd.Flags().StringVar(&f.since, "since", "", "only events since a duration ago (90m, 24h) or a time (2026-12-06T06:00:00Z)")
	if !all {
		return
	}
	cmd.Flags().StringVar(&f.app, "app", "", "only this app's events")
	cmd.Flags().StringVar(&f.verdict, "verdict", "", "only events with this verdict: allow, deny, would-deny, open, close, refuse")
	cmd.Flags().StringVar(&f.dest, "dest", "", "only events to an address in this prefix (10.1.0.0/16, fd00::/8, 10.1.2.3)")
}

// eventVerdicts are the verdicts records carry: the kernel's decisions
// (would-deny: an audit-only app's attempt that passed) and pinholes'.
var eventVerdicts = []string{ruleset.VerdictAllow, ruleset.VerdictDeny, ruleset.VerdictWouldDeny,
	ruleset.VerdictOpen, ruleset.VerdictClose, ruleset.VerdictRefuse}

func (f *eventFlags) request() (api.Request, error) {
	if f.verdict != "" && !slices.Contains(eventVerdicts, f.verdict) {
		return api.Request{}, fmt.Errorf("--verdict %q: want one of %s", f.verdict, strings.Join(eventVerdicts, ", "))
	}
	since, err := parseSince(f.since, time.Now())
	if err != nil {
		return api.Request{}, err
	}
	return api.Request{Op: api.OpEvents, App: f.app, Verdict: f.verdict, Since: since, DestPrefix: f.dest}, nil
}

// parseSince reads --since: a duration back from now, or an RFC 3339 time.
func parseSince(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(s); err == nil {
		if d < 0 {
			return time.Time{}, fmt.Errorf("--since %q: want a duration back from now (24h), not a negative one", s)
		}
		return now.Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("--since %q: want a duration (90m, 24h) or an RFC 3339 time (2026-12-06T06:00:00Z)", s)
	}
	return t, nil
}

// streamEvents asks the daemon for events and hands each to fn until the
// daemon ends the stream.
func streamEvents(c api.Client, req api.Request, fn func(json.RawMessage, audit.Record)) error {
	conn, r, err := c.Dial(req)
	if err != nil {
		return err
	}
	defer conn.Close()
	for {
		resp, err := api.ReadResponse(r)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		var rec audit.Record
		if err := json.Unmarshal(resp.Event, &rec); err != nil {
			return fmt.Errorf("decode event: %w", err)
		}
		fn(resp.Event, rec)
	}
}

func revokeCmd(client func() api.Client) *cobra.Command {
	var app string
	var grant int
	var restore, fleetWide bool
	var e etcdFlags
	cmd := &cobra.Command{
		Use:   "revoke --app NAME [--grant N] [--restore] [--fleet]",
		Short: "Withdraw an app's grants now (all, or grant N); --restore gives them back; --fleet on every host",
		Long: `Withdraws an app's grants now, new attempts and live sockets, until
--restore. With --fleet the revocation goes to etcd (/procgate/revocations/APP)
instead of this host's daemon: every daemon with --policy-store etcd applies
it as it applies a push, and keeps it in its last good policy. A host's own
revocations and the fleet's add up; --restore without --fleet gives back only
the host's own.

An app revoked whole is enforced even in mode: audit: revoke is the brake.
Grant N of an app in audit mode is withdrawn as the policy without it would
be: its attempts become would-deny, and pass.`,
		Example: `  procgate revoke --app psql-prod
  procgate revoke --app psql-prod --grant 1
  procgate revoke --app psql-prod --restore
  procgate revoke --app psql-prod --fleet         # every host (PROCGATE_ETCD_* set)
  procgate revoke --app psql-prod --fleet --restore`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var g *int
			if cmd.Flags().Changed("grant") {
				g = &grant
			}
			if fleetWide {
				return revokeFleet(cmd.OutOrStdout(), e, app, g, restore)
			}
			resp, err := client().Do(api.Request{Op: api.OpRevoke, App: app, Restore: restore, Grant: g})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: %s; generation %d in force; %d live sockets ended\n", app, resp.Revoke.Revoked, resp.Revoke.Generation, resp.Revoke.SocketsEnded)
			return nil
		},
	}
	cmd.Flags().StringVar(&app, "app", "", "app name (required)")
	cmd.Flags().IntVar(&grant, "grant", 0, "only this grant (its position in the app's allow list, from 0; with --fleet, in each host's merged list, where the fleet document's grants come first)")
	cmd.Flags().BoolVar(&restore, "restore", false, "undo an earlier revoke")
	cmd.Flags().BoolVar(&fleetWide, "fleet", false, "on every host that takes its policy from etcd (docs/fleet.md), through etcd")
	e.register(cmd.Flags())
	_ = cmd.MarkFlagRequired("app")
	return cmd
}

func reloadCmd(client func() api.Client) *cobra.Command {
	return &cobra.Command{
		Use:   "reload",
		Short: "Make the daemon re-read its policy now (as SIGHUP does) and say whether it took it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := client().Do(api.Request{Op: api.OpReload})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "policy loaded: generation %d in force; %d live sockets ended\n", *resp.Reload, resp.SocketsEnded)
			return nil
		},
	}
}
