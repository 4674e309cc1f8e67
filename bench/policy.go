package main

import (
	"fmt"
	"net/netip"

	"github.com/procgate/procgate/ruleset"
)

// The synthetic policy every variant enforces, at a given size.
//
// Size N means N internal prefixes and N grants: internal prefix i is the
// /29 at 10.0.0.0 + 16*i (every other /29 of 10.0.0.0/8, so no two are
// adjacent and no backend can merge them; room for 1,048,576), and grant i
// lets app i%apps reach prefix i, tcp and udp, ports 5432 and 8000-8100.
// The measured app is app0; app1's grants are internal destinations app0 is
// denied; 198.51.100.0/24 is outside every internal prefix.
//
// Every grant has the same port set, so the nftables and routing variants
// can use one port match per app (in their favour: a real policy with
// varied ports needs concatenated sets there).

const (
	maxApps     = 10
	firstAppUID = 64001 // app i runs as uid firstAppUID+i (uid-based variants)
	servicePort = 5432  // connect latency target (a listener accepts)
	refusedPort = 8000  // granted, no listener: connect is refused (reload test)
	bulkPort    = 8001  // throughput: bulk sink
	rrPort      = 8002  // throughput: 1-byte request/response echo
	maxPolicy   = 1 << 20
)

var grantPorts = []ruleset.PortRange{{Lo: servicePort, Hi: servicePort}, {Lo: 8000, Hi: 8100}}

// benchPolicy is the synthetic policy of one size.
type benchPolicy struct {
	size     int
	apps     int
	internal []netip.Prefix
	// grants[a] are app a's grant prefixes.
	grants [][]netip.Prefix
}

func internalPrefix(i int) netip.Prefix {
	v := uint32(10)<<24 + uint32(i)*16
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), 29)
}

func newPolicy(size int) (*benchPolicy, error) {
	if size < 2 || size > maxPolicy {
		return nil, fmt.Errorf("policy size %d outside 2..%d", size, maxPolicy)
	}
	p := &benchPolicy{size: size, apps: min(maxApps, size)}
	p.internal = make([]netip.Prefix, size)
	p.grants = make([][]netip.Prefix, p.apps)
	for i := range size {
		pfx := internalPrefix(i)
		p.internal[i] = pfx
		p.grants[i%p.apps] = append(p.grants[i%p.apps], pfx)
	}
	return p, nil
}

func appName(i int) string { return fmt.Sprintf("app%d", i) }

// ruleset is the policy as procgate takes it.
func (p *benchPolicy) ruleset() *ruleset.Ruleset {
	rs := &ruleset.Ruleset{AuditRate: 100}
	rs.Internal = make([]ruleset.InternalPrefix, len(p.internal))
	for i, pfx := range p.internal {
		rs.Internal[i] = ruleset.InternalPrefix{Prefix: pfx}
	}
	for a, gs := range p.grants {
		app := ruleset.App{Name: appName(a), Grants: make([]ruleset.Grant, len(gs))}
		for i, pfx := range gs {
			app.Grants[i] = ruleset.Grant{Index: int32(i), Prefix: pfx, Proto: ruleset.Both, Ports: grantPorts}
		}
		rs.Apps = append(rs.Apps, app)
	}
	return rs
}

// appIDs are the stable ids procgate's counters are keyed by.
func (p *benchPolicy) appIDs() map[string]uint32 {
	ids := make(map[string]uint32, p.apps)
	for a := range p.apps {
		ids[appName(a)] = uint32(a + 1)
	}
	return ids
}

// class is a verdict class of destinations, as app0 sees them.
type class string

const (
	classAllow    class = "internal-allow"
	classDeny     class = "internal-deny"
	classExternal class = "external"
)

var allClasses = []class{classAllow, classDeny, classExternal}

// destsPerClass is how many distinct destinations a batch cycles through:
// spread over the policy, so a lookup walks a realistic part of every
// structure (and rule-per-prefix configurations an average number of rules).
const destsPerClass = 64

// dests returns up to destsPerClass destination addresses of class c.
func (p *benchPolicy) dests(c class) []netip.Addr {
	var pool []netip.Prefix
	switch c {
	case classAllow:
		pool = p.grants[0]
	case classDeny:
		pool = p.grants[1]
	case classExternal:
		out := make([]netip.Addr, destsPerClass)
		for i := range out {
			out[i] = netip.AddrFrom4([4]byte{198, 51, 100, byte(1 + i)})
		}
		return out
	}
	n := min(destsPerClass, len(pool))
	out := make([]netip.Addr, n)
	for i := range n {
		// Evenly spread, and a different host in each prefix.
		pfx := pool[i*len(pool)/n]
		out[i] = hostIn(pfx)
	}
	return out
}

// appUID is the uid of app a's processes for the uid-based variants.
func appUID(a int) int { return firstAppUID + a }
