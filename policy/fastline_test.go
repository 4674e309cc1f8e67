package policy

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// fastAndYAML reads list, the lines of a list below a key, with fastChunk
// and with yaml.v3. fast is nil when fastChunk declined the list (or the
// lines make no run), want nil when yaml.v3 refused the text.
func fastAndYAML(t *testing.T, list string) (fast, want []*yaml.Node) {
	t.Helper()
	data := []byte("k:\n" + list)
	min := streamMin
	streamMin = 1
	defer func() { streamMin = min }()
	_, runs := splitRuns(data)
	if len(runs) != 1 || runs[0].keyLine != 1 {
		return nil, nil
	}
	r := &runs[0]
	if len(bytes.TrimSpace(data[r.start+len(r.data):])) > 0 {
		return nil, nil // the list goes on past the run (skeleton and graft decide)
	}
	r.line = 2
	fast, ok := r.fastChunk(0, len(r.items))
	if !ok {
		fast = nil
	}
	docs, err := decode(data)
	if err != nil || len(docs) != 1 || len(docs[0].Content) != 1 {
		return fast, nil
	}
	m := docs[0].Content[0]
	if m.Kind != yaml.MappingNode || len(m.Content) != 2 || m.Content[1].Kind != yaml.SequenceNode {
		return fast, nil
	}
	return fast, m.Content[1].Content
}

// sameNodes reports how a and b differ, in every field the parser could
// read; "" when they do not.
func sameNodes(a, b *yaml.Node) string {
	type fields struct {
		Kind                                               yaml.Kind
		Style                                              yaml.Style
		Tag, Value, Anchor, HeadComment, LineComment, Foot string
		Line, Column, Content                              int
		Alias                                              bool
	}
	of := func(n *yaml.Node) fields {
		return fields{n.Kind, n.Style, n.Tag, n.Value, n.Anchor, n.HeadComment, n.LineComment, n.FootComment, n.Line, n.Column, len(n.Content), n.Alias != nil}
	}
	if fa, fb := of(a), of(b); fa != fb {
		return fmt.Sprintf("%+v, yaml.v3 %+v", fa, fb)
	}
	for i := range a.Content {
		if d := sameNodes(a.Content[i], b.Content[i]); d != "" {
			return d
		}
	}
	return ""
}

func checkFast(t *testing.T, list string) bool {
	t.Helper()
	fast, want := fastAndYAML(t, list)
	if fast == nil {
		return false
	}
	if want == nil {
		t.Fatalf("%q: read without yaml.v3, which refuses it", list)
	}
	if len(fast) != len(want) {
		t.Fatalf("%q: %d items, yaml.v3 %d", list, len(fast), len(want))
	}
	for i := range fast {
		if d := sameNodes(fast[i], want[i]); d != "" {
			t.Fatalf("%q: item %d: %s", list, i, d)
		}
	}
	return true
}

var fastSeeds = []string{
	"10.0.0.0/29", "{to: 10.0.0.0/29, ports: [5432, 8000-8100]}", "{to: 10.1.0.0/16, proto: udp}",
	"{ to: fd00::/8 , ports: [ 1,2-3 ] }", "2001:db8::1", "::1", "{to: ::1}", "10.1.2.3", "{}", "{to: []}",
	"true", "yes", "Null", "0x10", "0o17", "017", "1e5", "1.5", "2024-01-02", "2024-1", "1_000", "+1", "-1", ".inf",
	"{a: b,c: d}", "{a: b,}", "{a: [b,]}", "a b", "a: b", "a:b", "{to: a:b}", "{to: a:}", "x # c", "'q'", "&a x", "*a",
	"!!str 5", "{to: 10.0.0.0/8, to: 10.1.0.0/16}", "99999999999999999999", "0", "00", "8000-", "-8000", "1-2-3",
	"{k_1: v}", "{_k: v}", "{ports: [1, {a: b}]}", "[1, 2]", "db.corp.example", "10.0.0.0/8\t", "{to:x}",
}

func TestFastItems(t *testing.T) {
	fast := 0
	for _, s := range fastSeeds {
		for _, list := range []string{"  - " + s + "\n  - " + s + "\n", "- " + s + "\n\n-   " + s} {
			if checkFast(t, list) {
				fast++
			}
		}
	}
	// The forms a large policy is made of must be read here.
	for _, s := range []string{"10.0.0.0/29", "{to: 10.0.0.0/29, ports: [5432, 8000-8100]}", "{to: 10.1.0.0/16, proto: udp}", "2001:db8::1", "{to: fd00::/8}"} {
		if !checkFast(t, "  - "+s+"\n") {
			t.Errorf("%q was left to yaml.v3", s)
		}
	}
	if fast == 0 {
		t.Error("no list was read without yaml.v3: the comparison checked nothing")
	}
}

func FuzzFastItems(f *testing.F) {
	for _, s := range fastSeeds {
		f.Add(s, s)
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		if strings.ContainsAny(a+b, "\n\r") {
			return // one line each
		}
		checkFast(t, "  - "+a+"\n  - "+b+"\n")
	})
}
