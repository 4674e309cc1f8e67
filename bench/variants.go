package main

import (
	"fmt"

	"github.com/cilium/ebpf"
	"net/netip"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// variant is one way of enforcing the policy.
type variant struct {
	Name string
	Desc string
	// MaxSize is the largest policy the variant is measured at (0: all),
	// and StopWhy says why.
	MaxSize int
	StopWhy string
	// control variants only show the measurement's noise; the scaling phase
	// leaves them out.
	control bool
	// uidBased variants tell apps apart by uid: their clients run as the
	// app's uid. All others run as root (the uid does not change their
	// connect path).
	uidBased bool
	// latencyOnly variants break procgate's cost down by guard: measured
	// in the latency phase over loopback only.
	latencyOnly bool
	// pinned lists the enforcer's programs (pinned as prog_<hook>) that a
	// procgate variant other than procgate itself attaches to its own
	// cgroup: the same programs and maps, so the same policy.
	pinned []string
	// openToTracing: the client runs with all its uids and gids equal, as
	// a traceable app, a script or root, whose connections the default TCP
	// handover guard watches; every other client has the trace guard's
	// credentials, as `procgate run` starts apps.
	openToTracing bool
	// empty: the variant attaches empty programs (floorHooks) to its own
	// cgroup, kept in progs for the BPF statistics: the floor of every
	// hook procgate uses.
	empty bool
	progs map[string]*ebpf.Program
	// minimal: the variant attaches the bare decision (minimal.c) at
	// connect4 and sendmsg4 and the floor's empty programs at the other
	// floor hooks, kept in progs too: what deciding alone costs.
	minimal bool
	// unbound: the variant's cgroup is enforced, but no app claims it: its
	// client is a process of no app.
	unbound bool
	// install puts the variant's rules into the network namespace ns of a
	// lane; nil for variants that need none there.
	install func(b *bench, l *lane, pol *benchPolicy) (loadStats, error)
}

// loadStats is what installing a policy cost.
type loadStats struct {
	Seconds float64 `json:"seconds"`
	// CPUSeconds is user+system time of the loading process(es).
	CPUSeconds float64 `json:"cpu_seconds"`
	// MaxRSSKiB is the peak memory of the loading tool (nft, ip), where one ran.
	MaxRSSKiB int64 `json:"max_rss_kib,omitempty"`
}

const (
	vBaseline      = "baseline"
	vControl       = "baseline-aa"
	vProcgate      = "procgate"
	vProcgateHooks = "procgate-hooks-only"
	// One guard at a time on top of the hooks, and the TCP handover guard.
	vProcgateEgress     = "procgate-hooks+egress"
	vProcgateSockCreate = "procgate-hooks+sock_create"
	vProcgateTraceable  = "procgate-traceable"
	vEmpty              = "empty-programs"
	vMinimal            = "minimal-decision"
	vProcgateNoApp      = "procgate-noapp"
	vNoAppTracker       = "procgate-noapp-tracker"
	vNftCgroupSet       = "nft-cgroup-set"
	vNftCgroupRules     = "nft-cgroup-rules"
	vNftUIDSet          = "nft-uid-set"
	vRouteUID           = "route-uid"
)

// Where variants stop (see StopWhy).
const (
	ruleVariantMax = 5000
	uidVariantMax  = 100000
	routeMax       = 100000
)

func allVariants() []*variant {
	return []*variant{
		{Name: vBaseline, Desc: "no enforcement"},
		{Name: vControl, Desc: "control: a second, identical baseline lane; its ratio to the baseline is this run's noise floor", control: true},
		{Name: vProcgate, Desc: "procgate: eBPF cgroup connect4/6, sendmsg4/6 (+ sock_create, egress backstop, bind hooks, the TCP handover guard's sockops), as bpf.Open/Apply/Attach install it with the daemon's defaults (--tcp-handover=auto); the client has the trace guard's credentials, as `procgate run` starts apps, so its connections are left to the trace guard"},
		{Name: vProcgateHooks, Desc: "diagnostic: procgate's connect4/6 and sendmsg4/6 programs alone (no egress backstop, no sock_create guard, no handover sockops) on a cgroup of their own, same maps and policy: what the backstops and the handover guard add",
			pinned: hookPrograms},
		{Name: vProcgateEgress, Desc: "diagnostic: the hooks and the egress backstop (with the UDP handover check), nothing else: what the backstop adds",
			latencyOnly: true, pinned: append([]string{"egress"}, hookPrograms...)},
		{Name: vProcgateSockCreate, Desc: "diagnostic: the hooks and the sock_create guard (raw sockets), nothing else: what that guard adds",
			latencyOnly: true, pinned: append([]string{"sock_create"}, hookPrograms...)},
		{Name: vProcgateTraceable, Desc: "procgate with every program, for an app process open to tracing (equal uids and gids: traceable: true, a script, root), whose internal TCP connections the TCP handover guard watches by default (as it watches every app's with --tcp-handover=all): what that guard adds",
			latencyOnly: true, openToTracing: true, pinned: append([]string{"sock_create", "egress", "bind4", "bind6", "handover"}, hookPrograms...)},
		{Name: vProcgateNoApp, Desc: "procgate with the programs of its defaults here, for a process of no app (a cgroup below the enforced one that no app claims, as most of a host's processes are): internal destinations are denied to it, external ones are what it pays",
			latencyOnly: true, unbound: true, pinned: append([]string{"sock_create", "egress", "bind4", "bind6"}, hookPrograms...)},
		{Name: vNoAppTracker, Desc: "procgate-noapp with the TCP handover guard's sockops tracker attached too, as the daemon attaches it host-wide while some app needs it (traceable: true, a match: app, --tcp-handover=all, an untraced launch): what a process of no app pays then",
			latencyOnly: true, unbound: true, pinned: append([]string{"sock_create", "egress", "bind4", "bind6", "handover"}, hookPrograms...)},
		{Name: vEmpty, Desc: "diagnostic: the floor; at each hook procgate's defaults use here (sock_create, connect4/6, sendmsg4/6, egress; not the sockops tracker, which the defaults leave off for these apps), a program that only returns \"go on\", on a cgroup of its own: what running a program there costs at all, below any design of procgate's",
			latencyOnly: true, empty: true},
		{Name: vMinimal, Desc: "diagnostic: the bare decision, issue 13's \"minimal eBPF decision\" (bench/minimal.c): at connect4 and sendmsg4 the cgroup id's app (hash), the destination in an LPM trie of internal prefixes (not internal: allowed), then an LPM trie keyed by app and address to the grant's TCP and UDP port ranges; no counters, audit, handoff, caches or generations; IPv4 only; empty-programs' programs at the other hooks, on a cgroup of its own: what deciding alone costs, below any design that decides at these hooks",
			latencyOnly: true, minimal: true},
		{Name: vNftCgroupSet, Desc: "nftables output chain: ct state established first, internal set, `socket cgroupv2` goto per-app chain with an interval set of the app's prefixes", install: installNft},
		{Name: vNftCgroupRules, Desc: "as nft-cgroup-set, but one rule per granted prefix in the per-app chain", install: installNft,
			MaxSize: ruleVariantMax, StopWhy: "every new packet walks app0's chain rule by rule, so 100,000 prefixes mean ~5,000 rule evaluations per packet: milliseconds per connect"},
		{Name: vNftUIDSet, Desc: "as nft-cgroup-set, but apps told apart by `meta skuid` (one uid per app)", uidBased: true, install: installNft,
			MaxSize: uidVariantMax, StopWhy: "its sets are nft-cgroup-set's (only the app match differs), and loading 1,000,000 elements again (~20-30 s, 1.5 GiB of nft memory) would not fit the full run's 15 minutes"},
		{Name: vRouteUID, Desc: "policy routing: `ip rule uidrange` per app to a table of its granted prefixes, then blackhole routes for every internal prefix (no ports, no protocols)", uidBased: true, install: installRoutes,
			MaxSize: routeMax, StopWhy: "1,000,000 prefixes are 2,000,000 routes: `ip -batch` took 46 s and 8 GiB of memory to load them here"},
	}
}

// hookPrograms are the connect and sendmsg programs.
var hookPrograms = []string{"connect4", "connect6", "sendmsg4", "sendmsg6"}

// procgateLike: does the variant enforce with procgate's programs?
func (v *variant) procgateLike() bool { return v.Name == vProcgate || v.pinned != nil }

// enforcing is false for the baseline, its control and the empty programs.
func (v *variant) enforcing() bool { return v.Name != vBaseline && !v.control && !v.empty }

// expectAllow is the verdict of the variant's client for destinations of
// class c. A variant that enforces nothing connects to the deny class too,
// and that is its cost to compare.
func (v *variant) expectAllow(c class) bool {
	switch {
	case !v.enforcing():
		return true
	case v.unbound:
		return c == classExternal
	}
	return c != classDeny
}

func pickVariants(all []*variant, names ...string) []*variant {
	var out []*variant
	for _, v := range all {
		for _, n := range names {
			if v.Name == n {
				out = append(out, v)
			}
		}
	}
	return out
}

func rusageStats(elapsed time.Duration, ru *syscall.Rusage) loadStats {
	s := loadStats{Seconds: elapsed.Seconds()}
	if ru != nil {
		s.CPUSeconds = tvSeconds(ru.Utime) + tvSeconds(ru.Stime)
		s.MaxRSSKiB = ru.Maxrss
	}
	return s
}

func tvSeconds(tv syscall.Timeval) float64 { return float64(tv.Sec) + float64(tv.Usec)/1e6 }

// nftCgroupPath is how `socket cgroupv2 level N "PATH"` names a cgroup: PATH
// below /sys/fs/cgroup (so "unified/..." on a hybrid layout), N its depth
// below the cgroup2 root; the id is resolved when the rule is loaded.
func nftCgroupPath(dir string) (string, error) {
	rel, err := filepath.Rel("/sys/fs/cgroup", dir)
	if err != nil || strings.HasPrefix(rel, "..") {
		return "", fmt.Errorf("cgroup %s is not below /sys/fs/cgroup, nft cannot name it", dir)
	}
	return rel, nil
}

// nftRuleset writes the ruleset a careful admin would: established
// connections first, then everything not internal, then per app a jump to
// its own chain, which accepts its grants and ends in a denial. TCP is
// rejected with a reset so that a denied connect fails at once, as it does
// with procgate; other denials drop, and sendmsg() sees EPERM.
func (b *bench) nftRuleset(v *variant, pol *benchPolicy) (string, error) {
	var s strings.Builder
	s.WriteString("table inet procgate_bench {\n")
	writeSet(&s, "internal", pol.internal)
	s.WriteString("\tset grant_ports { type inet_service; flags interval; elements = { 5432, 8000-8100 } }\n")
	if v.Name != vNftCgroupRules {
		for a, gs := range pol.grants {
			writeSet(&s, appName(a), gs)
		}
	}
	s.WriteString("\tchain output {\n\t\ttype filter hook output priority filter; policy accept;\n")
	s.WriteString("\t\tct state established,related accept\n")
	s.WriteString("\t\tip daddr != @internal accept\n")
	s.WriteString("\t\tmeta l4proto != { tcp, udp } drop\n")
	for a := range pol.grants {
		if v.uidBased {
			fmt.Fprintf(&s, "\t\tmeta skuid %d goto %s\n", appUID(a), appName(a))
			continue
		}
		dir := b.appCgroup(v.Name, a)
		path, err := nftCgroupPath(dir)
		if err != nil {
			return "", err
		}
		level, err := b.cgroupLevel(dir)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&s, "\t\tsocket cgroupv2 level %d %q goto %s\n", level, path, appName(a))
	}
	s.WriteString("\t\tmeta l4proto tcp reject with tcp reset\n\t\tdrop\n\t}\n")
	for a, gs := range pol.grants {
		fmt.Fprintf(&s, "\tchain %s {\n", appName(a))
		if v.Name == vNftCgroupRules {
			for _, p := range gs {
				fmt.Fprintf(&s, "\t\tip daddr %s th dport @grant_ports accept\n", p)
			}
		} else {
			fmt.Fprintf(&s, "\t\tip daddr @%s th dport @grant_ports accept\n", appName(a))
		}
		s.WriteString("\t\tmeta l4proto tcp reject with tcp reset\n\t\tdrop\n\t}\n")
	}
	s.WriteString("}\n")
	return s.String(), nil
}

func writeSet(s *strings.Builder, name string, ps []netip.Prefix) {
	fmt.Fprintf(s, "\tset %s {\n\t\ttype ipv4_addr; flags interval;\n", name)
	if len(ps) > 0 {
		s.WriteString("\t\telements = {\n")
		for i, p := range ps {
			s.WriteString("\t\t\t")
			s.WriteString(p.String())
			if i < len(ps)-1 {
				s.WriteByte(',')
			}
			s.WriteByte('\n')
		}
		s.WriteString("\t\t}\n")
	}
	s.WriteString("\t}\n")
}

func installNft(b *bench, l *lane, pol *benchPolicy) (loadStats, error) {
	text, err := b.nftRuleset(l.v, pol)
	if err != nil {
		return loadStats{}, err
	}
	start := time.Now()
	ru, err := nsRun(l.clientNS, []byte(text), "nft", "-f", "-")
	if err != nil {
		return loadStats{}, err
	}
	st := rusageStats(time.Since(start), ru)
	// Connections end with RST (SO_LINGER {1,0}); conntrack keeps them in
	// CLOSE for 10 s by default, and at ~50,000 connects per second the
	// table (nf_conntrack_max is global) would fill and drop SYNs.
	if err := writeSysctl(l.clientNS, "net/netfilter/nf_conntrack_tcp_timeout_close", "1"); err != nil {
		return st, err
	}
	return st, nil
}

// removeNft deletes the bench's table from ns (the tunnel lanes share one
// namespace, so the table is there only during the variant's own batches).
func removeNft(ns string) error {
	_, err := nsRun(ns, nil, "nft", "delete", "table", "inet", "procgate_bench")
	return err
}

// Policy routing: table appTable+a holds app a's granted prefixes, reached
// by `ip rule uidrange` of the app's uid; table blackholeTable holds every
// internal prefix as a blackhole route, for everyone. The rule that looks up
// table local moves behind them: on the loopback lanes every destination is
// local, and it would otherwise win before any policy rule is read.
const (
	appTable       = 100
	blackholeTable = 200
)

func (b *bench) routeBatch(l *lane, pol *benchPolicy) string {
	var s strings.Builder
	// The servers (root, in the bench process) answer from internal
	// addresses on the loopback lanes: root is not an app.
	s.WriteString("rule add pref 5 uidrange 0-0 lookup local\n")
	for a, gs := range pol.grants {
		fmt.Fprintf(&s, "rule add pref %d uidrange %d-%d lookup %d\n", 10+a, appUID(a), appUID(a), appTable+a)
		for _, p := range gs {
			if l.topo == topoLoopback {
				fmt.Fprintf(&s, "route add local %s dev lo table %d\n", p, appTable+a)
			} else {
				fmt.Fprintf(&s, "route add %s via %s table %d\n", p, vethServer.Addr(), appTable+a)
			}
		}
	}
	fmt.Fprintf(&s, "rule add pref 50 lookup %d\n", blackholeTable)
	for _, p := range pol.internal {
		fmt.Fprintf(&s, "route add blackhole %s table %d\n", p, blackholeTable)
	}
	s.WriteString("rule add pref 60 lookup local\nrule del pref 0 lookup local\n")
	return s.String()
}

func installRoutes(b *bench, l *lane, pol *benchPolicy) (loadStats, error) {
	start := time.Now()
	ru, err := nsRun(l.clientNS, []byte(b.routeBatch(l, pol)), "ip", "-batch", "-")
	if err != nil {
		return loadStats{}, err
	}
	return rusageStats(time.Since(start), ru), nil
}
