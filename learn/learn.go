// Package learn turns an app's denied attempts into the grants that would
// have allowed them: a policy fragment an administrator reads, edits and
// adds as a drop-in (the policy's way to add grants to an app defined in
// another file). Learn is a pure function of the audit records it is given;
// Write checks a fragment with the whole policy before writing it.
//
// It never proposes a grant wider than asked: an address becomes /32 or
// /128, a port list holds the attempted ports (a range only for
// consecutive ones), and only Options.Widen joins addresses into a prefix.
package learn

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/ruleset"
)

// Verdicts learn reads: an enforced denial, and an audit-only app's attempt
// that passed but would have been denied. Other verdicts are not denials.
// The decision's own words, so that the two cannot drift apart.
const (
	VerdictDeny      = ruleset.VerdictDeny
	VerdictWouldDeny = ruleset.VerdictWouldDeny
)

// grantable are the reasons a grant of the app fixes: no grant for the
// address, none for the port, a sandbox's outside or loopback (the app's
// grants are asked first: ruleset.Decide). Every other reason (exe-not-
// pinned, handover, proto-not-grantable, raw-socket, no-policy, listen)
// is about the process or the socket, not the destination.
var grantable = map[string]bool{
	ruleset.ReasonNoGrant.String():  true,
	ruleset.ReasonPort.String():     true,
	ruleset.ReasonOutside.String():  true,
	ruleset.ReasonLoopback.String(): true,
}

// Widening bounds: --widen joins addresses only inside one /24 (IPv4) or
// /64 (IPv6), so that two far-apart servers never become 0.0.0.0/0.
const (
	WidenBits4 = 24
	WidenBits6 = 64
)

// Options choose what is learned.
type Options struct {
	App string
	// Since drops records before it (zero: all).
	Since time.Time
	// Widen joins addresses with the same protocol and ports into the
	// smallest prefix covering them, within WidenBits4/WidenBits6.
	Widen bool
}

// Seen counts attempts.
type Seen struct {
	Attempts    int
	First, Last time.Time
}

func (s *Seen) add(t time.Time) {
	if s.Attempts == 0 || t.Before(s.First) {
		s.First = t
	}
	if s.Attempts == 0 || t.After(s.Last) {
		s.Last = t
	}
	s.Attempts++
}

func (s *Seen) join(o Seen) {
	if o.Attempts == 0 {
		return
	}
	if s.Attempts == 0 {
		*s = o
		return
	}
	s.Attempts += o.Attempts
	if o.First.Before(s.First) {
		s.First = o.First
	}
	if o.Last.After(s.Last) {
		s.Last = o.Last
	}
}

// Grant is one proposed grant. Proto is ruleset.Both when TCP and UDP were
// both attempted at the same ports.
type Grant struct {
	Prefix netip.Prefix
	Proto  ruleset.Proto
	Ports  []ruleset.PortRange
	Seen
}

// Unfixable is a denial no grant would have allowed, by reason and
// destination.
type Unfixable struct {
	Reason string
	Dest   string
	Seen
}

// Result is what was learned.
type Result struct {
	App       string
	Grants    []Grant
	Unfixable []Unfixable
	// Denials counts the records learned from, by verdict.
	Denials map[string]int
}

// Learn reads the app's deny and would-deny records.
func Learn(recs []audit.Record, opt Options) Result {
	res := Result{App: opt.App, Denials: map[string]int{}}
	type key struct {
		addr  netip.Addr
		proto ruleset.Proto
	}
	ports := map[key]map[uint16]*Seen{}
	unfix := map[[2]string]*Seen{}
	for _, r := range recs {
		if r.Kind != "" || r.App != opt.App || (r.Verdict != VerdictDeny && r.Verdict != VerdictWouldDeny) {
			continue
		}
		if !opt.Since.IsZero() && r.Time.Before(opt.Since) {
			continue
		}
		res.Denials[r.Verdict]++
		d, ok := parseDest(r.Dest)
		if !ok || !grantable[r.Reason] {
			k := [2]string{r.Reason, r.Dest}
			if unfix[k] == nil {
				unfix[k] = &Seen{}
			}
			unfix[k].add(r.Time)
			continue
		}
		k := key{d.Addr, d.Proto}
		if ports[k] == nil {
			ports[k] = map[uint16]*Seen{}
		}
		if ports[k][d.Port] == nil {
			ports[k][d.Port] = &Seen{}
		}
		ports[k][d.Port].add(r.Time)
	}
	var grants []Grant
	for k, ps := range ports {
		g := Grant{Prefix: netip.PrefixFrom(k.addr, k.addr.BitLen()), Proto: k.proto}
		list := make([]uint16, 0, len(ps))
		for p, s := range ps {
			list = append(list, p)
			g.Seen.join(*s)
		}
		g.Ports = ranges(list)
		grants = append(grants, g)
	}
	grants = joinProtos(grants)
	if opt.Widen {
		grants = widen(grants)
	}
	sortGrants(grants)
	res.Grants = grants
	for k, s := range unfix {
		res.Unfixable = append(res.Unfixable, Unfixable{Reason: k[0], Dest: k[1], Seen: *s})
	}
	slices.SortFunc(res.Unfixable, func(a, b Unfixable) int {
		return cmp.Or(cmp.Compare(a.Reason, b.Reason), cmp.Compare(a.Dest, b.Dest))
	})
	return res
}

// parseDest reads a record's destination (ruleset.Dest.String()): only TCP
// and UDP destinations can be granted. IPv4-mapped addresses are IPv4, as
// the kernel decides them.
func parseDest(s string) (ruleset.Dest, bool) {
	i := strings.LastIndexByte(s, '/')
	if i < 0 {
		return ruleset.Dest{}, false
	}
	var proto ruleset.Proto
	switch s[i+1:] {
	case "tcp":
		proto = ruleset.TCP
	case "udp":
		proto = ruleset.UDP
	default:
		return ruleset.Dest{}, false
	}
	ap, err := netip.ParseAddrPort(s[:i])
	if err != nil {
		return ruleset.Dest{}, false
	}
	return ruleset.Dest{Addr: ap.Addr().Unmap().WithZone(""), Proto: proto, Port: ap.Port()}, true
}

// ranges sorts ports and joins consecutive ones into ranges: the list
// covers exactly the ports given.
func ranges(ports []uint16) []ruleset.PortRange {
	slices.Sort(ports)
	var out []ruleset.PortRange
	for _, p := range ports {
		if n := len(out); n > 0 && out[n-1].Hi != 65535 && out[n-1].Hi+1 == p {
			out[n-1].Hi = p
			continue
		}
		out = append(out, ruleset.PortRange{Lo: p, Hi: p})
	}
	return out
}

// joinProtos makes one grant without a protocol of a TCP and a UDP grant
// of the same prefix and ports: it covers exactly what the two did.
func joinProtos(gs []Grant) []Grant {
	type key struct {
		prefix netip.Prefix
		ports  string
	}
	at := map[key]int{}
	var out []Grant
	for _, g := range gs {
		k := key{g.Prefix, portsText(g.Ports)}
		if i, ok := at[k]; ok {
			out[i].Proto |= g.Proto
			out[i].Seen.join(g.Seen)
			continue
		}
		at[k] = len(out)
		out = append(out, g)
	}
	return out
}

// widen joins grants of the same protocol and ports whose addresses share
// a /24 (IPv4) or /64 (IPv6) into one grant for the smallest prefix
// covering them.
func widen(gs []Grant) []Grant {
	type key struct {
		block netip.Prefix
		proto ruleset.Proto
		ports string
	}
	at := map[key]int{}
	var out []Grant
	for _, g := range gs {
		bits := WidenBits4
		if g.Prefix.Addr().Is6() {
			bits = WidenBits6
		}
		block, _ := g.Prefix.Addr().Prefix(bits)
		k := key{block, g.Proto, portsText(g.Ports)}
		if i, ok := at[k]; ok {
			out[i].Prefix = cover(out[i].Prefix, g.Prefix)
			out[i].Seen.join(g.Seen)
			continue
		}
		at[k] = len(out)
		out = append(out, g)
	}
	return out
}

// cover is the smallest prefix holding a and b (of one family).
func cover(a, b netip.Prefix) netip.Prefix {
	bits := min(a.Bits(), b.Bits())
	for ; bits > 0; bits-- {
		p, _ := a.Addr().Prefix(bits)
		if p.Contains(b.Addr()) {
			return p
		}
	}
	p, _ := a.Addr().Prefix(0)
	return p
}

func sortGrants(gs []Grant) {
	slices.SortFunc(gs, func(a, b Grant) int {
		return cmp.Or(
			cmp.Compare(a.Prefix.Addr().BitLen(), b.Prefix.Addr().BitLen()),
			a.Prefix.Addr().Compare(b.Prefix.Addr()),
			cmp.Compare(a.Prefix.Bits(), b.Prefix.Bits()),
			cmp.Compare(a.Proto, b.Proto),
			cmp.Compare(portsText(a.Ports), portsText(b.Ports)))
	})
}

func portsText(ps []ruleset.PortRange) string { return ruleset.JoinPorts(ps, ", ") }

// Fragment renders the result as a policy drop-in: the app's name and the
// grants under it, each with how often and when it was attempted, and the
// denials no grant fixes as comments. With no grant to propose it is a
// drop-in without apps, still valid.
func (r Result) Fragment() []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "# procgate learn --app %s: %s\n", r.App, r.summary())
	b.WriteString("# Read each grant before applying it: it allows what the app tried, no more.\n")
	b.WriteString("version: 1\n")
	if len(r.Grants) > 0 {
		b.WriteString("apps:\n")
		fmt.Fprintf(&b, "  - name: %s\n", r.App)
		b.WriteString("    allow:\n")
		for _, g := range r.Grants {
			fmt.Fprintf(&b, "      # %s\n", g.Seen.text())
			fmt.Fprintf(&b, "      - to: %s\n", g.Prefix)
			if g.Proto != ruleset.Both {
				fmt.Fprintf(&b, "        proto: %s\n", g.Proto)
			}
			fmt.Fprintf(&b, "        ports: [%s]\n", portsText(g.Ports))
		}
	}
	if len(r.Unfixable) > 0 {
		b.WriteString("# Denied for reasons no grant fixes (the process or the socket, not the destination):\n")
		for _, u := range r.Unfixable {
			fmt.Fprintf(&b, "#   %s %s: %s\n", u.Reason, u.Dest, u.Seen.text())
		}
	}
	return []byte(b.String())
}

func (r Result) summary() string {
	n := 0
	var parts []string
	for _, v := range []string{VerdictDeny, VerdictWouldDeny} {
		if c := r.Denials[v]; c > 0 {
			n += c
			parts = append(parts, strconv.Itoa(c)+" "+v)
		}
	}
	if n == 0 {
		return "no denied attempts"
	}
	return fmt.Sprintf("%d denied attempts (%s), %d grants, %d not grantable",
		n, strings.Join(parts, ", "), len(r.Grants), len(r.Unfixable))
}

func (s Seen) text() string {
	word := "attempts"
	if s.Attempts == 1 {
		word = "attempt"
	}
	return fmt.Sprintf("%d %s, first %s, last %s", s.Attempts, word,
		s.First.UTC().Format(time.RFC3339), s.Last.UTC().Format(time.RFC3339))
}

// Narrowest is the grant that would have allowed one attempt and nothing
// else: the address as /32 or /128, its protocol, its port. ok is false
// for a destination no grant can allow (not TCP or UDP).
func Narrowest(dest string) (Grant, bool) {
	d, ok := parseDest(dest)
	if !ok {
		return Grant{}, false
	}
	return Grant{Prefix: netip.PrefixFrom(d.Addr, d.Addr.BitLen()), Proto: d.Proto,
		Ports: []ruleset.PortRange{{Lo: d.Port, Hi: d.Port}}}, true
}

// Grantable reports whether a denial's reason is one a grant fixes.
func Grantable(reason string) bool { return grantable[reason] }
