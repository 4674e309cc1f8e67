package launch_test

import (
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/launch"
	"github.com/procgate/procgate/ruleset"
)

// run starts spec with stdout captured and waits for it.
func run(t *testing.T, spec launch.Spec) (string, launch.Exit) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	spec.Stdio[1] = w
	p, err := launch.Start(spec)
	w.Close()
	if err != nil {
		t.Fatal(err)
	}
	out, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	exit, err := p.Wait()
	if err != nil {
		t.Fatal(err)
	}
	return string(out), exit
}

func TestStart(t *testing.T) {
	cg := nstest.Cgroup(t)
	mount, err := cgroups.Mount()
	if err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(mount, cg)
	if err != nil {
		t.Fatal(err)
	}
	ns := nstest.NetNS(t)
	var nsStat unix.Stat_t
	if err := unix.Stat(ns, &nsStat); err != nil {
		t.Fatal(err)
	}
	env := []string{"PATH=/usr/bin:/bin", "LD_PRELOAD=/nonexistent/evil.so", "KEEP=1", "GCONV_PATH=/x"}
	nobody := &launch.Cred{UID: 65534, GID: 65534, Groups: []uint32{65534}}

	tests := []struct {
		name     string
		argv     []string
		cred     *launch.Cred
		netns    string
		wantOut  func(string) bool
		wantExit launch.Exit
	}{
		{name: "in the cgroup", argv: []string{"cat", "/proc/self/cgroup"},
			wantOut: func(s string) bool { return strings.Contains(s, "0::/"+rel+"\n") }},
		{name: "env scrubbed", argv: []string{"/usr/bin/env"},
			wantOut: func(s string) bool {
				return strings.Contains(s, "KEEP=1\n") && !strings.Contains(s, "LD_PRELOAD") && !strings.Contains(s, "GCONV_PATH")
			}},
		{name: "exit code", argv: []string{"sh", "-c", "exit 7"}, wantExit: launch.Exit{Code: 7}},
		{name: "as nobody", argv: []string{"sh", "-c", "id -u; id -g; id -G"}, cred: nobody,
			wantOut: func(s string) bool { return s == "65534\n65534\n65534\n" }},
		{name: "stdin is /dev/null", argv: []string{"readlink", "/proc/self/fd/0"},
			wantOut: func(s string) bool { return s == "/dev/null\n" }},
		{name: "in the netns", argv: []string{"readlink", "/proc/self/ns/net"}, netns: ns,
			wantOut: func(s string) bool { return s == "net:["+strconv.FormatUint(nsStat.Ino, 10)+"]\n" }},
		{name: "own session", argv: []string{"sh", "-c", `[ "$(ps -o sid= -p $$)" -eq $$ ]`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, exit := run(t, launch.Spec{
				App: ruleset.App{Name: "t"}, CgroupDir: cg, Argv: tt.argv, Env: env, Cred: tt.cred, NetNS: tt.netns,
			})
			if exit != tt.wantExit {
				t.Errorf("exit %+v, want %+v (output %q)", exit, tt.wantExit, out)
			}
			if tt.wantOut != nil && !tt.wantOut(out) {
				t.Errorf("unexpected output %q", out)
			}
		})
	}
}

func TestStartSignal(t *testing.T) {
	p, err := launch.Start(launch.Spec{App: ruleset.App{Name: "t"}, CgroupDir: nstest.Cgroup(t), Argv: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	exit, err := p.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if exit != (launch.Exit{Signal: syscall.SIGTERM}) || exit.ShellCode() != 143 {
		t.Errorf("exit %+v (shell %d), want killed by SIGTERM (143)", exit, exit.ShellCode())
	}
	if err := p.Signal(syscall.SIGTERM); err == nil {
		t.Error("signal to a reaped process succeeded")
	}
}

func TestStartRefuses(t *testing.T) {
	cg := nstest.Cgroup(t)
	tests := []struct {
		name    string
		spec    launch.Spec
		wantErr string
	}{
		{"wrong binary", launch.Spec{App: ruleset.App{Name: "t", Exe: []ruleset.Exe{{Path: "/bin/true"}}}, CgroupDir: cg, Argv: []string{"/bin/false"}},
			"is not one of the app's binaries"},
		{"not in PATH", launch.Spec{App: ruleset.App{Name: "t"}, CgroupDir: cg, Argv: []string{"true"}, Env: []string{"PATH=/nonexistent"}},
			"true: not found in PATH /nonexistent"},
		{"empty command", launch.Spec{App: ruleset.App{Name: "t"}, CgroupDir: cg}, "empty command"},
		{"no cgroup", launch.Spec{App: ruleset.App{Name: "t"}, Argv: []string{"true"}}, "no cgroup"},
		{"missing cgroup", launch.Spec{App: ruleset.App{Name: "t"}, CgroupDir: filepath.Join(cg, "missing"), Argv: []string{"true"}}, "open cgroup"},
		{"missing dir", launch.Spec{App: ruleset.App{Name: "t"}, CgroupDir: cg, Argv: []string{"true"}, Dir: "/nonexistent"}, "start /usr/bin/true"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := launch.Start(tt.spec)
			if err == nil {
				p.Wait()
				t.Fatalf("started; want error containing %q", tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %q, want it to contain %q", err, tt.wantErr)
			}
		})
	}
	if pids, err := cgroups.Procs(cg); err != nil || len(pids) != 0 {
		t.Errorf("processes in the cgroup after refusals: %v, %v", pids, err)
	}
}

func TestShellCode(t *testing.T) {
	tests := []struct {
		exit launch.Exit
		want int
	}{
		{launch.Exit{}, 0},
		{launch.Exit{Code: 7}, 7},
		{launch.Exit{Signal: syscall.SIGKILL}, 137},
		{launch.Exit{Signal: syscall.SIGINT}, 130},
	}
	for _, tt := range tests {
		if got := tt.exit.ShellCode(); got != tt.want {
			t.Errorf("%+v.ShellCode() = %d, want %d", tt.exit, got, tt.want)
		}
	}
}

// statusField reads a field of /proc/PID/status output.
func statusField(t *testing.T, status, name string) string {
	t.Helper()
	for _, line := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no %s in %q", name, status)
	return ""
}

// TestConfinement: an app's processes, root included, lack the capabilities
// that lead around the hooks (bounding, inheritable and ambient sets) but
// those the app keeps; no_new_privs is set exactly for apps that pin
// binaries which do not gain privilege at exec.
func TestConfinement(t *testing.T) {
	cg := nstest.Cgroup(t)
	grep, err := filepath.EvalSymlinks("/usr/bin/grep")
	if err != nil {
		t.Skipf("no grep binary: %v", err)
	}
	argv := []string{grep, "-E", "^(Cap|NoNewPrivs)", "/proc/self/status"}
	all := uint64(0)
	for _, name := range ruleset.LauncherDrops {
		all |= 1 << capBit(t, name)
	}
	tests := []struct {
		name    string
		app     ruleset.App
		cred    *launch.Cred
		keep    uint64 // bits of LauncherDrops that stay
		wantNNP string
	}{
		{name: "root", app: ruleset.App{Name: "t"}, wantNNP: "0"},
		{name: "root, keep net_admin", app: ruleset.App{Name: "t", KeepCaps: []string{"net_admin"}},
			keep: 1 << unix.CAP_NET_ADMIN, wantNNP: "0"},
		{name: "root, pinned binary", app: ruleset.App{Name: "t", Exe: []ruleset.Exe{{Path: grep}}}, wantNNP: "1"},
		{name: "nobody", app: ruleset.App{Name: "t"}, cred: &launch.Cred{UID: 65534, GID: 65534}, wantNNP: "0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, exit := run(t, launch.Spec{App: tt.app, CgroupDir: cg, Argv: argv, Cred: tt.cred})
			if exit != (launch.Exit{}) {
				t.Fatalf("exit %+v: %q", exit, out)
			}
			for _, set := range []string{"CapBnd", "CapInh", "CapAmb", "CapEff", "CapPrm"} {
				v, err := strconv.ParseUint(statusField(t, out, set), 16, 64)
				if err != nil {
					t.Fatal(err)
				}
				if got := v & all; got&^tt.keep != 0 {
					t.Errorf("%s %#x holds dropped capabilities %#x", set, v, got&^tt.keep)
				}
				if set == "CapBnd" && v&tt.keep != tt.keep {
					t.Errorf("CapBnd %#x lacks the kept capabilities %#x", v, tt.keep)
				}
			}
			if tt.cred == nil {
				// Root keeps what is not dropped: the list is a list, not "all".
				bnd, _ := strconv.ParseUint(statusField(t, out, "CapBnd"), 16, 64)
				if bnd&(1<<unix.CAP_NET_BIND_SERVICE) == 0 || bnd&(1<<unix.CAP_SETUID) == 0 {
					t.Errorf("CapBnd %#x lost capabilities the launcher does not drop", bnd)
				}
			}
			if got := statusField(t, out, "NoNewPrivs"); got != tt.wantNNP {
				t.Errorf("NoNewPrivs %s, want %s", got, tt.wantNNP)
			}
		})
	}
}

func capBit(t *testing.T, name string) uint {
	t.Helper()
	bits := map[string]uint{"net_raw": unix.CAP_NET_RAW, "net_admin": unix.CAP_NET_ADMIN, "sys_admin": unix.CAP_SYS_ADMIN,
		"bpf": unix.CAP_BPF, "perfmon": unix.CAP_PERFMON, "sys_ptrace": unix.CAP_SYS_PTRACE, "sys_module": unix.CAP_SYS_MODULE,
		"sys_rawio": unix.CAP_SYS_RAWIO, "mknod": unix.CAP_MKNOD, "sys_boot": unix.CAP_SYS_BOOT}
	b, ok := bits[name]
	if !ok {
		t.Fatalf("capability %q of LauncherDrops unknown to the test", name)
	}
	return b
}
