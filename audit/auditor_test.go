package audit

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/cilium/ebpf/ringbuf"
)

// fakeSource yields queued samples (or errors), then blocks until Close, or
// reports ringbuf.ErrClosed at once when ended.
type fakeSource struct {
	items  chan fakeItem
	closed chan struct{}
	once   sync.Once
	closes int
	mu     sync.Mutex
}

type fakeItem struct {
	raw []byte
	err error
}

// newFakeSource queues items; with end, the source reports closed after them.
func newFakeSource(end bool, items ...fakeItem) *fakeSource {
	s := &fakeSource{items: make(chan fakeItem, len(items)), closed: make(chan struct{})}
	for _, it := range items {
		s.items <- it
	}
	if end {
		close(s.items)
	}
	return s
}

func (s *fakeSource) Read() (ringbuf.Record, error) {
	select {
	case it, ok := <-s.items:
		if !ok {
			return ringbuf.Record{}, ringbuf.ErrClosed
		}
		return ringbuf.Record{RawSample: it.raw}, it.err
	case <-s.closed:
		return ringbuf.Record{}, ringbuf.ErrClosed
	}
}

func (s *fakeSource) Close() error {
	s.mu.Lock()
	s.closes++
	s.mu.Unlock()
	s.once.Do(func() { close(s.closed) })
	return nil
}

func (s *fakeSource) closeCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closes
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func samples(t *testing.T, n int) []fakeItem {
	items := make([]fakeItem, n)
	for i := range items {
		e := denyV4()
		e.Generation = uint32(i)
		items[i] = fakeItem{raw: e.encode(t)}
	}
	return items
}

func drain(ch <-chan Record) []Record {
	var out []Record
	for r := range ch {
		out = append(out, r)
	}
	return out
}

func generations(recs []Record) []uint32 {
	out := make([]uint32, len(recs))
	for i, r := range recs {
		out[i] = r.Generation
	}
	return out
}

func TestRun(t *testing.T) {
	good := samples(t, 3)
	garbage := fakeItem{raw: []byte("not an audit event")}
	badFamily := denyV4()
	badFamily.Family = 9
	tests := []struct {
		name      string
		items     []fakeItem
		wantGens  []uint32
		wantStats Stats
		wantErr   bool
	}{{
		name:      "events and garbage",
		items:     []fakeItem{good[0], garbage, good[1], {raw: badFamily.encode(t)}, good[2]},
		wantGens:  []uint32{0, 1, 2},
		wantStats: Stats{Events: 3, DecodeErrors: 2},
	}, {
		name:      "flushes and deadlines are not an end",
		items:     []fakeItem{good[0], {err: ringbuf.ErrFlushed}, {err: os.ErrDeadlineExceeded}, good[1]},
		wantGens:  []uint32{0, 1},
		wantStats: Stats{Events: 2},
	}, {
		name:      "a failing source ends Run with its error",
		items:     []fakeItem{good[0], {err: errors.New("epoll broke")}, good[1]},
		wantGens:  []uint32{0},
		wantStats: Stats{Events: 1},
		wantErr:   true,
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logPath := filepath.Join(t.TempDir(), "audit.jsonl")
			src := newFakeSource(true, tt.items...)
			a, err := New(src, Options{LogPath: logPath, Annotate: testAnnotate, Log: quietLog()})
			if err != nil {
				t.Fatal(err)
			}
			live, cancel := a.Subscribe(len(tt.items))
			defer cancel()
			err = a.Run(context.Background())
			if (err != nil) != tt.wantErr {
				t.Fatalf("Run: %v, want error %v", err, tt.wantErr)
			}
			if src.closeCount() == 0 {
				t.Error("Run did not close the source")
			}
			if got := generations(drain(live)); !slices.Equal(got, tt.wantGens) {
				t.Errorf("subscriber got generations %v, want %v", got, tt.wantGens)
			}
			logged, err := ReadLog(logPath, 0)
			if err != nil {
				t.Fatal(err)
			}
			if got := generations(logged); !slices.Equal(got, tt.wantGens) {
				t.Errorf("log holds generations %v, want %v", got, tt.wantGens)
			}
			for _, r := range logged {
				if r.Verdict != "deny" || r.Dest != "10.1.2.3:5432/tcp" || r.Rule != "internal 10.0.0.0/8" {
					t.Errorf("logged record %+v is not the event sent", r)
				}
			}
			if got := a.Stats(); got != tt.wantStats {
				t.Errorf("Stats() = %+v, want %+v", got, tt.wantStats)
			}
			st, err := os.Stat(logPath)
			if err != nil {
				t.Fatal(err)
			}
			if perm := st.Mode().Perm(); perm != 0o600 {
				t.Errorf("log mode %v, want 0600", perm)
			}
		})
	}
}

func TestRunStopsWithContext(t *testing.T) {
	src := newFakeSource(false, samples(t, 2)...)
	a, err := New(src, Options{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	live, cancel := a.Subscribe(4)
	defer cancel()
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- a.Run(ctx) }()
	// Both records arriving shows Run is past them and blocked in Read.
	<-live
	<-live
	stop()
	if err := <-done; err != nil {
		t.Errorf("Run after cancel: %v", err)
	}
	if _, open := <-live; open {
		t.Error("subscription still open after Run returned")
	}
	if err := a.Run(context.Background()); err == nil {
		t.Error("second Run did not fail")
	}
}

func TestSubscribe(t *testing.T) {
	const n = 10
	src := newFakeSource(true, samples(t, n)...)
	a, err := New(src, Options{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	slow, cancelSlow := a.Subscribe(1)
	defer cancelSlow()
	fast, cancelFast := a.Subscribe(n)
	defer cancelFast()
	gone, cancelGone := a.Subscribe(n)
	cancelGone()
	cancelGone() // twice is harmless

	// Nobody reads slow while Run goes: were the reader held up by it, Run
	// would never return.
	if err := a.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := len(drain(fast)); got != n {
		t.Errorf("fast subscriber got %d records, want %d", got, n)
	}
	if got := len(drain(slow)); got != 1 {
		t.Errorf("slow subscriber got %d records, want 1", got)
	}
	if got := len(drain(gone)); got != 0 {
		t.Errorf("cancelled subscriber got %d records", got)
	}
	if got := a.Stats().Dropped; got != n-1 {
		t.Errorf("Stats().Dropped = %d, want %d", got, n-1)
	}
	late, cancelLate := a.Subscribe(1)
	defer cancelLate()
	if _, open := <-late; open {
		t.Error("subscription after Run returned is open")
	}
}

func TestNew(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		src  Source
		opts Options
	}{
		{name: "no source", opts: Options{}},
		{name: "log directory missing", src: newFakeSource(true), opts: Options{LogPath: filepath.Join(dir, "none", "audit.jsonl")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := New(tt.src, tt.opts); err == nil {
				t.Error("no error")
			}
		})
	}
}

// TestLogRotation writes records through Run into a log that holds about
// three of them, so it rotates several times.
func TestLogRotation(t *testing.T) {
	const n = 10
	items := samples(t, n)
	line := recordLine(t, items[0].raw)
	logPath := filepath.Join(t.TempDir(), "audit.jsonl")
	src := newFakeSource(true, items...)
	a, err := New(src, Options{LogPath: logPath, MaxBytes: int64(3*len(line) + 1), Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	// Every line then has the same length: same time, one-digit generation.
	a.clock = *fixedClock()
	if err := a.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	// 10 records, 3 a file: [0 1 2] [3 4 5] [6 7 8] [9]; .1 holds the third.
	for _, f := range []struct {
		path string
		gens []uint32
	}{{logPath, []uint32{9}}, {logPath + ".1", []uint32{6, 7, 8}}} {
		b, err := os.ReadFile(f.path)
		if err != nil {
			t.Fatal(err)
		}
		if lines := strings.Count(string(b), "\n"); lines != len(f.gens) {
			t.Errorf("%s has %d lines, want %d", f.path, lines, len(f.gens))
		}
		recs, err := tailRecords(f.path, 0)
		if err != nil {
			t.Fatal(err)
		}
		got := generations(recs)
		slices.Reverse(got)
		if !slices.Equal(got, f.gens) {
			t.Errorf("%s holds generations %v, want %v", f.path, got, f.gens)
		}
	}
	if got := a.Stats().LogWriteErrors; got != 0 {
		t.Errorf("%d log write errors", got)
	}
}

// recordLine is the log line the sample raw becomes under fixedClock.
func recordLine(t *testing.T, raw []byte) []byte {
	r, err := recordOf(raw, fixedClock(), nil)
	if err != nil {
		t.Fatal(err)
	}
	line, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return append(line, '\n')
}

func TestAppendPinholeRecords(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "audit.jsonl")
	src := newFakeSource(false, samples(t, 1)...)
	a, err := New(src, Options{LogPath: logPath, Annotate: testAnnotate, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	live, cancel := a.Subscribe(4)
	defer cancel()
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	rec := Record{Verdict: "open", App: "ftp", PID: 7, Dest: "198.51.100.10 -> 10.9.0.5:40000/tcp", Hook: "pinhole", Kind: KindPinhole,
		Pinhole: &Pinhole{Proto: "tcp", Peer: "198.51.100.10", Host: "10.9.0.5", Port: 40000, User: "alice"}}
	a.Append(rec)
	var got []Record
	for len(got) < 2 {
		got = append(got, <-live)
	}
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	a.Append(rec) // after Run: dropped, not a crash
	data, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	if len(lines) != 2 {
		t.Fatalf("log has %d lines, want the kernel event and the pinhole record:\n%s", len(lines), data)
	}
	var back Record
	for _, l := range lines {
		if strings.Contains(l, `"kind":"pinhole"`) {
			if err := json.Unmarshal([]byte(l), &back); err != nil {
				t.Fatal(err)
			}
		} else if strings.Contains(l, `"kind"`) || strings.Contains(l, `"pinhole"`) {
			t.Errorf("a kernel record carries pinhole fields: %s", l)
		}
	}
	if back.Pinhole == nil || *back.Pinhole != *rec.Pinhole || back.Verdict != "open" || back.Time.IsZero() {
		t.Errorf("pinhole record read back as %+v", back)
	}
	if !strings.Contains(back.Text(), "open  app=ftp") {
		t.Errorf("text %q", back.Text())
	}
}
