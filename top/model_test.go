package top

import (
	"errors"
	"strings"
	"testing"
	"time"

	tea "github.com/charmbracelet/bubbletea"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/audit"
)

var t0 = time.Date(2026, 12, 6, 6, 0, 0, 0, time.UTC)

func testStatus(webAllow, webDeny uint64) *api.Status {
	return &api.Status{
		Generation: 7, Policy: "/etc/procgate/policy.yaml",
		Guards: []api.Guard{{Name: "connect", Active: true}, {Name: "socket-lsm", Active: false, Why: "no BPF LSM"}},
		Apps: []api.AppStatus{
			{Name: "web", Mode: "enforce", Principal: "launched", Grants: []string{"a", "b"}, Counters: api.Counters{Allow: webAllow, Deny: webDeny, External: 4}},
			{Name: "backup", Mode: "enforce", Principal: "user backup", Revoked: []string{"all"}},
		},
	}
}

func denial(app, dest, reason string) EventMsg {
	return EventMsg(audit.Record{Time: t0, Verdict: "deny", Reason: reason, App: app, PID: 4242, Comm: "curl", Dest: dest})
}

// feed runs msgs through the model, as bubbletea would, and returns it.
func feed(t *testing.T, m Model, msgs ...tea.Msg) Model {
	t.Helper()
	for _, msg := range msgs {
		next, _ := m.Update(msg)
		m = next.(Model)
	}
	return m
}

func key(s string) tea.KeyMsg {
	switch s {
	case "up":
		return tea.KeyMsg{Type: tea.KeyUp}
	case "down":
		return tea.KeyMsg{Type: tea.KeyDown}
	}
	return tea.KeyMsg{Type: tea.KeyRunes, Runes: []rune(s)}
}

func checkView(t *testing.T, view string, w, h int, want, not []string) {
	t.Helper()
	lines := strings.Split(view, "\n")
	if len(lines) > h {
		t.Errorf("%d lines in a %d-line window:\n%s", len(lines), h, view)
	}
	for _, l := range lines {
		if n := len([]rune(l)); n > w {
			t.Errorf("line of %d cells in a %d-cell window: %q", n, w, l)
		}
	}
	for _, s := range want {
		if !strings.Contains(view, s) {
			t.Errorf("view lacks %q:\n%s", s, view)
		}
	}
	for _, s := range not {
		if strings.Contains(view, s) {
			t.Errorf("view has %q:\n%s", s, view)
		}
	}
}

func TestViewRowsRatesAndDenials(t *testing.T) {
	m := feed(t, New(Config{Root: true}),
		tea.WindowSizeMsg{Width: 80, Height: 24},
		StatusMsg{Status: testStatus(10, 2), At: t0},
		StatusMsg{Status: testStatus(30, 6), At: t0.Add(2 * time.Second)},
		denial("web", "10.1.2.3:5432/tcp", "no-grant"),
		EventMsg(audit.Record{Verdict: "allow", App: "web", Dest: "10.9.9.9:1/tcp"}),
		denial("backup", "10.7.0.1:22/tcp", "port-not-granted"),
	)
	v := m.View()
	checkView(t, v, 80, 24, []string{
		"gen 7",
		// 20 allowed and 4 denied in 2 s; totals; grants; principal kind
		"web         enforce launched  2 -       10.0    2.0    0.0      30      6      4",
		"backup      enforce user      0 all",
		"web        4242   curl       10.1.2.3:5432/tcp       no-grant",
		"10.7.0.1:22/tcp",
		"GUARDS connect", "NOT GUARDED on this kernel: socket-lsm",
		"g grant",
	}, []string{"10.9.9.9"})
}

// TestViewAuditMode: an app in audit mode says so in capitals, in its row
// and above the table, and its DENY columns count its would-deny attempts.
func TestViewAuditMode(t *testing.T) {
	st := func(wouldDeny uint64) *api.Status {
		s := testStatus(0, 0)
		// A raw socket refused (deny), and would-be denials that passed.
		s.Apps = append(s.Apps, api.AppStatus{Name: "trial", Mode: "audit", Principal: "unit trial.service",
			Counters: api.Counters{Deny: 1, WouldDeny: wouldDeny}})
		return s
	}
	m := feed(t, New(Config{Root: true}), StatusMsg{Status: st(2), At: t0}, StatusMsg{Status: st(6), At: t0.Add(2 * time.Second)})
	checkView(t, m.View(), 80, 24, []string{
		"AUDIT MODE, NOT ENFORCED: trial (their denials pass as would-deny)",
		"web         enforce launched",
		"trial       AUDIT   unit      0 -        0.0    2.0    0.0       0      7      0",
	}, nil)
	if plain := feed(t, New(Config{}), StatusMsg{Status: testStatus(0, 0), At: t0}).View(); strings.Contains(plain, "AUDIT") {
		t.Errorf("no app in audit mode, and the view says AUDIT:\n%s", plain)
	}
}

func TestFiltersAndPause(t *testing.T) {
	m := feed(t, New(Config{Root: true}),
		StatusMsg{Status: testStatus(0, 0), At: t0},
		denial("web", "10.1.2.3:5432/tcp", "no-grant"),
		denial("backup", "10.7.0.1:22/tcp", "no-grant"),
		EventMsg(audit.Record{Verdict: "would-deny", Reason: "no-grant", App: "web", Dest: "10.5.5.5:80/tcp"}),
	)
	web := feed(t, m, key("a")) // all -> web
	checkView(t, web.View(), 80, 24, []string{"app:web", "10.1.2.3:5432/tcp", "10.5.5.5:80/tcp"}, []string{"10.7.0.1"})
	backup := feed(t, web, key("a"))
	checkView(t, backup.View(), 80, 24, []string{"app:backup", "10.7.0.1"}, []string{"10.1.2.3:5432"})
	all := feed(t, backup, key("a"))
	checkView(t, all.View(), 80, 24, []string{"app:all", "10.7.0.1", "10.1.2.3"}, nil)

	wd := feed(t, all, key("v"), key("v")) // all -> deny -> would-deny
	checkView(t, wd.View(), 80, 24, []string{"verdict:would-deny", "10.5.5.5:80/tcp"}, []string{"10.1.2.3:5432", "10.7.0.1"})

	paused := feed(t, all, key("p"), denial("web", "10.6.6.6:1/tcp", "no-grant"))
	checkView(t, paused.View(), 80, 24, []string{"[PAUSED, 1 new]"}, []string{"10.6.6.6"})
	resumed := feed(t, paused, key("p"), denial("web", "10.6.6.7:1/tcp", "no-grant"))
	checkView(t, resumed.View(), 80, 24, []string{"10.6.6.7"}, []string{"PAUSED", "10.6.6.6"})
}

func TestSmallWindows(t *testing.T) {
	st := testStatus(1, 1)
	st.Pinholes = &api.PinholeAgent{Gateway: "gw:443", Open: 1}
	for _, size := range [][2]int{{80, 24}, {60, 15}, {40, 8}, {30, 5}, {120, 50}} {
		m := feed(t, New(Config{}), tea.WindowSizeMsg{Width: size[0], Height: size[1]},
			StatusMsg{Status: st, At: t0, Pinholes: []api.Pinhole{{App: "ftp", Peer: "192.0.2.9", Port: 40001, Proto: "tcp", State: "open", Opened: t0.Add(-time.Minute), Bytes: 1234}}})
		for range 30 {
			m = feed(t, m, denial("web", "10.1.2.3:5432/tcp", "no-grant"))
		}
		want := []string{"procgate top"}
		if size[1] >= 24 {
			want = append(want, "PINHOLES", "192.0.2.9", "40001/tcp", "1m0s", "GUARDS")
		}
		checkView(t, m.View(), size[0], size[1], want, nil)
	}
}

func TestGrantKey(t *testing.T) {
	var granted []Proposal
	grant := func(p Proposal) tea.Cmd {
		granted = append(granted, p)
		return func() tea.Msg { return GrantedMsg{Text: "granted"} }
	}
	base := feed(t, New(Config{Root: true, Grant: grant}), StatusMsg{Status: testStatus(0, 0), At: t0},
		denial("web", "10.1.2.3:5432/tcp", "no-grant"),
		denial("web", "10.1.2.4:443/tcp", "exe-not-pinned"))

	// The newest is selected first: exe-not-pinned, which no grant fixes.
	m := feed(t, base, key("g"))
	checkView(t, m.View(), 80, 24, []string{"exe-not-pinned, which no grant fixes"}, []string{"Grant "})

	m = feed(t, base, key("down"), key("g"))
	checkView(t, m.View(), 80, 24, []string{
		"Grant 10.1.2.3:5432/tcp to web?", "policy.d/60-top-web-10.1.2.3-5432-tcp.yaml",
		"- to: 10.1.2.3/32", "proto: tcp", "ports: [5432]", "y: write and reload",
	}, nil)
	cancelled := feed(t, m, key("n"))
	if len(granted) != 0 || !strings.Contains(cancelled.View(), "grant cancelled") {
		t.Errorf("n: granted %v\n%s", granted, cancelled.View())
	}
	next, cmd := m.Update(key("y"))
	if len(granted) != 1 || granted[0].App != "web" || granted[0].File != "60-top-web-10.1.2.3-5432-tcp.yaml" || cmd == nil {
		t.Fatalf("y: granted %+v", granted)
	}
	done := feed(t, next.(Model), cmd())
	checkView(t, done.View(), 80, 24, []string{"granted"}, nil)

	// Not root: the key says why, and nothing is proposed.
	user := feed(t, New(Config{Grant: grant}), StatusMsg{Status: testStatus(0, 0), At: t0},
		denial("web", "10.1.2.3:5432/tcp", "no-grant"), key("g"))
	checkView(t, user.View(), 80, 24, []string{"grant: needs root", "g (root)"}, []string{"Grant "})
}

func TestProposeIPv6AndMapped(t *testing.T) {
	for dest, want := range map[string]string{
		"[fd00::5]:443/udp":         "- to: fd00::5/128\n        proto: udp\n        ports: [443]",
		"[::ffff:10.1.2.3]:443/tcp": "- to: 10.1.2.3/32\n",
	} {
		p, err := Propose(audit.Record{Verdict: "deny", Reason: "no-grant", App: "web", Dest: dest, Time: t0})
		if err != nil || !strings.Contains(string(p.Fragment), want) || strings.Contains(p.File, ":") {
			t.Errorf("%s: %v %s\n%s", dest, err, p.File, p.Fragment)
		}
	}
	if _, err := Propose(audit.Record{Verdict: "deny", Reason: "unbound", App: "", Dest: "10.1.2.3:1/tcp"}); err == nil {
		t.Error("a grant proposed for an unbound process")
	}
}

// TestViewWithoutDaemon: before the first snapshot, and when the daemon
// cannot be reached, the view says so.
func TestViewWithoutDaemon(t *testing.T) {
	m := New(Config{})
	checkView(t, m.View(), 80, 24, []string{"procgate top", "waiting for the daemon"}, nil)
	m = feed(t, m, StatusMsg{Err: errors.New("connect to procgate daemon at /x: no such file"), At: t0})
	checkView(t, m.View(), 80, 24, []string{"daemon: connect to procgate daemon at /x"}, nil)
	// A daemon gone after a snapshot: the last one stays, with the error.
	m = feed(t, New(Config{}), StatusMsg{Status: testStatus(1, 1), At: t0}, StatusMsg{Err: errors.New("gone"), At: t0})
	checkView(t, m.View(), 80, 24, []string{"daemon: gone", "web"}, nil)
}
