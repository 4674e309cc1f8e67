package top

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	tea "github.com/charmbracelet/bubbletea"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/learn"
)

// Run shows the view on the terminal until the user quits.
func Run(c api.Client) error {
	root := os.Geteuid() == 0
	cfg := Config{Root: root, Refresh: refresh(c, root)}
	if root {
		cfg.Grant = func(p Proposal) tea.Cmd { return func() tea.Msg { return apply(c, p) } }
	}
	prog := tea.NewProgram(New(cfg), tea.WithAltScreen())
	stop := make(chan struct{})
	defer close(stop)
	go follow(c, prog, stop)
	_, err := prog.Run()
	if err != nil {
		return fmt.Errorf("top: %w", err)
	}
	return nil
}

// refresh takes one snapshot: status, and the pinholes when the agent runs
// and the caller is root (the daemon refuses them to others).
func refresh(c api.Client, root bool) tea.Cmd {
	return func() tea.Msg {
		resp, err := c.Do(api.Request{Op: api.OpStatus})
		if err != nil {
			return StatusMsg{Err: err, At: time.Now()}
		}
		msg := StatusMsg{Status: resp.Status, At: time.Now()}
		if root && resp.Status.Pinholes != nil {
			if ph, err := c.Do(api.Request{Op: api.OpPinholes}); err == nil {
				msg.Pinholes = ph.Pinholes
			}
		}
		return msg
	}
}

// follow streams denials into the program, reconnecting after the daemon
// restarts, until stop.
func follow(c api.Client, prog *tea.Program, stop <-chan struct{}) {
	last := 50
	for {
		err := stream(c, prog, last, stop)
		last = 0 // after a reconnect, only new ones
		select {
		case <-stop:
			return
		case <-time.After(2 * time.Second):
		}
		_ = err // the status snapshot shows the daemon's state
	}
}

func stream(c api.Client, prog *tea.Program, last int, stop <-chan struct{}) error {
	conn, r, err := c.Dial(api.Request{Op: api.OpEvents, Follow: true, Last: last})
	if err != nil {
		return err
	}
	go func() {
		<-stop
		conn.Close()
	}()
	defer conn.Close()
	for {
		resp, err := api.ReadResponse(r)
		if err != nil {
			return err
		}
		var rec audit.Record
		if err := json.Unmarshal(resp.Event, &rec); err != nil {
			continue
		}
		prog.Send(EventMsg(rec))
	}
}

// apply writes p's drop-in beside the daemon's policy, checked with the
// whole policy first, and asks the daemon to reload.
func apply(c api.Client, p Proposal) GrantedMsg {
	resp, err := c.Do(api.Request{Op: api.OpStatus})
	if err != nil {
		return GrantedMsg{Err: err}
	}
	if resp.Status.Policy == "" {
		return GrantedMsg{Err: errors.New("the daemon names no policy file (policy from a store?): add the grant there")}
	}
	path := learn.DropinPath(resp.Status.Policy, p.File)
	if err := learn.Write(resp.Status.Policy, path, p.Fragment); err != nil {
		return GrantedMsg{Err: err}
	}
	rl, err := c.Do(api.Request{Op: api.OpReload})
	if err != nil {
		return GrantedMsg{Err: fmt.Errorf("wrote %s, but the reload failed: %w", path, err)}
	}
	return GrantedMsg{Text: fmt.Sprintf("granted %s to %s: wrote %s, generation %d in force", p.Dest, p.App, path, *rl.Reload)}
}
