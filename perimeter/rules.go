package perimeter

import (
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Rules are a site's pinhole rules: which delegate may open which holes for
// which user, when, and how many a user may hold. The grammar is Diaper's
// (seed 003), one rule per line, with `#` comments:
//
//	(allow|deny) DELEGATE USER PROTO SRC SRCPORTS DST DSTPORTS [at [DAYS] HH:MM-HH:MM [ZONE]]
//	limit USER N
//	host NAME ADDR|PREFIX[,...]
//	service HOST (tcp|udp) PORTS [from SRC]
//
// A hole is allowed when at least one allow rule matches it and no deny rule
// does. A service is always open: the gateway lets new connections to it in
// without a hole (a server's control port, such as FTP's 21).
// docs/pinholes.md is the reference.
type Rules struct {
	File     string
	List     []Rule
	Services []Service
	Hosts    map[string][]netip.Prefix
	// limits by user; "*" is every user without a line of their own.
	limits map[string]Limit
}

// Rule is one allow or deny line.
type Rule struct {
	Allow     bool
	Delegates names
	Users     names
	Proto     Proto // 0: tcp and udp
	Src       addrSet
	SrcPorts  portSet
	Dst       addrSet
	DstPorts  portSet
	Window    *Window // nil: always
	// Where is "file:line"; Text is the rule as written, without comment.
	Where string
	Text  string
}

// Service is a `service` line: new connections of Proto to Ports of the
// Hosts, from From (any source when From is empty), are let in by the
// gateway's chain itself, without a hole and without an agent.
type Service struct {
	Hosts []netip.Prefix
	Proto Proto
	Ports [][2]uint16
	// From is empty for any source.
	From []netip.Prefix
	// Where is "file:line"; Text is the line as written, without comment.
	Where string
	Text  string

	hosts, from   addrSet // as parsed; Hosts and From once names are resolved
	line, fromCol int     // for errors found once names are resolved
}

// Limit is a `limit` line: User may hold at most Max holes at once.
type Limit struct {
	User  string
	Max   int
	Where string
}

// names is a list of delegate or user names; nil matches every name.
type names []string

func (n names) match(s string) bool { return n == nil || slices.Contains(n, s) }

// addrSet is a range field: any address, or a list of prefixes, possibly
// with `self` (the addresses of the `host` line named like the delegate).
type addrSet struct {
	any      bool
	self     bool
	prefixes []netip.Prefix
}

func (s addrSet) match(a netip.Addr, self []netip.Prefix) bool {
	if s.any {
		return true
	}
	in := func(p netip.Prefix) bool { return p.Contains(a) }
	return slices.ContainsFunc(s.prefixes, in) || (s.self && slices.ContainsFunc(self, in))
}

// portSet is a ports field: any port, or a list of inclusive ranges.
type portSet struct {
	any    bool
	ranges [][2]uint16
}

func (s portSet) match(port uint16) bool {
	return s.any || slices.ContainsFunc(s.ranges, func(r [2]uint16) bool { return r[0] <= port && port <= r[1] })
}

// Decision is the verdict of the rules on one hole.
type Decision struct {
	Allowed bool
	// Rule is the allow rule that allowed the hole or the deny rule that
	// refused it; nil when no allow rule matched.
	Rule *Rule
	// Until is when the allowing rule's time window closes; zero when the
	// rule has none.
	Until time.Time
}

// Reason says why, for logs and refusals.
func (d Decision) Reason() string {
	switch {
	case d.Rule == nil:
		return "no allow rule matched"
	case d.Allowed:
		return "allowed by " + d.Rule.Where + ": " + d.Rule.Text
	}
	return "denied by " + d.Rule.Where + ": " + d.Rule.Text
}

// matches reports whether r applies to the hole. A hole admits every source
// port of its peer, so SRCPORTS never narrows a match (allow rules must say
// `*` there; the parser enforces it).
func (r *Rule) matches(rs *Rules, delegate, user string, k Key, now time.Time) bool {
	return r.Delegates.match(delegate) && r.Users.match(user) &&
		(r.Proto == 0 || r.Proto == k.Proto) &&
		r.Src.match(k.Peer, nil) &&
		r.Dst.match(k.Host, rs.Hosts[delegate]) &&
		r.DstPorts.match(k.Port) &&
		(r.Window == nil || r.Window.Contains(now))
}

// Authorize decides whether delegate may open hole k for user at now. Of
// several allow rules that match, the one whose window stays open longest
// is the one reported, so that the hole lives as long as the rules permit.
func (rs *Rules) Authorize(delegate, user string, k Key, now time.Time) Decision {
	var best Decision
	for i := range rs.List {
		r := &rs.List[i]
		if !r.matches(rs, delegate, user, k, now) {
			continue
		}
		if !r.Allow {
			return Decision{Rule: r}
		}
		until := time.Time{}
		if r.Window != nil {
			until = r.Window.Until(now)
		}
		if best.Rule == nil || (!best.Until.IsZero() && (until.IsZero() || until.After(best.Until))) {
			best = Decision{Allowed: true, Rule: r, Until: until}
		}
	}
	return best
}

// Limit returns the limit on user's open holes, if the rules set one.
func (rs *Rules) Limit(user string) (Limit, bool) {
	if l, ok := rs.limits[user]; ok {
		return l, true
	}
	l, ok := rs.limits["*"]
	return l, ok
}

// RulesError is one mistake in a rules file. Line and Col are 1-based.
type RulesError struct {
	File      string
	Line, Col int
	Msg       string
}

func (e RulesError) Error() string {
	return e.File + ":" + strconv.Itoa(e.Line) + ":" + strconv.Itoa(e.Col) + ": " + e.Msg
}

// RulesErrors is every mistake found in one rules file, in file order.
type RulesErrors struct {
	List []RulesError
}

func (e *RulesErrors) Error() string {
	lines := make([]string, len(e.List))
	for i, err := range e.List {
		lines[i] = err.Error()
	}
	return strings.Join(lines, "\n")
}

// LoadRules reads and parses the rules file at path.
func LoadRules(path string) (*Rules, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read rules %s: %w", path, err)
	}
	return ParseRules(path, data)
}

// token is a whitespace-separated word and its 1-based column.
type token struct {
	s   string
	col int
}

// nameRef is a host name used in a range field, resolved once every `host`
// line has been read (they may come in any order).
type nameRef struct {
	name      string
	line, col int
	into      *addrSet
}

type rulesParser struct {
	file string
	rs   *Rules
	errs []RulesError
	line int
	refs []nameRef
	// where each host line is, for duplicate errors
	hostLine map[string]int
}

func (p *rulesParser) errorf(col int, format string, args ...any) {
	p.errs = append(p.errs, RulesError{File: p.file, Line: p.line, Col: col, Msg: fmt.Sprintf(format, args...)})
}

// ParseRules parses rules text; file names it in errors and rule locations.
// On failure the error is a *RulesErrors with every mistake found, and no
// Rules are returned: a file applies whole or not at all.
func ParseRules(file string, data []byte) (*Rules, error) {
	p := &rulesParser{
		file:     file,
		rs:       &Rules{File: file, Hosts: map[string][]netip.Prefix{}, limits: map[string]Limit{}},
		hostLine: map[string]int{},
	}
	rules := make([]*Rule, 0)
	var services []*Service
	for i, text := range strings.Split(string(data), "\n") {
		p.line = i + 1
		if before, _, ok := strings.Cut(text, "#"); ok {
			text = before
		}
		toks := tokenize(text)
		if len(toks) == 0 {
			continue
		}
		switch toks[0].s {
		case "allow", "deny":
			if r := p.rule(toks); r != nil {
				r.Text = strings.TrimSpace(text)
				rules = append(rules, r)
			}
		case "service":
			if sv := p.service(toks); sv != nil {
				sv.Text = strings.TrimSpace(text)
				services = append(services, sv)
			}
		case "limit":
			p.limit(toks)
		case "host":
			p.host(toks)
		default:
			p.errorf(toks[0].col, "expected allow, deny, service, limit or host, got %q", toks[0].s)
		}
	}
	for _, ref := range p.refs {
		prefixes, ok := p.rs.Hosts[ref.name]
		if !ok {
			p.errs = append(p.errs, RulesError{File: file, Line: ref.line, Col: ref.col,
				Msg: fmt.Sprintf("unknown host name %q: define it with a line `host %s ADDR[,ADDR...]`", ref.name, ref.name)})
			continue
		}
		ref.into.prefixes = append(ref.into.prefixes, prefixes...)
	}
	for _, sv := range services {
		p.resolveService(sv)
	}
	if len(p.errs) > 0 {
		slices.SortStableFunc(p.errs, func(a, b RulesError) int { return a.Line - b.Line })
		return nil, &RulesErrors{List: p.errs}
	}
	for _, r := range rules {
		p.rs.List = append(p.rs.List, *r)
	}
	for _, sv := range services {
		p.rs.Services = append(p.rs.Services, *sv)
	}
	return p.rs, nil
}

func tokenize(s string) []token {
	var toks []token
	start := -1
	for i := 0; i <= len(s); i++ {
		space := i == len(s) || s[i] == ' ' || s[i] == '\t' || s[i] == '\r'
		switch {
		case space && start >= 0:
			toks = append(toks, token{s[start:i], start + 1})
			start = -1
		case !space && start < 0:
			start = i
		}
	}
	return toks
}

func isAny(s string) bool { return s == "*" || s == "any" }

var hostNameRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9._-]{0,63}$`)

// rule parses an allow or deny line; nil when it has errors.
func (p *rulesParser) rule(toks []token) *Rule {
	fields := []string{"DELEGATE", "USER", "PROTO", "SRC", "SRCPORTS", "DST", "DSTPORTS"}
	if len(toks) < 1+len(fields) {
		end := toks[len(toks)-1]
		p.errorf(end.col+len(end.s), "expected %s after %q: a rule is `%s %s [at ...]`",
			fields[len(toks)-1], end.s, toks[0].s, strings.Join(fields, " "))
		return nil
	}
	before := len(p.errs)
	r := &Rule{Allow: toks[0].s == "allow", Where: p.file + ":" + strconv.Itoa(p.line)}
	r.Delegates = p.names(toks[1], "a delegate name")
	r.Users = p.names(toks[2], "a user name")
	switch proto := toks[3].s; {
	case isAny(proto):
	case proto == "tcp":
		r.Proto = TCP
	case proto == "udp":
		r.Proto = UDP
	default:
		p.errorf(toks[3].col, "expected tcp, udp or *, got %q", proto)
	}
	p.addrs(toks[4], false, &r.Src)
	r.SrcPorts = p.ports(toks[5])
	if r.Allow && !r.SrcPorts.any {
		p.errorf(toks[5].col, "expected * for SRCPORTS in an allow rule: a hole admits every source port of its peer, so %q could never match", toks[5].s)
	}
	p.addrs(toks[6], true, &r.Dst)
	r.DstPorts = p.ports(toks[7])
	if rest := toks[8:]; len(rest) > 0 {
		if rest[0].s != "at" {
			p.errorf(rest[0].col, "expected `at` (a time window) or the end of the line, got %q", rest[0].s)
		} else {
			r.Window = p.window(rest)
		}
	}
	if len(p.errs) > before {
		return nil
	}
	return r
}

func (p *rulesParser) names(t token, what string) names {
	if isAny(t.s) {
		return nil
	}
	var out names
	off := 0
	for _, n := range strings.Split(t.s, ",") {
		if !nameRE.MatchString(n) {
			p.errorf(t.col+off, "expected %s (letters, digits and ._@+-), a comma list of them, or *, got %q", what, n)
		}
		out = append(out, n)
		off += len(n) + 1
	}
	return out
}

// addrs parses a range field into set: *, or a comma list of addresses,
// prefixes, host names and (in DST only) self. Host names are resolved into
// set at the end of the file.
func (p *rulesParser) addrs(t token, dst bool, set *addrSet) {
	if isAny(t.s) {
		set.any = true
		return
	}
	off := 0
	for _, item := range strings.Split(t.s, ",") {
		col := t.col + off
		off += len(item) + 1
		if item == "self" {
			if !dst {
				p.errorf(col, "self names the delegate's own addresses and belongs in DST, not SRC")
			}
			set.self = true
			continue
		}
		if pfx, err := parsePrefix(item); err == nil {
			set.prefixes = append(set.prefixes, pfx)
			continue
		} else if strings.ContainsAny(item, ".:/") {
			p.errorf(col, "%v", err)
			continue
		}
		if !hostNameRE.MatchString(item) {
			p.errorf(col, "expected an address, a prefix such as 10.0.0.0/8, a host name, or *, got %q", item)
			continue
		}
		p.refs = append(p.refs, nameRef{name: item, line: p.line, col: col, into: set})
	}
}

// parsePrefix reads an address (a /32 or /128) or a prefix without host
// bits. IPv4-mapped IPv6 forms are taken as IPv4, as the holes are.
func parsePrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("expected an address or a prefix, got %q", s)
		}
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	pfx, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("expected a prefix such as 10.0.0.0/8, got %q", s)
	}
	if pfx.Addr().Is4In6() {
		if pfx.Bits() < 96 {
			return netip.Prefix{}, fmt.Errorf("prefix %s spans more than the IPv4-mapped range", s)
		}
		pfx = netip.PrefixFrom(pfx.Addr().Unmap(), pfx.Bits()-96)
	}
	if pfx.Masked() != pfx {
		return netip.Prefix{}, fmt.Errorf("prefix %s has host bits set; did you mean %s?", s, pfx.Masked())
	}
	return pfx, nil
}

func (p *rulesParser) ports(t token) portSet {
	if isAny(t.s) {
		return portSet{any: true}
	}
	var set portSet
	off := 0
	for _, item := range strings.Split(t.s, ",") {
		col := t.col + off
		off += len(item) + 1
		lo, hi, isRange := strings.Cut(item, "-")
		a, errA := parsePort(lo)
		b := a
		var errB error
		if isRange {
			b, errB = parsePort(hi)
		}
		switch {
		case errA != nil || errB != nil:
			p.errorf(col, "expected a port (0-65535), a range such as 40000-40100, a comma list of them, or *, got %q", item)
		case a > b:
			p.errorf(col, "port range %q runs backwards", item)
		default:
			set.ranges = append(set.ranges, [2]uint16{a, b})
		}
	}
	return set
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	return uint16(n), err
}

// window parses `at [DAYS] HH:MM-HH:MM [ZONE]`.
func (p *rulesParser) window(toks []token) *Window {
	at := toks[0]
	toks = toks[1:]
	if len(toks) == 0 {
		p.errorf(at.col+len(at.s), "expected a time window after `at`, such as `at Mon-Fri 08:00-18:00`")
		return nil
	}
	w := &Window{Loc: time.Local}
	for i := range w.Days {
		w.Days[i] = true
	}
	if !strings.Contains(toks[0].s, ":") {
		days, err := parseDays(toks[0].s)
		if err != nil {
			p.errorf(toks[0].col, "%v", err)
			return nil
		}
		w.Days = days
		toks = toks[1:]
		if len(toks) == 0 {
			p.errorf(at.col, "expected a span HH:MM-HH:MM after the days")
			return nil
		}
	}
	var err error
	if w.Start, w.End, err = parseSpan(toks[0].s); err != nil {
		p.errorf(toks[0].col, "%v", err)
		return nil
	}
	if len(toks) > 1 {
		loc, err := time.LoadLocation(toks[1].s)
		if err != nil {
			p.errorf(toks[1].col, "expected a time zone (UTC, Local or an IANA name such as Europe/Berlin), got %q", toks[1].s)
			return nil
		}
		w.Loc = loc
	}
	if len(toks) > 2 {
		p.errorf(toks[2].col, "expected the end of the line after the time window, got %q", toks[2].s)
		return nil
	}
	return w
}

// limit parses `limit USER N`.
func (p *rulesParser) limit(toks []token) {
	if len(toks) != 3 {
		p.errorf(toks[0].col, "expected `limit USER N` (USER a name or *, N the most holes the user may hold at once)")
		return
	}
	user := toks[1].s
	if isAny(user) {
		user = "*"
	} else if !nameRE.MatchString(user) {
		p.errorf(toks[1].col, "expected a user name or *, got %q", user)
		return
	}
	n, err := strconv.Atoi(toks[2].s)
	if err != nil || n < 0 {
		p.errorf(toks[2].col, "expected a number of holes (0 or more), got %q", toks[2].s)
		return
	}
	if prev, ok := p.rs.limits[user]; ok {
		p.errorf(toks[1].col, "second limit for %s; the first is at %s", user, prev.Where)
		return
	}
	p.rs.limits[user] = Limit{User: user, Max: n, Where: p.file + ":" + strconv.Itoa(p.line)}
}

// host parses `host NAME ADDR|PREFIX[,...]`.
func (p *rulesParser) host(toks []token) {
	if len(toks) != 3 {
		p.errorf(toks[0].col, "expected `host NAME ADDR|PREFIX[,ADDR|PREFIX...]`")
		return
	}
	name := toks[1].s
	if !hostNameRE.MatchString(name) || name == "self" || name == "any" {
		p.errorf(toks[1].col, "expected a host name (a letter, then letters, digits and ._-; not self or any), got %q", name)
		return
	}
	if prev, ok := p.hostLine[name]; ok {
		p.errorf(toks[1].col, "host %s is defined twice; the first is at line %d", name, prev)
		return
	}
	var prefixes []netip.Prefix
	off := 0
	for _, item := range strings.Split(toks[2].s, ",") {
		pfx, err := parsePrefix(item)
		if err != nil {
			p.errorf(toks[2].col+off, "%v", err)
			return
		}
		prefixes = append(prefixes, pfx)
		off += len(item) + 1
	}
	p.hostLine[name] = p.line
	p.rs.Hosts[name] = prefixes
}

// service parses `service HOST (tcp|udp) PORTS [from SRC]`; nil when it has
// errors. HOST is never * (that would open the whole protected range) nor
// self (a service belongs to no delegate); PORTS is never *.
func (p *rulesParser) service(toks []token) *Service {
	const form = "`service HOST (tcp|udp) PORTS [from SRC]`"
	fields := []string{"HOST", "PROTO", "PORTS"}
	if len(toks) < 1+len(fields) {
		end := toks[len(toks)-1]
		p.errorf(end.col+len(end.s), "expected %s after %q: a service is %s", fields[len(toks)-1], end.s, form)
		return nil
	}
	before := len(p.errs)
	sv := &Service{Where: p.file + ":" + strconv.Itoa(p.line), line: p.line}
	switch h := toks[1]; {
	case isAny(h.s):
		p.errorf(h.col, "expected the HOST of a service (an address, a prefix or a host name), got %q: a service for every host would open the protected range", h.s)
	default:
		p.addrs(h, false, &sv.hosts)
		if sv.hosts.self {
			p.errs = p.errs[:len(p.errs)-1] // addrs' SRC message does not fit here
			p.errorf(h.col, "self belongs to no host in a service line: name the host")
		}
	}
	switch proto := toks[2].s; proto {
	case "tcp":
		sv.Proto = TCP
	case "udp":
		sv.Proto = UDP
	default:
		p.errorf(toks[2].col, "expected tcp or udp for the PROTO of a service, got %q", proto)
	}
	if isAny(toks[3].s) {
		p.errorf(toks[3].col, "expected the PORTS of a service (a port, a range such as 6000-6010, or a comma list), got %q: a service opens named ports only", toks[3].s)
	} else {
		sv.Ports = p.ports(toks[3]).ranges
	}
	switch rest := toks[4:]; {
	case len(rest) == 0:
		sv.from.any = true
	case rest[0].s != "from":
		p.errorf(rest[0].col, "expected `from SRC` or the end of the line, got %q", rest[0].s)
	case len(rest) == 1:
		p.errorf(rest[0].col+len(rest[0].s), "expected SRC after `from`: *, addresses, prefixes or host names")
	case len(rest) > 2:
		p.errorf(rest[2].col, "expected the end of the line after `from %s`, got %q", rest[1].s, rest[2].s)
	default:
		sv.fromCol = rest[1].col
		p.addrs(rest[1], false, &sv.from)
	}
	if len(p.errs) > before {
		return nil
	}
	return sv
}

// resolveService fills Hosts and From once host names are known, and
// refuses a service whose sources are all of the other family than its
// hosts: it could never let anything in.
func (p *rulesParser) resolveService(sv *Service) {
	sv.Hosts = sv.hosts.prefixes
	if !sv.from.any {
		sv.From = sv.from.prefixes
	}
	if len(sv.Hosts) == 0 || (!sv.from.any && len(sv.From) == 0) {
		return // an unknown name, already reported
	}
	if len(sv.matches()) == 0 {
		p.errs = append(p.errs, RulesError{File: p.file, Line: sv.line, Col: sv.fromCol,
			Msg: "expected a SRC of the family (IPv4 or IPv6) of the service's HOST: this service could never let anything in"})
	}
}

// ServiceMatch is one (host, source) pair of a service, of one family; a
// zero From is any source.
type ServiceMatch struct {
	Host netip.Prefix
	From netip.Prefix
}

// matches lists the service's (host, source) pairs of one family each.
func (sv *Service) matches() []ServiceMatch {
	var out []ServiceMatch
	for _, h := range sv.Hosts {
		if len(sv.From) == 0 {
			out = append(out, ServiceMatch{Host: h})
			continue
		}
		for _, f := range sv.From {
			if f.Addr().Is4() == h.Addr().Is4() {
				out = append(out, ServiceMatch{Host: h, From: f})
			}
		}
	}
	return out
}
