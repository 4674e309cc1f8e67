package ruleset

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// TestCover checks Inside and Overlaps against netip on every pair, for
// prefixes clustered enough that containment both ways, equal prefixes,
// both families and IPv4-mapped IPv6 all occur.
func TestCover(t *testing.T) {
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
		name        string
		set, probes int
	}{
		{"empty set", 0, 50},
		{"one prefix", 1, 200},
		{"sparse", 20, 500},
		{"dense", 500, 2000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var set []netip.Prefix
			for range tc.set {
				set = append(set, random())
			}
			c := CoverOf(SortPrefixes(slices.Clone(set)))
			hits, inside := 0, 0
			probes := make([]netip.Prefix, tc.probes)
			for i := range probes {
				probes[i] = random()
			}
			// Fingers, on the probes as they come and in address order.
			var f, fs Finger
			sorted := SortPrefixes(slices.Clone(probes))
			for _, q := range probes {
				if c.OverlapsFrom(&f, q) != c.Overlaps(q) || c.InsideFrom(&f, q) != c.Inside(q) {
					t.Fatalf("%s: with a finger (at %d) %v/%v, without %v/%v", q, f.at, c.OverlapsFrom(&f, q), c.InsideFrom(&f, q), c.Overlaps(q), c.Inside(q))
				}
			}
			for _, q := range sorted {
				if c.OverlapsFrom(&fs, q) != c.Overlaps(q) || c.InsideFrom(&fs, q) != c.Inside(q) {
					t.Fatalf("%s in order: with a finger %v/%v, without %v/%v", q, c.OverlapsFrom(&fs, q), c.InsideFrom(&fs, q), c.Overlaps(q), c.Inside(q))
				}
			}
			for _, q := range probes {
				want := slices.ContainsFunc(set, q.Overlaps)
				if got := c.Overlaps(q); got != want {
					t.Fatalf("Overlaps(%s) = %v, want %v (set %v)", q, got, want, set)
				}
				wantIn := slices.ContainsFunc(set, func(p netip.Prefix) bool { return PrefixContains(p, q) })
				if got := c.Inside(q); got != wantIn {
					t.Fatalf("Inside(%s) = %v, want %v (set %v)", q, got, wantIn, set)
				}
				if want {
					hits++
				}
				if wantIn {
					inside++
				}
			}
			if tc.set > 0 && (hits == 0 || inside == 0) {
				t.Errorf("%d probes overlapped, %d inside: the test checks too little", hits, inside)
			}
		})
	}
}
