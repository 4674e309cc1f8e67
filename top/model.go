// Package top is `procgate top`: a live terminal view of the daemon, built
// on bubbletea. The Model is a pure function of the messages it is fed
// (status snapshots, audit records, key presses, window sizes), so it is
// tested without a terminal; Run wires it to the daemon's API.
//
// It talks only to the daemon's API (package api) and, for the grant key,
// writes a policy drop-in checked with package learn: never the daemon's
// internals. What a caller other than root sees is decided by the daemon.
package top

import (
	"fmt"
	"slices"
	"strings"
	"time"

	tea "github.com/charmbracelet/bubbletea"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/learn"
)

// MaxDenials is how many denials the view keeps.
const MaxDenials = 200

// Messages the model takes besides bubbletea's own.
type (
	// StatusMsg is a status snapshot, taken at At, and the pinholes
	// (nil: none or not available to this caller).
	StatusMsg struct {
		Status   *api.Status
		Pinholes []api.Pinhole
		At       time.Time
		Err      error
	}
	// EventMsg is one audit record from the daemon's stream.
	EventMsg audit.Record
	// GrantedMsg is the outcome of a confirmed grant.
	GrantedMsg struct {
		Text string
		Err  error
	}
	// TickMsg asks for the next snapshot.
	TickMsg time.Time
)

// Config is what the model needs of the world.
type Config struct {
	// Root: the caller is root, so the grant key may write policy.d.
	Root bool
	// Refresh fetches a snapshot (a tea.Cmd returning StatusMsg).
	Refresh tea.Cmd
	// Grant writes and applies a proposal; nil disables the grant key.
	Grant func(Proposal) tea.Cmd
	// Interval between snapshots; zero: one second.
	Interval time.Duration
}

// Proposal is the narrowest grant that would have allowed one denial.
type Proposal struct {
	App      string
	Dest     string
	Fragment []byte
	// File is the drop-in's name under policy.d.
	File string
}

// verdict filters, cycled by the v key.
var verdicts = []string{"", learn.VerdictDeny, learn.VerdictWouldDeny}

// Model is the view's state.
type Model struct {
	cfg           Config
	width, height int

	status   *api.Status
	pinholes []api.Pinhole
	at       time.Time
	rates    map[string]Rates
	prev     map[string]api.Counters
	prevAt   time.Time
	err      error

	denials []audit.Record // oldest first
	paused  bool
	missed  int // denials that came while paused
	app     string
	verdict int
	sel     int // index into the shown denials, from the newest

	confirm *Proposal
	message string
}

// Rates are one app's decisions per second between two snapshots; Deny
// counts would-deny attempts too (denied).
type Rates struct {
	Allow, Deny, External float64
}

// New is a model before its first snapshot.
func New(cfg Config) Model {
	if cfg.Interval == 0 {
		cfg.Interval = time.Second
	}
	return Model{cfg: cfg, width: 80, height: 24, rates: map[string]Rates{}}
}

// Init asks for the first snapshot.
func (m Model) Init() tea.Cmd { return m.cfg.Refresh }

func (m Model) tick() tea.Cmd {
	return tea.Tick(m.cfg.Interval, func(t time.Time) tea.Msg { return TickMsg(t) })
}

// Update is the model's one transition.
func (m Model) Update(msg tea.Msg) (tea.Model, tea.Cmd) {
	switch msg := msg.(type) {
	case tea.WindowSizeMsg:
		m.width, m.height = msg.Width, msg.Height
	case TickMsg:
		return m, m.cfg.Refresh
	case StatusMsg:
		m = m.snapshot(msg)
		return m, m.tick()
	case EventMsg:
		m = m.event(audit.Record(msg))
	case GrantedMsg:
		if msg.Err != nil {
			m.message = "grant failed: " + msg.Err.Error()
		} else {
			m.message = msg.Text
		}
		return m, m.cfg.Refresh
	case tea.KeyMsg:
		return m.key(msg)
	}
	return m, nil
}

func (m Model) snapshot(msg StatusMsg) Model {
	m.err = msg.Err
	if msg.Err != nil || msg.Status == nil {
		return m
	}
	rates := map[string]Rates{}
	if !m.prevAt.IsZero() {
		secs := msg.At.Sub(m.prevAt).Seconds()
		for _, a := range msg.Status.Apps {
			p, ok := m.prev[a.Name]
			if !ok || secs <= 0 {
				continue
			}
			rates[a.Name] = Rates{
				Allow:    perSecond(a.Counters.Allow, p.Allow, secs),
				Deny:     perSecond(denied(a.Counters), denied(p), secs),
				External: perSecond(a.Counters.External, p.External, secs),
			}
		}
	}
	m.prev = map[string]api.Counters{}
	for _, a := range msg.Status.Apps {
		m.prev[a.Name] = a.Counters
	}
	m.status, m.pinholes, m.at, m.prevAt, m.rates = msg.Status, msg.Pinholes, msg.At, msg.At, rates
	return m
}

// denied counts an app's denials and would-be denials (audit mode: they
// passed); an app has the latter only while in audit mode.
func denied(c api.Counters) uint64 { return c.Deny + c.WouldDeny }

// perSecond is a counter's rate; a counter that went back (a daemon
// restart) counts from zero.
func perSecond(now, before uint64, secs float64) float64 {
	if now < before {
		before = 0
	}
	return float64(now-before) / secs
}

func (m Model) event(r audit.Record) Model {
	if r.Kind != "" || (r.Verdict != learn.VerdictDeny && r.Verdict != learn.VerdictWouldDeny) {
		return m
	}
	if m.paused {
		m.missed++
		return m
	}
	m.denials = append(m.denials, r)
	if len(m.denials) > MaxDenials {
		m.denials = slices.Delete(m.denials, 0, len(m.denials)-MaxDenials)
	}
	return m
}

// shown is the denials that pass the filters, newest first.
func (m Model) shown() []audit.Record {
	var out []audit.Record
	for i := len(m.denials) - 1; i >= 0; i-- {
		r := m.denials[i]
		if (m.app == "" || r.App == m.app) && (verdicts[m.verdict] == "" || r.Verdict == verdicts[m.verdict]) {
			out = append(out, r)
		}
	}
	return out
}

func (m Model) key(k tea.KeyMsg) (tea.Model, tea.Cmd) {
	if m.confirm != nil {
		switch k.String() {
		case "y", "Y", "enter":
			p := *m.confirm
			m.confirm = nil
			m.message = "granting " + p.Dest + " to " + p.App + "..."
			return m, m.cfg.Grant(p)
		case "ctrl+c":
			return m, tea.Quit
		default:
			m.confirm, m.message = nil, "grant cancelled"
		}
		return m, nil
	}
	switch k.String() {
	case "q", "ctrl+c", "esc":
		return m, tea.Quit
	case "p", " ":
		m.paused = !m.paused
		if !m.paused {
			m.missed = 0
		}
	case "a":
		m.app, m.sel = m.nextApp(), 0
	case "v":
		m.verdict, m.sel = (m.verdict+1)%len(verdicts), 0
	case "up", "k":
		m.sel = max(0, m.sel-1)
	case "down", "j":
		m.sel = min(max(0, len(m.shown())-1), m.sel+1)
	case "g":
		m = m.propose()
	}
	return m, nil
}

// nextApp cycles the app filter: all, then each app in status order.
func (m Model) nextApp() string {
	var names []string
	if m.status != nil {
		for _, a := range m.status.Apps {
			names = append(names, a.Name)
		}
	}
	if m.app == "" {
		if len(names) == 0 {
			return ""
		}
		return names[0]
	}
	i := slices.Index(names, m.app)
	if i < 0 || i+1 >= len(names) {
		return ""
	}
	return names[i+1]
}

func (m Model) propose() Model {
	shown := m.shown()
	switch {
	case !m.cfg.Root:
		m.message = "grant: needs root (it writes policy.d beside the daemon's policy and reloads)"
		return m
	case m.cfg.Grant == nil:
		m.message = "grant: not available"
		return m
	case len(shown) == 0:
		m.message = "grant: no denial selected"
		return m
	}
	r := shown[min(m.sel, len(shown)-1)]
	p, err := Propose(r)
	if err != nil {
		m.message = "grant: " + err.Error()
		return m
	}
	m.confirm, m.message = &p, ""
	return m
}

// Propose is the narrowest grant that would have allowed r: its address as
// /32 or /128, its protocol, its port.
func Propose(r audit.Record) (Proposal, error) {
	if r.App == "" || strings.HasPrefix(r.App, "app#") {
		return Proposal{}, fmt.Errorf("%s was denied to a process of no app: grants are an app's", r.Dest)
	}
	if !learn.Grantable(r.Reason) {
		return Proposal{}, fmt.Errorf("%s was denied for %s, which no grant fixes", r.Dest, r.Reason)
	}
	g, ok := learn.Narrowest(r.Dest)
	if !ok {
		return Proposal{}, fmt.Errorf("%s is not a tcp or udp destination", r.Dest)
	}
	g.Seen = learn.Seen{Attempts: 1, First: r.Time, Last: r.Time}
	res := learn.Result{App: r.App, Grants: []learn.Grant{g}, Denials: map[string]int{r.Verdict: 1}}
	name := fmt.Sprintf("60-top-%s-%s-%d-%s.yaml", r.App, fileSafe(g.Prefix.Addr().String()), g.Ports[0].Lo, g.Proto)
	return Proposal{App: r.App, Dest: r.Dest, Fragment: res.Fragment(), File: name}, nil
}

func fileSafe(s string) string { return strings.ReplaceAll(s, ":", "_") }
