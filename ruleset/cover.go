package ruleset

import (
	"net/netip"
	"slices"
)

// Cover is a set of prefixes reduced to its outermost ones, sorted by
// address: they are disjoint, so one binary search tells whether a prefix
// lies inside the set or overlaps it, where a map of the set's prefixes
// would cost 100 bytes and a hash for each of a policy's 1,000,000.
type Cover []netip.Prefix

// SortPrefixes sorts masked prefixes by address, then length, IPv4 first
// (netip.Prefix.Compare), and drops repeats, in place: a prefix then
// follows every prefix that contains it.
func SortPrefixes(ps []netip.Prefix) []netip.Prefix {
	slices.SortFunc(ps, netip.Prefix.Compare)
	return slices.Compact(ps)
}

// CoverOf is the cover of sorted, prefixes as SortPrefixes leaves them.
// It is made at its size, counted first: of 1,000,000 disjoint
// prefixes, grown by doubling, it was 100 MB.
func CoverOf(sorted []netip.Prefix) Cover {
	outer := func(yield func(netip.Prefix)) {
		var last netip.Prefix
		for i, p := range sorted {
			// A prefix that contains p comes before it, and the last
			// outer prefix is the only one that can.
			if i > 0 && PrefixContains(last, p) {
				continue
			}
			last = p
			yield(p)
		}
	}
	n := 0
	outer(func(netip.Prefix) { n++ })
	if n == 0 {
		return nil
	}
	c := make(Cover, 0, n)
	outer(func(p netip.Prefix) { c = append(c, p) })
	return c
}

// PrefixContains: does a contain b (a's length at most b's, b's address
// in a)?
func PrefixContains(a, b netip.Prefix) bool {
	return a.Bits() <= b.Bits() && a.Contains(b.Addr())
}

// A Finger remembers where the last question to a Cover landed: the
// questions of a policy's grants, as written and as encoded, come in
// address order, and each finds its place by a short gallop from the
// last (a binary search of 1,000,000 prefixes was 0.9 s of a reload's
// CPU). The zero Finger is ready; nil is none.
type Finger struct{ at int }

// at is the position of the first prefix of c whose address is at or
// after a's, and whether it is at a.
func (c Cover) at(a netip.Addr, f *Finger) (int, bool) {
	lo, hi := 0, len(c)
	if f != nil && f.at <= len(c) {
		// Every prefix before f.at is before a too: gallop from there.
		if j := f.at; j == 0 || c[j-1].Addr().Compare(a) < 0 {
			lo = j
			for step := 1; j < len(c) && c[j].Addr().Compare(a) < 0; step *= 2 {
				lo, j = j+1, j+step
			}
			hi = min(j, len(c))
		}
	}
	i, _ := slices.BinarySearchFunc(c[lo:hi], a, func(q netip.Prefix, a netip.Addr) int { return q.Addr().Compare(a) })
	i += lo
	if f != nil {
		f.at = i
	}
	return i, i < len(c) && c[i].Addr() == a
}

// Inside: is the masked prefix p inside a prefix of c?
func (c Cover) Inside(p netip.Prefix) bool { return c.InsideFrom(nil, p) }

// InsideFrom is Inside, with a finger.
func (c Cover) InsideFrom(f *Finger, p netip.Prefix) bool {
	// The last outer prefix at or before p's address.
	i, found := c.at(p.Addr(), f)
	if !found {
		i--
	}
	return i >= 0 && PrefixContains(c[i], p)
}

// Overlaps: does p overlap a prefix of c (one contains the other)? It
// does where the prefix of c at or before p's first address contains
// it, or the first prefix of c after it starts inside p.
func (c Cover) Overlaps(p netip.Prefix) bool { return c.OverlapsFrom(nil, p) }

// OverlapsFrom is Overlaps, with a finger.
func (c Cover) OverlapsFrom(f *Finger, p netip.Prefix) bool {
	p = p.Masked()
	if !p.IsValid() {
		return false
	}
	i, found := c.at(p.Addr(), f)
	if found || i > 0 && c[i-1].Contains(p.Addr()) {
		return true
	}
	return i < len(c) && p.Contains(c[i].Addr())
}
