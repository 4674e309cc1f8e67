package audit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf/ringbuf"
)

// Source yields raw audit events; *ringbuf.Reader is one.
type Source interface {
	Read() (ringbuf.Record, error)
	Close() error
}

var _ Source = (*ringbuf.Reader)(nil)

// Options configure an Auditor.
type Options struct {
	// LogPath is the JSON-lines log, appended to and created 0600; empty
	// means no log. Its directory must exist.
	LogPath string
	// MaxBytes is the size past which LogPath is rotated to LogPath+".1";
	// <= 0 means DefaultMaxBytes.
	MaxBytes int64
	// Journal, when set, is journald's native socket
	// (DefaultJournalSocket): each record is sent there too, with
	// structured fields (journalEntry). Empty means none.
	Journal string
	// Annotate names the app and rule of each event; nil leaves them empty.
	Annotate Annotator
	// Log receives the auditor's own problems; nil means slog.Default().
	Log *slog.Logger
}

// Stats count what an Auditor did since New.
type Stats struct {
	Events         uint64 // records decoded from the source
	DecodeErrors   uint64 // records from the source that did not decode
	Dropped        uint64 // records a slow subscriber did not get
	LogWriteErrors uint64 // records not (or not cleanly) written to the log or journald
}

// defaultSubscriberBuffer is used for Subscribe(buf) with buf <= 0: an
// unbuffered subscriber would lose nearly everything.
const defaultSubscriberBuffer = 64

// warnEvery spaces out repeated warnings: a full disk or a stream of garbage
// would otherwise log once per event.
const warnEvery = 10 * time.Second

// Auditor reads audit events from a Source, logs them and fans them out to
// subscribers.
type Auditor struct {
	src      Source
	annotate Annotator
	log      *slog.Logger
	// fileMu guards file and journal (nil without Options.LogPath and
	// Options.Journal, and after Run) and writeWarn: Append writes from
	// other goroutines than Run's.
	fileMu  sync.Mutex
	file    *logFile
	journal *journal
	clock   wallClock

	running   atomic.Bool
	closeOnce sync.Once
	closeErr  error

	events, decodeErrors, dropped, logWriteErrors atomic.Uint64

	decodeWarn, writeWarn throttle

	mu   sync.Mutex
	subs map[chan Record]struct{}
	done bool // Run has returned: subscriptions end at once
}

// New prepares an Auditor; it opens the log so that a bad path fails early.
// Run takes over src and the log and closes both when it returns.
func New(src Source, opts Options) (*Auditor, error) {
	if src == nil {
		return nil, errors.New("audit: no event source")
	}
	a := &Auditor{
		src:      src,
		annotate: opts.Annotate,
		log:      opts.Log,
		subs:     map[chan Record]struct{}{},
	}
	if a.log == nil {
		a.log = slog.Default()
	}
	if err := a.clock.refresh(); err != nil {
		return nil, err
	}
	if opts.LogPath != "" {
		max := opts.MaxBytes
		if max <= 0 {
			max = DefaultMaxBytes
		}
		f, err := openLog(opts.LogPath, max)
		if err != nil {
			return nil, err
		}
		a.file = f
	}
	if opts.Journal != "" {
		j, err := openJournal(opts.Journal)
		if err != nil {
			if a.file != nil {
				a.file.close()
			}
			return nil, err
		}
		a.journal = j
	}
	return a, nil
}

// Run reads events until ctx is done or the source is closed, then closes
// the source, the log and every subscription. It returns nil then, and an
// error only when the source fails otherwise. Events that do not decode are
// counted and logged, never fatal. Run may be called once.
func (a *Auditor) Run(ctx context.Context) (err error) {
	if !a.running.CompareAndSwap(false, true) {
		return errors.New("audit: Run called twice")
	}
	// Closing is the only way to interrupt a blocked Read.
	stop := context.AfterFunc(ctx, func() { _ = a.closeSource() })
	defer func() {
		stop()
		err = errors.Join(err, a.finish())
	}()
	for {
		rec, err := a.src.Read()
		switch {
		case err == nil:
			a.handle(rec.RawSample)
		case errors.Is(err, ringbuf.ErrClosed):
			return nil
		case errors.Is(err, ringbuf.ErrFlushed), errors.Is(err, os.ErrDeadlineExceeded):
			// Someone flushed the reader or set a deadline: not an end.
		default:
			return fmt.Errorf("read audit events: %w", err)
		}
	}
}

func (a *Auditor) handle(raw []byte) {
	r, err := recordOf(raw, &a.clock, a.annotate)
	if err != nil {
		n := a.decodeErrors.Add(1)
		if suppressed, ok := a.decodeWarn.allow(); ok {
			a.log.Warn("audit event dropped", "err", err, "bytes", len(raw),
				"decode_errors", n, "suppressed", suppressed)
		}
		return
	}
	a.events.Add(1)
	a.store(r)
}

// Append logs and publishes a record that does not come from the kernel's
// ring buffer, such as a pinhole opened, closed or refused (Kind
// "pinhole"). It may be called from any goroutine; after Run returned it
// does nothing.
func (a *Auditor) Append(r Record) {
	if r.Time.IsZero() {
		r.Time = time.Now().UTC()
	}
	a.store(r)
}

func (a *Auditor) store(r Record) {
	a.fileMu.Lock()
	if a.file != nil || a.journal != nil {
		a.write(r)
	}
	a.fileMu.Unlock()
	a.publish(r)
}

// write sends r to the log file and journald, encoded once for both.
// a.fileMu held.
func (a *Auditor) write(r Record) {
	line, err := json.Marshal(r)
	if err != nil {
		a.written(fmt.Errorf("encode audit record: %w", err))
		return
	}
	if a.file != nil {
		// The newline goes past line's length: the journal's line is
		// as encoded.
		a.written(a.file.write(append(line, '\n')))
	}
	if a.journal != nil {
		a.written(a.journal.write(r, line))
	}
}

// written counts and (throttled) logs a failed write. a.fileMu held.
func (a *Auditor) written(err error) {
	if err == nil {
		return
	}
	n := a.logWriteErrors.Add(1)
	if suppressed, ok := a.writeWarn.allow(); ok {
		a.log.Error("audit log write failed", "err", err,
			"log_write_errors", n, "suppressed", suppressed)
	}
}

func (a *Auditor) publish(r Record) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for ch := range a.subs {
		select {
		case ch <- r:
		default:
			a.dropped.Add(1)
		}
	}
}

func (a *Auditor) closeSource() error {
	a.closeOnce.Do(func() {
		if err := a.src.Close(); err != nil {
			a.closeErr = fmt.Errorf("close audit event source: %w", err)
		}
	})
	return a.closeErr
}

func (a *Auditor) finish() error {
	err := a.closeSource()
	a.fileMu.Lock()
	if a.file != nil {
		err = errors.Join(err, a.file.close())
		a.file = nil
	}
	if a.journal != nil {
		err = errors.Join(err, a.journal.close())
		a.journal = nil
	}
	a.fileMu.Unlock()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.done = true
	for ch := range a.subs {
		close(ch)
	}
	clear(a.subs)
	return err
}

// Subscribe returns a channel of live records, buffered for buf of them
// (<= 0: a default), and a function that ends the subscription. A
// subscriber that falls behind loses records (counted in Stats.Dropped)
// rather than holding up the reader. The channel is closed when the
// subscription ends or Run returns.
func (a *Auditor) Subscribe(buf int) (<-chan Record, func()) {
	if buf <= 0 {
		buf = defaultSubscriberBuffer
	}
	ch := make(chan Record, buf)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.done {
		close(ch)
		return ch, func() {}
	}
	a.subs[ch] = struct{}{}
	return ch, func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		if _, ok := a.subs[ch]; ok {
			delete(a.subs, ch)
			close(ch)
		}
	}
}

// Stats returns the counts so far.
func (a *Auditor) Stats() Stats {
	return Stats{
		Events:         a.events.Load(),
		DecodeErrors:   a.decodeErrors.Load(),
		Dropped:        a.dropped.Load(),
		LogWriteErrors: a.logWriteErrors.Load(),
	}
}

// throttle lets a warning through at most once per warnEvery and counts
// the ones it held back. Only the Run goroutine uses it.
type throttle struct {
	last       time.Time
	suppressed int
}

func (t *throttle) allow() (suppressed int, ok bool) {
	now := time.Now()
	if !t.last.IsZero() && now.Sub(t.last) < warnEvery {
		t.suppressed++
		return 0, false
	}
	suppressed, t.suppressed, t.last = t.suppressed, 0, now
	return suppressed, true
}
