package dnsproxy

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func rrs(t *testing.T, lines ...string) []dns.RR {
	t.Helper()
	var out []dns.RR
	for _, l := range lines {
		rr, err := dns.NewRR(l)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, rr)
	}
	return out
}

func TestFacts(t *testing.T) {
	now := time.Date(2026, 12, 6, 6, 0, 0, 0, time.UTC)
	res := netip.MustParseAddrPort("10.0.0.53:53")
	for _, tc := range []struct {
		name   string
		q      string
		answer []string
		rcode  int
		want   []string // addr@ttl
	}{
		{"round robin", "db.corp.example.", []string{"db.corp.example. 30 IN A 10.1.2.3", "db.corp.example. 60 IN A 10.1.2.4", "db.corp.example. 30 IN AAAA fd00::3"},
			dns.RcodeSuccess, []string{"10.1.2.3@30", "10.1.2.4@60", "fd00::3@30"}},
		{"cname chain, out of order, least ttl", "DB.corp.example.", []string{
			"db2.corp.example. 300 IN A 10.1.2.9",
			"db.corp.example. 20 IN CNAME db1.corp.example.",
			"db1.corp.example. 300 IN CNAME db2.corp.example.",
		}, dns.RcodeSuccess, []string{"10.1.2.9@20"}},
		{"records of names not asked", "db.corp.example.", []string{"evil.corp.example. 30 IN A 10.6.6.6", "x.corp.example. 30 IN CNAME db.corp.example."},
			dns.RcodeSuccess, nil},
		{"failure", "db.corp.example.", []string{"db.corp.example. 30 IN A 10.1.2.3"}, dns.RcodeServerFailure, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := &dns.Msg{Answer: rrs(t, tc.answer...)}
			m.Rcode = tc.rcode
			var got []string
			for _, f := range Facts("web", tc.q, m, now, res) {
				if f.App != "web" || f.Name != strings.ToLower(strings.TrimSuffix(tc.q, ".")) || f.Resolver != res || f.Answer == "" {
					t.Errorf("fact %+v", f)
				}
				got = append(got, f.Addr.String()+"@"+strconv.Itoa(int(f.Expires.Sub(now)/time.Second)))
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}
