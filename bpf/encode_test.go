package bpf

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/procgate/procgate/ruleset"
)

// TestCoverOf: the internal set sorted by address, then length
// (netip.Prefix.Compare on masked prefixes), so that a prefix follows
// every prefix that contains it and the cover is its outermost prefixes.
// An order by length first would leave 10.1.0.0/16 behind 11.0.0.0/8,
// outside the cover's reach.
func TestCoverOf(t *testing.T) {
	ps := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	for _, tc := range []struct {
		name              string
		in, sorted, cover []netip.Prefix
	}{
		{"empty", nil, nil, nil},
		{"nested and disjoint",
			ps("11.0.0.0/16", "10.1.0.0/16", "11.0.0.0/8", "10.0.0.0/8"),
			ps("10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8", "11.0.0.0/16"),
			ps("10.0.0.0/8", "11.0.0.0/8")},
		{"duplicates once, IPv4 before IPv6",
			ps("fd00::/8", "10.0.0.0/8", "fd00:1::/64", "10.0.0.0/8", "192.168.0.0/16"),
			ps("10.0.0.0/8", "192.168.0.0/16", "fd00::/8", "fd00:1::/64"),
			ps("10.0.0.0/8", "192.168.0.0/16", "fd00::/8")},
		{"same address, shorter first",
			ps("10.0.0.0/24", "10.0.0.0/16", "10.0.1.0/24"),
			ps("10.0.0.0/16", "10.0.0.0/24", "10.0.1.0/24"),
			ps("10.0.0.0/16")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sorted, cover := coverOf(slices.Clone(tc.in))
			if !slices.Equal(sorted, tc.sorted) || !slices.Equal(cover, ruleset.Cover(tc.cover)) {
				t.Errorf("coverOf(%v) = %v, cover %v; want %v, cover %v", tc.in, sorted, cover, tc.sorted, tc.cover)
			}
		})
	}
}
