package top

import (
	"fmt"
	"strings"
	"time"

	"github.com/charmbracelet/lipgloss"

	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/ruleset"
)

var (
	titleStyle = lipgloss.NewStyle().Bold(true)
	headStyle  = lipgloss.NewStyle().Bold(true).Underline(true)
	selStyle   = lipgloss.NewStyle().Reverse(true)
	warnStyle  = lipgloss.NewStyle().Bold(true)
)

// View renders the model in its window: every line cut to the width, and
// sections dropped from the bottom up (guards, pinholes) when the height
// is short, so that the apps and the denials stay.
func (m Model) View() string {
	w, h := max(m.width, 20), max(m.height, 5)
	var top []string
	top = append(top, titleStyle.Render(cut(m.title(), w)))
	if m.err != nil {
		top = append(top, warnStyle.Render(cut("daemon: "+m.err.Error(), w)))
	}
	if m.status == nil {
		top = append(top, "waiting for the daemon...")
		return strings.Join(top, "\n")
	}
	top = append(top, m.auditLine(w)...)
	apps := m.appLines(w)
	foot := m.footer(w)
	guards := m.guardLines(w)
	pins := m.pinholeLines(w)
	// Denials get what is left; at least a heading and 3 rows if there
	// is room, before pinholes and guards.
	fixed := len(top) + len(apps) + len(foot)
	room := h - fixed
	if room-len(guards) < 4 {
		guards = nil
	}
	if room-len(guards)-len(pins) < 4 {
		pins = nil
	}
	den := m.denialLines(w, max(1, room-len(guards)-len(pins)))
	lines := append(top, apps...)
	lines = append(lines, den...)
	lines = append(lines, pins...)
	lines = append(lines, guards...)
	lines = append(lines, foot...)
	if len(lines) > h {
		// Too small for all: keep the title and the footer.
		lines = append(lines[:h-len(foot)], foot...)
	}
	return strings.Join(lines, "\n")
}

func (m Model) title() string {
	s := m.status
	if s == nil {
		return "procgate top"
	}
	t := fmt.Sprintf("procgate top  gen %d  %s  %s", s.Generation, s.Policy, m.at.Local().Format("15:04:05"))
	if m.paused {
		t += fmt.Sprintf("  [PAUSED, %d new]", m.missed)
	}
	if s.LastError != "" {
		t += "  [last reload refused]"
	}
	return t
}

// The app table's columns, 80 cells wide. MODE is AUDIT for an app in
// audit mode, whose DENY columns count its would-deny attempts too.
const appColumns = "%-11s %-7s %-8s %2v %-4s %7s %6s %6s %7v %6v %6v"

var appHead = fmt.Sprintf(appColumns, "APP", "MODE", "KIND", "GR", "REV", "ALLOW/s", "DENY/s", "EXT/s", "ALLOW", "DENY", "EXT")

func (m Model) appLines(w int) []string {
	out := []string{headStyle.Render(cut(appHead, w))}
	if len(m.status.Apps) == 0 {
		return append(out, "(no apps you may see)")
	}
	for _, a := range m.status.Apps {
		r := m.rates[a.Name]
		rev := "-"
		if len(a.Revoked) > 0 {
			rev = strings.Join(a.Revoked, ",")
		}
		kind, _, _ := strings.Cut(a.Principal, " ")
		line := fmt.Sprintf(appColumns,
			cut(a.Name, 11), a.ModeColumn(), cut(kind, 8), a.GrantCount(), cut(rev, 4),
			rate(r.Allow), rate(r.Deny), rate(r.External), a.Counters.Allow, denied(a.Counters), a.Counters.External)
		out = append(out, cut(line, w))
	}
	return out
}

// auditLine names the apps in audit mode, or is nil when there are none.
func (m Model) auditLine(w int) []string {
	names := m.status.AuditModeApps()
	if len(names) == 0 {
		return nil
	}
	return []string{warnStyle.Render(cut("AUDIT MODE, NOT ENFORCED: "+strings.Join(names, " ")+" (their denials pass as would-deny)", w))}
}

func rate(v float64) string {
	if v >= 1000 {
		return fmt.Sprintf("%.0fk", v/1000)
	}
	return fmt.Sprintf("%.1f", v)
}

func (m Model) denialLines(w, n int) []string {
	app, verdict := m.app, verdicts[m.verdict]
	if app == "" {
		app = "all"
	}
	if verdict == "" {
		verdict = "all"
	}
	shown := m.shown()
	out := []string{headStyle.Render(cut(fmt.Sprintf("LAST DENIALS  app:%s verdict:%s  (%d)", app, verdict, len(shown)), w))}
	if n <= 1 {
		return out
	}
	out = append(out, cut("TIME     APP        PID    COMM       DESTINATION             REASON / RULE", w))
	rows := n - 2
	first := 0
	if m.sel >= rows {
		first = m.sel - rows + 1
	}
	for i := first; i < len(shown) && i < first+rows; i++ {
		line := cut(denialLine(shown[i]), w)
		if i == m.sel {
			line = selStyle.Render(line)
		}
		out = append(out, line)
	}
	if len(shown) == 0 {
		out = append(out, "(none yet)")
	}
	return out
}

func denialLine(r audit.Record) string {
	why := r.Reason
	if r.Rule != "" {
		why += " " + r.Rule
	}
	if r.Verdict != ruleset.VerdictDeny {
		why = r.Verdict + " " + why
	}
	return fmt.Sprintf("%s %-10s %-6d %-10s %-23s %s", r.Time.Local().Format("15:04:05"), cut(r.App, 10), r.PID,
		cut(r.Comm, 10), r.Dest, why)
}

func (m Model) pinholeLines(w int) []string {
	if m.status.Pinholes == nil {
		return nil
	}
	out := []string{headStyle.Render(cut(fmt.Sprintf("PINHOLES  gateway %s  open %d pending %d refused %d",
		m.status.Pinholes.Gateway, m.status.Pinholes.Open, m.status.Pinholes.Pending, m.status.Pinholes.Refused), w))}
	for i, p := range m.pinholes {
		if i == 3 {
			out = append(out, fmt.Sprintf("... %d more (procgate pinholes)", len(m.pinholes)-3))
			break
		}
		age := "-"
		if !p.Opened.IsZero() {
			age = m.at.Sub(p.Opened).Truncate(time.Second).String()
		}
		out = append(out, cut(fmt.Sprintf("%-12s %-28s %5d/%-3s %-8s %8s %10dB", cut(p.App, 12), cut(p.Peer, 28), p.Port, p.Proto, p.State, age, p.Bytes), w))
	}
	return out
}

func (m Model) guardLines(w int) []string {
	var on, off []string
	for _, g := range m.status.Guards {
		if g.Active {
			on = append(on, g.Name)
		} else {
			off = append(off, g.Name)
		}
	}
	out := []string{cut("GUARDS "+strings.Join(on, " "), w)}
	if len(off) > 0 {
		out = append(out, warnStyle.Render(cut("NOT GUARDED on this kernel: "+strings.Join(off, " ")+" (procgate status)", w)))
	}
	return out
}

func (m Model) footer(w int) []string {
	if m.confirm != nil {
		lines := []string{warnStyle.Render(cut(fmt.Sprintf("Grant %s to %s? This drop-in, then a reload:", m.confirm.Dest, m.confirm.App), w)),
			cut("  policy.d/"+m.confirm.File, w)}
		for _, l := range strings.Split(strings.TrimSpace(string(m.confirm.Fragment)), "\n") {
			if strings.HasPrefix(l, "  ") {
				lines = append(lines, cut(l, w))
			}
		}
		return append(lines, warnStyle.Render(cut("y: write and reload   any other key: cancel", w)))
	}
	var out []string
	if m.message != "" {
		out = append(out, cut(m.message, w))
	}
	grant := "g grant"
	if !m.cfg.Root {
		grant = "g (root)"
	}
	return append(out, cut("q quit  p pause  a app  v verdict  ↑↓ select  "+grant, w))
}

// cut shortens s to w cells, marking the cut.
func cut(s string, w int) string {
	if lipgloss.Width(s) <= w {
		return s
	}
	r := []rune(s)
	for len(r) > 0 && lipgloss.Width(string(r)) > w-1 {
		r = r[:len(r)-1]
	}
	return string(r) + "…"
}
