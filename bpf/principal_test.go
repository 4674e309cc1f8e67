package bpf

import (
	"net/netip"
	"os"
	"strconv"
	"testing"

	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

// Uids of no user on the test machine, for match.user apps.
const (
	userUID  = 64001
	otherUID = 64002
)

// proberAs starts a prober in the cgroup of app ("" unbound, or a world
// cgroup name) that runs as uid (0: root, as probers usually run).
func (w *world) proberAs(cgroup string, uid int) *probe.Prober {
	w.t.Helper()
	self, err := os.Executable()
	if err != nil {
		w.t.Fatal(err)
	}
	var env []string
	if uid != 0 {
		env = append(env, probe.EnvUID+"="+strconv.Itoa(uid))
	}
	p, err := probe.StartExe(self, w.cgroups[cgroup], w.netns, nil, env...)
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { p.Close() })
	return p
}

// TestUserPrincipals: a match.user app is every process of its real uid
// that is in no app cgroup; a launched app's cgroup takes precedence over
// the uid; processes of other uids are unbound. Checked on connect and on
// UDP sendto.
func TestUserPrincipals(t *testing.T) {
	w := newWorld(t, "web")
	pfx := netip.MustParsePrefix
	rs := &ruleset.Ruleset{
		Internal: []ruleset.InternalPrefix{{Prefix: pfx("10.0.0.0/8")}},
		Apps: []ruleset.App{
			{Name: "web", Grants: []ruleset.Grant{{Prefix: pfx("10.2.0.0/16"), Proto: ruleset.Both, Ports: []ruleset.PortRange{ruleset.AllPorts}}}},
			{Name: "backup", Match: &ruleset.Match{Kind: ruleset.MatchUser, Value: strconv.Itoa(userUID), UID: userUID},
				Grants: []ruleset.Grant{{Prefix: pfx("10.1.0.0/16"), Proto: ruleset.Both, Ports: []ruleset.PortRange{ruleset.AllPorts}}}},
		},
	}
	w.apply(rs)
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	toUser := ruleset.Dest{Addr: netip.MustParseAddr("10.1.2.3"), Proto: ruleset.TCP, Port: 80}
	toUserUDP := ruleset.Dest{Addr: netip.MustParseAddr("10.1.2.3"), Proto: ruleset.UDP, Port: 53}
	toWeb := ruleset.Dest{Addr: netip.MustParseAddr("10.2.2.3"), Proto: ruleset.TCP, Port: 80}
	for _, tt := range []struct {
		name   string
		cgroup string
		uid    int
		d      ruleset.Dest
		m      probe.Method
		want   probe.Verdict
	}{
		{"user's process outside apps reaches the user's grant", "/unbound", userUID, toUser, probe.Connect, probe.Allowed},
		{"user's process outside apps, UDP sendto", "/unbound", userUID, toUserUDP, probe.SendTo, probe.Allowed},
		{"user's process outside apps, IPv4-mapped", "/unbound", userUID, toUser, probe.Mapped, probe.Allowed},
		{"user's process outside apps has no launched app's grant", "/unbound", userUID, toWeb, probe.Connect, probe.Denied},
		{"other uid outside apps", "/unbound", otherUID, toUser, probe.Connect, probe.Denied},
		{"other uid outside apps, UDP sendto", "/unbound", otherUID, toUserUDP, probe.SendTo, probe.Denied},
		{"root outside apps", "/unbound", 0, toUser, probe.Connect, probe.Denied},
		{"user's process in a launched app: the app, not the user", "web/run", userUID, toUser, probe.Connect, probe.Denied},
		{"user's process in a launched app reaches the app's grant", "web/run", userUID, toWeb, probe.Connect, probe.Allowed},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := w.proberAs(tt.cgroup, tt.uid)
			got, err := p.Try(tt.d, tt.m)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("%s %s as uid %d in %s: %s, want %s", tt.m, tt.d, tt.uid, tt.cgroup, got, tt.want)
			}
		})
	}

	// The same uid loses the user's grants when the policy drops the user
	// app: the uid is looked up in the generation in force.
	rs2 := rs.Clone()
	rs2.Apps = rs2.Apps[:1]
	w.apply(rs2)
	if got, err := w.proberAs("/unbound", userUID).Try(toUser, probe.Connect); err != nil || got != probe.Denied {
		t.Fatalf("after the user app was removed: %s, %v; want denied", got, err)
	}
}
