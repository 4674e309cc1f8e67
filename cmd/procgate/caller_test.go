package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/launch"
)

const callerPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: shell
    users: [nobody]
  - name: debug
    users: [nobody]
    traceable: true
  - name: pinned
    users: [nobody]
    exe: [/usr/bin/env]
`

// callerNamespaces are the namespaces an app shares with its caller.
var callerNamespaces = []string{"net", "mnt", "uts", "ipc", "cgroup", "pid"}

// nsInodes is a shell snippet printing "NAME=INODE" for each namespace of
// the shell itself.
func nsInodes(prefix string) string {
	var b strings.Builder
	for _, n := range callerNamespaces {
		fmt.Fprintf(&b, `echo "%s%s=$(readlink /proc/self/ns/%s)"; `, prefix, n, n)
	}
	return b.String()
}

// TestRunInCallersNamespaces: an unprivileged caller in namespaces of its
// own (net, uts, ipc, mnt with a private mount, cgroup, pid), in a working
// directory there and with its umask, gets its app in all of them, never
// in the daemon's, which runs in another network namespace.
func TestRunInCallersNamespaces(t *testing.T) {
	nstest.RequireRoot(t)
	daemonNS := nstest.NetNS(t)
	e := newE2EIn(t, callerPolicy, daemonNS, true, "--guard-gid", "65533")
	callerNS := nstest.NetNS(t)

	// The caller's working directory is a tmpfs mounted in its own mount
	// namespace only: the daemon's cannot see it.
	mnt := filepath.Join(e.dir, "callermnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ app, argv0 string }{
		{"shell", "sh"},            // guarded: through the shim's guard path
		{"debug", "sh"},            // traceable: no guard, still through the shim
		{"pinned", "/usr/bin/env"}, // exe: found and checked in the caller's mount namespace
	} {
		t.Run(tc.app, func(t *testing.T) {
			app := `echo "cwd=$(pwd)"; echo "umask=$(umask)"; echo "host=$(hostname)"; ls; ` + nsInodes("app-")
			argv := fmt.Sprintf("sh -c '%s'", app)
			if tc.argv0 == "/usr/bin/env" {
				argv = fmt.Sprintf("/usr/bin/env sh -c '%s'", app)
			}
			script := fmt.Sprintf(`set -e
hostname caller-uts
mount -t tmpfs callertmp %[1]s
chmod 0777 %[1]s
touch %[1]s/only-in-the-callers-mount-ns
cd %[1]s
umask 0027
%[2]s
exec setpriv --reuid=65534 --regid=65534 --clear-groups %[3]s --socket %[4]s run --app %[5]s -- %[6]s`,
				mnt, nsInodes("caller-"), e.bin, e.socket, tc.app, argv)
			cmd := exec.Command("nsenter", "--net="+callerNS, "unshare", "--uts", "--ipc", "--mount", "--cgroup", "--pid", "--fork", "--mount-proc",
				"sh", "-c", script)
			cmd.Env = append(os.Environ(), envAsMain+"=1")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("run in the caller's namespaces: %v\n%s", err, out)
			}
			got := map[string]string{}
			for _, l := range strings.Split(string(out), "\n") {
				if k, v, ok := strings.Cut(l, "="); ok {
					got[k] = v
				}
			}
			daemonPid := e.daemon.Process.Pid
			for _, n := range callerNamespaces {
				caller, app := got["caller-"+n], got["app-"+n]
				daemon, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", daemonPid, n))
				if err != nil {
					t.Fatal(err)
				}
				if caller == "" || caller == daemon {
					t.Fatalf("test set-up: the caller's %s namespace %q is not apart from the daemon's %q\n%s", n, caller, daemon, out)
				}
				if app != caller {
					t.Errorf("app's %s namespace is %q, the caller's %q (the daemon's %q)", n, app, caller, daemon)
				}
			}
			for _, want := range []string{"cwd=" + mnt + "\n", "umask=0027\n", "host=caller-uts\n", "only-in-the-callers-mount-ns\n"} {
				if !strings.Contains(string(out), want) {
					t.Errorf("output lacks %q:\n%s", want, out)
				}
			}
		})
	}
}

// TestRunRefusedOutsideCallersNamespaces: where the caller's namespaces
// cannot be entered, `procgate run` is refused with status 125 and the
// app never runs, in the daemon's namespaces or elsewhere.
func TestRunRefusedOutsideCallersNamespaces(t *testing.T) {
	nstest.RequireRoot(t)
	e := newE2EIn(t, callerPolicy, nstest.NetNS(t), true)

	t.Run("caller in a user namespace of its own", func(t *testing.T) {
		cmd := exec.Command("unshare", "--user", e.bin, "--socket", e.socket, "run", "--app", "shell", "--", "sh", "-c", "echo RAN")
		cmd.Env = append(os.Environ(), envAsMain+"=1")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: nobody}
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != launch.StatusFailed {
			t.Fatalf("want exit status %d, got %v\n%s", launch.StatusFailed, err, out)
		}
		if strings.Contains(string(out), "RAN") || !strings.Contains(string(out), "user namespace") {
			t.Fatalf("want a refusal naming the user namespace, and no run:\n%s", out)
		}
	})

	t.Run("caller gone", func(t *testing.T) {
		// A process of nobody connects and hands the connection over
		// before it exits: the request then comes from a dead peer.
		conn := connectAndExit(t, e.bin, e.socket)
		defer conn.Close()
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		defer w.Close()
		cwd, err := os.Open("/")
		if err != nil {
			t.Fatal(err)
		}
		defer cwd.Close()
		line := []byte(`{"op":"run","app":"shell","argv":["sh","-c","echo RAN"]}` + "\n")
		if err := launch.SendWithFds(conn, line, r, w, w, cwd); err != nil {
			t.Fatal(err)
		}
		w.Close()
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 4096)
		n, _ := conn.Read(buf)
		resp := string(buf[:n])
		if !strings.Contains(resp, `"error"`) || !strings.Contains(resp, "gone") || !strings.Contains(resp, `"exit_code":125`) {
			t.Fatalf("want a refusal saying the caller is gone, got %q", resp)
		}
		_ = r.SetReadDeadline(time.Now().Add(time.Second))
		if out, _ := r.Read(buf); out > 0 {
			t.Fatalf("the app ran: %q", buf[:out])
		}
	})
}

// envConnect makes the test binary connect to the socket named by its
// value, pass the connection on its descriptor 3 and exit.
const envConnect = "PROCGATE_TEST_CONNECT_AND_EXIT"

func init() {
	sock := os.Getenv(envConnect)
	if sock == "" {
		return
	}
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err == nil {
		var f *os.File
		if f, err = conn.File(); err == nil {
			err = unix.Sendmsg(3, []byte{0}, unix.UnixRights(int(f.Fd())), nil, 0)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// connectAndExit returns a connection to socket made by a process of
// nobody that has exited since.
func connectAndExit(t *testing.T, bin, socket string) *net.UnixConn {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "mine"), os.NewFile(uintptr(fds[1]), "theirs")
	defer mine.Close()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), envConnect+"="+socket)
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: nobody}
	out, err := cmd.CombinedOutput()
	theirs.Close()
	if err != nil {
		t.Fatalf("connect as nobody: %v\n%s", err, out)
	}
	buf, oob := make([]byte, 1), make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := unix.Recvmsg(int(mine.Fd()), buf, oob, 0)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		t.Fatalf("connection not received: %v", err)
	}
	got, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(got) != 1 {
		t.Fatalf("connection not received: %v", err)
	}
	f := os.NewFile(uintptr(got[0]), "conn")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.UnixConn)
}

// TestRunKeepsTheDaemonsDescriptors: a descriptor the daemon inherited
// without close-on-exec (from its unit or a shell) never reaches an app it
// launches for a user: the app holds its stdio only.
func TestRunKeepsTheDaemonsDescriptors(t *testing.T) {
	nstest.RequireRoot(t)
	secret, err := os.CreateTemp("", "procgate-daemon-only-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(secret.Name())
	defer secret.Close()
	// At 10, above the descriptors the launcher hands its shim (3 to 7),
	// which would otherwise replace it.
	files := make([]*os.File, 8)
	for i := range files {
		files[i] = secret
	}
	ns := nstest.NetNS(t)
	e := newE2EInheriting(t, callerPolicy, ns, true, files, "--guard-gid", "65533")
	for _, app := range []string{"shell", "debug"} {
		t.Run(app, func(t *testing.T) {
			out, err := e.procgateAs(nobody, nil, "run", "--pty=false", "--app", app, "--", "sh", "-c", "exec ls -l /proc/self/fd")
			if err != nil {
				t.Fatalf("run: %v\n%s", err, out)
			}
			if !strings.Contains(out, "0 ->") {
				t.Fatalf("test set-up: no descriptor listing:\n%s", out)
			}
			if strings.Contains(out, filepath.Base(secret.Name())) {
				t.Fatalf("the app holds the daemon's descriptor:\n%s", out)
			}
		})
	}
}
