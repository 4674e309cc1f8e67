package audit

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/journaltest"
)

// TestJournalSink: records go to journald with stable structured fields,
// kernel events and appended ones alike; a value with a newline takes the
// protocol's binary form.
func TestJournalSink(t *testing.T) {
	jd := journaltest.New(t)
	wouldDeny := denyV4()
	wouldDeny.AppID, wouldDeny.Allowed, wouldDeny.Reason = 1, 2, 4
	copy(wouldDeny.Comm[:], "ev\nil\x00")
	src := newFakeSource(false, fakeItem{raw: denyV4().encode(t)}, fakeItem{raw: wouldDeny.encode(t)})
	a, err := New(src, Options{Journal: jd.Path, Annotate: testAnnotate, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- a.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	pin := Record{Verdict: "open", App: "ftp", Kind: KindPinhole, Hook: "pinhole", Dest: "192.0.2.9 -> 10.1.2.3:40001/tcp",
		Pinhole: &Pinhole{Proto: "tcp", Peer: "192.0.2.9", Host: "10.1.2.3", Port: 40001, User: "alice"}}

	for i, want := range []map[string]string{
		{
			"PRIORITY": "4", "SYSLOG_IDENTIFIER": "procgate", "PROCGATE_VERDICT": "deny", "PROCGATE_REASON": "unbound",
			"PROCGATE_DEST": "10.1.2.3:5432/tcp", "PROCGATE_APP": "", "PROCGATE_PID": "2147483632", "PROCGATE_UID": "1000",
			"PROCGATE_COMM": "curl", "PROCGATE_HOOK": "connect4", "PROCGATE_RULE": "internal 10.0.0.0/8",
			"PROCGATE_GENERATION": "3", "PROCGATE_CGROUP_ID": "77",
			"MESSAGE": `deny  app=- pid=2147483632 comm=curl uid=1000 dest=10.1.2.3:5432/tcp reason=unbound rule="internal 10.0.0.0/8"`,
		},
		{
			"PRIORITY": "5", "PROCGATE_VERDICT": "would-deny", "PROCGATE_REASON": "no-grant", "PROCGATE_APP": "web",
			"PROCGATE_COMM": "ev\nil",
		},
		{
			"PRIORITY": "6", "PROCGATE_VERDICT": "open", "PROCGATE_KIND": "pinhole", "PROCGATE_APP": "ftp",
			"PROCGATE_PINHOLE_PEER": "192.0.2.9", "PROCGATE_PINHOLE_PORT": "40001", "PROCGATE_PINHOLE_USER": "alice",
		},
	} {
		if i == 2 {
			a.Append(pin)
		}
		got := jd.Entry()
		for k, v := range want {
			if got[k] != v {
				t.Errorf("entry %d: %s = %q, want %q\n%v", i, k, got[k], v, got)
			}
		}
		if _, err := time.Parse(time.RFC3339Nano, got["PROCGATE_TIME"]); err != nil {
			t.Errorf("entry %d: PROCGATE_TIME %q: %v", i, got["PROCGATE_TIME"], err)
		}
		if i == 0 {
			if _, ok := got["PROCGATE_EXE"]; ok {
				t.Errorf("entry %d: an empty exe is a field: %v", i, got)
			}
		}
	}
	if s := a.Stats(); s.LogWriteErrors != 0 {
		t.Errorf("%d write errors", s.LogWriteErrors)
	}
}

// TestJournalGone: without journald, records are counted as not written;
// the auditor goes on.
func TestJournalGone(t *testing.T) {
	a, err := New(newFakeSource(true, fakeItem{raw: denyV4().encode(t)}), Options{Journal: filepath.Join(t.TempDir(), "none"), Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	live, _ := a.Subscribe(1)
	if err := a.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if s := a.Stats(); s.Events != 1 || s.LogWriteErrors != 1 || len(drain(live)) != 1 {
		t.Errorf("stats %+v: want the event read, published, and its journal write failed", s)
	}
}

// TestJournalPriority: what README promises for each verdict, a pinhole's
// refuse among the warnings.
func TestJournalPriority(t *testing.T) {
	for _, tc := range []struct{ verdict, want string }{
		{"deny", "4"},
		{"refuse", "4"},
		{"would-deny", "5"},
		{"allow", "6"},
		{"open", "6"},
		{"close", "6"},
		{"", "6"},
	} {
		if got := journalPriority(tc.verdict); got != tc.want {
			t.Errorf("journalPriority(%q) = %s, want %s", tc.verdict, got, tc.want)
		}
	}
}
