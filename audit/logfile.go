package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
)

// DefaultMaxBytes is the log size past which it is rotated.
const DefaultMaxBytes = 64 << 20

// logFile is the JSON-lines audit log, rotated to path+".1" past max bytes.
// Only the Run goroutine writes it.
type logFile struct {
	path string
	max  int64
	f    *os.File
	size int64
}

func openLog(path string, max int64) (*logFile, error) {
	l := &logFile{path: path, max: max}
	if err := l.open(); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *logFile) open() error {
	// O_APPEND makes each line one write at the end, so a reader never sees
	// a line cut in the middle, except after a crash mid-write.
	f, err := os.OpenFile(l.path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open audit log: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("stat audit log: %w", err)
	}
	size := st.Size()
	if size > 0 {
		// A line torn by a crash must not swallow the next one: end it.
		var last [1]byte
		if _, err := f.ReadAt(last[:], size-1); err != nil {
			f.Close()
			return fmt.Errorf("read audit log %s: %w", l.path, err)
		}
		if last[0] != '\n' {
			if _, err := f.Write([]byte{'\n'}); err != nil {
				f.Close()
				return fmt.Errorf("write audit log %s: %w", l.path, err)
			}
			size++
		}
	}
	l.f, l.size = f, size
	return nil
}

// write appends line (which ends in '\n'). Should rotation fail, the line
// still goes to the current file, as losing it would be worse than an
// oversized log.
func (l *logFile) write(line []byte) error {
	var rotateErr error
	if l.size > 0 && l.size+int64(len(line)) > l.max {
		rotateErr = l.rotate()
	}
	n, err := l.f.Write(line)
	l.size += int64(n)
	if err != nil {
		err = fmt.Errorf("write audit log %s: %w", l.path, err)
	}
	return errors.Join(rotateErr, err)
}

func (l *logFile) rotate() error {
	// A missing path means an earlier reopen failed (or someone removed
	// the log): then there is nothing to rename, only a file to create.
	if err := os.Rename(l.path, l.path+".1"); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("rotate audit log: %w", err)
	}
	old := l.f
	if err := l.open(); err != nil {
		// Keep appending to the old file; the next write tries again.
		return err
	}
	if err := old.Close(); err != nil {
		return fmt.Errorf("close rotated audit log: %w", err)
	}
	return nil
}

func (l *logFile) close() error {
	if err := l.f.Close(); err != nil {
		return fmt.Errorf("close audit log: %w", err)
	}
	return nil
}

// tailChunk is how much of a log file ReadLog reads at a time, from the end.
const tailChunk = 64 << 10

// ReadLog returns the last n records of the audit log at path, continuing
// into path+".1" when path holds fewer, oldest first; n <= 0 means all.
// Lines that are not records (a line torn by a crash) are skipped. It fails
// with an error wrapping fs.ErrNotExist when neither file exists.
func ReadLog(path string, n int) ([]Record, error) {
	var newestFirst []Record
	found := false
	for _, p := range []string{path, path + ".1"} {
		want := 0
		if n > 0 {
			want = n - len(newestFirst)
			if want == 0 {
				break
			}
		}
		recs, err := tailRecords(p, want)
		if errors.Is(err, fs.ErrNotExist) {
			// Between rotating and reopening, only path+".1" exists.
			continue
		}
		if err != nil {
			return nil, err
		}
		found = true
		newestFirst = append(newestFirst, recs...)
	}
	if !found {
		return nil, fmt.Errorf("read audit log %s: %w", path, fs.ErrNotExist)
	}
	slices.Reverse(newestFirst)
	return newestFirst, nil
}

// tailRecords reads the last want records of one file (all for want <= 0),
// newest first, reading backwards so that a short tail of a large log is
// cheap.
func tailRecords(path string, want int) ([]Record, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read audit log: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read audit log: %w", err)
	}
	var out []Record
	full := func() bool { return want > 0 && len(out) >= want }
	take := func(line []byte) {
		var r Record
		if len(line) > 0 && json.Unmarshal(line, &r) == nil {
			out = append(out, r)
		}
	}
	// rest holds the bytes at pos whose start is not yet known to begin a
	// line; it ends where a line ends (its '\n' dropped), except while
	// tornTail says the bytes after the file's last '\n' are still in it.
	var rest []byte
	tornTail := true
	for pos := st.Size(); pos > 0 && !full(); {
		size := min(int64(tailChunk), pos)
		pos -= size
		chunk := make([]byte, size, size+int64(len(rest)))
		if _, err := f.ReadAt(chunk, pos); err != nil {
			return nil, fmt.Errorf("read audit log %s: %w", path, err)
		}
		rest = append(chunk, rest...)
		if tornTail {
			i := bytes.LastIndexByte(rest, '\n')
			if i < 0 {
				continue
			}
			rest, tornTail = rest[:i], false
		}
		for !full() {
			i := bytes.LastIndexByte(rest, '\n')
			if i < 0 {
				break
			}
			take(rest[i+1:])
			rest = rest[:i]
		}
		if pos == 0 && !tornTail && !full() {
			take(rest)
		}
	}
	return out, nil
}
