package fleet

import (
	stdmaps "maps"
	"slices"
	"testing"

	"github.com/procgate/procgate/internal/etcdtest"
)

func TestRevocations(t *testing.T) {
	snap := Snapshot{Docs: map[string][]byte{
		FleetKey:            []byte(fleetDoc),
		RevokeKey("db"):     []byte(`{"all":true}`),
		RevokeKey("web"):    []byte(`{"grants":[0,2]}`),
		RevokeKey("broken"): []byte(`{"grants":`),
		RevokeKey("neg"):    []byte(`{"grants":[-1]}`),
		RevokeKey("none"):   []byte(`{}`),
	}}
	got, problems := snap.Revocations()
	want := map[string]Revocation{
		"db":  {All: true},
		"web": {Grants: []int{0, 2}},
		// What does not read revokes its app whole.
		"broken": {All: true},
		"neg":    {All: true},
	}
	if !stdmaps.EqualFunc(got, want, func(a, b Revocation) bool { return a.All == b.All && slices.Equal(a.Grants, b.Grants) }) {
		t.Fatalf("revocations %+v, want %+v", got, want)
	}
	if len(problems) != 2 {
		t.Fatalf("problems %v, want the two that do not read", problems)
	}
}

func TestRevoke(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	c := ctx(t)
	one, two := 1, 2
	for _, step := range []struct {
		grant   *int
		restore bool
		want    string
	}{
		{grant: &two, want: "grants #2"},
		{grant: &one, want: "grants #1,#2"},
		{grant: &one, want: "grants #1,#2"},
		{grant: &two, restore: true, want: "grants #1"},
		{want: "all grants"},
		{restore: true, want: "nothing"},
	} {
		r, rev, err := Revoke(c, cli, "db", step.grant, step.restore)
		if err != nil || r.String() != step.want {
			t.Fatalf("%+v: %v %v, want %s", step, r, err, step.want)
		}
		resp, err := cli.Get(c, RevokeKey("db"))
		if err != nil || resp.Header.Revision != rev {
			t.Fatalf("%+v: revision %d, etcd at %d (%v)", step, rev, resp.Header.Revision, err)
		}
		if (len(resp.Kvs) == 0) != (step.want == "nothing") {
			t.Fatalf("%+v: key %v", step, resp.Kvs)
		}
	}
	if _, _, err := Revoke(c, cli, "a/b", nil, false); err == nil {
		t.Fatal("an app name with a slash was taken")
	}
}
