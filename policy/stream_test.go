package policy

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// streamAll reads every list of two or more items in chunks of two, for the
// length of a test.
func streamAll(t testing.TB) {
	min, chunk := streamMin, streamChunk
	streamMin, streamChunk = 2, 2
	t.Cleanup(func() { streamMin, streamChunk = min, chunk })
}

// sameAsWhole parses data in chunks and whole, and fails unless both give
// the same ruleset, warnings and errors. It reports whether lists were read
// in chunks (false: the streamed parse fell back to the whole file).
func sameAsWhole(t testing.TB, data []byte) bool {
	t.Helper()
	files := []File{{Path: "p.yaml", Data: data}}
	wantRS, wantWarns, _, wantErr := parseFilesWith(files, false, false)
	gotRS, gotWarns, p, gotErr := parseFilesWith(files, false, true)
	if p.reparse {
		return false
	}
	if !reflect.DeepEqual(gotRS, wantRS) || !reflect.DeepEqual(gotWarns, wantWarns) || fmt.Sprint(gotErr) != fmt.Sprint(wantErr) {
		t.Fatalf("chunked parse differs from the whole:\n%s\nchunked: %+v\n%v\n%v\nwhole: %+v\n%v\n%v",
			data, gotRS, gotWarns, gotErr, wantRS, wantWarns, wantErr)
	}
	return len(p.lazy) > 0
}

func TestStreamMatchesWhole(t *testing.T) {
	streamAll(t)
	streamed := 0
	for _, data := range testdataPolicies(t) {
		if sameAsWhole(t, data) {
			streamed++
		}
	}
	for _, tc := range []struct {
		name   string
		policy string
		// stream: the lists must be read in chunks (else the whole file
		// is read again).
		stream bool
	}{
		{"one-line items", "version: 1\ninternal:\n  prefixes:\n    - 10.0.0.0/8\n    - 10.0.0.0/8\n    - 192.168.0.0/16\n\n    # a comment\n    - 300.1.1.1\napps:\n  - name: a\n    allow:\n    - {to: 10.1.0.0/16, ports: [1, 2-3]}\n    - {to: 10.2.0.0/16, ports: [99999]}\n    - {to: 8.8.8.8, proto: udp}\n", true},
		{"errors in chunks", "version: 1\ninternal:\n  prefixes:\n    - 10.0.0.0/8\n    - [1]\n    - 10.0.0.1/8\n    - null\n    - {a: b}\napps: []\n", true},
		{"multi-line items stay whole", "version: 1\ninternal:\n  prefixes:\n    - 10.0.0.0/8\n    - 10.1.0.0/16\napps:\n  - name: a\n    allow:\n      - to: 10.1.0.0/16\n        ports: [1]\n      - to: 10.2.0.0/16\n", true},
		{"anchor and alias across", "version: 1\ninternal:\n  prefixes:\n    - &p 10.0.0.0/8\n    - 10.1.0.0/16\napps:\n  - name: a\n    allow:\n      - {to: *p}\n      - {to: 10.1.0.0/16}\n", false},
		{"quoted scalar past the list", "version: 1\ninternal:\n  prefixes:\n    - 10.0.0.0/8\n    - \"10.1.0.0/16\n  \"\napps: []\n", false},
		{"list in a block scalar", "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: |\n      allow:\n      - a\n      - b\n", false},
		{"compact list", "version: 1\ninternal:\n  prefixes:\n  - 10.0.0.0/8\n  - 10.1.0.0/16\napps: []\n", true},
		{"second document", "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\n---\nlist:\n  - a\n  - b\n", false},
		{"not a list where one is wanted", "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\naudit:\n  - a\n  - b\napps: []\n", true},
		{"broken list under an unknown key", "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\nbogus:\n  - \"\n  - a\napps: []\n", false},
		// A line at the list's column that is no item is no YAML; left in
		// the skeleton, a lone tag or anchor would hang on the key as its
		// null value (found by FuzzStreamMatchesWhole).
		{"tag alone after the list", "version: 1\ninternal:\n  prefixes:\n    - 10.0.0.0/8\n    - 10.1.0.0/16\n    !\napps: []\n", false},
		{"anchor alone after the list", "version: 1\ninternal:\n  prefixes:\n    - 10.0.0.0/8\n    - 10.1.0.0/16\n    &a\napps: []\n", false},
		{"null tag between the list's column and its key's", "version: 1\ninternal:\n  prefixes:\n      - 10.0.0.0/8\n      - 10.1.0.0/16\n    !!null\napps: []\n", false},
		{"CRLF", "version: 1\r\ninternal:\r\n  prefixes:\r\n    - 10.0.0.0/8\r\n    - 10.1.0.0/16\r\napps: []\r\n", true},
		// yaml.v3 breaks lines at these too: the errors after them are a
		// line further down than LF alone counts.
		{"CR alone in a blank line", lineBreakPolicy(" \r \n"), false},
		{"NEL in a comment", lineBreakPolicy("    # a\u0085\n"), false},
		{"LS in a comment", lineBreakPolicy("    # a\u2028\n"), false},
		{"PS in a comment", lineBreakPolicy("    #\u2029\n"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := sameAsWhole(t, []byte(tc.policy)); got != tc.stream {
				t.Errorf("read in chunks: %v, want %v", got, tc.stream)
			}
		})
	}
	if streamed == 0 {
		t.Error("no file of testdata was read in chunks: the comparison checked nothing")
	}
}

// lineBreakPolicy is a policy with mistakes in and after a list, and
// between its first items the line sep.
func lineBreakPolicy(sep string) string {
	return "version: 1\ninternal:\n  prefixes:\n    - 10.0.0.0/8\n" + sep + "    - 10.1.0.0/16\n    - 10.2.0.0/16\n    - 300.1.1.1\n" +
		"apps:\n  - name: x\n    allow:\n      - {to: 10.1.0.0/16, ports: [99999]}\n      - {to: 10.1.0.0/16, ports: [1]}\n"
}

// TestStreamLongList: a list of many chunks keeps its items' order, lines
// and indexes, and a mistake deep in it is reported where it is.
func TestStreamLongList(t *testing.T) {
	var b strings.Builder
	b.WriteString("version: 1\ninternal:\n  prefixes:\n")
	const n = 3*streamChunkTest + 7
	for i := range n {
		if i == n-3 {
			b.WriteString("    - 10.0.0.1/8\n")
			continue
		}
		fmt.Fprintf(&b, "    - 10.%d.%d.0/24\n", i/256, i%256)
	}
	b.WriteString("apps: []\n")
	min, chunk := streamMin, streamChunk
	streamMin, streamChunk = 2, streamChunkTest
	defer func() { streamMin, streamChunk = min, chunk }()
	if !sameAsWhole(t, []byte(b.String())) {
		t.Fatal("the list was not read in chunks")
	}
	_, _, err := Parse("p.yaml", []byte(b.String()))
	want := fmt.Sprintf("p.yaml:%d:7: internal.prefixes[%d]: ", 4+n-3, n-3)
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Errorf("got %v, want an error starting %q", err, want)
	}
}

const streamChunkTest = 100

func FuzzStreamMatchesWhole(f *testing.F) {
	for _, data := range testdataPolicies(f) {
		f.Add(data)
	}
	streamAll(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		sameAsWhole(t, data)
	})
}
