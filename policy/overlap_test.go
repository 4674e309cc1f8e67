package policy

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// TestOverlapIndex checks the index against netip's Overlaps on every
// pair, for prefixes clustered enough that containment both ways, equal
// prefixes, both families and IPv4-mapped IPv6 all occur.
func TestOverlapIndex(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	random := func() netip.Prefix {
		var a netip.Addr
		switch rnd.IntN(3) {
		case 0:
			a = netip.AddrFrom4([4]byte{10, byte(rnd.IntN(4)), byte(rnd.IntN(256)), byte(rnd.IntN(256))})
		case 1:
			a = netip.AddrFrom16([16]byte{0xfd, 0, 0, byte(rnd.IntN(4)), 14: byte(rnd.IntN(256))})
		default:
			a = netip.AddrFrom16(netip.AddrFrom4([4]byte{10, byte(rnd.IntN(4)), 0, 1}).As16())
		}
		return netip.PrefixFrom(a, rnd.IntN(a.BitLen()+1)).Masked()
	}
	for _, tc := range []struct {
		name            string
		indexed, probes int
	}{
		{"empty index", 0, 50},
		{"one prefix", 1, 200},
		{"sparse", 20, 500},
		{"dense", 500, 2000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var idx []netip.Prefix
			for range tc.indexed {
				idx = append(idx, random())
			}
			overlaps := overlapIndex(idx)
			hits := 0
			for range tc.probes {
				q := random()
				want := slices.ContainsFunc(idx, q.Overlaps)
				if got := overlaps(q); got != want {
					t.Fatalf("overlaps(%s) = %v, want %v (index %v)", q, got, want, idx)
				}
				if want {
					hits++
				}
			}
			if tc.indexed > 0 && hits == 0 {
				t.Errorf("no probe overlapped: the test checks only misses")
			}
		})
	}
}
