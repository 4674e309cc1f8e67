package audit

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"net/netip"
	"os"
	"reflect"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/bpf"
)

// rawEvent mirrors struct audit_event in bpf/decision.h field by field
// (procgateAuditEvent in bpf/procgate_bpfel.go), so tests can make the bytes
// the kernel would.
type rawEvent struct {
	TsNs       uint64
	CgroupID   uint64
	PID        uint32
	TID        uint32
	UID        uint32
	GID        uint32
	AppID      uint32
	Generation uint32
	Allowed    uint8
	Reason     uint8
	Hook       uint8
	Proto      uint8
	Port       uint16
	Family     uint8
	Pad        uint8
	Addr       [16]byte
	Comm       [16]byte
}

func (e rawEvent) encode(t testing.TB) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := binary.Write(&b, binary.NativeEndian, e); err != nil {
		t.Fatalf("encode event: %v", err)
	}
	if b.Len() != bpf.EventSize {
		t.Fatalf("test event is %d bytes, struct audit_event is %d: update rawEvent", b.Len(), bpf.EventSize)
	}
	return b.Bytes()
}

// denyV4 is an unbound process denied 10.1.2.3:5432/tcp.
func denyV4() rawEvent {
	e := rawEvent{
		TsNs: 5_000_000_000, CgroupID: 77, PID: 0x7fff_fff0, TID: 0x7fff_fff1, UID: 1000, GID: 100,
		Generation: 3, Reason: 3, Hook: 1, Proto: 1, Port: 5432, Family: 4,
	}
	copy(e.Addr[:], []byte{10, 1, 2, 3})
	copy(e.Comm[:], "curl")
	return e
}

// testAnnotate names app id 1 "web" and gives every event a rule.
func testAnnotate(ev bpf.Event) (string, string) {
	if ev.AppID == 1 {
		return "web", "grant #0 10.0.0.0/8 tcp ports 5432"
	}
	return "", "internal 10.0.0.0/8"
}

// fixedClock converts monotonic ns n to the Unix time 1_800_000_000 s + n.
func fixedClock() *wallClock {
	return &wallClock{offset: 1_800_000_000 * int64(time.Second), at: time.Now().Add(time.Hour)}
}

func TestRecordText(t *testing.T) {
	at := time.Date(2026, 11, 22, 10, 0, 0, 123456789, time.UTC)
	tests := []struct {
		name string
		r    Record
		want string
	}{{
		name: "unbound deny",
		r: Record{Time: at, Verdict: "deny", Reason: "unbound", PID: 123, UID: 1000, Comm: "curl",
			Exe: "/usr/bin/curl", Dest: "10.1.2.3:5432/tcp", Rule: "internal"},
		want: "2026-11-22T10:00:00Z deny  app=- pid=123 comm=curl exe=/usr/bin/curl uid=1000 dest=10.1.2.3:5432/tcp reason=unbound rule=internal",
	}, {
		name: "allow without exe or rule",
		r: Record{Time: at, Verdict: "allow", Reason: "granted", App: "web", PID: 9, Comm: "psql",
			Dest: "[fd00::1]:53/udp"},
		want: "2026-11-22T10:00:00Z allow app=web pid=9 comm=psql uid=0 dest=[fd00::1]:53/udp reason=granted",
	}, {
		name: "values that would break the line are quoted",
		r: Record{Time: at.In(time.FixedZone("X", 3600)), Verdict: "deny", Reason: "no-grant", App: "web",
			Comm: "a b=\"c\"\n", Exe: "/tmp/x y", Dest: "10.0.0.1:1/tcp", Rule: "grant #0 10.0.0.0/8"},
		want: `2026-11-22T10:00:00Z deny  app=web pid=0 comm="a b=\"c\"\n" exe="/tmp/x y" uid=0 dest=10.0.0.1:1/tcp reason=no-grant rule="grant #0 10.0.0.0/8"`,
	}, {
		name: "empty comm",
		r:    Record{Time: at, Verdict: "deny", Reason: "no-policy", Dest: "10.0.0.1:1/tcp"},
		want: `2026-11-22T10:00:00Z deny  app=- pid=0 comm="" uid=0 dest=10.0.0.1:1/tcp reason=no-policy`,
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.r.Text(); got != tt.want {
				t.Errorf("Text()\n got %s\nwant %s", got, tt.want)
			}
		})
	}
}

func TestRecordJSON(t *testing.T) {
	at := time.Date(2026, 11, 22, 10, 0, 0, 5, time.UTC)
	tests := []struct {
		name string
		r    Record
		want string
	}{{
		name: "all fields",
		r: Record{Time: at, Verdict: "deny", Reason: "no-grant", App: "web", PID: 1, TID: 2, UID: 3, GID: 4,
			Comm: "curl", Exe: "/usr/bin/curl", Dest: "10.1.2.3:5432/tcp", Hook: "connect4",
			Rule: "internal 10.0.0.0/8", Generation: 5, CgroupID: 6},
		want: `{"time":"2026-11-22T10:00:00.000000005Z","verdict":"deny","reason":"no-grant","app":"web",` +
			`"pid":1,"tid":2,"uid":3,"gid":4,"comm":"curl","exe":"/usr/bin/curl","dest":"10.1.2.3:5432/tcp",` +
			`"hook":"connect4","rule":"internal 10.0.0.0/8","generation":5,"cgroup_id":6}`,
	}, {
		name: "exe and rule left out when empty",
		r:    Record{Time: at, Verdict: "allow", Reason: "granted", Dest: "10.1.2.3:5432/tcp", Hook: "connect4"},
		want: `{"time":"2026-11-22T10:00:00.000000005Z","verdict":"allow","reason":"granted","app":"",` +
			`"pid":0,"tid":0,"uid":0,"gid":0,"comm":"","dest":"10.1.2.3:5432/tcp",` +
			`"hook":"connect4","generation":0,"cgroup_id":0}`,
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := json.Marshal(tt.r)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Errorf("JSON\n got %s\nwant %s", got, tt.want)
			}
			var back Record
			if err := json.Unmarshal(got, &back); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(back, tt.r) {
				t.Errorf("round trip: got %+v, want %+v", back, tt.r)
			}
		})
	}
}

func TestRecordOf(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	base := Record{
		Time:    time.Unix(1_800_000_005, 0).UTC(),
		Verdict: "deny", Reason: "unbound", Rule: "internal 10.0.0.0/8",
		PID: 0x7fff_fff0, TID: 0x7fff_fff1, UID: 1000, GID: 100, Comm: "curl",
		Dest: "10.1.2.3:5432/tcp", Hook: "connect4", Generation: 3, CgroupID: 77,
	}
	tests := []struct {
		name     string
		event    func(*rawEvent)
		annotate Annotator
		want     func(*Record)
		wantErr  bool
	}{
		{name: "unbound ipv4 deny", annotate: testAnnotate},
		{
			name: "a bind refused by listen:",
			event: func(e *rawEvent) {
				e.AppID, e.Reason, e.Hook, e.Proto, e.Port, e.Family = 1, 13, 10, 1, 8081, 6
				e.Addr = netip.MustParseAddr("::").As16()
			},
			annotate: testAnnotate,
			want: func(r *Record) {
				r.Reason, r.App, r.Hook, r.Dest = "listen", "web", "bind6", "[::]:8081/tcp"
				r.Rule = "grant #0 10.0.0.0/8 tcp ports 5432"
			},
		},
		{
			name: "a sandbox's denied destination",
			event: func(e *rawEvent) {
				e.AppID, e.Reason = 1, 12
				copy(e.Addr[:], []byte{192, 0, 2, 1})
			},
			annotate: testAnnotate,
			want: func(r *Record) {
				r.Reason, r.App, r.Dest = "outside-denied", "web", "192.0.2.1:5432/tcp"
				r.Rule = "grant #0 10.0.0.0/8 tcp ports 5432"
			},
		},
		{
			name: "bound ipv6 udp allow",
			event: func(e *rawEvent) {
				e.AppID, e.Allowed, e.Reason, e.Hook, e.Proto, e.Port, e.Family = 1, 1, 2, 4, 2, 53, 6
				a := netip.MustParseAddr("fd00::1").As16()
				e.Addr = a
			},
			annotate: testAnnotate,
			want: func(r *Record) {
				r.Verdict, r.Reason, r.App, r.Hook, r.Dest = "allow", "granted", "web", "sendmsg6", "[fd00::1]:53/udp"
				r.Rule = "grant #0 10.0.0.0/8 tcp ports 5432"
			},
		},
		{
			name: "would-deny of an app in audit mode",
			event: func(e *rawEvent) {
				e.AppID, e.Allowed, e.Reason = 1, 2, 4
				copy(e.Addr[:], []byte{10, 9, 9, 9})
			},
			annotate: testAnnotate,
			want: func(r *Record) {
				r.Verdict, r.Reason, r.App, r.Dest = "would-deny", "no-grant", "web", "10.9.9.9:5432/tcp"
				r.Rule = "grant #0 10.0.0.0/8 tcp ports 5432"
			},
		},
		{
			name:     "an unknown allowed value is a denial",
			event:    func(e *rawEvent) { e.AppID, e.Allowed, e.Reason = 1, 7, 4 },
			annotate: testAnnotate,
			want:     func(r *Record) { r.App, r.Reason, r.Rule = "web", "no-grant", "grant #0 10.0.0.0/8 tcp ports 5432" },
		},
		{
			name:     "app id the annotator cannot name is not unbound",
			event:    func(e *rawEvent) { e.AppID, e.Reason = 7, 4 },
			annotate: testAnnotate,
			want:     func(r *Record) { r.App, r.Reason = "app#7", "no-grant" },
		},
		{
			name:  "no annotator",
			event: func(e *rawEvent) { e.AppID = 1 },
			want:  func(r *Record) { r.App, r.Rule = "app#1", "" },
		},
		{
			name:  "exe of a live process",
			event: func(e *rawEvent) { e.PID = uint32(os.Getpid()) },
			want:  func(r *Record) { r.PID, r.Exe, r.Rule = uint32(os.Getpid()), self, "" },
		},
		{
			name:  "comm that is not UTF-8 and fills the array",
			event: func(e *rawEvent) { copy(e.Comm[:], "abcdefghijklmn\xff\xfe") },
			want:  func(r *Record) { r.Comm, r.Rule = "abcdefghijklmn\uFFFD", "" },
		},
		{name: "unknown address family", event: func(e *rawEvent) { e.Family = 5 }, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := denyV4()
			if tt.event != nil {
				tt.event(&e)
			}
			want := base
			if tt.annotate == nil {
				want.Rule = ""
			}
			if tt.want != nil {
				tt.want(&want)
			}
			got, err := recordOf(e.encode(t), fixedClock(), tt.annotate)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("no error; got %+v", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("got  %+v\nwant %+v", got, want)
			}
		})
	}
	t.Run("short record", func(t *testing.T) {
		if _, err := recordOf(denyV4().encode(t)[:bpf.EventSize-1], fixedClock(), nil); err == nil {
			t.Error("no error for a short record")
		}
	})
}

// TestWallClockRefresh checks the sign and size of the measured offset: the
// time of "now" on CLOCK_MONOTONIC must come out as about the wall time.
func TestWallClockRefresh(t *testing.T) {
	var c wallClock
	if err := c.refresh(); err != nil {
		t.Fatal(err)
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	got := c.wall(uint64(ts.Nano()))
	if d := time.Since(got).Abs(); d > time.Minute {
		t.Errorf("monotonic now converts to %v, %v away from the wall clock", got, d)
	}
	if got.Location() != time.UTC {
		t.Errorf("time in %v, want UTC", got.Location())
	}
}
