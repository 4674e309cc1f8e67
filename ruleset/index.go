package ruleset

import (
	"cmp"
	"net/netip"
	"slices"
	"time"
)

// Index decides as its Ruleset does, without walking every prefix: Decide
// looks at each internal prefix and each grant of the app, 5 ms a decision
// at 1,000,000 prefixes, which the daemon makes for every audit event it
// names and every explain. An Index looks up the prefixes of each length
// present that contain the address, by binary search. The Ruleset must not
// change after NewIndex.
type Index struct {
	rs       *Ruleset
	internal prefixIndex
	grants   map[*App]*prefixIndex
}

// prefixIndex finds, among a list of prefixes, those that contain an
// address.
type prefixIndex struct {
	// order holds the list's positions, sorted by masked prefix
	// (netip.Prefix.Compare: family, address, length) and position: 4
	// bytes a prefix.
	order  []int32
	prefix func(int) netip.Prefix
	// lengths are the prefix lengths present, per family (0: IPv4), longest
	// first.
	lengths [2][]int
}

func newPrefixIndex(n int, prefix func(int) netip.Prefix) prefixIndex {
	ix := prefixIndex{prefix: prefix}
	var seen [2][129]bool
	for i := range n {
		p := prefix(i)
		if !p.IsValid() {
			continue // a name grant
		}
		ix.order = append(ix.order, int32(i))
		seen[family(p.Addr())][p.Bits()] = true
	}
	slices.SortFunc(ix.order, func(a, b int32) int {
		if c := prefix(int(a)).Masked().Compare(prefix(int(b)).Masked()); c != 0 {
			return c
		}
		return cmp.Compare(a, b)
	})
	for f := range seen {
		for bits := 128; bits >= 0; bits-- {
			if seen[f][bits] {
				ix.lengths[f] = append(ix.lengths[f], bits)
			}
		}
	}
	return ix
}

func family(a netip.Addr) int {
	if a.Is4() {
		return 0
	}
	return 1
}

// containing calls yield with the positions of the prefixes that contain
// a, longest prefixes first, each length's in list order, until yield
// returns false.
func (ix *prefixIndex) containing(a netip.Addr, yield func(int) bool) {
	for _, bits := range ix.lengths[family(a)] {
		p, err := a.Prefix(bits)
		if err != nil {
			continue
		}
		i, _ := slices.BinarySearchFunc(ix.order, p, func(at int32, p netip.Prefix) int {
			return ix.prefix(int(at)).Masked().Compare(p)
		})
		for ; i < len(ix.order) && ix.prefix(int(ix.order[i])).Masked() == p; i++ {
			if !yield(int(ix.order[i])) {
				return
			}
		}
	}
}

// NewIndex indexes rs's internal prefixes and its apps' grants.
func NewIndex(rs *Ruleset) *Index {
	ix := &Index{rs: rs, grants: make(map[*App]*prefixIndex, len(rs.Apps))}
	ix.internal = newPrefixIndex(len(rs.Internal), func(i int) netip.Prefix { return rs.Internal[i].Prefix })
	for i := range rs.Apps {
		a := &rs.Apps[i]
		g := newPrefixIndex(len(a.Grants), func(i int) netip.Prefix { return a.Grants[i].Prefix })
		ix.grants[a] = &g
	}
	return ix
}

// Size is how many prefixes ix indexes: internal ones and grants.
func (ix *Index) Size() int {
	n := len(ix.internal.order)
	for _, g := range ix.grants {
		n += len(g.order)
	}
	return n
}

// Ruleset is the ruleset ix indexes.
func (ix *Index) Ruleset() *Ruleset { return ix.rs }

// Decide is Ruleset.Decide.
func (ix *Index) Decide(app string, d Dest) Decision {
	return ix.DecideLearned(app, d, nil, time.Time{})
}

// DecideLearned is Ruleset.DecideLearned.
func (ix *Index) DecideLearned(app string, d Dest, learned []Learned, now time.Time) Decision {
	return ix.rs.decide(app, d, learned, now, ix.internalOf, ix.grantsOf)
}

func (ix *Index) internalOf(a netip.Addr) *InternalPrefix {
	var in *InternalPrefix
	ix.internal.containing(a, func(i int) bool {
		in = &ix.rs.Internal[i]
		return false // the longest, first in the list
	})
	return in
}

// grantsOf is the grants of app whose prefix contains a, in app's order.
func (ix *Index) grantsOf(app *App, a netip.Addr) []Grant {
	g := ix.grants[app]
	if g == nil {
		return app.Grants
	}
	var at []int
	g.containing(a, func(i int) bool {
		at = append(at, i)
		return true
	})
	slices.Sort(at)
	out := make([]Grant, len(at))
	for i, j := range at {
		out[i] = app.Grants[j]
	}
	return out
}
