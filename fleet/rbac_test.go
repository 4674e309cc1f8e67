package fleet

import (
	"slices"
	"testing"

	"github.com/procgate/procgate/internal/etcdtest"
)

// A host role set up again after its labels changed has exactly the new
// grants: the group it lost is revoked.
func TestRoleApplyFollowsLabels(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	c := ctx(t)
	paris, db := Label{Key: "site", Value: "paris"}, Label{Key: "role", Value: "db"}
	for _, labels := range [][]Label{{paris, db}, {paris, db}, {db}} {
		r := HostRole(Host{Name: "web-1", Labels: labels})
		if err := r.Apply(c, cli); err != nil {
			t.Fatal(err)
		}
		got, err := cli.RoleGet(c, r.Name)
		if err != nil {
			t.Fatal(err)
		}
		var have, want []string
		for _, p := range got.Perm {
			have = append(have, p.PermType.String()+" "+string(p.Key)+" "+string(p.RangeEnd))
		}
		for _, g := range r.Grants {
			perm := "READ"
			if g.Write {
				perm = "READWRITE"
			}
			want = append(want, perm+" "+g.Key+" "+g.rangeEnd())
		}
		slices.Sort(have)
		slices.Sort(want)
		if !slices.Equal(have, want) {
			t.Fatalf("labels %v: role has\n%q\nwant\n%q", labels, have, want)
		}
	}
	u, err := cli.UserGet(c, "web-1")
	if err != nil || !slices.Equal(u.Roles, []string{"procgate-host-web-1"}) {
		t.Fatalf("user web-1: %v, %v", u, err)
	}
}
