package audit

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// logLines renders records with generations from..to-1 as log lines. The
// long rule makes a few hundred of them span several tailChunk reads.
func logLines(t *testing.T, from, to int) string {
	var b strings.Builder
	for g := from; g < to; g++ {
		line, err := json.Marshal(Record{
			Time: time.Unix(int64(g), 0).UTC(), Verdict: "deny", Reason: "no-grant", App: "web",
			Comm: "curl", Dest: "10.1.2.3:5432/tcp", Hook: "connect4", Generation: uint32(g),
			Rule: strings.Repeat("r", 200),
		})
		if err != nil {
			t.Fatal(err)
		}
		b.Write(line)
		b.WriteByte('\n')
	}
	return b.String()
}

func span(from, to int) []uint32 {
	out := []uint32{}
	for g := from; g < to; g++ {
		out = append(out, uint32(g))
	}
	return out
}

// absent stands for "no such file" in the tables below.
const absent = "\x00absent"

func TestReadLog(t *testing.T) {
	tests := []struct {
		name          string
		current, prev string // file contents; absent: no file
		n             int
		want          []uint32
		wantNotExist  bool
	}{
		{name: "tail within current", current: logLines(t, 100, 600), prev: logLines(t, 0, 100), n: 10, want: span(590, 600)},
		{name: "tail into the rotated file", current: logLines(t, 100, 600), prev: logLines(t, 0, 100), n: 510, want: span(90, 600)},
		{name: "all", current: logLines(t, 100, 600), prev: logLines(t, 0, 100), n: 0, want: span(0, 600)},
		{name: "more than there is", current: logLines(t, 100, 600), prev: logLines(t, 0, 100), n: 10000, want: span(0, 600)},
		{name: "exactly the current file", current: logLines(t, 100, 600), prev: logLines(t, 0, 100), n: 500, want: span(100, 600)},
		{name: "no rotated file", current: logLines(t, 0, 5), prev: absent, n: 0, want: span(0, 5)},
		{name: "only the rotated file", current: absent, prev: logLines(t, 0, 5), n: 2, want: span(3, 5)},
		{name: "empty log", current: "", prev: absent, n: 5, want: span(0, 0)},
		{name: "torn last line skipped", current: logLines(t, 0, 3) + `{"time":"2026`, prev: absent, n: 0, want: span(0, 3)},
		{name: "torn last line longer than a read", current: logLines(t, 0, 3) + strings.Repeat("x", 3*tailChunk), prev: absent, n: 2, want: span(1, 3)},
		{name: "torn line alone", current: `{"time":"2026`, prev: absent, n: 0, want: span(0, 0)},
		{
			name:    "blank and broken lines skipped",
			current: logLines(t, 0, 1) + "\n{broken\n" + logLines(t, 1, 2) + "\n",
			prev:    absent, n: 0, want: span(0, 2),
		},
		{name: "no log at all", current: absent, prev: absent, wantNotExist: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "audit.jsonl")
			for p, content := range map[string]string{path: tt.current, path + ".1": tt.prev} {
				if content == absent {
					continue
				}
				if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			recs, err := ReadLog(path, tt.n)
			if tt.wantNotExist {
				if !errors.Is(err, fs.ErrNotExist) {
					t.Fatalf("ReadLog: %v, want fs.ErrNotExist", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := generations(recs); !slices.Equal(got, tt.want) {
				t.Errorf("got generations %v, want %v", got, tt.want)
			}
		})
	}
}

func TestLogFile(t *testing.T) {
	line := []byte(logLines(t, 7, 8))
	tests := []struct {
		name        string
		before      string // current file before opening; absent: none
		max         int64
		writes      int
		removeAfter int // remove the current file after this many writes (0: never)
		wantCurrent string
		wantPrev    string
	}{
		{name: "new log", before: absent, max: 1 << 20, writes: 2, wantCurrent: strings.Repeat(string(line), 2), wantPrev: absent},
		{name: "torn line is ended", before: "{torn", max: 1 << 20, writes: 1, wantCurrent: "{torn\n" + string(line), wantPrev: absent},
		{name: "rotates past max", before: absent, max: int64(2 * len(line)), writes: 3, wantCurrent: string(line), wantPrev: strings.Repeat(string(line), 2)},
		{name: "line over max still written", before: absent, max: 10, writes: 2, wantCurrent: string(line), wantPrev: string(line)},
		{
			name: "log removed under us", before: absent, max: int64(2 * len(line)), writes: 3, removeAfter: 2,
			wantCurrent: string(line), wantPrev: absent,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "audit.jsonl")
			if tt.before != absent {
				if err := os.WriteFile(path, []byte(tt.before), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			l, err := openLog(path, tt.max)
			if err != nil {
				t.Fatal(err)
			}
			for i := range tt.writes {
				if err := l.write(line); err != nil {
					t.Fatalf("write %d: %v", i, err)
				}
				if i+1 == tt.removeAfter {
					if err := os.Remove(path); err != nil {
						t.Fatal(err)
					}
				}
			}
			if err := l.close(); err != nil {
				t.Fatal(err)
			}
			for p, want := range map[string]string{path: tt.wantCurrent, path + ".1": tt.wantPrev} {
				got, err := os.ReadFile(p)
				if want == absent {
					if !errors.Is(err, fs.ErrNotExist) {
						t.Errorf("%s: %v, want no file", p, err)
					}
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				if string(got) != want {
					t.Errorf("%s holds\n%q\nwant\n%q", p, got, want)
				}
			}
		})
	}
}
