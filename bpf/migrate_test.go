package bpf

import (
	"bufio"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/ruleset"
)

// TestMigrationMarks: a process that a process without CAP_SYS_ADMIN (as
// the launcher leaves root) moves or clones into an app's cgroup holds no
// grants there, and neither do its children, wherever that mover stands;
// moved by a process with CAP_SYS_ADMIN (the daemon, root, systemd), it
// holds them, and such a move clears a mark.
func TestMigrationMarks(t *testing.T) {
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skipf("no setpriv to start a shell without CAP_SYS_ADMIN: %v", err)
	}
	w := newWorld(t, "granted", "other")
	w.apply(&ruleset.Ruleset{
		Internal: []ruleset.InternalPrefix{{Prefix: netip.MustParsePrefix("10.0.0.0/8")}},
		Apps: []ruleset.App{
			{Name: "granted", Grants: []ruleset.Grant{
				{Prefix: netip.MustParsePrefix("10.1.0.0/16"), Proto: ruleset.TCP, Ports: []ruleset.PortRange{ruleset.AllPorts}},
			}},
			{Name: "other"},
		},
	})
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	for _, g := range w.e.Guards() {
		if g.Name == "cgroup-migration" && !g.Active {
			t.Skipf("kernel feature missing: %s", g.Why)
		}
	}
	dest := ruleset.Dest{Addr: netip.MustParseAddr("10.1.2.3"), Proto: ruleset.TCP, Port: 80}
	into := filepath.Join(w.cgroups["granted/run"], "cgroup.procs")
	const (
		moveSelf      = `echo $$ > "$1" && exec "$0"`
		moveSelfChild = `echo $$ > "$1" && "$0"`
		moveSelfWait  = `echo $$ > "$1" && read x && exec "$0"` // the test moves it again
		stay          = `exec "$0"`
	)
	tests := []struct {
		name    string
		capless bool   // without CAP_SYS_ADMIN, as the launcher starts root
		from    string // the cgroup the shell starts in
		script  string // $0 is the prober binary, $1 the granted app's cgroup.procs
		want    probe.Verdict
	}{
		{"root with CAP_SYS_ADMIN moves itself", false, "other/run", moveSelf, probe.Allowed},
		{"launched root moves itself from another app", true, "other/run", moveSelf, probe.Denied},
		{"launched root moves itself from outside every app", true, "/unbound", moveSelf, probe.Denied},
		{"child of launched root that moved itself", true, "other/run", moveSelfChild, probe.Denied},
		{"moved again by root with CAP_SYS_ADMIN", true, "other/run", moveSelfWait, probe.Allowed},
		{"launched root not moved: its own app's verdict", true, "other/run", stay, probe.Denied},
		{"launched root started in the app", true, "granted/run", stay, probe.Allowed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sh := w.startShell(t, setpriv, tt.capless, tt.from, tt.script, into)
			if tt.script == moveSelfWait {
				waitIn(t, sh.cmd.Process.Pid, into)
				if err := os.WriteFile(into, []byte(fmt.Sprint(sh.cmd.Process.Pid)), 0); err != nil {
					t.Fatal(err)
				}
				fmt.Fprintln(sh.in, "go")
			}
			if got := sh.try(t, dest); got != tt.want {
				t.Fatalf("got %s, want %s", got, tt.want)
			}
		})
	}
}

// shell is a shell that ends as a prober (migrate and principal tests).
type shell struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

// startShell starts /bin/sh -c script in the world's network namespace,
// from its first instruction in the cgroup from, with $0 the prober binary
// and $1 into; capless drops CAP_SYS_ADMIN first (setpriv), as the
// launcher starts root. The shell is forked in the namespace: without
// CAP_SYS_ADMIN the prober could not enter it itself. It ends with the
// test (its stdin closed, waited for).
func (w *world) startShell(t *testing.T, setpriv string, capless bool, from, script, into string) *shell {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cg, err := os.Open(w.cgroups[from])
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	argv := []string{"/bin/sh", "-c", script, self, into}
	if capless {
		argv = append([]string{setpriv, "--bounding-set", "-sys_admin", "--inh-caps", "-all", "--"}, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), probe.EnvServe+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := nstest.InNS(t, w.netns, cmd.Start); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		cmd.Wait()
	})
	return &shell{cmd: cmd, in: in, out: bufio.NewReader(out)}
}

// try asks the prober for a connect to dest and returns its verdict.
func (s *shell) try(t *testing.T, dest ruleset.Dest) probe.Verdict {
	t.Helper()
	fmt.Fprintf(s.in, "%s %s\n", probe.Connect, dest)
	line, err := s.out.ReadString('\n')
	if err != nil {
		t.Fatalf("prober: %v", err)
	}
	return probe.Verdict(strings.TrimSpace(line))
}

// waitIn waits until pid is listed in the cgroup.procs file procs.
func waitIn(t *testing.T, pid int, procs string) {
	t.Helper()
	for i := 0; ; i++ {
		data, err := os.ReadFile(procs)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Fields(string(data)) {
			if l == fmt.Sprint(pid) {
				return
			}
		}
		if i > 100000 {
			t.Fatalf("pid %d never moved to %s", pid, procs)
		}
	}
}
