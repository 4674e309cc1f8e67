package bpf

import (
	"math/rand/v2"
	"net/netip"
	"strconv"

	"github.com/procgate/procgate/ruleset"
)

// randomRuleset makes a policy whose prefixes crowd a few small address
// spaces, so that random destinations often fall inside internal prefixes,
// inside grants, on their edges, and in overlaps of several grants.
func randomRuleset(rng *rand.Rand, apps int) *ruleset.Ruleset {
	rs := &ruleset.Ruleset{}
	for range 1 + rng.IntN(6) {
		rs.Internal = append(rs.Internal, ruleset.InternalPrefix{Prefix: randomPrefix(rng)})
	}
	// Everyone grants in about half the policies, a few of them.
	if rng.IntN(2) == 0 {
		rs.Everyone = randomGrants(rng, 1+rng.IntN(3))
	}
	for a := range apps {
		app := ruleset.App{Name: "app" + string(rune('a'+a)), AuditAllow: rng.IntN(2) == 0}
		if rng.IntN(3) == 0 {
			uid := uint32(60000 + a)
			app.Match = &ruleset.Match{Kind: ruleset.MatchUser, Value: strconv.Itoa(int(uid)), UID: uid}
		}
		// A sandbox in a third of the apps, half of them without loopback.
		if rng.IntN(3) == 0 {
			app.OutsideDeny, app.LoopbackDeny = true, rng.IntN(2) == 0
		}
		// listen: in a quarter of the apps: a few of the ports 0-15, maybe
		// none at all.
		if rng.IntN(4) == 0 {
			app.Listen = &ruleset.Listen{Ports: []ruleset.PortRange{}}
			for range rng.IntN(4) {
				lo := uint16(rng.IntN(16))
				app.Listen.Ports = append(app.Listen.Ports, ruleset.PortRange{Lo: lo, Hi: lo + uint16(rng.IntN(3))})
			}
		}
		// mode: audit in a quarter of the apps.
		app.AuditOnly = rng.IntN(4) == 0
		app.Grants = randomGrants(rng, rng.IntN(8))
		rs.Apps = append(rs.Apps, app)
	}
	return rs
}

// randomGrants makes n grants on crowded prefixes with few, small ports.
func randomGrants(rng *rand.Rand, n int) []ruleset.Grant {
	var gs []ruleset.Grant
	for i := range n {
		g := ruleset.Grant{Index: int32(i), Prefix: randomPrefix(rng), Proto: ruleset.Proto(1 + rng.IntN(3))}
		for range 1 + rng.IntN(4) {
			lo := uint16(rng.IntN(40))
			hi := lo
			if rng.IntN(3) == 0 {
				hi = lo + uint16(rng.IntN(10))
			}
			if rng.IntN(20) == 0 {
				lo, hi = 0, 65535
			}
			g.Ports = append(g.Ports, ruleset.PortRange{Lo: lo, Hi: hi})
		}
		gs = append(gs, g)
	}
	return gs
}

// randomPrefix draws from 10.0.0.0/16 or fd00::/112 so that prefixes
// overlap, and now and then from the external ranges randomDest uses, for
// sandboxes' grants outside internal prefixes.
func randomPrefix(rng *rand.Rand) netip.Prefix {
	switch rng.IntN(10) {
	case 0:
		return netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(rng.IntN(256))}), 24+rng.IntN(9)).Masked()
	case 1:
		var a [16]byte
		a[0], a[1], a[15] = 0x20, 0x01, byte(rng.IntN(256))
		return netip.PrefixFrom(netip.AddrFrom16(a), 120+rng.IntN(9)).Masked()
	}
	if rng.IntN(2) == 0 {
		a := [4]byte{10, 0, byte(rng.IntN(4)), byte(rng.IntN(256))}
		return netip.PrefixFrom(netip.AddrFrom4(a), 16+rng.IntN(17)).Masked()
	}
	var a [16]byte
	a[0] = 0xfd
	a[14], a[15] = byte(rng.IntN(4)), byte(rng.IntN(256))
	return netip.PrefixFrom(netip.AddrFrom16(a), 112+rng.IntN(17)).Masked()
}

// randomDest is near the prefixes above most of the time, elsewhere sometimes,
// and now and then an IPv4-mapped IPv6 address.
func randomDest(rng *rand.Rand) ruleset.Dest {
	d := ruleset.Dest{Proto: ruleset.Proto(1 + rng.IntN(2)), Port: uint16(1 + rng.IntN(45))}
	switch rng.IntN(12) {
	case 10:
		d.Addr = []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.1.2.3"),
			netip.MustParseAddr("::1"), netip.MustParseAddr("::ffff:127.0.0.1")}[rng.IntN(4)]
	case 11:
		d.Addr = netip.AddrFrom4([4]byte{192, 0, 2, byte(1 + rng.IntN(250))})
	case 0:
		d.Addr = netip.AddrFrom4([4]byte{byte(11 + rng.IntN(200)), byte(rng.IntN(256)), byte(rng.IntN(256)), byte(1 + rng.IntN(250))})
	case 1:
		var a [16]byte
		a[0], a[1], a[15] = 0x20, 0x01, byte(1+rng.IntN(250))
		d.Addr = netip.AddrFrom16(a)
	case 2, 3, 4:
		var a [16]byte
		a[0] = 0xfd
		a[14], a[15] = byte(rng.IntN(4)), byte(rng.IntN(256))
		d.Addr = netip.AddrFrom16(a)
	default:
		a := netip.AddrFrom4([4]byte{10, 0, byte(rng.IntN(4)), byte(rng.IntN(256))})
		if rng.IntN(8) == 0 {
			a = netip.AddrFrom16(a.As16()) // ::ffff:10.0.x.y
		}
		d.Addr = a
	}
	return d
}

// appIDs numbers apps from 1 in policy order.
func appIDs(rs *ruleset.Ruleset) map[string]uint32 {
	ids := map[string]uint32{}
	for i, a := range rs.Apps {
		ids[a.Name] = uint32(i + 1)
	}
	return ids
}
