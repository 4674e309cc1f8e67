package learn

import (
	"flag"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/policy"
	"github.com/procgate/procgate/ruleset"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var t0 = time.Date(2026, 12, 6, 6, 0, 0, 0, time.UTC)

// deny is a denied attempt of app web at t0+sec.
func deny(sec int, dest, reason string) audit.Record {
	return audit.Record{Time: t0.Add(time.Duration(sec) * time.Second), Verdict: VerdictDeny, Reason: reason, App: "web", Dest: dest}
}

func grantsText(gs []Grant) []string {
	var out []string
	for _, g := range gs {
		s := g.Prefix.String() + " " + g.Proto.String() + " [" + portsText(g.Ports) + "]"
		out = append(out, s)
	}
	return out
}

func TestLearnMerge(t *testing.T) {
	const ng, np = "no-grant", "port-not-granted"
	for _, tc := range []struct {
		name  string
		recs  []audit.Record
		widen bool
		want  []string
	}{
		{"one", []audit.Record{deny(0, "10.1.2.3:5432/tcp", ng)}, false, []string{"10.1.2.3/32 tcp [5432]"}},
		{"ports of one address into a list", []audit.Record{
			deny(0, "10.1.2.3:443/tcp", ng), deny(1, "10.1.2.3:80/tcp", np), deny(2, "10.1.2.3:443/tcp", np)},
			false, []string{"10.1.2.3/32 tcp [80, 443]"}},
		{"consecutive ports into a range, others apart", []audit.Record{
			deny(0, "10.1.2.3:8001/tcp", ng), deny(1, "10.1.2.3:8000/tcp", ng), deny(2, "10.1.2.3:8002/tcp", ng), deny(3, "10.1.2.3:8004/tcp", ng)},
			false, []string{"10.1.2.3/32 tcp [8000-8002, 8004]"}},
		{"port 65535 and 0", []audit.Record{deny(0, "10.1.2.3:65535/udp", ng), deny(0, "10.1.2.3:0/udp", ng), deny(0, "10.1.2.3:65534/udp", ng)},
			false, []string{"10.1.2.3/32 udp [0, 65534-65535]"}},
		{"protocols apart", []audit.Record{deny(0, "10.1.2.3:53/udp", ng), deny(1, "10.1.2.3:443/tcp", ng)},
			false, []string{"10.1.2.3/32 tcp [443]", "10.1.2.3/32 udp [53]"}},
		{"same ports both protocols: one grant", []audit.Record{deny(0, "10.1.2.3:53/udp", ng), deny(1, "10.1.2.3:53/tcp", ng)},
			false, []string{"10.1.2.3/32 tcp+udp [53]"}},
		{"addresses apart without widen", []audit.Record{deny(0, "10.1.2.3:443/tcp", ng), deny(1, "10.1.2.4:443/tcp", ng)},
			false, []string{"10.1.2.3/32 tcp [443]", "10.1.2.4/32 tcp [443]"}},
		{"widen: smallest covering prefix", []audit.Record{deny(0, "10.1.2.3:443/tcp", ng), deny(1, "10.1.2.4:443/tcp", ng)},
			true, []string{"10.1.2.0/29 tcp [443]"}},
		{"widen: other ports stay apart", []audit.Record{deny(0, "10.1.2.3:443/tcp", ng), deny(1, "10.1.2.4:80/tcp", ng)},
			true, []string{"10.1.2.3/32 tcp [443]", "10.1.2.4/32 tcp [80]"}},
		{"widen: never past a /24", []audit.Record{deny(0, "10.1.2.3:443/tcp", ng), deny(1, "10.1.3.3:443/tcp", ng)},
			true, []string{"10.1.2.3/32 tcp [443]", "10.1.3.3/32 tcp [443]"}},
		{"v6", []audit.Record{deny(0, "[fd00::5]:443/tcp", ng), deny(1, "[fd00::6]:443/tcp", ng)},
			false, []string{"fd00::5/128 tcp [443]", "fd00::6/128 tcp [443]"}},
		{"widen v6 within a /64", []audit.Record{deny(0, "[fd00::5]:443/tcp", ng), deny(1, "[fd00::6]:443/tcp", ng), deny(2, "[fd00:0:0:1::6]:443/tcp", ng)},
			true, []string{"fd00::4/126 tcp [443]", "fd00:0:0:1::6/128 tcp [443]"}},
		{"IPv4-mapped is IPv4", []audit.Record{deny(0, "[::ffff:10.1.2.3]:443/tcp", ng), deny(1, "10.1.2.3:443/tcp", ng)},
			false, []string{"10.1.2.3/32 tcp [443]"}},
		{"sandbox outside and loopback", []audit.Record{deny(0, "192.0.2.1:443/tcp", "outside-denied"), deny(1, "127.0.0.1:8080/tcp", "loopback")},
			false, []string{"127.0.0.1/32 tcp [8080]", "192.0.2.1/32 tcp [443]"}},
		{"reasons no grant fixes", []audit.Record{
			deny(0, "10.1.2.3:443/tcp", "exe-not-pinned"), deny(1, "10.1.2.3:443/tcp", "handover"),
			deny(2, "10.1.2.3:0/none", "proto-not-grantable"), deny(3, "10.1.2.3:0/none", "raw-socket")},
			false, nil},
		{"other apps, allows and pinhole records are not learned", []audit.Record{
			{Verdict: VerdictDeny, Reason: ng, App: "db", Dest: "10.1.2.3:443/tcp"},
			{Verdict: "allow", Reason: "granted", App: "web", Dest: "10.1.2.3:443/tcp"},
			{Verdict: VerdictDeny, Reason: ng, App: "web", Dest: "10.1.2.3:443/tcp", Kind: audit.KindPinhole}},
			false, nil},
		{"would-deny is learned", []audit.Record{{Time: t0, Verdict: VerdictWouldDeny, Reason: ng, App: "web", Dest: "10.1.2.3:443/tcp"}},
			false, []string{"10.1.2.3/32 tcp [443]"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := Learn(tc.recs, Options{App: "web", Widen: tc.widen})
			if got := grantsText(res.Grants); !slices.Equal(got, tc.want) {
				t.Errorf("grants %q, want %q", got, tc.want)
			}
			// Never wider than asked: without widen every grant is one address.
			for _, g := range res.Grants {
				if !tc.widen && g.Prefix.Bits() != g.Prefix.Addr().BitLen() {
					t.Errorf("grant %v wider than one address without widen", g.Prefix)
				}
			}
		})
	}
}

func TestLearnSince(t *testing.T) {
	recs := []audit.Record{deny(0, "10.1.2.3:1/tcp", "no-grant"), deny(60, "10.1.2.3:2/tcp", "no-grant")}
	res := Learn(recs, Options{App: "web", Since: t0.Add(30 * time.Second)})
	if got := grantsText(res.Grants); !slices.Equal(got, []string{"10.1.2.3/32 tcp [2]"}) {
		t.Errorf("grants %q: want only the attempt after since", got)
	}
}

const testPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8, fd00::/8]
apps:
  - name: web
    allow:
      - to: 10.9.0.0/16
        ports: [443]
`

// goldenRecords: counts, first and last, both protocols, a range, v6 and
// a denial no grant fixes.
func goldenRecords() []audit.Record {
	return []audit.Record{
		deny(0, "10.1.2.3:5432/tcp", "no-grant"),
		deny(5, "10.1.2.3:5432/tcp", "no-grant"),
		deny(9, "10.1.2.3:5433/tcp", "no-grant"),
		deny(10, "10.0.0.53:53/udp", "no-grant"),
		deny(11, "10.0.0.53:53/tcp", "no-grant"),
		deny(20, "[fd00::7]:8443/tcp", "no-grant"),
		{Time: t0.Add(30 * time.Second), Verdict: VerdictWouldDeny, Reason: "port-not-granted", App: "web", Dest: "10.9.1.1:80/tcp"},
		deny(40, "10.1.2.3:5432/tcp", "exe-not-pinned"),
	}
}

func TestFragmentGolden(t *testing.T) {
	got := Learn(goldenRecords(), Options{App: "web"}).Fragment()
	golden := filepath.Join("testdata", "web.golden.yaml")
	if *update {
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(want) {
		t.Errorf("fragment:\n%s\nwant (go test ./learn -update to rewrite):\n%s", got, want)
	}
}

// TestFragmentValidates: the fragment is a valid drop-in of the policy,
// and with it every learned attempt is allowed, and nothing else that was
// denied before (checked on neighbours of every learned destination).
func TestFragmentValidates(t *testing.T) {
	for _, widen := range []bool{false, true} {
		res := Learn(goldenRecords(), Options{App: "web", Widen: widen})
		rs := validate(t, res.Fragment())
		before := validate(t, nil)
		for _, r := range goldenRecords() {
			d, _ := parseDest(r.Dest)
			if Grantable(r.Reason) {
				if dec := rs.Decide("web", d); !dec.Allow {
					t.Errorf("widen=%v: learned %s still denied: %v", widen, r.Dest, dec)
				}
			}
			for _, n := range neighbours(d) {
				if !before.Decide("web", n).Allow && rs.Decide("web", n).Allow && !learned(n) {
					if !widen || n.Port != d.Port || n.Proto != d.Proto {
						t.Errorf("widen=%v: %s allowed, never attempted", widen, n)
					}
				}
			}
		}
	}
}

func learned(d ruleset.Dest) bool {
	for _, r := range goldenRecords() {
		if l, _ := parseDest(r.Dest); l == d && Grantable(r.Reason) {
			return true
		}
	}
	return false
}

func neighbours(d ruleset.Dest) []ruleset.Dest {
	var out []ruleset.Dest
	for _, a := range []netip.Addr{d.Addr.Prev(), d.Addr.Next()} {
		if a.IsValid() {
			out = append(out, ruleset.Dest{Addr: a, Proto: d.Proto, Port: d.Port})
		}
	}
	other := ruleset.UDP
	if d.Proto == ruleset.UDP {
		other = ruleset.TCP
	}
	out = append(out, ruleset.Dest{Addr: d.Addr, Proto: other, Port: d.Port},
		ruleset.Dest{Addr: d.Addr, Proto: d.Proto, Port: d.Port + 1}, ruleset.Dest{Addr: d.Addr, Proto: d.Proto, Port: d.Port - 1})
	return out
}

// validate checks fragment as a drop-in with testPolicy, as the daemon
// would read them, and returns the merged ruleset.
func validate(t *testing.T, fragment []byte) *ruleset.Ruleset {
	t.Helper()
	files := []policy.File{{Path: "/etc/procgate/policy.yaml", Data: []byte(testPolicy)}}
	if fragment != nil {
		files = append(files, policy.File{Path: "/etc/procgate/policy.d/50-learned-web.yaml", Data: fragment})
	}
	rs, warns, err := policy.ParseFiles(files)
	if err != nil {
		t.Fatalf("fragment does not validate: %v\n%s", err, fragment)
	}
	if len(warns) > 0 {
		t.Errorf("warnings %v", warns)
	}
	return rs
}

// TestFromLog learns from the audit log file the daemon writes.
func TestFromLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	var b strings.Builder
	for _, r := range goldenRecords() {
		b.WriteString(mustJSON(t, r) + "\n")
	}
	b.WriteString("{torn line\n")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	recs, err := audit.ReadLog(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := Learn(recs, Options{App: "web"}).Fragment()
	want := Learn(goldenRecords(), Options{App: "web"}).Fragment()
	if string(got) != string(want) {
		t.Errorf("from the log:\n%s\nwant:\n%s", got, want)
	}
}

// TestLearnRecordedLog: 10,000 denials of 50 destinations. The fragment
// validates; with it every learned attempt is allowed and none of 1,000
// random destinations the log did not hold is (unless --widen, which is
// the only way to a prefix wider than one address).
func TestLearnRecordedLog(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 10000))
	type dest struct {
		d      ruleset.Dest
		reason string
	}
	var dests []dest
	seen := map[ruleset.Dest]bool{}
	for len(dests) < 50 {
		var a netip.Addr
		if rng.IntN(4) == 0 {
			a = netip.AddrFrom16([16]byte{0xfd, 0, 0, 0, 0, 0, 0, 1, 15: byte(rng.IntN(8))})
		} else {
			a = netip.AddrFrom4([4]byte{10, byte(rng.IntN(3)), 0, byte(rng.IntN(16))})
		}
		d := ruleset.Dest{Addr: a, Proto: ruleset.Proto(1 + rng.IntN(2)), Port: uint16(440 + rng.IntN(8))}
		if seen[d] {
			continue
		}
		seen[d] = true
		reason := "no-grant"
		if rng.IntN(10) == 0 {
			reason = "exe-not-pinned"
		}
		dests = append(dests, dest{d, reason})
	}
	recs := make([]audit.Record, 10000)
	for i := range recs {
		x := dests[rng.IntN(len(dests))]
		dst := x.d.String()
		if x.d.Addr.Is4() && rng.IntN(5) == 0 {
			dst = ruleset.Dest{Addr: netip.AddrFrom16(x.d.Addr.As16()), Proto: x.d.Proto, Port: x.d.Port}.String()
		}
		recs[i] = audit.Record{Time: t0.Add(time.Duration(i) * time.Second), Verdict: []string{VerdictDeny, VerdictWouldDeny}[rng.IntN(2)],
			Reason: x.reason, App: "web", Dest: dst}
	}
	learnedDest := map[ruleset.Dest]bool{}
	for _, x := range dests {
		if x.reason == "no-grant" {
			learnedDest[x.d] = true
		}
	}
	before := validate(t, nil)
	for _, widen := range []bool{false, true} {
		res := Learn(recs, Options{App: "web", Widen: widen})
		rs := validate(t, res.Fragment())
		wide := false
		for _, g := range res.Grants {
			wide = wide || g.Prefix.Bits() < g.Prefix.Addr().BitLen()
		}
		if wide != widen {
			t.Errorf("widen=%v: a grant wider than one address: %v", widen, wide)
		}
		for d := range learnedDest {
			if !rs.Decide("web", d).Allow {
				t.Errorf("widen=%v: learned %s denied", widen, d)
			}
		}
		if widen {
			continue
		}
		for range 1000 {
			var a netip.Addr
			if rng.IntN(4) == 0 {
				a = netip.AddrFrom16([16]byte{0xfd, 0, 0, 0, 0, 0, 0, 1, 15: byte(rng.IntN(16))})
			} else {
				a = netip.AddrFrom4([4]byte{10, byte(rng.IntN(4)), 0, byte(rng.IntN(32))})
			}
			d := ruleset.Dest{Addr: a, Proto: ruleset.Proto(1 + rng.IntN(2)), Port: uint16(436 + rng.IntN(16))}
			if learnedDest[d] || before.Decide("web", d).Allow {
				continue
			}
			if dec := rs.Decide("web", d); dec.Allow {
				t.Errorf("%s allowed, not in the log: %v", d, dec)
			}
		}
	}
}
