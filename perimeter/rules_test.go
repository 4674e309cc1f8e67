package perimeter

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

func mustRules(t testing.TB, text string) *Rules {
	t.Helper()
	rs, err := ParseRules("site.rules", []byte(text))
	if err != nil {
		t.Fatalf("ParseRules: %v", err)
	}
	return rs
}

func TestParseRulesErrors(t *testing.T) {
	tests := []struct {
		name, text string
		want       []string // file:line:col: message fragments, in order
	}{
		{"unknown keyword", "permit * * tcp * * * *", []string{`site.rules:1:1: expected allow, deny, service, limit or host, got "permit"`}},
		{"short rule", "\n  allow srv1 alice tcp", []string{`site.rules:2:23: expected SRC after "tcp"`}},
		{"bad proto", "allow * * icmp * * * *", []string{`site.rules:1:11: expected tcp, udp or *, got "icmp"`}},
		{"host bits", "allow * * tcp 10.0.0.1/8 * * *", []string{`site.rules:1:15: prefix 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?`}},
		{"bad address in a list", "allow * * tcp 10.0.0.0/8,300.1.1.1 * * *", []string{`site.rules:1:26: expected an address or a prefix, got "300.1.1.1"`}},
		{"port out of range", "allow * * tcp * * * 80,70000", []string{`site.rules:1:24: expected a port (0-65535)`}},
		{"backwards range", "allow * * tcp * * * 9000-8000", []string{`site.rules:1:21: port range "9000-8000" runs backwards`}},
		{"src ports in an allow rule", "allow * * tcp * 1024-65535 * *", []string{`site.rules:1:17: expected * for SRCPORTS in an allow rule`}},
		{"self in src", "allow * * tcp self * * *", []string{`site.rules:1:15: self names the delegate's own addresses and belongs in DST`}},
		{"unknown host", "allow * * tcp * * db1 *", []string{`site.rules:1:19: unknown host name "db1"`}},
		{"bad delegate", "allow srv/1 * tcp * * * *", []string{`site.rules:1:7: expected a delegate name`}},
		{"junk after rule", "allow * * tcp * * * * always", []string{"site.rules:1:23: expected `at` (a time window) or the end of the line"}},
		{"at without window", "allow * * tcp * * * * at", []string{"site.rules:1:25: expected a time window after `at`"}},
		{"bad day", "allow * * tcp * * * * at Mon-Fry 08:00-18:00", []string{`site.rules:1:26: expected a day after "Mon"-`}},
		{"bad time", "allow * * tcp * * * * at Mon 8:00-18:00", []string{`site.rules:1:30: expected a time of day HH:MM`}},
		{"empty span", "allow * * tcp * * * * at 08:00-08:00", []string{`site.rules:1:26: span "08:00-08:00" is empty`}},
		{"bad zone", "allow * * tcp * * * * at 08:00-18:00 Mars/Olympus", []string{`site.rules:1:38: expected a time zone`}},
		{"limit twice", "limit alice 3\nlimit alice 4", []string{`site.rules:2:7: second limit for alice; the first is at site.rules:1`}},
		{"bad limit", "limit alice -1", []string{`site.rules:1:13: expected a number of holes (0 or more), got "-1"`}},
		{"host twice", "host db 10.0.0.1\nhost db 10.0.0.2", []string{`site.rules:2:6: host db is defined twice; the first is at line 1`}},
		{"service for every host", "service * tcp 21", []string{`site.rules:1:9: expected the HOST of a service`}},
		{"service for self", "service self tcp 21", []string{`site.rules:1:9: self belongs to no host in a service line`}},
		{"service any proto", "service 10.9.0.5 * 21", []string{`site.rules:1:18: expected tcp or udp for the PROTO of a service, got "*"`}},
		{"service any port", "service 10.9.0.5 tcp *", []string{`site.rules:1:22: expected the PORTS of a service`}},
		{"service short", "service 10.9.0.5", []string{`site.rules:1:17: expected PROTO after "10.9.0.5"`}},
		{"service junk", "service 10.9.0.5 tcp 21 to 10.0.0.0/8", []string{"site.rules:1:25: expected `from SRC` or the end of the line"}},
		{"service from nothing", "service 10.9.0.5 tcp 21 from", []string{"site.rules:1:29: expected SRC after `from`"}},
		{"service unknown host", "service ftp1 tcp 21", []string{`site.rules:1:9: unknown host name "ftp1"`}},
		{"service other family", "host srv1 10.9.0.5\nservice srv1 tcp 21 from 2001:db8::/32", []string{`site.rules:2:26: expected a SRC of the family`}},
		{"every error, in line order", "allow * * tcp * * * 99999\nallow * * tcp * * nowhere *\ndeny * * sctp * * * *", []string{
			`site.rules:1:21: expected a port`, `site.rules:2:19: unknown host name "nowhere"`, `site.rules:3:10: expected tcp, udp or *`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs, err := ParseRules("site.rules", []byte(tt.text))
			var errs *RulesErrors
			if !errors.As(err, &errs) {
				t.Fatalf("ParseRules = %v, %v; want *RulesErrors", rs, err)
			}
			if rs != nil {
				t.Error("ParseRules returned rules with errors")
			}
			if len(errs.List) != len(tt.want) {
				t.Fatalf("got %d errors, want %d:\n%v", len(errs.List), len(tt.want), err)
			}
			for i, want := range tt.want {
				if got := errs.List[i].Error(); !strings.HasPrefix(got, want) {
					t.Errorf("error %d:\n got %s\nwant %s...", i, got, want)
				}
			}
		})
	}
}

func TestParseServices(t *testing.T) {
	rs := mustRules(t, `host srv1 10.9.0.5,fd09::5
service srv1 tcp 21                          # vsftpd's control port
service 10.9.4.0/24 udp 5060,6000-6010 from 198.51.100.0/24,2001:db8::/32
`)
	p := netip.MustParsePrefix
	tests := []struct {
		where   string
		proto   Proto
		ports   [][2]uint16
		matches []ServiceMatch
	}{
		{"site.rules:2", TCP, [][2]uint16{{21, 21}}, []ServiceMatch{{Host: p("10.9.0.5/32")}, {Host: p("fd09::5/128")}}},
		// an IPv6 source never pairs with an IPv4 host
		{"site.rules:3", UDP, [][2]uint16{{5060, 5060}, {6000, 6010}}, []ServiceMatch{{Host: p("10.9.4.0/24"), From: p("198.51.100.0/24")}}},
	}
	if len(rs.Services) != len(tests) {
		t.Fatalf("%d services, want %d: %+v", len(rs.Services), len(tests), rs.Services)
	}
	for i, tt := range tests {
		sv := rs.Services[i]
		if sv.Where != tt.where || sv.Proto != tt.proto || !slices.Equal(sv.Ports, tt.ports) || !slices.Equal(sv.matches(), tt.matches) {
			t.Errorf("service %d = %s %v %v %v; want %s %v %v %v", i, sv.Where, sv.Proto, sv.Ports, sv.matches(), tt.where, tt.proto, tt.ports, tt.matches)
		}
	}
	if rs.Services[0].Text != "service srv1 tcp 21" {
		t.Errorf("Text = %q", rs.Services[0].Text)
	}
}

const siteRules = `# Diaper's rules, and procgate's extensions.
host srv1 10.9.0.5,fd09::5
host srv2 10.9.0.6
allow srv1,srv2 * * * * self *            # hosts open holes to themselves only
allow ftp * tcp 198.51.100.0/24 * 10.9.1.0/24 40000-40100
deny * mallory * * * * *
deny * * * 198.51.100.66 * * *            # a known bad peer
allow night * udp * * 10.9.2.0/24 * at Mon-Fri 22:00-06:00 UTC
allow office * tcp any * 10.9.3.0/24 8000 at Mon-Fri 08:00-18:00 UTC
allow office * tcp any * 10.9.3.0/24 8000 at Mon-Sat 09:00-12:00 UTC
limit alice 2
limit * 10
`

func TestAuthorize(t *testing.T) {
	rs := mustRules(t, siteRules)
	wed := time.Date(2026, 11, 25, 10, 0, 0, 0, time.UTC) // a Wednesday
	sat := time.Date(2026, 11, 28, 10, 0, 0, 0, time.UTC)
	tests := []struct {
		name, delegate, user, hole string
		at                         time.Time
		wantRule                   string // where the deciding rule is; "" = no allow rule matched
		allowed                    bool
		until                      time.Time
	}{
		{"own host", "srv1", "alice", "tcp 203.0.113.9 10.9.0.5 40000", wed, "site.rules:4", true, time.Time{}},
		{"own host v6", "srv1", "alice", "udp 2001:db8::9 fd09::5 5004", wed, "site.rules:4", true, time.Time{}},
		{"other host", "srv1", "alice", "tcp 203.0.113.9 10.9.0.6 40000", wed, "", false, time.Time{}},
		{"delegate without a host line", "srv3", "alice", "tcp 203.0.113.9 10.9.0.5 40000", wed, "", false, time.Time{}},
		{"ftp range", "ftp", "bob", "tcp 198.51.100.7 10.9.1.9 40050", wed, "site.rules:5", true, time.Time{}},
		{"ftp port outside", "ftp", "bob", "tcp 198.51.100.7 10.9.1.9 40101", wed, "", false, time.Time{}},
		{"ftp udp", "ftp", "bob", "udp 198.51.100.7 10.9.1.9 40050", wed, "", false, time.Time{}},
		{"ftp peer outside", "ftp", "bob", "tcp 198.51.101.7 10.9.1.9 40050", wed, "", false, time.Time{}},
		{"denied user", "srv1", "mallory", "tcp 203.0.113.9 10.9.0.5 40000", wed, "site.rules:6", false, time.Time{}},
		{"denied peer beats an allow", "ftp", "bob", "tcp 198.51.100.66 10.9.1.9 40050", wed, "site.rules:7", false, time.Time{}},
		{"overnight window, evening", "night", "carol", "udp 203.0.113.9 10.9.2.1 9000", time.Date(2026, 11, 25, 23, 0, 0, 0, time.UTC), "site.rules:8", true, time.Date(2026, 11, 26, 6, 0, 0, 0, time.UTC)},
		{"overnight window, Saturday morning after Friday", "night", "carol", "udp 203.0.113.9 10.9.2.1 9000", time.Date(2026, 11, 28, 5, 59, 0, 0, time.UTC), "site.rules:8", true, time.Date(2026, 11, 28, 6, 0, 0, 0, time.UTC)},
		{"overnight window, Monday morning after Sunday", "night", "carol", "udp 203.0.113.9 10.9.2.1 9000", time.Date(2026, 11, 30, 5, 0, 0, 0, time.UTC), "", false, time.Time{}},
		{"overnight window, daytime", "night", "carol", "udp 203.0.113.9 10.9.2.1 9000", wed, "", false, time.Time{}},
		{"two windows: the longer one wins", "office", "dave", "tcp 203.0.113.9 10.9.3.1 8000", wed, "site.rules:9", true, time.Date(2026, 11, 25, 18, 0, 0, 0, time.UTC)},
		{"two windows: Saturday", "office", "dave", "tcp 203.0.113.9 10.9.3.1 8000", sat, "site.rules:10", true, time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)},
		{"window ends exclusive", "office", "dave", "tcp 203.0.113.9 10.9.3.1 8000", time.Date(2026, 11, 25, 18, 0, 0, 0, time.UTC), "", false, time.Time{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := rs.Authorize(tt.delegate, tt.user, key(tt.hole), tt.at)
			where := ""
			if d.Rule != nil {
				where = d.Rule.Where
			}
			if d.Allowed != tt.allowed || where != tt.wantRule || !d.Until.Equal(tt.until) {
				t.Errorf("Authorize = allowed %v by %q until %v (%s); want %v by %q until %v",
					d.Allowed, where, d.Until, d.Reason(), tt.allowed, tt.wantRule, tt.until)
			}
		})
	}
}

func TestDecisionReason(t *testing.T) {
	rs := mustRules(t, siteRules)
	wed := time.Date(2026, 11, 25, 10, 0, 0, 0, time.UTC)
	for hole, want := range map[string]string{
		"tcp 198.51.100.66 10.9.1.9 40050": "denied by site.rules:7: deny * * * 198.51.100.66 * * *",
		"tcp 198.51.100.7 10.9.1.9 40050":  "allowed by site.rules:5: allow ftp * tcp 198.51.100.0/24 * 10.9.1.0/24 40000-40100",
		"tcp 198.51.100.7 10.9.1.9 22":     "no allow rule matched",
	} {
		if got := rs.Authorize("ftp", "bob", key(hole), wed).Reason(); got != want {
			t.Errorf("%s: %q, want %q", hole, got, want)
		}
	}
}

func TestLimits(t *testing.T) {
	rs := mustRules(t, siteRules)
	for user, want := range map[string]int{"alice": 2, "bob": 10} {
		l, ok := rs.Limit(user)
		if !ok || l.Max != want {
			t.Errorf("Limit(%s) = %v, %v; want %d", user, l, ok, want)
		}
	}
	if _, ok := mustRules(t, "limit alice 1").Limit("bob"); ok {
		t.Error("a user without a limit line and no `limit *` got a limit")
	}
}

func TestWindowDST(t *testing.T) {
	berlin, err := time.LoadLocation("Europe/Berlin")
	if err != nil {
		t.Skipf("no time zone database: %v", err)
	}
	rs := mustRules(t, "allow * * * * * * * at Sun 01:00-04:00 Europe/Berlin")
	// 2026-03-29 is the spring change in Berlin: 02:00 does not exist.
	at := time.Date(2026, 3, 29, 1, 30, 0, 0, berlin)
	d := rs.Authorize("a", "b", key("tcp 203.0.113.9 10.9.0.5 1"), at)
	if !d.Allowed || d.Until.Sub(at) != 90*time.Minute {
		t.Errorf("DST night: allowed %v until %v (%v after), want 90m", d.Allowed, d.Until, d.Until.Sub(at))
	}
}
