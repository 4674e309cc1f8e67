package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/ruleset"
)

// roundTrip formats rs, parses the text back, and fails unless the result
// equals rs apart from sources.
func roundTrip(t *testing.T, rs *ruleset.Ruleset) []byte {
	t.Helper()
	out, err := Format(rs)
	if err != nil {
		t.Fatalf("Format: %v", err)
	}
	back, _, err := Parse("formatted.yaml", out)
	if err != nil {
		t.Fatalf("Parse(Format(rs)): %v\n%s", err, out)
	}
	if d := diff(rs, back); d != "" {
		t.Fatalf("round trip: %s\n%s", d, out)
	}
	return out
}

func TestFormatRoundTripFiles(t *testing.T) {
	files, _ := filepath.Glob("testdata/valid/*.yaml")
	files = append(files, "testdata/example.yaml")
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			rs, _, err := Load(file)
			if err != nil {
				t.Fatal(err)
			}
			roundTrip(t, rs)
		})
	}
}

func TestFormatText(t *testing.T) {
	rs := &ruleset.Ruleset{
		Internal:   []ruleset.InternalPrefix{{Prefix: pfx("10.0.0.0/8")}, {Prefix: pfx("fd00::/8")}},
		Interfaces: []string{"wg0"},
		AuditRate:  5,
		Apps: []ruleset.App{
			{
				Name:       "null",
				Exe:        []ruleset.Exe{{Path: "/usr/bin/psql"}, {Path: "/usr/bin/psql", SHA256: hash}},
				Users:      []string{"alice", "@dba"},
				AuditAllow: true,
				Grants: []ruleset.Grant{
					{Index: 0, Prefix: pfx("10.1.2.0/24"), Proto: ruleset.TCP, Ports: ports(port1(5432))},
					{Index: 1, Prefix: pfx("fd00:1::/64"), Proto: ruleset.Both, Ports: ports(port1(443), ruleset.PortRange{Lo: 8000, Hi: 8100})},
					{Index: 2, Prefix: pfx("10.9.9.9/32"), Proto: ruleset.UDP, Ports: allPorts},
				},
			},
			{Name: "empty", Exe: []ruleset.Exe{{Path: "/bin/true"}}},
		},
	}
	want := `version: 1
internal:
  prefixes: [10.0.0.0/8, 'fd00::/8']
  interfaces: [wg0]
audit:
  rate: 5
apps:
  - name: "null"
    exe:
      - /usr/bin/psql
      - {path: /usr/bin/psql, sha256: ` + hash + `}
    users: [alice, '@dba']
    audit: all
    allow:
      - to: 10.1.2.0/24
        proto: tcp
        ports: [5432]
      - to: fd00:1::/64
        ports: [443, 8000-8100]
      - to: 10.9.9.9/32
        proto: udp
  - name: empty
    exe: [/bin/true]
    allow: []
`
	if got := string(roundTrip(t, rs)); got != want {
		t.Errorf("Format:\n%s\nwant:\n%s", got, want)
	}
}

func TestFormatRejects(t *testing.T) {
	valid := func() *ruleset.Ruleset {
		return &ruleset.Ruleset{
			Internal:  []ruleset.InternalPrefix{{Prefix: pfx("10.0.0.0/8")}},
			AuditRate: DefaultAuditRate,
			Apps: []ruleset.App{{Name: "a", Grants: []ruleset.Grant{
				{Index: 0, Prefix: pfx("10.1.0.0/16"), Proto: ruleset.TCP, Ports: ports(port1(22))},
			}}},
		}
	}
	tests := []struct {
		name   string
		change func(rs *ruleset.Ruleset)
		want   string
	}{
		{"unmasked prefix", func(rs *ruleset.Ruleset) { rs.Apps[0].Grants[0].Prefix = pfx("10.1.2.3/16") },
			"apps[0].allow[0].to: host bits set in 10.1.2.3/16; did you mean 10.1.0.0/16?"},
		{"4in6 prefix", func(rs *ruleset.Ruleset) { rs.Internal[0].Prefix = pfx("::ffff:10.0.0.0/104") },
			"internal prefixes [{::ffff:10.0.0.0/104 }] reads back as [{10.0.0.0/8 }]"},
		{"unsorted ports", func(rs *ruleset.Ruleset) { rs.Apps[0].Grants[0].Ports = ports(port1(80), port1(22)) },
			"apps[0] {Name:a"},
		{"no ports", func(rs *ruleset.Ruleset) { rs.Apps[0].Grants[0].Ports = nil },
			"apps[0].allow[0].ports: empty port list"},
		{"index not the position", func(rs *ruleset.Ruleset) { rs.Apps[0].Grants[0].Index = 3 },
			"Grants:[#3 10.1.0.0/16 tcp ports 22]"},
		{"audit rate 0", func(rs *ruleset.Ruleset) { rs.AuditRate = 0 },
			"audit.rate: rate 0 out of range 1-1000000"},
		{"no proto", func(rs *ruleset.Ruleset) { rs.Apps[0].Grants[0].Proto = 0 },
			`apps[0].allow[0].proto: invalid proto "none"`},
		{"bad app name", func(rs *ruleset.Ruleset) { rs.Apps[0].Name = "A" },
			`apps[0].name: invalid app name "A"`},
		{"relative exe", func(rs *ruleset.Ruleset) { rs.Apps[0].Exe = []ruleset.Exe{{Path: "bin/a"}} },
			`apps[0].exe[0]: exe path "bin/a" must be absolute`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs := valid()
			roundTrip(t, rs) // the base case is fine; only the change breaks it
			tt.change(rs)
			out, err := Format(rs)
			if err == nil {
				t.Fatalf("Format accepted a ruleset that does not round trip:\n%s", out)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
	if _, err := Format(nil); err == nil {
		t.Errorf("Format(nil) succeeded")
	}
}

// Names and users that YAML would read as something other than a string if
// written plainly.
var tricky = []string{"null", "true", "yes", "no", "on", "123", "0x1f", "1e3", "2001-12-14", "0o17", "1_000", ".5"}

// randomRuleset returns a ruleset in canonical form (what Parse produces),
// with every optional part sometimes present.
func randomRuleset(r *rand.Rand) *ruleset.Ruleset {
	rs := &ruleset.Ruleset{AuditRate: DefaultAuditRate}
	if r.IntN(2) == 0 {
		rs.AuditRate = 1 + r.Uint32N(MaxAuditRate)
	}
	seenPrefix := map[netip.Prefix]bool{}
	for range r.IntN(4) {
		p := randomPrefix(r)
		if !seenPrefix[p] {
			seenPrefix[p] = true
			rs.Internal = append(rs.Internal, ruleset.InternalPrefix{Prefix: p})
		}
	}
	for i := range r.IntN(3) {
		rs.Interfaces = append(rs.Interfaces, fmt.Sprintf("wg%d", i))
	}
	for i := range r.IntN(4) {
		a := ruleset.App{Name: fmt.Sprintf("app-%d", i), AuditAllow: r.IntN(2) == 0, AuditOnly: r.IntN(2) == 0}
		if i < len(tricky) && r.IntN(2) == 0 {
			a.Name = tricky[i]
		}
		for j := range r.IntN(3) {
			e := ruleset.Exe{Path: fmt.Sprintf("/usr/bin/tool%d", j)}
			if r.IntN(2) == 0 {
				e.SHA256 = fmt.Sprintf("%064x", r.Uint64())
			}
			a.Exe = append(a.Exe, e)
		}
		for j := range r.IntN(3) {
			u := tricky[r.IntN(len(tricky))]
			if !userRE.MatchString(u) {
				u = "user" + fmt.Sprint(j)
			}
			if r.IntN(3) == 0 {
				u = "@" + u
			}
			if !strings.Contains(strings.Join(a.Users, " "), u) {
				a.Users = append(a.Users, u)
			}
		}
		for j := range r.IntN(4) {
			a.Grants = append(a.Grants, ruleset.Grant{
				Index:  int32(j),
				Prefix: randomPrefix(r),
				Proto:  []ruleset.Proto{ruleset.TCP, ruleset.UDP, ruleset.Both}[r.IntN(3)],
				Ports:  randomPorts(r),
			})
		}
		if r.IntN(3) == 0 {
			in := &ruleset.Inbound{Ports: slices.Clone(randomPorts(r)), Proto: []ruleset.Proto{ruleset.TCP, ruleset.UDP, ruleset.Both}[r.IntN(3)]}
			if in.Ports[0].Lo == 0 {
				in.Ports[0].Lo = 1
			}
			if in.Proto == ruleset.UDP && r.IntN(2) == 0 {
				in.Control = ports(port1(21)) // may overlap: only TCP aux ports clash with control ports
			}
			if r.IntN(2) == 0 {
				in.Lease = time.Duration(1+r.IntN(3600)) * time.Second
			}
			a.Inbound = in
		}
		rs.Apps = append(rs.Apps, a)
	}
	return rs
}

func randomPrefix(r *rand.Rand) netip.Prefix {
	if r.IntN(2) == 0 {
		var b [4]byte
		for i := range b {
			b[i] = byte(r.UintN(256))
		}
		p, _ := netip.AddrFrom4(b).Prefix(r.IntN(33))
		return p
	}
	var b [16]byte
	for i := range b {
		b[i] = byte(r.UintN(256))
	}
	p, _ := netip.AddrFrom16(b).Prefix(r.IntN(129))
	return p
}

func randomPorts(r *rand.Rand) []ruleset.PortRange {
	if r.IntN(4) == 0 {
		return allPorts
	}
	var out []ruleset.PortRange
	lo := 0
	for range 1 + r.IntN(4) {
		// Overlapping ranges stay as written; only exact repeats are removed.
		lo += r.IntN(5000)
		if lo > 65535 {
			break
		}
		hi := min(65535, lo+r.IntN(3)*r.IntN(2000))
		if len(out) > 0 && out[len(out)-1] == (ruleset.PortRange{Lo: uint16(lo), Hi: uint16(hi)}) {
			continue
		}
		out = append(out, ruleset.PortRange{Lo: uint16(lo), Hi: uint16(hi)})
	}
	if len(out) == 0 {
		out = ports(port1(65535))
	}
	// Equal starts sort by end, as the parser sorts them.
	slices.SortStableFunc(out, func(a, b ruleset.PortRange) int {
		if a.Lo != b.Lo {
			return int(a.Lo) - int(b.Lo)
		}
		return int(a.Hi) - int(b.Hi)
	})
	return slices.Compact(out)
}

func TestFormatRoundTripRandom(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		rs := randomRuleset(r)
		roundTrip(t, rs)
		// Format is deterministic: generated policy files must be reproducible.
		a, _ := Format(rs)
		b, _ := Format(rs.Clone())
		if !reflect.DeepEqual(a, b) {
			t.Fatalf("Format gave two texts for one ruleset:\n%s\n%s", a, b)
		}
	}
}
