// Command attack tries every way it knows to reach a destination procgate
// should keep it from, and reports what got through (issue 4).
//
//	attack run    [flags]   every technique, one child process each; a JSON
//	                        line per technique and a summary line on stdout
//	attack one    -technique NAME [flags]   one technique (used by run)
//	attack list             the techniques, one per line: NAME CLASS
//	attack target -ifname IF -oracle SOCK   the listener side, run in the
//	                        target's network; records what arrives
//	attack holder -listen SOCK [flags]      an app process that holds sockets
//	                        to the target, for the identity techniques
//
// "reached" means the target saw the technique's packet, not that a syscall
// returned 0: every attempt carries a token the target's capture looks for,
// and run asks the target (over the -oracle unix socket) what it saw.
// Attempts go only to the addresses given by the flags.
package main

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"time"
)

func main() {
	cfg, err := parseArgs(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "attack:", err)
		os.Exit(2)
	}
	if err := run(cfg); err != nil {
		fmt.Fprintln(os.Stderr, "attack:", err)
		os.Exit(1)
	}
}

// config is the command line.
type config struct {
	cmd  string
	args []string // the flags as given, handed on to child processes

	role, nonce string
	// target4 and target6 are the destinations under attack; techniques
	// about other address forms derive theirs from them or use the fixed
	// addresses below.
	target4, target6     netip.Addr
	external4, external6 netip.Addr // outside every internal prefix: the controls
	linkLocal6           netip.Addr // the target's link-local address on ifname
	metadata4            netip.Addr // a link-local IPv4 service address
	tcpPort, udpPort     uint16
	ifname               string // the attacker's interface towards the target
	internal             []netip.Prefix
	oracle, holder       string // unix sockets of the target and the holder
	only                 *regexp.Regexp
	technique            string
	stage                int
	timeout              time.Duration

	listen string // target: oracle socket to serve; holder: socket to serve
	log    string // target: JSON lines of records
}

func parseArgs(argv []string) (*config, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("usage: attack run|one|list|target|holder [flags]")
	}
	cfg := &config{cmd: argv[0], args: argv[1:]}
	fs := flag.NewFlagSet("attack "+cfg.cmd, flag.ContinueOnError)
	var target4, target6, ext4, ext6, ll6, meta4, internal, only string
	var tcpPort, udpPort uint
	fs.StringVar(&cfg.role, "role", "attacker", "name of the role in tokens and results")
	fs.StringVar(&cfg.nonce, "nonce", "", "token nonce of this run (default: random)")
	fs.StringVar(&target4, "target4", "10.1.2.3", "IPv4 destination under attack")
	fs.StringVar(&target6, "target6", "fd00:1::3", "IPv6 destination under attack")
	fs.StringVar(&ext4, "external4", "198.51.100.7", "IPv4 control destination outside the internal prefixes")
	fs.StringVar(&ext6, "external6", "2001:db8:ff::7", "IPv6 control destination outside the internal prefixes")
	fs.StringVar(&ll6, "linklocal6", "fe80::2", "the target's link-local IPv6 address on -ifname")
	fs.StringVar(&meta4, "metadata4", "169.254.169.254", "a link-local IPv4 service address")
	fs.UintVar(&tcpPort, "tcp-port", 5432, "TCP port of the target")
	fs.UintVar(&udpPort, "udp-port", 5353, "UDP port of the target")
	fs.StringVar(&cfg.ifname, "ifname", "pga", "interface towards the target (run) or to capture on (target)")
	fs.StringVar(&internal, "internal", "10.0.0.0/8,fd00::/8", "internal prefixes, comma-separated: where an arrival counts as reached")
	fs.StringVar(&cfg.oracle, "oracle", "", "unix socket of the target's oracle")
	fs.StringVar(&cfg.holder, "holder", "", "unix socket of a holder (an app process with sockets to the target)")
	fs.StringVar(&only, "only", "", "run only techniques whose name matches this regexp")
	fs.StringVar(&cfg.technique, "technique", "", "one: the technique to try")
	fs.IntVar(&cfg.stage, "stage", 1, "one: internal, the stage of a technique that starts a process of its own")
	fs.DurationVar(&cfg.timeout, "timeout", 1500*time.Millisecond, "how long one connection attempt may wait")
	fs.StringVar(&cfg.listen, "listen", "", "target, holder: unix socket to serve")
	fs.StringVar(&cfg.log, "log", "", "target: file for JSON lines of what arrives")
	if err := fs.Parse(cfg.args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	for _, a := range []struct {
		dst *netip.Addr
		s   string
	}{{&cfg.target4, target4}, {&cfg.target6, target6}, {&cfg.external4, ext4}, {&cfg.external6, ext6}, {&cfg.linkLocal6, ll6}, {&cfg.metadata4, meta4}} {
		v, err := netip.ParseAddr(a.s)
		if err != nil {
			return nil, err
		}
		*a.dst = v
	}
	if !cfg.target4.Is4() || !cfg.metadata4.Is4() || !cfg.external4.Is4() {
		return nil, fmt.Errorf("-target4, -external4 and -metadata4 must be IPv4 addresses")
	}
	if tcpPort > 65535 || udpPort > 65535 {
		return nil, fmt.Errorf("ports must be 0-65535")
	}
	cfg.tcpPort, cfg.udpPort = uint16(tcpPort), uint16(udpPort)
	for _, p := range strings.Split(internal, ",") {
		if p = strings.TrimSpace(p); p == "" {
			continue
		}
		pfx, err := netip.ParsePrefix(p)
		if err != nil {
			return nil, fmt.Errorf("-internal: %w", err)
		}
		cfg.internal = append(cfg.internal, pfx.Masked())
	}
	if only != "" {
		re, err := regexp.Compile(only)
		if err != nil {
			return nil, fmt.Errorf("-only: %w", err)
		}
		cfg.only = re
	}
	if strings.ContainsAny(cfg.role, "/| \t\n") || strings.ContainsAny(cfg.nonce, "/| \t\n") {
		return nil, fmt.Errorf("-role and -nonce must not contain '/', '|' or spaces")
	}
	return cfg, nil
}

func run(cfg *config) error {
	switch cfg.cmd {
	case "run":
		return runAll(cfg, os.Stdout)
	case "one":
		return runOne(cfg, os.Stdout)
	case "list":
		for _, t := range techniques {
			fmt.Printf("%s %s\n", t.name, t.class)
		}
		return nil
	case "target":
		return serveTarget(cfg)
	case "holder":
		return serveHolder(cfg)
	}
	return fmt.Errorf("unknown command %q (run, one, list, target, holder)", cfg.cmd)
}
