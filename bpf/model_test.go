package bpf

import (
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/procgate/procgate/ruleset"
)

// kernelModel evaluates encoded tables the way procgate.c does: longest
// prefix match in the internal and grant tries, binary search of port ranges.
type kernelModel struct {
	t   *tables
	ids map[string]uint32
}

// modelOf encodes rs with a made-up cgroup per app, so that app flags are
// encoded as the kernel reads them (app_by_cgroup).
func modelOf(t testing.TB, rs *ruleset.Ruleset, slot uint32) kernelModel {
	t.Helper()
	ids := appIDs(rs)
	g := Generation{Rules: rs, AppIDs: ids}
	for _, a := range rs.Apps {
		g.Bindings = append(g.Bindings, Binding{App: a.Name, CgroupID: 1000 + uint64(ids[a.Name]), Level: 2})
	}
	tb, err := encode(g, slot)
	if err != nil {
		t.Fatalf("encode: %v", err)
	}
	return kernelModel{tb, ids}
}

// flags are an app's APP_* flags as encoded.
func (m kernelModel) flags(id uint32) uint32 {
	return m.t.apps[procgateAppKey{CgroupId: 1000 + uint64(id), Slot: m.t.info.Slot}].Flags
}

func (m kernelModel) lookup(appID uint32, a netip.Addr) (procgateRuleValue, bool) {
	bits := 32
	if a.Is6() {
		bits = 128
	}
	for l := bits; l >= 0; l-- {
		p, _ := a.Prefix(l)
		if v, ok := m.t.rule(ruleKey(m.t.info.Slot, appID, p)); ok {
			return v, true
		}
	}
	return procgateRuleValue{}, false
}

func (m kernelModel) decide(app string, d ruleset.Dest) (bool, ruleset.Reason) {
	a := d.Addr.Unmap()
	id, bound := m.ids[app]
	reason := ruleset.ReasonUnbound
	flags := uint32(0)
	if bound {
		flags = m.flags(id)
	}
	sandbox := flags&appFlagOutsideDeny != 0
	// As decide() in decision.h: the grant first; a grant entry inside an
	// internal prefix stands for the internal-set lookup.
	var best procgateRuleValue
	var ok bool
	if bound {
		best, ok = m.lookup(id, a)
	}
	internal := ok && best.Flags&ruleInsideInternal != 0
	if !internal {
		_, internal = m.lookup(0, a)
	}
	if !internal && !sandbox {
		return true, ruleset.ReasonNotInternal
	}
	if bound {
		reason = ruleset.ReasonNoGrant
		if ok {
			if m.ports(best, d) {
				return true, ruleset.ReasonGranted
			}
			reason = ruleset.ReasonPort
		}
	}
	if !internal {
		reason = ruleset.ReasonOutside
		if ruleset.IsLoopback(a) {
			reason = ruleset.ReasonLoopback
			if flags&appFlagLoopbackDeny == 0 {
				return true, reason
			}
		}
	}
	// Then everyone's entry, under its reserved id.
	if m.t.info.Flags&genEveryone != 0 {
		if e, ok := m.lookup(everyoneID, a); ok && m.ports(e, d) {
			return true, ruleset.ReasonEveryone
		}
	}
	return false, reason
}

// bind is authorize_bind in procgate.c: an app with APP_LISTEN binds only
// the ports of its listen entry.
func (m kernelModel) bind(app string, port uint16) bool {
	id, bound := m.ids[app]
	if !bound || m.t.info.Flags&genListen == 0 || m.flags(id)&appFlagListen == 0 {
		return true
	}
	v, ok := m.t.rule(listenKey(m.t.info.Slot, id))
	return ok && m.ports(v, ruleset.Dest{Proto: ruleset.TCP, Port: port})
}

// auditOnly is the app's APP_AUDIT_ONLY, which decide() and
// authorize_bind test where they deny: the denial then passes.
func (m kernelModel) auditOnly(app string) bool {
	id, bound := m.ids[app]
	return bound && m.flags(id)&appFlagAuditOnly != 0
}

// ports is the kernel's binary search of a grant entry's port ranges.
func (m kernelModel) ports(v procgateRuleValue, d ruleset.Dest) bool {
	first, count := v.TcpFirst, v.TcpCount
	if d.Proto == ruleset.UDP {
		first, count = v.UdpFirst, v.UdpCount
	}
	lo, hi := first, first+count
	for lo < hi {
		mid := lo + (hi-lo)/2
		r := m.t.ports[mid]
		switch {
		case d.Port < r.Lo:
			hi = mid
		case d.Port > r.Hi:
			lo = mid + 1
		default:
			return true
		}
	}
	return false
}

// TestEncodingMatchesDecide checks the encoding (prefix push-down, port
// merging, app keys) against the reference decision without a kernel.
func TestEncodingMatchesDecide(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for p := range 200 {
		rs := randomRuleset(rng, 1+rng.IntN(4))
		m := modelOf(t, rs, uint32(p%2))
		tb, ids := m.t, m.ids
		// The principal by uid: each user app's uid, and nothing else.
		users := 0
		for _, a := range rs.Apps {
			if a.Kind() != ruleset.MatchUser {
				continue
			}
			users++
			got, ok := tb.users[procgateUserKey{Slot: uint32(p % 2), Uid: a.Match.UID}]
			if !ok || got.AppId != ids[a.Name] || got.Flags&appFlagByUser == 0 {
				t.Fatalf("policy %d: user app %s (uid %d) encoded as %+v, %v", p, a.Name, a.Match.UID, got, ok)
			}
		}
		if len(tb.users) != users || (users > 0) != (tb.info.Flags&genUserApps != 0) {
			t.Fatalf("policy %d: %d user apps, encoded %d, generation flags %#x", p, users, len(tb.users), tb.info.Flags)
		}
		for range 500 {
			d := randomDest(rng)
			app := ""
			if i := rng.IntN(len(rs.Apps) + 1); i < len(rs.Apps) {
				app = rs.Apps[i].Name
			}
			want := rs.Decide(app, d)
			allow, reason := m.decide(app, d)
			if allow != want.Allow || reason != want.Reason || m.auditOnly(app) != want.AuditOnly {
				t.Fatalf("policy %d app %q dest %s: model %v/%s audit-only %v, Decide %v/%s audit-only %v\nruleset: %+v",
					p, app, d, allow, reason, m.auditOnly(app), want.Allow, want.Reason, want.AuditOnly, rs)
			}
			// And a bind to the destination's port, as DecideBind has it.
			if got, want := m.bind(app, d.Port%16), rs.DecideBind(app, d.Port%16); got != want.Allow || (got || m.auditOnly(app)) != want.Passes() {
				t.Fatalf("policy %d app %q bind to port %d: model %v, DecideBind %s", p, app, d.Port%16, got, want)
			}
		}
	}
}

func TestMergeRanges(t *testing.T) {
	r := func(lo, hi uint16) ruleset.PortRange { return ruleset.PortRange{Lo: lo, Hi: hi} }
	for _, tc := range []struct {
		name string
		in   []ruleset.PortRange
		want []ruleset.PortRange
	}{
		{"empty", nil, nil},
		{"exact ports stay exact", []ruleset.PortRange{r(443, 443), r(80, 80)}, []ruleset.PortRange{r(80, 80), r(443, 443)}},
		{"adjacent join", []ruleset.PortRange{r(1, 2), r(3, 4)}, []ruleset.PortRange{r(1, 4)}},
		{"overlap join", []ruleset.PortRange{r(10, 20), r(15, 30), r(40, 40)}, []ruleset.PortRange{r(10, 30), r(40, 40)}},
		{"contained", []ruleset.PortRange{r(0, 65535), r(22, 22)}, []ruleset.PortRange{r(0, 65535)}},
		{"gap of one stays", []ruleset.PortRange{r(1, 2), r(4, 5)}, []ruleset.PortRange{r(1, 2), r(4, 5)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := mergeRanges(tc.in)
			if len(got) != len(tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("got %v, want %v", got, tc.want)
				}
			}
		})
	}
}

// followModel is follow_mkdir (migrate.c) over encoded pattern maps: the
// app id it binds a new cgroup at p (below the mount) to, 0 none.
func followModel(t *tables, slot uint32, p string) uint32 {
	if a, ok := t.exactPatterns[pathKey(slot, p)]; ok {
		return a.AppId
	}
	i := strings.LastIndexByte(p, '/')
	parent, name := p[:i], p[i+1:]
	gs, ok := t.globPatterns[pathKey(slot, parent)]
	if !ok {
		return 0
	}
	for _, g := range gs.Globs {
		if g.App.AppId == 0 || int(g.PrefixLen+g.SuffixLen) > len(name) {
			continue
		}
		pre, suf := make([]byte, g.PrefixLen), make([]byte, g.SuffixLen)
		for j := range pre {
			pre[j] = byte(g.Prefix[j])
		}
		for j := range suf {
			suf[j] = byte(g.Suffix[j])
		}
		if strings.HasPrefix(name, string(pre)) && strings.HasSuffix(name, string(suf)) {
			return g.App.AppId
		}
	}
	return 0
}

// TestFollowMatchesAppOfCgroup: the kernel's binding of new cgroups, as
// encoded, names the app ruleset.AppOfCgroup (explain --pid) names.
func TestFollowMatchesAppOfCgroup(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	parts := []string{"system.slice", "docker-a.scope", "docker-.scope", "a.scope", "docker-ab.service", "x", "nginx.service", "a-b.slice"}
	for p := range 100 {
		rs := &ruleset.Ruleset{}
		for a := range 1 + rng.IntN(5) {
			var glob string
			switch rng.IntN(4) {
			case 0:
				glob = "system.slice/docker-*.scope"
			case 1:
				glob = "system.slice/*.scope"
			case 2:
				glob = "system.slice/nginx.service"
			default:
				glob = parts[rng.IntN(len(parts))] + "/" + parts[rng.IntN(len(parts))]
			}
			if slices.ContainsFunc(rs.Apps, func(x ruleset.App) bool { return x.Match.Path == glob }) {
				continue
			}
			rs.Apps = append(rs.Apps, ruleset.App{Name: "app" + string(rune('a'+a)),
				Match: &ruleset.Match{Kind: ruleset.MatchCgroup, Value: glob, Path: glob}})
		}
		ids := appIDs(rs)
		g := Generation{Rules: rs, AppIDs: ids, cgroupRoot: "/test-root", cgroupRootLevel: 1}
		tb, err := encode(g, uint32(p%2))
		if err != nil {
			t.Fatalf("policy %d: %v", p, err)
		}
		for range 50 {
			rel := parts[rng.IntN(len(parts))] + "/" + parts[rng.IntN(len(parts))]
			want := ids[rs.AppOfCgroup(rel, "procgate.apps")]
			if got := followModel(tb, uint32(p%2), "/test-root/"+rel); got != want {
				t.Fatalf("policy %d: %s bound to app id %d, AppOfCgroup says %d\n%+v", p, rel, got, want, rs.Apps)
			}
		}
	}
}

// TestIndexMatchesDecide: ruleset.Index, which the daemon names events and
// answers explain with, decides as the reference does, down to the
// internal prefix and the grants it names, with repeated prefixes (the
// first one counts) and name grants among the grants.
func TestIndexMatchesDecide(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for p := range 200 {
		rs := randomRuleset(rng, 1+rng.IntN(4))
		rs.Internal = append(rs.Internal, rs.Internal[rng.IntN(len(rs.Internal))])
		if a := &rs.Apps[0]; len(a.Grants) > 0 {
			g := a.Grants[rng.IntN(len(a.Grants))]
			g.Index, g.Ports = int32(len(a.Grants)), []ruleset.PortRange{ruleset.AllPorts}
			a.Grants = append(a.Grants, g, ruleset.Grant{Index: int32(len(a.Grants) + 1), Name: "db.example", Proto: ruleset.Both, Ports: []ruleset.PortRange{ruleset.AllPorts}})
		}
		ix := ruleset.NewIndex(rs)
		for range 500 {
			d := randomDest(rng)
			app := ""
			if i := rng.IntN(len(rs.Apps) + 2); i < len(rs.Apps) {
				app = rs.Apps[i].Name
			} else if i == len(rs.Apps) {
				app = "unknown"
			}
			want, got := rs.Decide(app, d), ix.Decide(app, d)
			if !reflect.DeepEqual(got, want) || got.Internal != want.Internal {
				t.Fatalf("policy %d app %q dest %s: index %+v, Decide %+v\nruleset: %+v", p, app, d, got, want, rs)
			}
		}
	}
}
