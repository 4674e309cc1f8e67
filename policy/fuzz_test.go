package policy

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/procgate/procgate/ruleset"
)

// canonicalPrefix reports whether p is as the backends expect it: valid,
// masked, and IPv4 as 4 bytes.
func canonicalPrefix(p netip.Prefix) bool {
	return p.IsValid() && p.Masked() == p && !p.Addr().Is4In6() && p.Addr().Zone() == ""
}

// testdataPolicies are the policy files of testdata, the fuzz targets'
// seeds.
func testdataPolicies(tb testing.TB) [][]byte {
	files, _ := filepath.Glob("testdata/*/*.yaml")
	files = append(files, "testdata/example.yaml")
	var out [][]byte
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			tb.Fatal(err)
		}
		out = append(out, data)
	}
	return out
}

func FuzzParse(f *testing.F) {
	for _, data := range testdataPolicies(f) {
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		rs, _, err := Parse("f.yaml", data)
		if err != nil {
			var errs *Errors
			if !errors.As(err, &errs) || len(errs.List) == 0 || rs != nil {
				t.Fatalf("failure must be a non-empty *Errors and no ruleset: %v (%T), %v", err, err, rs)
			}
			return
		}
		for _, in := range rs.Internal {
			if !canonicalPrefix(in.Prefix) {
				t.Errorf("internal prefix %v is not canonical", in.Prefix)
			}
		}
		for _, a := range rs.Apps {
			for i, g := range a.Grants {
				// A name grant has no prefix, and its name is what
				// parseName keeps.
				canonicalTo := canonicalPrefix(g.Prefix)
				if g.Name != "" {
					n, msg := parseName(g.Name)
					canonicalTo = !g.Prefix.IsValid() && msg == "" && n == g.Name
				}
				if !canonicalTo || int(g.Index) != i || g.Proto&^ruleset.Both != 0 || g.Proto == 0 {
					t.Errorf("app %s grant %v is not canonical", a.Name, g)
				}
				if len(g.Ports) == 0 {
					t.Errorf("app %s grant %v has no ports", a.Name, g)
				}
				for j, r := range g.Ports {
					if r.Lo > r.Hi || (j > 0 && (g.Ports[j-1].Lo > r.Lo || g.Ports[j-1] == r)) {
						t.Errorf("app %s grant %v ports not sorted, exact and unique", a.Name, g)
					}
				}
			}
		}
		roundTrip(t, rs)
	})
}
