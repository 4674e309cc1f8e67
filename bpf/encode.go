package bpf

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"

	"github.com/procgate/procgate/ruleset"
)

// MaxApps bounds app ids (MAX_APPS in procgate.c); id 0 is the unbound principal.
const MaxApps = 65536

// Counter slots per app (enum counter_slot in procgate.c).
const (
	CountAllow = iota
	CountDeny
	CountExternal
	CountAuditDrop
	counterSlots
)

// appFlagAuditAllow is APP_AUDIT_ALLOW in procgate.c.
const appFlagAuditAllow = 1

// maxCgroupLevel is MAX_CGROUP_LEVEL in procgate.c: app cgroups deeper than
// this cannot be found as ancestors.
const maxCgroupLevel = 32

// Binding ties an app of the ruleset to a cgroup whose tasks (and their
// descendants' tasks) it is.
type Binding struct {
	App      string
	CgroupID uint64
	Level    int // ancestor level as bpf_get_current_ancestor_cgroup_id counts it
}

// Generation is everything one policy generation holds.
type Generation struct {
	Rules    *ruleset.Ruleset
	AppIDs   map[string]uint32 // stable ids in [1, MaxApps), so counters survive reloads
	Bindings []Binding
	// AuditRate is the kernel's limit of audit events per second per app.
	AuditRate uint32
}

// tables are the contents of one generation's inner maps.
type tables struct {
	internalV4 []procgateLpmV4Key
	internalV6 []procgateLpmV6Key
	grantV4    map[procgateGrantV4Key]procgateGrantValue
	grantV6    map[procgateGrantV6Key]procgateGrantValue
	ports      []procgatePortRange
	apps       map[uint64]procgateAppInfo
	info       procgateGenerationInfo
}

// encode turns a generation into map contents. It is pure, so the encoding
// can be checked against ruleset.Decide without a kernel (see model_test.go).
func encode(g Generation) (*tables, error) {
	t := &tables{
		grantV4: map[procgateGrantV4Key]procgateGrantValue{},
		grantV6: map[procgateGrantV6Key]procgateGrantValue{},
		apps:    map[uint64]procgateAppInfo{},
		info:    procgateGenerationInfo{AuditRate: g.AuditRate},
	}
	if t.info.AuditRate == 0 {
		t.info.AuditRate = 100
	}
	for _, p := range g.Rules.Internal {
		pfx := p.Prefix.Masked()
		if pfx.Addr().Is4() {
			k := procgateLpmV4Key{Prefixlen: uint32(pfx.Bits())}
			k.Addr = pfx.Addr().As4()
			t.internalV4 = append(t.internalV4, k)
		} else {
			k := procgateLpmV6Key{Prefixlen: uint32(pfx.Bits())}
			k.Addr = pfx.Addr().As16()
			t.internalV6 = append(t.internalV6, k)
		}
	}

	ports := newPortTable()
	for _, app := range g.Rules.Apps {
		id, ok := g.AppIDs[app.Name]
		if !ok || id == 0 || id >= MaxApps {
			return nil, fmt.Errorf("app %q: no valid app id (have %d)", app.Name, id)
		}
		for pfx, u := range unionByPrefix(app.Grants) {
			v := procgateGrantValue{}
			v.TcpFirst, v.TcpCount = ports.add(u.tcp)
			v.UdpFirst, v.UdpCount = ports.add(u.udp)
			var be [4]byte
			binary.BigEndian.PutUint32(be[:], id)
			// The key's app_id is compared as bytes by the trie, so store it
			// big-endian and read it back natively: the C side uses bpf_htonl.
			nid := binary.NativeEndian.Uint32(be[:])
			if pfx.Addr().Is4() {
				t.grantV4[procgateGrantV4Key{Prefixlen: 32 + uint32(pfx.Bits()), AppId: nid, Addr: pfx.Addr().As4()}] = v
			} else {
				t.grantV6[procgateGrantV6Key{Prefixlen: 32 + uint32(pfx.Bits()), AppId: nid, Addr: pfx.Addr().As16()}] = v
			}
		}
	}
	t.ports = ports.ranges

	minLevel, maxLevel := maxCgroupLevel, 0
	for _, b := range g.Bindings {
		app := g.Rules.App(b.App)
		if app == nil {
			return nil, fmt.Errorf("binding of cgroup %d names unknown app %q", b.CgroupID, b.App)
		}
		if b.Level < 0 || b.Level >= maxCgroupLevel {
			return nil, fmt.Errorf("app %q: cgroup level %d outside 0..%d", b.App, b.Level, maxCgroupLevel-1)
		}
		if prev, dup := t.apps[b.CgroupID]; dup && prev.AppId != g.AppIDs[b.App] {
			return nil, fmt.Errorf("cgroup %d bound to two apps", b.CgroupID)
		}
		var flags uint32
		if app.AuditAllow {
			flags |= appFlagAuditAllow
		}
		t.apps[b.CgroupID] = procgateAppInfo{AppId: g.AppIDs[b.App], Flags: flags}
		minLevel, maxLevel = min(minLevel, b.Level), max(maxLevel, b.Level)
	}
	if len(g.Bindings) == 0 {
		minLevel, maxLevel = 1, 0 // the ancestor walk probes nothing
	}
	t.info.MinLevel, t.info.MaxLevel = uint32(minLevel), uint32(maxLevel)
	return t, nil
}

// portUnion is the ports an app may use at one prefix, per protocol.
type portUnion struct{ tcp, udp []ruleset.PortRange }

// unionByPrefix gives, for every distinct grant prefix of an app, the union of
// the ports of every grant whose prefix contains it. The kernel takes the
// longest matching prefix only, so less specific grants are pushed down into
// more specific ones here; overlapping grants then mean their union.
func unionByPrefix(grants []ruleset.Grant) map[netip.Prefix]*portUnion {
	own := map[netip.Prefix]*portUnion{}
	for _, g := range grants {
		p := g.Prefix.Masked()
		u := own[p]
		if u == nil {
			u = &portUnion{}
			own[p] = u
		}
		if g.Proto&ruleset.TCP != 0 {
			u.tcp = append(u.tcp, g.Ports...)
		}
		if g.Proto&ruleset.UDP != 0 {
			u.udp = append(u.udp, g.Ports...)
		}
	}
	out := make(map[netip.Prefix]*portUnion, len(own))
	for p, u := range own {
		all := &portUnion{tcp: slices.Clone(u.tcp), udp: slices.Clone(u.udp)}
		// Walking the shorter masks of p finds every containing grant prefix
		// in at most 33 or 129 map lookups, instead of comparing all pairs.
		for bits := p.Bits() - 1; bits >= 0; bits-- {
			anc, _ := p.Addr().Prefix(bits)
			if a, ok := own[anc]; ok {
				all.tcp = append(all.tcp, a.tcp...)
				all.udp = append(all.udp, a.udp...)
			}
		}
		all.tcp, all.udp = mergeRanges(all.tcp), mergeRanges(all.udp)
		out[p] = all
	}
	return out
}

// mergeRanges sorts ranges and joins overlapping or adjacent ones: the same
// set of ports, in the disjoint form the kernel's binary search needs.
func mergeRanges(rs []ruleset.PortRange) []ruleset.PortRange {
	if len(rs) == 0 {
		return nil
	}
	rs = slices.Clone(rs)
	slices.SortFunc(rs, func(a, b ruleset.PortRange) int { return cmp.Compare(a.Lo, b.Lo) })
	out := rs[:1]
	for _, r := range rs[1:] {
		last := &out[len(out)-1]
		if uint32(r.Lo) <= uint32(last.Hi)+1 {
			last.Hi = max(last.Hi, r.Hi)
			continue
		}
		out = append(out, r)
	}
	return out
}

// portTable stores range lists once each: most grants share a few port sets.
type portTable struct {
	ranges []procgatePortRange
	seen   map[string][2]uint32
}

func newPortTable() *portTable { return &portTable{seen: map[string][2]uint32{}} }

func (pt *portTable) add(rs []ruleset.PortRange) (first, count uint32) {
	if len(rs) == 0 {
		return 0, 0
	}
	key := make([]byte, 0, 4*len(rs))
	for _, r := range rs {
		key = binary.LittleEndian.AppendUint16(key, r.Lo)
		key = binary.LittleEndian.AppendUint16(key, r.Hi)
	}
	if fc, ok := pt.seen[string(key)]; ok {
		return fc[0], fc[1]
	}
	first, count = uint32(len(pt.ranges)), uint32(len(rs))
	for _, r := range rs {
		pt.ranges = append(pt.ranges, procgatePortRange{Lo: r.Lo, Hi: r.Hi})
	}
	pt.seen[string(key)] = [2]uint32{first, count}
	return first, count
}
