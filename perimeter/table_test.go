package perimeter

import (
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/nstest"
)

var testProtect = []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16"), netip.MustParsePrefix("fd09::/64")}

// openTestTable opens the gateway table in a fresh namespace.
func openTestTable(t testing.TB, ns string) *Table {
	t.Helper()
	tab, err := OpenTable(TableConfig{NetNS: ns, Protect: testProtect})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tab.Close() })
	return tab
}

func key(s string) Key {
	// "tcp 198.51.100.7 10.9.0.5 40000"
	f := strings.Fields(s)
	k, err := Target{Proto: f[0], Peer: f[1], Host: f[2], Port: atoi(f[3])}.Key()
	if err != nil {
		panic(err)
	}
	return k
}

func atoi(s string) int {
	n := 0
	for _, c := range s {
		n = n*10 + int(c-'0')
	}
	return n
}

// elementsByKey lists the kernel's holes, failing t on error.
func elementsByKey(t testing.TB, tab *Table) map[Key]Element {
	t.Helper()
	els, err := tab.Elements()
	if err != nil {
		t.Fatal(err)
	}
	m := map[Key]Element{}
	for _, e := range els {
		m[e.Key] = e
	}
	return m
}

func sortedKeys(m map[Key]Element) []string {
	var out []string
	for k := range m {
		out = append(out, k.String())
	}
	slices.Sort(out)
	return out
}

func TestElementKeyRoundTrip(t *testing.T) {
	for _, s := range []string{
		"tcp 198.51.100.7 10.9.0.5 40000",
		"udp 2001:db8::7 fd09::5 1",
		"tcp 203.0.113.1 10.9.255.254 65535",
	} {
		k := key(s)
		got, ok := keyOf(elementKey(k))
		if !ok || got != k {
			t.Errorf("keyOf(elementKey(%v)) = %v, %v", k, got, ok)
		}
	}
	if _, ok := keyOf(make([]byte, 17)); ok {
		t.Error("keyOf accepted a 17-byte key")
	}
}

func TestTable(t *testing.T) {
	nstest.RequireRoot(t)
	ns := nstest.NetNS(t)
	tab := openTestTable(t, ns)
	a, b, c := key("tcp 198.51.100.7 10.9.0.5 40000"), key("udp 2001:db8::7 fd09::5 5004"), key("udp 198.51.100.8 10.9.0.6 9000")

	steps := []struct {
		name string
		do   func() error
		want []Key
	}{
		{"open two", func() error {
			return tab.Update([]Element{{Key: a, Timeout: time.Hour, Comment: comment("srv1", "alice")}, {Key: b, Timeout: time.Hour, Comment: comment("srv2", "bob")}}, nil)
		}, []Key{a, b}},
		{"renew keeps one element", func() error {
			return tab.Update([]Element{{Key: a, Timeout: 2 * time.Hour}}, nil)
		}, []Key{a, b}},
		{"close one, open one, one transaction", func() error {
			return tab.Update([]Element{{Key: c, Timeout: time.Hour}}, []Key{b})
		}, []Key{a, c}},
		{"close an absent hole as if the kernel expired it", func() error {
			return tab.Update(nil, []Key{b, c})
		}, []Key{a}},
		{"reconcile", func() error {
			added, deleted, err := tab.Reconcile([]Element{{Key: b, Timeout: time.Hour}, {Key: c, Timeout: time.Hour}})
			if err == nil && (added != 2 || deleted != 1) {
				t.Errorf("Reconcile added %d deleted %d, want 2 and 1", added, deleted)
			}
			return err
		}, []Key{b, c}},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		got := elementsByKey(t, tab)
		want := map[Key]Element{}
		for _, k := range s.want {
			want[k] = Element{}
		}
		if !slices.Equal(sortedKeys(got), sortedKeys(want)) {
			t.Fatalf("%s: kernel holds %v, want %v", s.name, sortedKeys(got), sortedKeys(want))
		}
		if s.name == "renew keeps one element" {
			e := got[a]
			if e.Timeout != 2*time.Hour || e.Expires <= time.Hour {
				t.Errorf("renewed hole: timeout %v expires %v, want 2h and more than 1h left", e.Timeout, e.Expires)
			}
			if d, u, ok := parseComment(e.Comment); !ok || d != "srv1" || u != "alice" {
				t.Errorf("renewed hole lost its comment: %q", e.Comment)
			}
		}
	}
	if err := tab.Update([]Element{{Key: a}}, nil); err == nil {
		t.Error("Update accepted a hole without a lease")
	}
}

func TestTableElementExpires(t *testing.T) {
	nstest.RequireRoot(t)
	tab := openTestTable(t, nstest.NetNS(t))
	k := key("tcp 198.51.100.7 10.9.0.5 40000")
	if err := tab.Update([]Element{{Key: k, Timeout: 300 * time.Millisecond}}, nil); err != nil {
		t.Fatal(err)
	}
	// Waiting for the kernel to act is not a timing assertion: the
	// deadline only bounds a hang.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if len(elementsByKey(t, tab)) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the kernel kept a hole past its timeout")
		}
	}
}

// TestTableReopen is a gateway restart: the holes survive, the forward
// chain is rewritten for the new protected ranges.
func TestTableReopen(t *testing.T) {
	nstest.RequireRoot(t)
	ns := nstest.NetNS(t)
	tab := openTestTable(t, ns)
	k := key("tcp 198.51.100.7 10.9.0.5 40000")
	if err := tab.Update([]Element{{Key: k, Timeout: time.Hour, Comment: comment("srv1", "alice")}}, nil); err != nil {
		t.Fatal(err)
	}
	tab.Close()
	again, err := OpenTable(TableConfig{NetNS: ns, Protect: []netip.Prefix{netip.MustParsePrefix("10.8.0.0/16")}})
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if got := elementsByKey(t, again); len(got) != 1 || got[k].Comment != comment("srv1", "alice") {
		t.Fatalf("after reopening: %v", got)
	}
	out, err := exec.Command("nsenter", "--net="+ns, nstest.Program(t, "nft"), "list", "chain", "inet", DefaultTableName, chainName).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list chain: %v\n%s", err, out)
	}
	for _, want := range []string{
		"ip saddr . meta l4proto . ip daddr . th dport @holes4 accept",
		"ip6 saddr . meta l4proto . ip6 daddr . th dport @holes6 accept",
		"ct state established,related accept",
		"ip daddr 10.8.0.0/16 counter packets 0 bytes 0 drop",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("chain lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(string(out), "10.9.0.0/16") {
		t.Errorf("chain still protects the old range:\n%s", out)
	}
	if err := again.Remove(); err != nil {
		t.Fatal(err)
	}
}
