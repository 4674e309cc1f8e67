package audit

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/procgate/procgate/ruleset"
)

// DefaultJournalSocket is where journald takes entries in its native
// protocol.
const DefaultJournalSocket = "/run/systemd/journal/socket"

// JournalIdentifier is the SYSLOG_IDENTIFIER of procgate's entries:
// `journalctl -t procgate` shows them.
const JournalIdentifier = "procgate"

// journal sends records to journald, one datagram each, in the native
// protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL). Written here, not with
// go-systemd's journal package, whose socket path is fixed when procgate
// is built: tests and containers name another.
type journal struct {
	conn *net.UnixConn
	addr *net.UnixAddr
}

// openJournal prepares a socket to send to journald at path. The socket is
// not connected: a restarted journald gets the next entry.
func openJournal(path string) (*journal, error) {
	// An empty name autobinds (Linux): the socket needs no file.
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("journald socket: %w", err)
	}
	return &journal{conn: conn, addr: &net.UnixAddr{Name: path, Net: "unixgram"}}, nil
}

// write sends r, whose JSON form is raw, to journald.
func (j *journal) write(r Record, raw []byte) error {
	entry, err := journalEntry(r, raw)
	if err != nil {
		return err
	}
	// An entry is well below the smallest datagram limit (comm, an exe
	// path and a rule); one that is not fails, and is counted.
	if _, _, err := j.conn.WriteMsgUnix(entry, nil, j.addr); err != nil {
		return fmt.Errorf("send to journald at %s: %w", j.addr.Name, err)
	}
	return nil
}

func (j *journal) close() error { return j.conn.Close() }

// journalEntry is r as journald fields: MESSAGE (Text without the time,
// which journald keeps), PRIORITY (by verdict), SYSLOG_IDENTIFIER, and
// each field of r's JSON form as PROCGATE_<NAME> in capitals, a pinhole's
// as PROCGATE_PINHOLE_<NAME>: PROCGATE_VERDICT, PROCGATE_APP,
// PROCGATE_DEST, PROCGATE_REASON... The names are the JSON contract's,
// so they are as stable; fields JSON leaves out (empty exe, rule, kind)
// are left out here too.
func journalEntry(r Record, raw []byte) ([]byte, error) {
	fields, err := journalFields(r, raw)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	put := func(k, v string) {
		if !strings.Contains(v, "\n") {
			b.WriteString(k + "=" + v + "\n")
			return
		}
		// A value with a newline (a comm or exe path can have one):
		// the name, a newline, the length as 64-bit little endian, the
		// value, a newline.
		b.WriteString(k + "\n")
		_ = binary.Write(&b, binary.LittleEndian, uint64(len(v)))
		b.WriteString(v + "\n")
	}
	put("MESSAGE", strings.TrimLeft(r.fields(), " "))
	put("PRIORITY", journalPriority(r.Verdict))
	put("SYSLOG_IDENTIFIER", JournalIdentifier)
	for _, k := range slices.Sorted(maps.Keys(fields)) {
		put(k, fields[k])
	}
	return b.Bytes(), nil
}

// journalFields flattens r's JSON form, raw, into PROCGATE_* fields.
func journalFields(r Record, raw []byte) (map[string]string, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(raw, &top); err != nil {
		return nil, fmt.Errorf("decode audit record: %w", err)
	}
	out := map[string]string{}
	var add func(prefix string, m map[string]json.RawMessage) error
	add = func(prefix string, m map[string]json.RawMessage) error {
		for k, v := range m {
			name := prefix + strings.ToUpper(k)
			if len(v) > 0 && v[0] == '{' {
				var sub map[string]json.RawMessage
				if err := json.Unmarshal(v, &sub); err != nil {
					return fmt.Errorf("decode audit record field %s: %w", k, err)
				}
				if err := add(name+"_", sub); err != nil {
					return err
				}
				continue
			}
			var s string
			if json.Unmarshal(v, &s) != nil {
				s = string(v) // a number or a bool, as JSON writes it
			}
			out[name] = s
		}
		return nil
	}
	if err := add("PROCGATE_", top); err != nil {
		return nil, err
	}
	// Exact, for correlating with the log file; the entry's own time is
	// when journald received it.
	out["PROCGATE_TIME"] = r.Time.UTC().Format(time.RFC3339Nano)
	return out, nil
}

// journalPriority: refusals are warnings (4), would-be refusals of apps in
// audit mode notices (5), the rest informational (6).
func journalPriority(verdict string) string {
	switch verdict {
	case ruleset.VerdictDeny, ruleset.VerdictRefuse:
		return "4"
	case ruleset.VerdictWouldDeny:
		return "5"
	}
	return "6"
}
