// Package audit turns the kernel's audit events into records: it reads the
// ring buffer, annotates each event with the app and rule behind it, appends
// it to a JSON-lines log, hands it to live subscribers, and exposes the
// kernel's decision counters as Prometheus metrics.
package audit

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/ruleset"
)

// Record is one audit event as users see it. The JSON field names are a
// stable contract: the log file and `procgate events --json` use them.
type Record struct {
	Time       time.Time `json:"time"`    // wall clock, UTC
	Verdict    string    `json:"verdict"` // "allow" | "deny" | "would-deny" (mode: audit: denied, and passed)
	Reason     string    `json:"reason"`  // ruleset.Reason.String()
	App        string    `json:"app"`     // "" for unbound
	PID        uint32    `json:"pid"`
	TID        uint32    `json:"tid"`
	UID        uint32    `json:"uid"`
	GID        uint32    `json:"gid"`
	Comm       string    `json:"comm"`
	Exe        string    `json:"exe,omitempty"` // best effort: the process may be gone
	Dest       string    `json:"dest"`          // ruleset.Dest.String()
	Hook       string    `json:"hook"`
	Rule       string    `json:"rule,omitempty"` // grant or internal prefix behind the decision
	Generation uint32    `json:"generation"`
	CgroupID   uint64    `json:"cgroup_id"`
	// Kind is "" for a decision of the kernel, KindPinhole for a pinhole
	// the agent opened, closed or had refused (Verdict ruleset.VerdictOpen,
	// VerdictClose, VerdictRefuse; Dest "peer -> host:port/proto"; Hook
	// "pinhole").
	Kind    string   `json:"kind,omitempty"`
	Pinhole *Pinhole `json:"pinhole,omitempty"`
}

// KindPinhole marks pinhole records.
const KindPinhole = "pinhole"

// KindName marks records of the daemon's DNS-name grants: an answer's
// address it did not learn (Reason "name-cap": the name holds as many
// addresses as the cap allows; Dest the address, Hook "dns", Rule the name
// and the cap).
const KindName = "name"

// KindExe marks records of the daemon's checks of pinned binaries (Reason
// "exe-hash"): Verdict "deny" when the file at Exe no longer has the
// sha256 the policy wants, so holds no grants; "allow" when it has again.
// Hook "exe"; Rule names the file's hash and the policy's.
const KindExe = "exe"

// Pinhole is the hole of a pinhole record.
type Pinhole struct {
	Proto string `json:"proto"`
	Peer  string `json:"peer"`
	Host  string `json:"host"`
	Port  uint16 `json:"port"`
	User  string `json:"user"` // as the gateway's rules see it
}

// Text renders r as one human line. Values that could break the line apart
// (spaces, quotes, '=', control characters) are quoted: comm and exe are
// chosen by whoever runs the process.
func (r Record) Text() string {
	return r.Time.UTC().Format(time.RFC3339) + r.fields()
}

// fields is Text after the time.
func (r Record) fields() string {
	var b strings.Builder
	// Padded to "allow" so that the fields after it line up.
	fmt.Fprintf(&b, " %-5s", r.Verdict)
	app := r.App
	if app == "" {
		app = "-"
	}
	writeField(&b, "app", app)
	writeField(&b, "pid", strconv.FormatUint(uint64(r.PID), 10))
	writeField(&b, "comm", r.Comm)
	if r.Exe != "" {
		writeField(&b, "exe", r.Exe)
	}
	writeField(&b, "uid", strconv.FormatUint(uint64(r.UID), 10))
	writeField(&b, "dest", r.Dest)
	writeField(&b, "reason", r.Reason)
	if r.Rule != "" {
		writeField(&b, "rule", r.Rule)
	}
	return b.String()
}

func writeField(b *strings.Builder, key, value string) {
	b.WriteString(" " + key + "=")
	needsQuote := value == "" || strings.ContainsFunc(value, func(c rune) bool {
		return c == ' ' || c == '"' || c == '=' || c == '\\' || !unicode.IsPrint(c)
	})
	if needsQuote {
		value = strconv.Quote(value)
	}
	b.WriteString(value)
}

// Annotator names the app behind an event's app id and the rule behind its
// decision. The daemon supplies it, as only the daemon knows which ruleset
// generation and app ids the kernel was using.
type Annotator func(bpf.Event) (app string, rule string)

// clockRefresh bounds how long a wall-clock offset is used: NTP slews and
// steps move the wall clock against CLOCK_MONOTONIC.
const clockRefresh = 30 * time.Second

// wallClock converts CLOCK_MONOTONIC readings (bpf_ktime_get_ns) to wall
// time. It is used by one goroutine at a time.
type wallClock struct {
	offset int64     // wall ns minus monotonic ns
	at     time.Time // when offset was measured
}

func (c *wallClock) refresh() error {
	var ts unix.Timespec
	wall := time.Now()
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return fmt.Errorf("read CLOCK_MONOTONIC: %w", err)
	}
	c.offset = wall.UnixNano() - ts.Nano()
	c.at = wall
	return nil
}

// wall converts a monotonic reading. Should a refresh fail, the last offset
// stays in use: a slightly stale time beats no record.
func (c *wallClock) wall(monotonicNS uint64) time.Time {
	if time.Since(c.at) > clockRefresh {
		_ = c.refresh()
	}
	// Garbage readings past MaxInt64 wrap around; time.Unix accepts any int64.
	return time.Unix(0, int64(monotonicNS)+c.offset).UTC()
}

// recordOf decodes one ring buffer sample. Run and FuzzDecodeEvent share it.
func recordOf(raw []byte, clock *wallClock, annotate Annotator) (Record, error) {
	ev, err := bpf.DecodeEvent(raw)
	if err != nil {
		return Record{}, err
	}
	return fromEvent(ev, clock, annotate), nil
}

func fromEvent(ev bpf.Event, clock *wallClock, annotate Annotator) Record {
	r := Record{
		Time:       clock.wall(ev.MonotonicNS),
		Verdict:    ruleset.VerdictDeny,
		Reason:     ev.Reason.String(),
		PID:        ev.PID,
		TID:        ev.TID,
		UID:        ev.UID,
		GID:        ev.GID,
		Comm:       validUTF8(ev.Comm),
		Exe:        exeOf(ev.PID),
		Dest:       ev.Dest.String(),
		Hook:       ev.Hook.String(),
		Generation: ev.Generation,
		CgroupID:   ev.CgroupID,
	}
	switch {
	case ev.Allowed:
		r.Verdict = ruleset.VerdictAllow
	case ev.WouldDeny:
		r.Verdict = ruleset.VerdictWouldDeny
	}
	if annotate != nil {
		app, rule := annotate(ev)
		r.App, r.Rule = validUTF8(app), validUTF8(rule)
	}
	if r.App == "" && ev.AppID != 0 {
		// "" means unbound; an app id the annotator cannot name (a
		// generation it no longer knows) must not pass for unbound.
		r.App = "app#" + strconv.FormatUint(uint64(ev.AppID), 10)
	}
	return r
}

// exeOf reads the executable of pid. The pid is from the initial pid
// namespace, so this is right only for a reader in that namespace; the
// process may also have exited and its pid been reused since the event.
func exeOf(pid uint32) string {
	if pid == 0 {
		return ""
	}
	exe, err := os.Readlink("/proc/" + strconv.FormatUint(uint64(pid), 10) + "/exe")
	if err != nil {
		return ""
	}
	return validUTF8(exe)
}

// validUTF8 replaces invalid UTF-8, which JSON cannot carry: doing it here
// keeps the live record and the logged one the same.
func validUTF8(s string) string { return strings.ToValidUTF8(s, "\uFFFD") }
