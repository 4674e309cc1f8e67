package ruleset

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestParseDest(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    Dest
		wantErr bool
	}{
		{"10.1.2.3:5432", Dest{netip.MustParseAddr("10.1.2.3"), TCP, 5432}, false},
		{"10.1.2.3:53/udp", Dest{netip.MustParseAddr("10.1.2.3"), UDP, 53}, false},
		{"[fd00::1]:443/TCP", Dest{netip.MustParseAddr("fd00::1"), TCP, 443}, false},
		{"[::ffff:10.1.2.3]:22", Dest{netip.MustParseAddr("::ffff:10.1.2.3"), TCP, 22}, false},
		{"10.1.2.3", Dest{}, true},
		{"10.1.2.3:70000", Dest{}, true},
		{"10.1.2.3:22/icmp", Dest{}, true},
		{"fd00::1:443", Dest{}, true},
	} {
		got, err := ParseDest(tc.in)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("ParseDest(%q) = %v, %v; want %v, error %v", tc.in, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestDecide(t *testing.T) {
	p := netip.MustParsePrefix
	rs := &Ruleset{
		Internal: []InternalPrefix{{Prefix: p("10.0.0.0/8")}, {Prefix: p("10.1.0.0/16")}, {Prefix: p("fd00::/8")}},
		Apps: []App{
			{Name: "db", Grants: []Grant{
				{Index: 0, Prefix: p("10.1.2.0/24"), Proto: TCP, Ports: []PortRange{{5432, 5432}}},
				{Index: 1, Prefix: p("10.0.0.0/8"), Proto: UDP, Ports: []PortRange{{53, 53}}},
				{Index: 2, Prefix: p("10.1.2.3/32"), Proto: Both, Ports: []PortRange{{8000, 8100}}},
				{Index: 3, Prefix: p("fd00:1::/64"), Proto: Both, Ports: []PortRange{AllPorts}},
			}},
			{Name: "none"},
		},
	}
	d := func(s string) Dest {
		x, err := ParseDest(s)
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	for _, tc := range []struct {
		app, dest string
		allow     bool
		reason    Reason
		grants    int
		internal  string
	}{
		{"db", "10.1.2.9:5432", true, ReasonGranted, 1, "10.1.0.0/16"},
		{"db", "10.1.2.9:5433", false, ReasonPort, 0, "10.1.0.0/16"},
		{"db", "10.1.3.9:5432", false, ReasonPort, 0, "10.1.0.0/16"},     // the /8 udp grant contains it
		{"db", "10.1.3.9:53/udp", true, ReasonGranted, 1, "10.1.0.0/16"}, // less specific grant still counts
		{"db", "10.1.2.3:8050/udp", true, ReasonGranted, 1, "10.1.0.0/16"},
		{"db", "10.1.2.3:53/udp", true, ReasonGranted, 1, "10.1.0.0/16"},        // union of overlapping grants
		{"db", "[::ffff:10.1.2.9]:5432", true, ReasonGranted, 1, "10.1.0.0/16"}, // IPv4-mapped is IPv4
		{"db", "[fd00:1::5]:1/udp", true, ReasonGranted, 1, "fd00::/8"},
		{"db", "[fd00:2::5]:1/udp", false, ReasonNoGrant, 0, "fd00::/8"},
		{"db", "192.0.2.1:5432", true, ReasonNotInternal, 0, ""},
		{"none", "10.1.2.9:5432", false, ReasonNoGrant, 0, "10.1.0.0/16"},
		{"", "10.1.2.9:5432", false, ReasonUnbound, 0, "10.1.0.0/16"},
		{"unknown-app", "10.1.2.9:5432", false, ReasonUnbound, 0, "10.1.0.0/16"},
		{"", "[2001:db8::1]:443", true, ReasonNotInternal, 0, ""},
	} {
		got := rs.Decide(tc.app, d(tc.dest))
		internal := ""
		if got.Internal != nil {
			internal = got.Internal.Prefix.String()
		}
		if got.Allow != tc.allow || got.Reason != tc.reason || len(got.Grants) != tc.grants || internal != tc.internal {
			t.Errorf("Decide(%q, %s) = %s; want allow=%v reason=%s grants=%d internal=%q", tc.app, tc.dest, got, tc.allow, tc.reason, tc.grants, tc.internal)
		}
	}
}

// TestDecideEveryone: everyone grants hold for every principal, unbound
// included, after the app's own grants, and only where they cover d.
func TestDecideEveryone(t *testing.T) {
	p := netip.MustParsePrefix
	rs := &Ruleset{
		Internal: []InternalPrefix{{Prefix: p("10.0.0.0/8")}},
		Everyone: []Grant{{Index: 0, Prefix: p("10.0.0.53/32"), Proto: UDP, Ports: []PortRange{{53, 53}}}},
		Apps: []App{
			{Name: "dns", Grants: []Grant{{Prefix: p("10.0.0.0/24"), Proto: UDP, Ports: []PortRange{{53, 53}}}}},
			{Name: "none"},
		},
	}
	for _, tc := range []struct {
		app, dest string
		allow     bool
		reason    Reason
		everyone  int
	}{
		{"", "10.0.0.53:53/udp", true, ReasonEveryone, 1},
		{"none", "10.0.0.53:53/udp", true, ReasonEveryone, 1},
		{"dns", "10.0.0.53:53/udp", true, ReasonGranted, 0}, // the app's own grant first
		{"", "[::ffff:10.0.0.53]:53/udp", true, ReasonEveryone, 1},
		{"", "10.0.0.53:53/tcp", false, ReasonUnbound, 0},
		{"", "10.0.0.54:53/udp", false, ReasonUnbound, 0},
		{"none", "10.0.0.53:54/udp", false, ReasonNoGrant, 0},
		{"dns", "10.0.1.53:53/udp", false, ReasonNoGrant, 0},
	} {
		d, err := ParseDest(tc.dest)
		if err != nil {
			t.Fatal(err)
		}
		got := rs.Decide(tc.app, d)
		if got.Allow != tc.allow || got.Reason != tc.reason || len(got.Everyone) != tc.everyone {
			t.Errorf("Decide(%q, %s) = %s; want allow=%v reason=%s everyone=%d", tc.app, tc.dest, got, tc.allow, tc.reason, tc.everyone)
		}
	}
}

// TestDecideSandbox: an outside: deny app reaches its grants and everyone's
// wherever they point, loopback unless loopback: deny, and nothing else;
// loopback: deny alone changes nothing.
func TestDecideSandbox(t *testing.T) {
	p := netip.MustParsePrefix
	rs := &Ruleset{
		Internal: []InternalPrefix{{Prefix: p("10.0.0.0/8")}},
		Everyone: []Grant{{Prefix: p("10.0.0.53/32"), Proto: UDP, Ports: []PortRange{{53, 53}}},
			{Prefix: p("127.0.0.53/32"), Proto: UDP, Ports: []PortRange{{53, 53}}}},
		Apps: []App{
			{Name: "box", OutsideDeny: true, Grants: []Grant{
				{Prefix: p("192.0.2.10/32"), Proto: TCP, Ports: []PortRange{{443, 443}}},
				{Prefix: p("10.1.0.0/16"), Proto: TCP, Ports: []PortRange{{5432, 5432}}},
			}},
			{Name: "sealed", OutsideDeny: true, LoopbackDeny: true},
			{Name: "open", LoopbackDeny: true},
		},
	}
	for _, tc := range []struct {
		app, dest string
		allow     bool
		reason    Reason
	}{
		{"box", "192.0.2.10:443", true, ReasonGranted},
		{"box", "192.0.2.10:80", false, ReasonOutside},
		{"box", "192.0.2.11:443", false, ReasonOutside},
		{"box", "[2001:db8::1]:443", false, ReasonOutside},
		{"box", "10.1.2.3:5432", true, ReasonGranted},
		{"box", "10.2.0.1:5432", false, ReasonNoGrant},
		{"box", "10.0.0.53:53/udp", true, ReasonEveryone},
		{"box", "127.0.0.1:80", true, ReasonLoopback},
		{"box", "[::1]:80", true, ReasonLoopback},
		{"box", "[::ffff:127.0.0.1]:80", true, ReasonLoopback},
		{"box", "0.0.0.0:80", true, ReasonLoopback},
		{"sealed", "127.0.0.1:80", false, ReasonLoopback},
		{"sealed", "[::1]:80", false, ReasonLoopback},
		{"sealed", "[::]:80", false, ReasonLoopback},
		{"sealed", "127.0.0.53:53/udp", true, ReasonEveryone},
		{"sealed", "192.0.2.10:443", false, ReasonOutside},
		{"open", "127.0.0.1:80", true, ReasonNotInternal},
		{"open", "192.0.2.10:443", true, ReasonNotInternal},
		{"", "192.0.2.10:443", true, ReasonNotInternal},
	} {
		d, err := ParseDest(tc.dest)
		if err != nil {
			t.Fatal(err)
		}
		got := rs.Decide(tc.app, d)
		if got.Allow != tc.allow || got.Reason != tc.reason {
			t.Errorf("Decide(%q, %s) = %s; want allow=%v reason=%s", tc.app, tc.dest, got, tc.allow, tc.reason)
		}
	}
}

func TestDecideBind(t *testing.T) {
	rs := &Ruleset{Apps: []App{
		{Name: "web", Listen: &Listen{Ports: []PortRange{{8080, 8080}, {9000, 9010}}}},
		{Name: "any-ephemeral", Listen: &Listen{Ports: []PortRange{{0, 0}, {8080, 8080}}}},
		{Name: "client", Listen: &Listen{}},
		{Name: "free"},
	}}
	for _, tc := range []struct {
		app    string
		port   uint16
		allow  bool
		reason Reason
	}{
		{"web", 8080, true, ReasonListen},
		{"web", 9005, true, ReasonListen},
		{"web", 8081, false, ReasonListen},
		{"web", 0, false, ReasonListen}, // an ephemeral port only when 0 is listed
		{"any-ephemeral", 0, true, ReasonListen},
		{"any-ephemeral", 40000, false, ReasonListen},
		{"client", 8080, false, ReasonListen},
		{"client", 0, false, ReasonListen},
		{"free", 22, true, ReasonNotListen},
		{"", 22, true, ReasonNotListen},
	} {
		got := rs.DecideBind(tc.app, tc.port)
		if got.Allow != tc.allow || got.Reason != tc.reason {
			t.Errorf("DecideBind(%q, %d) = %s; want allow=%v reason=%s", tc.app, tc.port, got, tc.allow, tc.reason)
		}
	}
	if got := rs.DecideBind("web", 1).String(); got != "deny (listen) not in listen: [8080, 9000-9010]" {
		t.Errorf("String() = %q", got)
	}
}

func TestCloneIsDeep(t *testing.T) {
	rs := &Ruleset{Apps: []App{{Name: "a", Grants: []Grant{{Ports: []PortRange{{1, 1}}}}}}, AuditRate: 7,
		Everyone: []Grant{{Ports: []PortRange{{2, 2}}}}}
	c := rs.Clone()
	c.Everyone[0].Ports[0].Lo = 9
	if rs.Everyone[0].Ports[0].Lo != 2 {
		t.Fatalf("Clone aliases everyone grants")
	}
	rs.Apps[0].Listen = &Listen{Ports: []PortRange{{3, 3}}}
	lc := rs.Clone()
	lc.Apps[0].Listen.Ports[0].Lo = 9
	if rs.Apps[0].Listen.Ports[0].Lo != 3 {
		t.Fatalf("Clone aliases listen ports")
	}
	c.Apps[0].Grants[0].Ports[0].Lo = 9
	c.Apps[0].Name = "b"
	if rs.Apps[0].Grants[0].Ports[0].Lo != 1 || rs.Apps[0].Name != "a" || c.AuditRate != 7 {
		t.Fatalf("Clone aliases its source or drops fields: %+v / %+v", rs, c)
	}
}

// TestPrincipal is the precedence of docs/policy.md: the deepest app cgroup
// (launched, unit, cgroup) among a process' cgroup and its ancestors, then
// the user app of its real uid, then none.
func TestPrincipal(t *testing.T) {
	rs := &Ruleset{Apps: []App{
		{Name: "launched"},
		{Name: "web", Match: &Match{Kind: MatchUnit, Value: "nginx.service", Path: "system.slice/nginx.service"}},
		{Name: "slice", Match: &Match{Kind: MatchUnit, Value: "system.slice", Path: "system.slice"}},
		{Name: "builds", Match: &Match{Kind: MatchCgroup, Value: "system.slice/docker-*.scope", Path: "system.slice/docker-*.scope"}},
		{Name: "exact", Match: &Match{Kind: MatchCgroup, Value: "system.slice/docker-x.scope", Path: "system.slice/docker-x.scope"}},
		{Name: "backup", Match: &Match{Kind: MatchUser, Value: "backup", UID: 34}},
		{Name: "db", Match: &Match{Kind: MatchContainer, Value: "db", Path: "system.slice/docker-d1.scope"}},
		{Name: "gone", Match: &Match{Kind: MatchContainer, Value: "gone"}}, // no such container: no path
	}}
	for _, tt := range []struct {
		cgroup string
		uid    uint32
		want   string
	}{
		{"procgate.apps/launched", 34, "launched"},
		{"procgate.apps/launched/worker/deeper", 34, "launched"},
		{"procgate.apps/unknown", 34, "backup"},
		{"system.slice/nginx.service", 34, "web"},
		{"system.slice/nginx.service/sub", 0, "web"},
		{"system.slice/cron.service", 34, "slice"},
		{"system.slice/docker-abc.scope", 34, "builds"},
		{"system.slice/docker-.scope", 34, "builds"},
		{"system.slice/docker-x.scope", 34, "exact"}, // exact paths before globs
		{"system.slice/docker-abc.scope/x/y", 34, "builds"},
		{"system.slice/docker-abc.service", 34, "slice"},
		{"user.slice/user-34.slice", 34, "backup"},
		{"user.slice/user-34.slice", 35, ""},
		{"", 34, "backup"},
		{"", 0, ""},
		{"system.slice/docker-d1.scope", 0, "db"},
		{"system.slice/docker-d1.scope/init", 34, "db"},
	} {
		if got := rs.Principal(tt.cgroup, tt.uid, "procgate.apps"); got != tt.want {
			t.Errorf("Principal(%q, uid %d) = %q, want %q", tt.cgroup, tt.uid, got, tt.want)
		}
	}
}

func TestMatchesName(t *testing.T) {
	for _, tc := range []struct {
		grant, q string
		want     bool
	}{
		{"db.corp.example", "db.corp.example", true},
		{"db.corp.example", "x.db.corp.example", false},
		{"db.corp.example", "corp.example", false},
		{"*.corp.example", "db.corp.example", true},
		{"*.corp.example", "a.b.corp.example", true},
		{"*.corp.example", "corp.example", false},
		{"*.corp.example", "evilcorp.example", false},
		{"*.corp.example", "db.corp.example.evil", false},
	} {
		if got := (Grant{Name: tc.grant}).MatchesName(tc.q); got != tc.want {
			t.Errorf("%s matches %s = %v, want %v", tc.grant, tc.q, got, tc.want)
		}
	}
	if (Grant{Prefix: netip.MustParsePrefix("10.0.0.0/8")}).MatchesName("db.corp.example") {
		t.Error("a prefix grant matches a name")
	}
}

func TestDecideLearned(t *testing.T) {
	p := netip.MustParsePrefix
	a := netip.MustParseAddr
	now := time.Date(2026, 12, 6, 6, 0, 0, 0, time.UTC)
	rs := &Ruleset{
		Internal: []InternalPrefix{{Prefix: p("10.0.0.0/8")}},
		Apps: []App{
			{Name: "web", Grants: []Grant{
				{Index: 0, Name: "db.corp.example", Proto: TCP, Ports: []PortRange{{5432, 5432}}},
				{Index: 1, Name: "*.corp.example", Proto: Both, Ports: []PortRange{{443, 443}}},
			}},
			{Name: "box", OutsideDeny: true, Grants: []Grant{
				{Index: 0, Name: "api.example.com", Proto: TCP, Ports: []PortRange{{443, 443}}},
			}},
			{Name: "other"},
		},
	}
	learned := []Learned{
		{App: "web", Name: "db.corp.example", Addr: a("10.1.2.3"), Expires: now.Add(time.Minute), Answer: "db.corp.example. 60 IN A 10.1.2.3"},
		{App: "web", Name: "old.corp.example", Addr: a("10.1.2.4"), Expires: now.Add(-time.Second)},
		{App: "web", Name: "www.corp.example", Addr: a("10.1.2.5"), Expires: now.Add(time.Minute)},
		{App: "box", Name: "api.example.com", Addr: a("192.0.2.10"), Expires: now.Add(time.Minute)},
		{App: "other", Name: "db.corp.example", Addr: a("10.1.2.6"), Expires: now.Add(time.Minute)},
	}
	for _, tc := range []struct {
		app, dest string
		allow     bool
		reason    Reason
		names     int
	}{
		{"web", "10.1.2.3:5432", true, ReasonName, 1},
		{"web", "[::ffff:10.1.2.3]:5432", true, ReasonName, 1},
		{"web", "10.1.2.3:5433", false, ReasonNoGrant, 0},
		{"web", "10.1.2.3:443/udp", true, ReasonName, 1}, // *.corp.example covers db.corp.example
		{"web", "10.1.2.4:443", false, ReasonNoGrant, 0}, // expired
		{"web", "10.1.2.5:443", true, ReasonName, 1},
		{"web", "10.1.2.5:5432", false, ReasonNoGrant, 0},   // www is not db
		{"web", "10.1.2.6:5432", false, ReasonNoGrant, 0},   // another app's answer
		{"other", "10.1.2.6:5432", false, ReasonNoGrant, 0}, // no name grant
		{"box", "192.0.2.10:443", true, ReasonName, 1},
		{"box", "192.0.2.11:443", false, ReasonOutside, 0},
		{"", "10.1.2.3:5432", false, ReasonUnbound, 0},
	} {
		d, err := ParseDest(tc.dest)
		if err != nil {
			t.Fatal(err)
		}
		dec := rs.DecideLearned(tc.app, d, learned, now)
		if dec.Allow != tc.allow || dec.Reason != tc.reason || len(dec.Names) != tc.names {
			t.Errorf("%s %s: %v, want allow %v reason %v names %d", tc.app, tc.dest, dec, tc.allow, tc.reason, tc.names)
		}
		if without := rs.Decide(tc.app, d); without.Allow && tc.reason == ReasonName {
			t.Errorf("%s %s allowed without learned answers: %v", tc.app, tc.dest, without)
		}
	}
	d, _ := ParseDest("10.1.2.3:5432")
	got := rs.DecideLearned("web", d, learned, now).String()
	for _, want := range []string{"granted-name", "#0 db.corp.example tcp ports 5432", "db.corp.example. 60 IN A 10.1.2.3"} {
		if !strings.Contains(got, want) {
			t.Errorf("explain %q does not say %q", got, want)
		}
	}
}

// TestDecideAuditOnly: an app in mode: audit is decided as in enforce mode
// (Allow, Reason), and only its denials pass, as would-deny.
func TestDecideAuditOnly(t *testing.T) {
	p := netip.MustParsePrefix
	grant := []Grant{{Index: 0, Prefix: p("10.1.0.0/16"), Proto: TCP, Ports: []PortRange{{443, 443}}}}
	rs := &Ruleset{
		Internal: []InternalPrefix{{Prefix: p("10.0.0.0/8")}},
		Apps: []App{
			{Name: "trial", AuditOnly: true, Grants: grant, Listen: &Listen{Ports: []PortRange{{8080, 8080}}}},
			{Name: "box", AuditOnly: true, OutsideDeny: true, LoopbackDeny: true},
			{Name: "strict", Grants: grant},
		},
	}
	for _, tc := range []struct {
		app, dest string
		allow     bool
		reason    Reason
		verdict   string
	}{
		{"trial", "10.1.2.3:443", true, ReasonGranted, VerdictAllow},
		{"trial", "10.1.2.3:80", false, ReasonPort, VerdictWouldDeny},
		{"trial", "10.9.9.9:443", false, ReasonNoGrant, VerdictWouldDeny},
		{"trial", "192.0.2.1:443", true, ReasonNotInternal, VerdictAllow},
		{"box", "192.0.2.1:443", false, ReasonOutside, VerdictWouldDeny},
		{"box", "127.0.0.1:80", false, ReasonLoopback, VerdictWouldDeny},
		{"strict", "10.9.9.9:443", false, ReasonNoGrant, VerdictDeny},
		{"", "10.9.9.9:443", false, ReasonUnbound, VerdictDeny},
	} {
		d, err := ParseDest(tc.dest)
		if err != nil {
			t.Fatal(err)
		}
		got := rs.Decide(tc.app, d)
		if got.Allow != tc.allow || got.Reason != tc.reason || got.Verdict() != tc.verdict || got.Passes() != (tc.verdict != VerdictDeny) {
			t.Errorf("Decide(%q, %s) = %s, verdict %s, passes %v; want allow=%v reason=%s verdict %s",
				tc.app, tc.dest, got, got.Verdict(), got.Passes(), tc.allow, tc.reason, tc.verdict)
		}
		if audit := strings.Contains(got.String(), "mode: audit"); audit != (tc.verdict == VerdictWouldDeny) {
			t.Errorf("Decide(%q, %s).String() = %q: says mode: audit %v, want %v", tc.app, tc.dest, got, audit, !audit)
		}
	}
	for _, tc := range []struct {
		port    uint16
		verdict string
	}{{8080, VerdictAllow}, {22, VerdictWouldDeny}} {
		if got := rs.DecideBind("trial", tc.port); got.Verdict() != tc.verdict || !got.Passes() {
			t.Errorf("DecideBind(trial, %d) = %s, verdict %s; want %s, passing", tc.port, got, got.Verdict(), tc.verdict)
		}
	}
}
