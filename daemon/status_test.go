package daemon

import (
	"context"
	"encoding/json"
	"net/netip"
	"slices"
	"testing"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/ruleset"
)

// scaledPolicy has n internal /32 prefixes, each granted to one of apps
// in turn.
func scaledPolicy(n int, apps ...string) *ruleset.Ruleset {
	rs := &ruleset.Ruleset{AuditRate: 100, Internal: make([]ruleset.InternalPrefix, n)}
	for _, a := range apps {
		rs.Apps = append(rs.Apps, ruleset.App{Name: a})
	}
	for i := range n {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 32)
		rs.Internal[i] = ruleset.InternalPrefix{Prefix: p}
		a := &rs.Apps[i%len(apps)]
		a.Grants = append(a.Grants, ruleset.Grant{Index: int32(len(a.Grants)), Prefix: p, Proto: ruleset.Both,
			Ports: []ruleset.PortRange{{Lo: 443, Hi: 443}}})
	}
	return rs
}

// listedEntries counts the internal prefixes and grants a status answer
// serializes.
func listedEntries(t *testing.T, st *api.Status) int {
	t.Helper()
	b, err := json.Marshal(api.Response{Status: st})
	if err != nil {
		t.Fatal(err)
	}
	var back api.Response
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	n := len(back.Status.Internal)
	for _, a := range back.Status.Apps {
		n += len(a.Grants)
	}
	return n
}

// TestStatusBounded: status lists at most api.StatusListMax internal
// prefixes and grants per app, with their totals, whatever the policy's
// size; all lists them all. The lists are made once per generation: a
// status call serializes and allocates as much at 200,000 prefixes as at
// a few hundred.
func TestStatusBounded(t *testing.T) {
	apps := []string{"a", "b"}
	const limit = api.StatusListMax
	// entries and allocs are those of the first size above the bound, for
	// the larger ones to compare with.
	var entries int
	var allocs float64
	for _, tc := range []struct {
		name string
		n    int
	}{
		{"small policy listed whole", 10},
		{"just over the bound", 4 * limit},
		{"200,000 prefixes", 200_000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, d := startOnApps(t, apps...)
			rs := scaledPolicy(tc.n, apps...)
			var err error
			if cerr := d.call(context.Background(), func() { err = d.install(rs, "scaled", nil) }); cerr != nil || err != nil {
				t.Fatalf("install %d prefixes: %v, %v", tc.n, cerr, err)
			}
			cur := d.current()
			st, err := d.status(cur, false)
			if err != nil {
				t.Fatal(err)
			}
			want := func(all []string, bounded bool) []string {
				if bounded && len(all) > limit {
					return all[:limit]
				}
				return all
			}
			check := func(st *api.Status, bounded bool) {
				t.Helper()
				if !slices.Equal(st.Internal, want(internalStrings(rs, -1), bounded)) || st.InternalTotal != tc.n || st.InternalCount() != tc.n {
					t.Errorf("all %v: %d internal prefixes listed of %d (count %d), want %d of %d",
						!bounded, len(st.Internal), st.InternalTotal, st.InternalCount(), len(want(internalStrings(rs, -1), bounded)), tc.n)
				}
				for i, a := range st.Apps {
					g := grantStrings(rs.Apps[i], -1)
					if !slices.Equal(a.Grants, want(g, bounded)) || a.GrantsTotal != len(g) || a.GrantCount() != len(g) {
						t.Errorf("all %v: app %s lists %d grants of %d (count %d), want %d of %d",
							!bounded, a.Name, len(a.Grants), a.GrantsTotal, a.GrantCount(), len(want(g, bounded)), len(g))
					}
				}
			}
			check(st, true)
			if again, err := d.status(cur, false); err != nil || len(again.Internal) > 0 && &again.Internal[0] != &st.Internal[0] {
				t.Errorf("two status calls made their own internal lists (%v): want the generation's", err)
			}
			full, err := d.status(cur, true)
			if err != nil {
				t.Fatal(err)
			}
			check(full, false)
			if got, wantAll := listedEntries(t, full), 2*tc.n; got != wantAll {
				t.Errorf("status --all serialized %d entries, want %d", got, wantAll)
			}

			n := listedEntries(t, st)
			if bound := (1 + len(apps)) * limit; n > bound {
				t.Errorf("status serialized %d prefixes and grants, want at most %d", n, bound)
			}
			a := testing.AllocsPerRun(10, func() {
				if _, err := d.status(cur, false); err != nil {
					t.Fatal(err)
				}
			})
			if tc.n < 4*limit {
				return
			}
			if entries == 0 {
				entries, allocs = n, a
				return
			}
			// The same apps: the same work, to the allocation.
			if n != entries || a > allocs {
				t.Errorf("status at %d prefixes serialized %d entries in %.0f allocations; at %d: %d in %.0f",
					tc.n, n, a, 4*limit, entries, allocs)
			}
		})
	}
}
