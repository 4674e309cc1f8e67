package main

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"
)

// TestRunOutlivesDaemonStop: a daemon that stops lets go of the apps it
// launched for `procgate run` instead of waiting for them (an app may run
// for days) or ending them (the pinned programs still enforce their
// policy): the daemon exits, the caller is told the app runs on, and the
// app still runs.
func TestRunOutlivesDaemonStop(t *testing.T) {
	e := newE2EWith(t, `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: shell
    users: [nobody]
`, false)
	cmd := exec.Command(e.bin, "--socket", e.socket, "run", "--app", "shell", "--", "sh", "-c", "echo started; exec sleep 1000")
	cmd.Env = append(cmd.Environ(), envAsMain+"=1")
	cmd.Dir = e.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: nobody}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	// A file, not a pipe: the app holds the descriptor on, and Wait would
	// wait for the pipe's end.
	stderr, err := os.Create(filepath.Join(t.TempDir(), "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	cmd.Stderr = stderr
	said := func() string { b, _ := os.ReadFile(stderr.Name()); return string(b) }
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	if line, err := bufio.NewReader(out).ReadString('\n'); line != "started\n" {
		t.Fatalf("the app wrote %q, %v; want started", line, err)
	}

	e.stopDaemon(syscall.SIGTERM) // fails the test if the daemon does not exit
	err = cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 125 {
		t.Errorf("procgate run ended with %v, want exit 125\n%s", err, said())
	}
	m := regexp.MustCompile(`app shell \(pid (\d+)\) runs on`).FindStringSubmatch(said())
	if m == nil {
		t.Fatalf("procgate run said %q, want that the app runs on", said())
	}
	pid, _ := strconv.Atoi(m[1])
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	if err := syscall.Kill(pid, 0); err != nil {
		t.Errorf("the app (pid %d) after the daemon stopped: %v, want it running", pid, err)
	}
	// The app is in the test's cgroup, which its cleanup kills and removes.
}
