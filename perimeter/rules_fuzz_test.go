package perimeter

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// FuzzParseRules: any text either parses into rules that can be asked, or
// fails with a *RulesErrors whose every entry points into the file.
func FuzzParseRules(f *testing.F) {
	for _, seed := range []string{
		"host srv1 10.9.0.5,fd09::5\nallow srv1 * tcp * * self 40000-40100\n",
		"allow media * udp 198.51.100.0/24 * 10.9.2.0/24 5000-5999 at Mon-Fri 08:00-18:00 Europe/Berlin\n",
		"deny * mallory * * * * *\ndeny * * * 203.0.113.66 * * *  # comment\nlimit * 16\nlimit backup 200\n",
		"service srv1 tcp 21,4600 from 198.51.100.0/24\nhost srv1 10.9.0.5\n",
		"allow a b tcp 10.0.0.0/33 70000 * *\n",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, text string) {
		rs, err := ParseRules("fuzz.rules", []byte(text))
		lines := strings.Count(text, "\n") + 1
		if err != nil {
			if rs != nil {
				t.Fatalf("rules returned with an error: %v", err)
			}
			var list *RulesErrors
			if !errors.As(err, &list) || len(list.List) == 0 {
				t.Fatalf("error %v (%T) is not a non-empty *RulesErrors", err, err)
			}
			for _, e := range list.List {
				if e.File != "fuzz.rules" || e.Line < 1 || e.Line > lines || e.Col < 1 || e.Msg == "" {
					t.Fatalf("error outside the file (%d lines): %+v", lines, e)
				}
			}
			return
		}
		k := Key{Peer: netip.MustParseAddr("198.51.100.10"), Proto: TCP, Host: netip.MustParseAddr("10.9.0.5"), Port: 40000}
		rs.Authorize("srv1", "alice", k, time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC))
		rs.Limit("alice")
	})
}
