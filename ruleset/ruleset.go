// Package ruleset is the kernel-neutral form of a procgate policy: the single
// source of truth that the eBPF backend encodes, that `explain` evaluates, and
// that tests compare both against.
//
// A Ruleset is plain data. policy.Compile produces one from a YAML file; the
// daemon may derive another from it (revocations) before a backend applies it.
package ruleset

import (
	"fmt"
	"net/netip"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Proto is a set of transport protocols.
type Proto uint8

const (
	TCP  Proto = 1 << 0
	UDP  Proto = 1 << 1
	Both       = TCP | UDP
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case Both:
		return "tcp+udp"
	case 0:
		return "none"
	}
	return "proto(" + strconv.Itoa(int(p)) + ")"
}

// PortRange is an inclusive range of ports; an exact port is Lo == Hi.
type PortRange struct {
	Lo, Hi uint16
}

// AllPorts is the range a grant without a port list covers.
var AllPorts = PortRange{0, 65535}

func (r PortRange) String() string {
	if r.Lo == r.Hi {
		return strconv.Itoa(int(r.Lo))
	}
	return strconv.Itoa(int(r.Lo)) + "-" + strconv.Itoa(int(r.Hi))
}

// JoinPorts writes ports and ranges as PortRange.String does, sep between.
func JoinPorts(rs []PortRange, sep string) string {
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = r.String()
	}
	return strings.Join(s, sep)
}

// Contains reports whether port lies in r.
func (r PortRange) Contains(port uint16) bool { return r.Lo <= port && port <= r.Hi }

// Source is where a rule was written, so that decisions can name it.
type Source struct {
	File string
	Line int
}

func (s Source) String() string {
	if s.File == "" {
		return ""
	}
	return s.File + ":" + strconv.Itoa(s.Line)
}

// Grant lets an app reach a prefix with some protocols and ports.
//
// A policy holds a million of them: Index and Proto come first, together
// in one word (with Index an int, and Proto after Name, a Grant took 112
// bytes, now 104).
type Grant struct {
	// Index is the grant's position in the app's allow list, from 0; it is
	// what `revoke --grant N` names.
	Index  int32
	Proto  Proto
	Prefix netip.Prefix // masked; IPv4 prefixes are 4-byte (never 4in6); invalid for a name grant
	// Name, when set, makes this a DNS-name grant (policy `to:
	// db.corp.example` or `*.corp.example`): it covers the addresses DNS
	// answers gave the app for the name (Learned), until they expire.
	// Lower case, without a trailing dot; Prefix is then the zero value.
	Name   string
	Ports  []PortRange // sorted by Lo, each as written (never widened); never empty
	Source Source
}

// Covers reports whether g allows d. A name grant covers no destination
// by itself: only the addresses learned for its name (CoversLearned).
func (g Grant) Covers(d Dest) bool {
	if g.Name != "" || !g.Prefix.Contains(d.Addr) {
		return false
	}
	return g.CoversPort(d)
}

// CoversPort reports whether g's protocols and ports take d's.
func (g Grant) CoversPort(d Dest) bool {
	if g.Proto&d.Proto == 0 {
		return false
	}
	for _, r := range g.Ports {
		if r.Contains(d.Port) {
			return true
		}
	}
	return false
}

func (g Grant) String() string {
	to := g.Prefix.String()
	if g.Name != "" {
		to = g.Name
	}
	return fmt.Sprintf("#%d %s %s ports %s", g.Index, to, g.Proto, JoinPorts(g.Ports, ","))
}

// MatchesName reports whether the name grant g stands for the DNS name q
// (lower case, no trailing dot): `db.corp.example` for itself only,
// `*.corp.example` for every name below corp.example, at any depth, but
// not for corp.example itself.
func (g Grant) MatchesName(q string) bool {
	if g.Name == "" {
		return false
	}
	if suffix, ok := strings.CutPrefix(g.Name, "*"); ok {
		return len(q) > len(suffix) && strings.HasSuffix(q, suffix)
	}
	return q == g.Name
}

// Learned is one address a DNS answer gave an app for a name: the fact a
// name grant stands on. The daemon learns them from the answers it relays
// (the DNS proxy), and the kernel holds them until Expires.
type Learned struct {
	App  string
	Name string // the name the app asked, lower case, no trailing dot
	Addr netip.Addr
	// Expires is when the answer's TTL, plus the daemon's grace period,
	// runs out.
	Expires time.Time
	// Answer is the answer as the resolver gave it, for explain: the
	// CNAME chain and the record, "db.corp.example. 30 IN CNAME
	// db1.corp.example.; db1.corp.example. 30 IN A 10.1.2.3".
	Answer string
	// Resolver is where the answer came from.
	Resolver netip.AddrPort
}

func (l Learned) String() string {
	return fmt.Sprintf("%s is %s until %s (answer from %s: %s)", l.Name, l.Addr, l.Expires.UTC().Format(time.RFC3339), l.Resolver, l.Answer)
}

// NameMatch is a name grant that covers a destination and the learned
// answer that makes it cover it.
type NameMatch struct {
	Grant   Grant
	Learned Learned
}

// HasNames reports whether the app has DNS-name grants.
func (a *App) HasNames() bool {
	return slices.ContainsFunc(a.Grants, func(g Grant) bool { return g.Name != "" })
}

// Exe is a binary that holds an app's grants.
type Exe struct {
	Path   string // absolute, as written
	SHA256 string // lowercase hex, optional
}

// App is a principal: processes in its cgroup (or a descendant) hold its grants.
type App struct {
	Name  string
	Exe   []Exe    // empty: any binary
	Users []string // user names, or "@group"
	// AuditAllow asks for an audit event on every allowed internal attempt,
	// not only on denials.
	AuditAllow bool
	// AuditOnly (policy `mode: audit`) lets the attempts the app's policy
	// refuses pass: each is counted and audited as a would-be denial
	// (verdict "would-deny") instead. Only the decisions of its own
	// policy (destinations, listen:) are not enforced; the guards around
	// the hooks (raw sockets, handover, tracing) are. The zero value is
	// the default, mode: enforce.
	AuditOnly bool
	Grants    []Grant
	// Inbound, when set, lets the app's peers in through dynamic
	// pinholes (policy `inbound: dynamic:`); nil: no pinholes.
	Inbound *Inbound
	// KeepCaps names capabilities of LauncherDrops that the launcher
	// leaves in the app's bounding set (policy `keep_caps:`).
	KeepCaps []string
	// AllowHandover leaves the app's TCP connections to internal
	// destinations without the handover guard (policy `handover: allow`):
	// any holder of such a socket may write to it, and connecting costs
	// no socket storage or sockhash entry.
	AllowHandover bool
	// Traceable lets processes of the same user trace the app's processes
	// (policy `traceable: true`): the launcher does not guard them.
	Traceable bool
	// OutsideDeny makes the app a sandbox (policy `outside: deny`): it
	// reaches only its grants and everyone's, external destinations too;
	// loopback stays open unless LoopbackDeny. The zero value is today's
	// default, outside: allow.
	OutsideDeny bool
	// LoopbackDeny (policy `loopback: deny`) takes loopback from a
	// sandboxed app too. Without OutsideDeny it changes nothing: loopback
	// is then external, and external is allowed.
	LoopbackDeny bool
	// Listen, when set, is the only ports the app's processes may bind
	// (policy `listen:`), TCP and UDP; nil: any port, as without it.
	Listen *Listen
	// Match, when set, makes the app every process in existing cgroups
	// (a systemd unit's, or those a glob names) or of a user; nil: the
	// processes `procgate run` starts in the app's own cgroup.
	Match  *Match
	Source Source
}

// An app's modes, as the policy's mode: writes them.
const (
	ModeEnforce = "enforce"
	ModeAudit   = "audit" // AuditOnly
)

// Mode is the app's mode: ModeAudit or ModeEnforce.
func (a *App) Mode() string {
	if a.AuditOnly {
		return ModeAudit
	}
	return ModeEnforce
}

// MatchKind is what kind of principal an app is.
type MatchKind uint8

const (
	MatchLaunched  MatchKind = iota // started by `procgate run` in <root>/procgate.apps/NAME
	MatchUnit                       // a systemd unit's or slice's cgroup, followed across restarts
	MatchCgroup                     // existing cgroups whose path below the cgroup root matches a glob
	MatchUser                       // every process whose real uid is UID, in no app's cgroup
	MatchContainer                  // a docker or podman container's cgroup, by the container's name
)

func (k MatchKind) String() string {
	switch k {
	case MatchLaunched:
		return "launched"
	case MatchUnit:
		return "unit"
	case MatchCgroup:
		return "cgroup"
	case MatchUser:
		return "user"
	case MatchContainer:
		return "container"
	}
	return "match(" + strconv.Itoa(int(k)) + ")"
}

// Match is an app's `match:`.
type Match struct {
	Kind MatchKind
	// Value is as written: the unit name, the glob, the user name or
	// number.
	Value string
	// Path is, for a unit, its cgroup below the cgroup root as systemd
	// lays it out (system.slice/nginx.service), and for a cgroup match the
	// glob; slash-separated, no leading slash. For a container it is
	// where the runtime put the container when the daemon last asked
	// (empty: no such container then).
	Path string
	// UID is a user match's uid, looked up when the policy was read.
	UID uint32
}

// Describe is the principal as explain and status name it: "unit
// nginx.service", "user backup", "launched".
func (m *Match) Describe() string {
	if m == nil {
		return MatchLaunched.String()
	}
	return m.Kind.String() + " " + m.Value
}

// Kind is the app's principal kind.
func (a *App) Kind() MatchKind {
	if a.Match == nil {
		return MatchLaunched
	}
	return a.Match.Kind
}

// LauncherDrops are the capabilities the launcher (`procgate run`, and the
// daemon launching for a user) removes from an app's bounding, inheritable
// and ambient sets, by name without the CAP_ prefix, lower case: each gives
// a path around the hooks. Root launched into an app keeps the others.
// SECURITY.md says why each is here.
var LauncherDrops = []string{
	"net_raw",    // raw IP and AF_PACKET sockets, AF_XDP: packets below the hooks
	"net_admin",  // TUN/TAP injection, routes, nftables, tc, XDP, TCP_REPAIR
	"sys_admin",  // bpf() and detaching procgate, namespaces, mounts, setns
	"bpf",        // loading and attaching BPF programs, reading procgate's maps
	"perfmon",    // tracing BPF programs, perf events
	"sys_ptrace", // ptrace, pidfd_getfd, process_vm_writev of other users' app processes
	"sys_module", // kernel modules
	"sys_rawio",  // /dev/mem, I/O ports
	"mknod",      // device nodes (a /dev/mem or TUN node where the caller can write)
	"sys_boot",   // kexec_load: another kernel
}

// Inbound is an app's dynamic inbound spec: the pinhole agent opens a hole
// in the perimeter (and on the host) for the peers of the app's live
// control connections, on an auxiliary port, while the app has it bound
// (UDP) or listens on it (TCP).
type Inbound struct {
	// Control are TCP ports the app serves control connections on; the
	// peers connected to them are the ones that get holes. Empty: holes
	// only for peers named through the local API.
	Control []PortRange
	// Ports are the auxiliary ports: a TCP listen or UDP bind on one of
	// them opens holes while it lasts. Never empty.
	Ports []PortRange
	// Proto is the protocols of auxiliary ports that open holes: TCP, UDP
	// or Both.
	Proto Proto
	// Lease is the lease asked of the gateway; 0 is the gateway's default.
	Lease  time.Duration
	Source Source
}

// IsControl reports whether a TCP port is one of the control ports.
func (in *Inbound) IsControl(port uint16) bool { return inRanges(in.Control, port) }

// IsAux reports whether proto (TCP or UDP) and port name an auxiliary port.
func (in *Inbound) IsAux(proto Proto, port uint16) bool {
	return in.Proto&proto != 0 && port != 0 && inRanges(in.Ports, port)
}

func inRanges(rs []PortRange, port uint16) bool {
	for _, r := range rs {
		if r.Contains(port) {
			return true
		}
	}
	return false
}

// InternalPrefix is a protected destination range.
type InternalPrefix struct {
	Prefix netip.Prefix // masked; IPv4 prefixes are 4-byte
	Source Source
}

// Ruleset is a whole compiled policy.
type Ruleset struct {
	Internal []InternalPrefix
	// Everyone are grants every process holds, of an app or of none, on
	// top of its app's own (policy `everyone: allow:`).
	Everyone []Grant
	Apps     []App
	// Interfaces whose routes are internal; followed live by the daemon, which
	// adds their routes to Internal before applying.
	Interfaces []string
	// AuditRate caps the audit events the kernel emits per second per app
	// (policy `audit.rate`, default 100), so that a process hammering a denied
	// destination cannot flood the ring buffer and hide other apps' events.
	AuditRate uint32
}

// App returns the app called name, or nil.
func (rs *Ruleset) App(name string) *App {
	for i := range rs.Apps {
		if rs.Apps[i].Name == name {
			return &rs.Apps[i]
		}
	}
	return nil
}

// Dest is one connection attempt's destination.
type Dest struct {
	Addr  netip.Addr
	Proto Proto // exactly one of TCP, UDP; 0 for other transports
	Port  uint16
}

// Normalize decides IPv4-mapped IPv6 addresses as IPv4, as the kernel hooks do.
func (d Dest) Normalize() Dest {
	d.Addr = d.Addr.Unmap()
	return d
}

func (d Dest) String() string {
	return netip.AddrPortFrom(d.Addr, d.Port).String() + "/" + d.Proto.String()
}

// ParseDest parses ADDR:PORT[/tcp|udp]; without a protocol it is tcp.
func ParseDest(s string) (Dest, error) {
	s, proto, ok := CutProto(s)
	if !ok {
		return Dest{}, fmt.Errorf("destination %q: protocol must be tcp or udp", s)
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return Dest{}, fmt.Errorf("destination %q: want ADDR:PORT or [V6ADDR]:PORT: %w", s, err)
	}
	return Dest{Addr: ap.Addr(), Proto: proto, Port: ap.Port()}, nil
}

// CutProto cuts a destination's /tcp or /udp (any case) off s: tcp when
// there is none, ok false for another word after the last '/'.
func CutProto(s string) (rest string, proto Proto, ok bool) {
	i := strings.LastIndexByte(s, '/')
	if i < 0 {
		return s, TCP, true
	}
	switch strings.ToLower(s[i+1:]) {
	case "tcp":
		return s[:i], TCP, true
	case "udp":
		return s[:i], UDP, true
	}
	return s, 0, false
}

// Reason says why a decision came out as it did.
type Reason uint8

// The values are shared with the eBPF programs (bpf/decision.h, enum reason).
const (
	ReasonNotInternal Reason = 1  // destination outside every internal prefix
	ReasonGranted     Reason = 2  // a grant of the app covers it
	ReasonUnbound     Reason = 3  // internal, and no app claims the process
	ReasonNoGrant     Reason = 4  // internal, app has no grant for this address
	ReasonPort        Reason = 5  // internal, app has grants for the address but not this proto/port
	ReasonNoPolicy    Reason = 6  // kernel state missing or inconsistent: fail closed
	ReasonRawSocket   Reason = 7  // a raw IP, packet or XDP socket, or a TUN device, in an app
	ReasonProto       Reason = 8  // internal, and neither TCP nor UDP: no grant covers it
	ReasonExe         Reason = 9  // the app pins binaries (exe:) and the process runs another
	ReasonHandover    Reason = 10 // a process outside the app wrote to the app's TCP connection
	ReasonEveryone    Reason = 11 // an everyone grant covers it (the app's own grants do not)
	ReasonOutside     Reason = 12 // not internal, and the app is a sandbox (outside: deny) without a grant for it
	ReasonListen      Reason = 13 // a bind by an app with listen:, to a port it lists (allowed) or not (denied)
	ReasonLoopback    Reason = 14 // a loopback destination of a sandboxed app: its loopback: decides
	// ReasonNotListen: a bind by a process whose app has no listen: (or of
	// no app), untouched. Never in an audit event.
	ReasonNotListen Reason = 15
	// ReasonName: a name grant of the app covers it, through an address a
	// DNS answer gave the app for the name, before it expired.
	ReasonName Reason = 16
	// ReasonNameCap: a DNS answer for a name grant was not learned (whole
	// or in part): the name holds as many addresses as the daemon's cap
	// allows. Only in the daemon's audit records.
	ReasonNameCap Reason = 17
	// ReasonDNSUnobserved: an app with name grants sent a DNS query from
	// a network namespace the daemon's DNS proxy does not serve: it went
	// to the resolver untouched, and its answer grants nothing. Allowed,
	// in an audit event.
	ReasonDNSUnobserved Reason = 18
	// ReasonExeHash: a pinned binary (exe: with sha256) does not match its
	// hash, so its file holds no grants in the kernel, or matches again.
	// Only in the daemon's audit records; the kernel then says
	// ReasonExe for the binary's connects.
	ReasonExeHash Reason = 19
)

func (r Reason) String() string {
	switch r {
	case ReasonNotInternal:
		return "not-internal"
	case ReasonGranted:
		return "granted"
	case ReasonUnbound:
		return "unbound"
	case ReasonNoGrant:
		return "no-grant"
	case ReasonPort:
		return "port-not-granted"
	case ReasonNoPolicy:
		return "no-policy"
	case ReasonRawSocket:
		return "raw-socket"
	case ReasonProto:
		return "proto-not-grantable"
	case ReasonExe:
		return "exe-not-pinned"
	case ReasonHandover:
		return "handover"
	case ReasonEveryone:
		return "granted-everyone"
	case ReasonOutside:
		return "outside-denied"
	case ReasonLoopback:
		return "loopback"
	case ReasonListen:
		return "listen"
	case ReasonNotListen:
		return "no-listen-policy"
	case ReasonName:
		return "granted-name"
	case ReasonNameCap:
		return "name-cap"
	case ReasonDNSUnobserved:
		return "dns-unobserved"
	case ReasonExeHash:
		return "exe-hash"
	}
	return "reason(" + strconv.Itoa(int(r)) + ")"
}

// Decision is the verdict for one attempt and what it rests on.
type Decision struct {
	Allow    bool
	Reason   Reason
	App      string          // "" for the unbound principal
	Internal *InternalPrefix // the internal prefix that matched, if any
	Grants   []Grant         // every grant of the app that covers the destination
	// Everyone is every everyone grant that covers the destination, when
	// the app's own grants do not.
	Everyone []Grant
	// Names are the app's name grants that cover the destination, each
	// with the answer behind it, when its prefix grants do not.
	Names []NameMatch
	// Listen is the app's listen: behind a bind decision.
	Listen *Listen
	// AuditOnly says the app is in audit mode (mode: audit): a denial is
	// not enforced; the attempt passes, audited as "would-deny". Allow
	// and Reason stay what enforcement would decide.
	AuditOnly bool
}

// The verdicts of audit records and Decision.Verdict.
const (
	VerdictAllow     = "allow"
	VerdictDeny      = "deny"
	VerdictWouldDeny = "would-deny" // denied by an app in audit mode: it passed
)

// The verdicts of the pinhole agent's audit records (pinhole.Notice's
// Action): a hole the gateway opened, one the agent closed, and one the
// gateway refused.
const (
	VerdictOpen   = "open"
	VerdictClose  = "close"
	VerdictRefuse = "refuse"
)

// AuditOnlyNote ends the explanation of a denial of an app in audit mode.
const AuditOnlyNote = "; mode: audit, so not enforced: the attempt passes, logged as would-deny"

// Passes reports whether the attempt goes on: allowed, or denied for an
// app in audit mode.
func (d Decision) Passes() bool { return d.Allow || d.AuditOnly }

// Verdict is what an audit record of the decision says: allow, deny, or
// would-deny for a denial of an app in audit mode.
func (d Decision) Verdict() string {
	switch {
	case d.Allow:
		return VerdictAllow
	case d.AuditOnly:
		return VerdictWouldDeny
	}
	return VerdictDeny
}

func (d Decision) String() string {
	verdict := VerdictDeny
	if d.Allow {
		verdict = VerdictAllow
	}
	var b strings.Builder
	b.WriteString(verdict + " (" + d.Reason.String() + ")")
	switch d.Reason {
	case ReasonOutside:
		b.WriteString(" outside: deny, and no grant covers it")
	case ReasonListen:
		if d.Allow {
			b.WriteString(" " + d.Listen.String())
		} else {
			b.WriteString(" not in " + d.Listen.String())
		}
	case ReasonLoopback:
		if d.Allow {
			b.WriteString(" outside: deny, loopback: allow")
		} else {
			b.WriteString(" outside: deny, loopback: deny")
		}
	}
	if d.Internal != nil {
		fmt.Fprintf(&b, " internal %s", d.Internal.Prefix)
		if s := d.Internal.Source.String(); s != "" {
			b.WriteString(" [" + s + "]")
		}
	}
	for _, g := range d.Grants {
		fmt.Fprintf(&b, "; grant %s", g)
		if s := g.Source.String(); s != "" {
			b.WriteString(" [" + s + "]")
		}
	}
	for _, m := range d.Names {
		fmt.Fprintf(&b, "; grant %s", m.Grant)
		if s := m.Grant.Source.String(); s != "" {
			b.WriteString(" [" + s + "]")
		}
		fmt.Fprintf(&b, " by answer: %s", m.Learned)
	}
	for _, g := range d.Everyone {
		fmt.Fprintf(&b, "; everyone grant %s", g)
		if s := g.Source.String(); s != "" {
			b.WriteString(" [" + s + "]")
		}
	}
	if d.AuditOnly && !d.Allow {
		b.WriteString(AuditOnlyNote)
	}
	return b.String()
}

// Listen is an app's `listen:`.
type Listen struct {
	// Ports are the ports and ranges it may bind, sorted; port 0 stands
	// for an ephemeral port the kernel picks (bind to port 0). May be
	// empty: no binds at all.
	Ports  []PortRange
	Source Source
}

// Allows reports whether a bind to port is listed; 0 only when 0 is.
func (l *Listen) Allows(port uint16) bool { return inRanges(l.Ports, port) }

func (l *Listen) String() string {
	return "listen: [" + JoinPorts(l.Ports, ", ") + "]"
}

// DecideBind is the decision on a bind() of a TCP or UDP socket to port by
// a process of app ("" for unbound): apps with listen: may bind only the
// ports it lists, everyone else any port.
func (rs *Ruleset) DecideBind(app string, port uint16) Decision {
	a := rs.App(app)
	if a == nil || a.Listen == nil {
		return Decision{Allow: true, Reason: ReasonNotListen, App: app, AuditOnly: a != nil && a.AuditOnly}
	}
	return Decision{Allow: a.Listen.Allows(port), Reason: ReasonListen, App: app, Listen: a.Listen, AuditOnly: a.AuditOnly}
}

// IsLoopback reports whether a (IPv4-mapped or not) reaches this host's
// loopback: 127.0.0.0/8 and ::1, and the unspecified addresses, which
// connect() and sendto() take for the local host as well.
func IsLoopback(a netip.Addr) bool {
	a = a.Unmap()
	return a.IsLoopback() || a.IsUnspecified()
}

// covering is the grants of gs that cover d.
func covering(gs []Grant, d Dest) []Grant {
	var out []Grant
	for _, g := range gs {
		if g.Covers(d) {
			out = append(out, g)
		}
	}
	return out
}

// Decide is the decision function of docs/policy.md:
//
//	allow(p, d) = d ∈ Everyone(d)
//	              ∨ (principal(p) ≠ ⊥ ∧ ∃ grant g of principal(p): g covers d)
//	              ∨ (d ∉ Internal ∧ outside(principal(p)) = allow)
//
// where outside is allow but for apps with outside: deny, and for those
// allow for loopback destinations (IsLoopback) unless loopback: deny.
// app is the principal's name, "" for unbound. An app name the ruleset does not
// know is treated as unbound. The app's own grants are asked before everyone's,
// as the kernel does, so Reason names them when both cover d.
func (rs *Ruleset) Decide(app string, d Dest) Decision {
	return rs.DecideLearned(app, d, nil, time.Time{})
}

// DecideLearned is Decide with the addresses DNS answers gave apps for
// their name grants: when the app's prefix grants do not cover d, a name
// grant does if an unexpired fact of learned (Expires after now) gives the
// app d's address for a name the grant stands for (Reason ReasonName).
// The kernel asks in the same order.
func (rs *Ruleset) DecideLearned(app string, d Dest, learned []Learned, now time.Time) Decision {
	return rs.decide(app, d, learned, now, rs.internalOf, allGrants)
}

// internalOf is the longest internal prefix that contains a (the first
// of the longest), or nil.
func (rs *Ruleset) internalOf(a netip.Addr) *InternalPrefix {
	var in *InternalPrefix
	for i := range rs.Internal {
		p := &rs.Internal[i]
		if p.Prefix.Contains(a) && (in == nil || p.Prefix.Bits() > in.Prefix.Bits()) {
			in = p
		}
	}
	return in
}

// allGrants is every grant of app, for decide to test each.
func allGrants(app *App, _ netip.Addr) []Grant { return app.Grants }

// decide is DecideLearned with the lookups it makes: the internal prefix
// of an address, and the grants of an app among which are all whose
// prefix contains it, in the app's order (an Index finds both without a
// walk of every prefix).
func (rs *Ruleset) decide(app string, d Dest, learned []Learned, now time.Time,
	internalOf func(netip.Addr) *InternalPrefix, grantsOf func(*App, netip.Addr) []Grant) Decision {
	d = d.Normalize()
	in := internalOf(d.Addr)
	a := rs.App(app)
	sandboxed := a != nil && a.OutsideDeny
	auditOnly := a != nil && a.AuditOnly
	if in == nil && !sandboxed {
		return Decision{Allow: true, Reason: ReasonNotInternal, App: app, AuditOnly: auditOnly}
	}
	dec := Decision{App: app, Internal: in, Reason: ReasonUnbound, AuditOnly: auditOnly}
	if a == nil {
		dec.App = ""
	} else {
		dec.Reason = ReasonNoGrant
		for _, g := range grantsOf(a, d.Addr) {
			if g.Covers(d) {
				dec.Grants = append(dec.Grants, g)
			} else if g.Prefix.Contains(d.Addr) {
				dec.Reason = ReasonPort
			}
		}
		if len(dec.Grants) > 0 {
			dec.Allow, dec.Reason = true, ReasonGranted
			return dec
		}
		if dec.Names = coveringNames(a, d, learned, now); len(dec.Names) > 0 {
			dec.Allow, dec.Reason = true, ReasonName
			return dec
		}
	}
	if in == nil {
		// A sandbox's external destination without a grant of its own.
		dec.Reason = ReasonOutside
		if IsLoopback(d.Addr) {
			dec.Reason = ReasonLoopback
			if !a.LoopbackDeny {
				dec.Allow = true
				return dec
			}
		}
	}
	if dec.Everyone = covering(rs.Everyone, d); len(dec.Everyone) > 0 {
		dec.Allow, dec.Reason = true, ReasonEveryone
	}
	return dec
}

// coveringNames is every name grant of a that covers d through a fact of
// learned, with the fact that expires last.
func coveringNames(a *App, d Dest, learned []Learned, now time.Time) []NameMatch {
	// Most decisions have no fact for the app and address: then no grant
	// needs a look (an app of 100,000 grants took 0.2 ms a decision, the
	// daemon's cost of naming each audit event).
	if !slices.ContainsFunc(learned, func(l Learned) bool {
		return l.App == a.Name && l.Addr.Unmap() == d.Addr && l.Expires.After(now)
	}) {
		return nil
	}
	var out []NameMatch
	for _, g := range a.Grants {
		if g.Name == "" || !g.CoversPort(d) {
			continue
		}
		best := -1
		for i, l := range learned {
			if l.App != a.Name || l.Addr.Unmap() != d.Addr || !l.Expires.After(now) || !g.MatchesName(l.Name) {
				continue
			}
			if best < 0 || l.Expires.After(learned[best].Expires) {
				best = i
			}
		}
		if best >= 0 {
			out = append(out, NameMatch{Grant: g, Learned: learned[best]})
		}
	}
	return out
}

// Clone returns a deep copy, so that a derived ruleset (a revocation) never
// aliases the policy it came from.
func (rs *Ruleset) Clone() *Ruleset {
	out := &Ruleset{
		Internal:   slices.Clone(rs.Internal),
		Everyone:   cloneGrants(rs.Everyone),
		Interfaces: slices.Clone(rs.Interfaces),
		Apps:       make([]App, len(rs.Apps)),
		AuditRate:  rs.AuditRate,
	}
	for i, a := range rs.Apps {
		a.Exe = slices.Clone(a.Exe)
		a.Users = slices.Clone(a.Users)
		a.KeepCaps = slices.Clone(a.KeepCaps)
		a.Grants = cloneGrants(a.Grants)
		if a.Listen != nil {
			l := *a.Listen
			l.Ports = slices.Clone(l.Ports)
			a.Listen = &l
		}
		if a.Match != nil {
			m := *a.Match
			a.Match = &m
		}
		if a.Inbound != nil {
			in := *a.Inbound
			in.Control = slices.Clone(in.Control)
			in.Ports = slices.Clone(in.Ports)
			a.Inbound = &in
		}
		out.Apps[i] = a
	}
	return out
}

// Derive returns a copy of rs to derive another ruleset from: the
// Ruleset and its Apps are new, every slice and pointer in them (prefixes,
// grants, ports) is rs's own. Whoever changes the copy replaces such a
// slice or pointer with a new one and never writes through it. It costs
// a few apps, where a Clone of a policy of 1,000,000 prefixes and grants
// costs 170 MB.
func (rs *Ruleset) Derive() *Ruleset {
	out := *rs
	out.Apps = slices.Clone(rs.Apps)
	return &out
}

func cloneGrants(gs []Grant) []Grant {
	gs = slices.Clone(gs)
	for i := range gs {
		gs[i].Ports = slices.Clone(gs[i].Ports)
	}
	return gs
}

// MatchesCgroup reports whether a unit or cgroup match takes the cgroup at
// rel, a slash-separated path below the cgroup root ("system.slice/x.scope").
// A glob's '*' (only in its last component) stands for any run of
// characters but '/'.
func (m *Match) MatchesCgroup(rel string) bool {
	if m == nil || m.Path == "" || (m.Kind != MatchUnit && m.Kind != MatchCgroup && m.Kind != MatchContainer) {
		return false
	}
	if m.Kind != MatchCgroup || !strings.Contains(m.Path, "*") {
		return rel == m.Path
	}
	ok, err := path.Match(m.Path, rel)
	return err == nil && ok
}

// AppOfCgroup is the app whose cgroup rel (below the cgroup root) is, or
// "": a launched app's own cgroup (launched/NAME, launched being the
// directory of launched apps' cgroups below the root), else the unit or
// exact cgroup match, else the first glob in policy order, as the kernel
// binds them (bpf/migrate.c, follow_mkdir).
func (rs *Ruleset) AppOfCgroup(rel, launched string) string {
	if dir, name := path.Split(rel); path.Clean(dir) == launched {
		if a := rs.App(name); a != nil && a.Match == nil {
			return name
		}
	}
	for _, exact := range []bool{true, false} {
		for i := range rs.Apps {
			m := rs.Apps[i].Match
			if m != nil && (m.Kind != MatchCgroup || !strings.Contains(m.Path, "*")) == exact && m.MatchesCgroup(rel) {
				return rs.Apps[i].Name
			}
		}
	}
	return ""
}

// Principal is the app of a process in the cgroup rel (below the cgroup
// root) with real uid uid, by the precedence of docs/policy.md: the
// deepest app cgroup among rel and its ancestors, else the user app of
// uid, else "" (unbound).
func (rs *Ruleset) Principal(rel string, uid uint32, launched string) string {
	for p := path.Clean(rel); p != "." && p != "/" && p != ""; p = path.Dir(p) {
		if app := rs.AppOfCgroup(p, launched); app != "" {
			return app
		}
	}
	for i := range rs.Apps {
		if m := rs.Apps[i].Match; m != nil && m.Kind == MatchUser && m.UID == uid {
			return rs.Apps[i].Name
		}
	}
	return ""
}
