package bpf

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
)

// MaxApps bounds app ids: id 0 is the unbound principal, and the last id of
// the rules trie's 16 bits (EVERYONE_APP_ID in decision.h) holds the
// everyone grants. MAX_APPS in decision.h sizes the counters above it.
const MaxApps = everyoneID

// everyoneID is EVERYONE_APP_ID in decision.h.
const everyoneID = 0xffff

// The counts per app that Enforcer.Counters gives: the slots of
// verdict_counters (enum counter_slot of decision.h, whose values bpf2go
// generates in procgate_bpfel.go), then would_deny_counters'.
const (
	CountAllow     = int(procgateCounterSlotCOUNT_ALLOW)
	CountDeny      = int(procgateCounterSlotCOUNT_DENY)
	CountExternal  = int(procgateCounterSlotCOUNT_EXTERNAL)
	CountAuditDrop = int(procgateCounterSlotCOUNT_AUDIT_DROP)
	// CountWouldDeny: attempts of an app in audit mode that its policy
	// refuses, which passed (would_deny_counters).
	CountWouldDeny = int(procgateCounterSlotCOUNTER_SLOTS)
	// NumCounts is the length of Counters' arrays.
	NumCounts = CountWouldDeny + 1
)

// counterSlots is COUNTER_SLOTS: the slots per app in verdict_counters.
const counterSlots = CountWouldDeny

// App flags (APP_* in decision.h).
const (
	appFlagAuditAllow = 1
	appFlagExePinned  = 2
	appFlagHandover   = 4 // APP_HANDOVER_ALLOWED
	appFlagByUser     = 8 // APP_BY_USER
	// APP_OUTSIDE_DENY, APP_LOOPBACK_DENY: a sandbox, and one without
	// loopback.
	appFlagOutsideDeny  = 16
	appFlagLoopbackDeny = 32
	appFlagListen       = 64  // APP_LISTEN: the app's binds are limited to its listen:
	appFlagNames        = 128 // APP_NAMES: the app has DNS-name grants (name_grants)
	appFlagAuditOnly    = 256 // APP_AUDIT_ONLY: mode: audit, its denials pass as would-deny
)

// Generation flags (GEN_* in decision.h).
const (
	genNoUDPHandover = 1
	genEveryone      = 2  // GEN_EVERYONE: the generation has everyone grants
	genUserApps      = 4  // GEN_USER_APPS: app_by_uid has entries
	genSandbox       = 16 // GEN_SANDBOX: some app is outside: deny
	genListen        = 32 // GEN_LISTEN: some app has listen:
	// GEN_TRUST_TRACE_GUARD: the TCP handover guard marks connections of
	// processes open to tracing only.
	genTrustTraceGuard = 64
	// GEN_UDP_MARKS: the connect hooks mark connected UDP sockets for
	// the BPF LSM handover program.
	genUDPMarks = 128
)

// maxCgroupLevel is MAX_CGROUP_LEVEL in decision.h: app cgroups deeper than
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
	// NoUDPHandover turns the UDP handover check off, for hosts whose
	// NFQUEUE firewall reinjects apps' internal UDP in its own task.
	NoUDPHandover bool
	// TrustTraceGuard leaves out of the TCP handover guard the connections
	// of processes the trace guard covers (their uids or gids not all
	// equal, as the launcher starts apps): pidfd_getfd of their sockets
	// needs ptrace access, which no process without CAP_SYS_PTRACE gets,
	// and an app that gives a connection away by SCM_RIGHTS could as well
	// relay its bytes. Those connections then cost no socket storage and,
	// without BPF LSM, no sockhash entry (about 1.3 µs each). The zero
	// value guards every app connection (procgate daemon --tcp-handover=all).
	TrustTraceGuard bool
	// udpMarks: the BPF LSM handover program judges connected UDP
	// sockets' writers (Apply sets it where the egress check is refused
	// and the program attached).
	udpMarks bool
	// Exes are the files of the binaries of apps with exe: (resolved by
	// the caller). An app with exe: and no file here holds its grants in
	// no process.
	Exes map[string][]FileID

	// cgroupRoot is the enforced cgroup below the cgroup2 mount ("/a/b",
	// "" for the mount itself) and cgroupRootLevel its level: unit and
	// cgroup matches are below it. Apply sets them.
	cgroupRoot      string
	cgroupRootLevel int
	// hasNames: some app has DNS-name grants (Apply sets it).
	hasNames bool
}

// FileID is a file as the kernel names it: inode number and the device of
// its filesystem in the kernel's encoding (MKDEV: major << 20 | minor).
type FileID struct {
	Dev, Ino uint64
}

// FileIDOf stats path (following symlinks) for its FileID.
func FileIDOf(path string) (FileID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return FileID{}, fmt.Errorf("stat %s: %w", path, err)
	}
	return FileIDOfStat(&st), nil
}

// FileIDOfStat is the FileID of a file stat(2) described: the dev_t as
// the kernel's s_dev encodes it (MKDEV: major << 20 | minor).
func FileIDOfStat(st *unix.Stat_t) FileID {
	return FileID{Dev: uint64(unix.Major(st.Dev))<<20 | uint64(unix.Minor(st.Dev)), Ino: st.Ino}
}

// Layout constants shared with decision.h.
const (
	tagSlot      = 1 << 31 // TAG_SLOT
	tagV6        = 1 << 30 // TAG_V6
	tagListen    = 1 << 29 // TAG_LISTEN
	portsPerSlot = 1 << 18 // PORTS_PER_SLOT
	// ruleInsideInternal (RULE_INSIDE_INTERNAL) marks a grant entry whose
	// prefix lies inside an internal prefix: the kernel then skips the
	// internal-set lookup for destinations it matches.
	ruleInsideInternal = 1
)

// coverOf sorts and dedups prefixes (masked) and returns them with their
// cover: one binary search then tells whether an internal prefix contains
// a given one.
func coverOf(prefixes []netip.Prefix) (sorted []netip.Prefix, cover ruleset.Cover) {
	sorted = ruleset.SortPrefixes(prefixes)
	return sorted, ruleset.CoverOf(sorted)
}

// tables are one generation's entries, for one slot.
type tables struct {
	// rules are the trie's entries, sorted by key (ruleOrder): writes in
	// that order touch the trie's nodes in turn, and two generations'
	// entries compare in one pass (diffRules).
	rules []ruleEntry
	ports []procgatePortRange // indexes from slot * portsPerSlot
	apps  map[procgateAppKey]procgateAppInfo
	users map[procgateUserKey]procgateAppInfo
	exes  []procgateExeKey
	info  procgateGenerationInfo
	// The unit and cgroup apps' patterns, and their entries in migrate.c's
	// maps.
	patterns      []cgroupPattern
	exactPatterns map[migrateCgroupPathKey]migrateAppInfo
	globPatterns  map[migrateCgroupPathKey]migrateCgroupGlobs
	// namePorts are the ports of apps' name grants in the slot's
	// port_ranges (names.go).
	namePorts map[nameRef]procgateRuleValue
}

// ruleKey builds a trie key. The tag is stored big-endian so the trie
// compares it as the key's leading bits; the C side uses bpf_htonl.
func ruleKey(slot uint32, appID uint32, p netip.Prefix) procgateRuleKey {
	tag := appID
	k := procgateRuleKey{Prefixlen: 32 + uint32(p.Bits())}
	if p.Addr().Is4() {
		a := p.Addr().As4()
		copy(k.Addr[:], a[:])
	} else {
		tag |= tagV6
		k.Addr = p.Addr().As16()
	}
	k.Tag = keyTag(tag, slot)
	return k
}

// ruleEntry is one entry of the rules trie.
type ruleEntry struct {
	key   procgateRuleKey
	value procgateRuleValue
}

// tagOrder is a key's tag as the trie orders it (its bytes are big-endian).
func tagOrder(k *procgateRuleKey) uint32 {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], k.Tag)
	return binary.BigEndian.Uint32(b[:])
}

// compareKeys orders trie keys as the trie does its bits: tag, address,
// then length (a prefix before the longer prefixes it contains).
func compareKeys(a, b *procgateRuleKey) int {
	// The slot bit is the tag's first.
	if c := cmp.Compare(tagOrder(a)&tagSlot, tagOrder(b)&tagSlot); c != 0 {
		return c
	}
	return compareSlotless(a, b)
}

func compareEntries(a, b ruleEntry) int { return compareKeys(&a.key, &b.key) }

// compareSlotless is compareKeys but for the slot bit: within one slot the
// order is the same, so a slot's sorted entries compare with the other
// slot's.
func compareSlotless(a, b *procgateRuleKey) int {
	if c := cmp.Compare(tagOrder(a)&^tagSlot, tagOrder(b)&^tagSlot); c != 0 {
		return c
	}
	if c := bytes.Compare(a.Addr[:], b.Addr[:]); c != 0 {
		return c
	}
	return cmp.Compare(a.Prefixlen, b.Prefixlen)
}

// withSlot is k with slot's bit in its tag.
func withSlot(k procgateRuleKey, slot uint32) procgateRuleKey {
	k.Tag = keyTag(tagOrder(&k)&^tagSlot, slot)
	return k
}

// keyTag is a key's Tag field for tag in slot: big-endian, so that the trie
// compares it as the key's leading bits; the C side uses bpf_htonl.
func keyTag(tag, slot uint32) uint32 {
	if slot == 1 {
		tag |= tagSlot
	}
	var be [4]byte
	binary.BigEndian.PutUint32(be[:], tag)
	return binary.NativeEndian.Uint32(be[:])
}

// sortRules sorts entries by key; encode writes them in order already,
// group by group, so this is usually one check.
func sortRules(rules []ruleEntry) {
	if !slices.IsSortedFunc(rules, compareEntries) {
		slices.SortFunc(rules, compareEntries)
	}
}

// rule finds the entry of key k.
func (t *tables) rule(k procgateRuleKey) (procgateRuleValue, bool) {
	i, ok := slices.BinarySearchFunc(t.rules, k, func(e ruleEntry, k procgateRuleKey) int { return compareKeys(&e.key, &k) })
	if !ok {
		return procgateRuleValue{}, false
	}
	return t.rules[i].value, true
}

// keyPrefix is the prefix of a grant or internal entry's key.
func keyPrefix(k procgateRuleKey) netip.Prefix {
	bits := int(k.Prefixlen) - 32
	if tagOrder(&k)&tagV6 != 0 {
		return netip.PrefixFrom(netip.AddrFrom16(k.Addr), bits)
	}
	return netip.PrefixFrom(netip.AddrFrom4([4]byte(k.Addr[:4])), bits)
}

// listenKey is the trie key of an app's listen: entry: the tag alone.
func listenKey(slot, appID uint32) procgateRuleKey {
	return procgateRuleKey{Prefixlen: 32, Tag: keyTag(appID|tagListen, slot)}
}

// encode turns a generation into map entries for slot. It is pure, so the
// encoding can be checked against ruleset.Decide without a kernel
// (model_test.go).
func encode(g Generation, slot uint32) (*tables, error) {
	t := &tables{
		apps:  map[procgateAppKey]procgateAppInfo{},
		users: map[procgateUserKey]procgateAppInfo{},
		info:  procgateGenerationInfo{AuditRate: g.AuditRate, Slot: slot},
	}
	if t.info.AuditRate == 0 {
		t.info.AuditRate = 100
	}
	if on, _ := UDPHandover(g.NoUDPHandover); !on {
		t.info.Flags |= genNoUDPHandover
	}
	if g.TrustTraceGuard {
		t.info.Flags |= genTrustTraceGuard
	}
	if g.udpMarks && !g.NoUDPHandover {
		t.info.Flags |= genUDPMarks
	}
	internal := make([]netip.Prefix, len(g.Rules.Internal))
	for i, p := range g.Rules.Internal {
		internal[i] = p.Prefix.Masked()
	}
	internal, cover := coverOf(internal)
	n := len(internal) + len(g.Rules.Everyone)
	for _, a := range g.Rules.Apps {
		n += len(a.Grants) + 1
	}
	t.rules = make([]ruleEntry, 0, n)
	for _, p := range internal {
		t.rules = append(t.rules, ruleEntry{key: ruleKey(slot, 0, p)})
	}
	ports := newPortTable()
	t.putGrants(cover, ports, slot, everyoneID, g.Rules.Everyone)
	if len(g.Rules.Everyone) > 0 {
		t.info.Flags |= genEveryone
	}
	for _, app := range g.Rules.Apps {
		id, ok := g.AppIDs[app.Name]
		if !ok || id == 0 || id >= MaxApps {
			return nil, fmt.Errorf("app %q: no valid app id (have %d)", app.Name, id)
		}
		t.putGrants(cover, ports, slot, id, app.Grants)
		t.putNamePorts(ports, &app)
		if app.Listen != nil {
			// Empty (listen: []) is an entry with no ranges: no port.
			var v procgateRuleValue
			v.TcpFirst, v.TcpCount = ports.add(mergeRanges(app.Listen.Ports))
			t.rules = append(t.rules, ruleEntry{key: listenKey(slot, id), value: v})
			t.info.Flags |= genListen
		}
	}
	if len(ports.table) > portsPerSlot {
		return nil, fmt.Errorf("policy needs %d distinct port ranges, the kernel map holds %d", len(ports.table), portsPerSlot)
	}
	t.ports = ports.table
	sortRules(t.rules)

	minLevel, maxLevel := maxCgroupLevel, 0
	for _, b := range g.Bindings {
		app := g.Rules.App(b.App)
		if app == nil {
			return nil, fmt.Errorf("binding of cgroup %d names unknown app %q", b.CgroupID, b.App)
		}
		if b.Level < 0 || b.Level >= maxCgroupLevel {
			return nil, fmt.Errorf("app %q: cgroup level %d outside 0..%d", b.App, b.Level, maxCgroupLevel-1)
		}
		key := procgateAppKey{CgroupId: b.CgroupID, Slot: slot}
		if prev, dup := t.apps[key]; dup && prev.AppId != g.AppIDs[b.App] {
			return nil, fmt.Errorf("cgroup %d bound to two apps", b.CgroupID)
		}
		t.apps[key] = procgateAppInfo{AppId: g.AppIDs[b.App], Flags: appFlags(app)}
		minLevel, maxLevel = min(minLevel, b.Level), max(maxLevel, b.Level)
	}
	for _, app := range g.Rules.Apps {
		if app.Kind() != ruleset.MatchUser {
			continue
		}
		key := procgateUserKey{Slot: slot, Uid: app.Match.UID}
		if _, dup := t.users[key]; dup {
			return nil, fmt.Errorf("app %q: uid %d matched by two apps", app.Name, app.Match.UID)
		}
		t.users[key] = procgateAppInfo{AppId: g.AppIDs[app.Name], Flags: appFlags(&app)}
		t.info.Flags |= genUserApps
	}
	for _, app := range g.Rules.Apps {
		if app.OutsideDeny {
			t.info.Flags |= genSandbox
		}
		if len(app.Exe) == 0 {
			continue
		}
		for _, f := range g.Exes[app.Name] {
			t.exes = append(t.exes, procgateExeKey{Slot: slot, AppId: g.AppIDs[app.Name], Ino: f.Ino, Dev: f.Dev})
		}
	}
	var err error
	if t.patterns, err = patternsOf(&g, appFlags); err != nil {
		return nil, err
	}
	if err := t.encodePatterns(slot); err != nil {
		return nil, err
	}
	for _, c := range t.patterns {
		// The levels of cgroups that do not exist yet: the kernel binds
		// them when they are made, and the walk must probe there.
		minLevel, maxLevel = min(minLevel, c.level), max(maxLevel, c.level)
	}
	if len(g.Bindings) == 0 && len(t.patterns) == 0 {
		minLevel, maxLevel = 1, 0 // the ancestor walk probes nothing
	}
	t.info.MinLevel, t.info.MaxLevel = uint32(minLevel), uint32(maxLevel)
	return t, nil
}

// putGrants adds the grant entries of app id (or everyoneID). The kernel
// takes the longest matching prefix only, so the ports of less specific
// grants are pushed down into more specific ones here: a grant entry holds
// the union of the ports of every grant whose prefix contains its own
// (overlapping grants then mean their union).
func (t *tables) putGrants(cover ruleset.Cover, ports *portTable, slot, id uint32, grants []ruleset.Grant) {
	own := make([]prefixGrant, 0, len(grants))
	for i := range grants {
		if grants[i].Name != "" {
			continue // a name grant's addresses are learned (names.go), not in the trie
		}
		own = append(own, prefixGrant{grants[i].Prefix.Masked(), &grants[i]})
	}
	slices.SortFunc(own, func(a, b prefixGrant) int { return a.prefix.Compare(b.prefix) })
	// ancestors are the entries written so far whose prefixes contain the
	// current one, outermost first: sorted, a prefix follows every prefix
	// that contains it, so they are a stack.
	var ancestors []int       // indexes into t.rules
	var inside ruleset.Finger // own is sorted: the cover is walked once
	var tcp, udp []ruleset.PortRange
	for i := 0; i < len(own); {
		p := own[i].prefix
		tcp, udp = tcp[:0], udp[:0]
		for ; i < len(own) && own[i].prefix == p; i++ {
			if g := own[i].grant; g.Proto&ruleset.TCP != 0 {
				tcp = append(tcp, g.Ports...)
			}
			if g := own[i].grant; g.Proto&ruleset.UDP != 0 {
				udp = append(udp, g.Ports...)
			}
		}
		for len(ancestors) > 0 && !ruleset.PrefixContains(keyPrefix(t.rules[ancestors[len(ancestors)-1]].key), p) {
			ancestors = ancestors[:len(ancestors)-1]
		}
		if n := len(ancestors); n > 0 {
			// The nearest ancestor's entry holds the union of its own
			// ancestors already.
			a := t.rules[ancestors[n-1]].value
			tcp = append(tcp, ports.ranges(a.TcpFirst, a.TcpCount)...)
			udp = append(udp, ports.ranges(a.UdpFirst, a.UdpCount)...)
		}
		var v procgateRuleValue
		tcp, udp = mergeInPlace(tcp), mergeInPlace(udp)
		v.TcpFirst, v.TcpCount = ports.add(tcp)
		v.UdpFirst, v.UdpCount = ports.add(udp)
		if cover.InsideFrom(&inside, p) {
			v.Flags |= ruleInsideInternal
		}
		ancestors = append(ancestors, len(t.rules))
		t.rules = append(t.rules, ruleEntry{key: ruleKey(slot, id, p), value: v})
	}
}

// prefixGrant is a grant and its masked prefix, to sort by.
type prefixGrant struct {
	prefix netip.Prefix
	grant  *ruleset.Grant
}

// appFlags are the APP_* flags of an app's entries.
func appFlags(app *ruleset.App) uint32 {
	var flags uint32
	if app.AuditAllow {
		flags |= appFlagAuditAllow
	}
	if len(app.Exe) > 0 {
		flags |= appFlagExePinned
	}
	if app.AllowHandover {
		flags |= appFlagHandover
	}
	if app.Kind() == ruleset.MatchUser {
		flags |= appFlagByUser
	}
	if app.Listen != nil {
		flags |= appFlagListen
	}
	if app.HasNames() {
		flags |= appFlagNames
	}
	if app.AuditOnly {
		flags |= appFlagAuditOnly
	}
	if app.OutsideDeny {
		flags |= appFlagOutsideDeny
		if app.LoopbackDeny {
			flags |= appFlagLoopbackDeny
		}
	}
	return flags
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
		if g.Name != "" {
			continue // a name grant's addresses are learned (names.go), not in the trie
		}
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
	return mergeInPlace(slices.Clone(rs))
}

// mergeInPlace is mergeRanges in rs's own array.
func mergeInPlace(rs []ruleset.PortRange) []ruleset.PortRange {
	if len(rs) == 0 {
		return nil
	}
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
	table []procgatePortRange
	seen  map[string][2]uint32
	key   []byte // scratch
}

func newPortTable() *portTable { return &portTable{seen: map[string][2]uint32{}} }

func (pt *portTable) add(rs []ruleset.PortRange) (first, count uint32) {
	if len(rs) == 0 {
		return 0, 0
	}
	key := pt.key[:0]
	for _, r := range rs {
		key = binary.LittleEndian.AppendUint16(key, r.Lo)
		key = binary.LittleEndian.AppendUint16(key, r.Hi)
	}
	pt.key = key
	if fc, ok := pt.seen[string(key)]; ok {
		return fc[0], fc[1]
	}
	first, count = uint32(len(pt.table)), uint32(len(rs))
	for _, r := range rs {
		pt.table = append(pt.table, procgatePortRange{Lo: r.Lo, Hi: r.Hi})
	}
	pt.seen[string(key)] = [2]uint32{first, count}
	return first, count
}

// ranges are the count ranges stored from first.
func (pt *portTable) ranges(first, count uint32) []ruleset.PortRange {
	out := make([]ruleset.PortRange, count)
	for i := range out {
		r := pt.table[first+uint32(i)]
		out[i] = ruleset.PortRange{Lo: r.Lo, Hi: r.Hi}
	}
	return out
}
