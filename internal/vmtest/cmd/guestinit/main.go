// Command guestinit is the init of vmtest's initramfs: as PID 1 it only
// sets up the console, starts itself again as the runner and reaps every
// orphan until the runner ends, then powers the machine off. The runner
// mounts what the tests expect of a host, loads the plan's kernel modules,
// reads procgate's guards on this kernel, runs the test binaries and prints
// the summary between vmtest's markers.
//
// PID 1 and the runner are apart because PID 1 must reap orphans
// (wait4(-1)), which would steal the exit status of the test binaries the
// runner waits for.
package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/vmtest"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "run" {
		os.Exit(runner())
	}
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "vmtest init: %v\n", err)
	}
	unix.Sync()
	// Never returns on success; if it fails, init exits and the kernel
	// panics, which with panic=-1 and qemu -no-reboot ends the VM too.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
}

// run is PID 1: console, the runner, reaping.
func run() error {
	if err := mount("devtmpfs", "/dev", "devtmpfs", ""); err != nil {
		return err
	}
	console, err := os.OpenFile("/dev/console", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open console: %w", err)
	}
	for fd := range 3 {
		if err := unix.Dup2(int(console.Fd()), fd); err != nil {
			return fmt.Errorf("console on fd %d: %w", fd, err)
		}
	}
	cmd := exec.Command("/proc/self/exe", "run")
	if _, err := os.Stat("/proc/self/exe"); err != nil {
		cmd = exec.Command(os.Args[0], "run")
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start runner: %w", err)
	}
	for {
		var st unix.WaitStatus
		pid, err := unix.Wait4(-1, &st, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("wait: %w", err)
		}
		if pid == cmd.Process.Pid {
			if st.ExitStatus() != 0 {
				return fmt.Errorf("runner ended with %v", st)
			}
			return nil
		}
	}
}

func mount(source, target, fstype, data string) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return fmt.Errorf("mkdir %s: %w", target, err)
	}
	if err := unix.Mount(source, target, fstype, 0, data); err != nil && !errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("mount %s on %s: %w", fstype, target, err)
	}
	return nil
}

// runner prepares the host, runs the plan and prints the summary; its exit
// status is 0 when it printed one.
func runner() int {
	sum := vmtest.Summary{}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err == nil {
		sum.Kernel = unix.ByteSliceToString(uts.Release[:])
	}
	sum.Setup = setup()
	plan, err := vmtest.ReadPlan(vmtest.PlanPath)
	if err != nil {
		sum.Setup = append(sum.Setup, err.Error())
	}
	for _, m := range plan.Modules {
		if err := loadModule(m); err != nil {
			sum.Setup = append(sum.Setup, err.Error())
		}
	}
	if b, err := os.ReadFile("/sys/kernel/security/lsm"); err == nil {
		sum.LSM = strings.TrimSpace(string(b))
	}
	sum.Guards, err = guards()
	if err != nil {
		sum.GuardsErr = err.Error()
	}
	env := []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root", "USER=root", "TMPDIR=/tmp", "LANG=C.UTF-8",
		nstest.RequireRootEnv + "=1",
	}
	for _, s := range plan.Suites {
		sum.Suites = append(sum.Suites, vmtest.RunSuite(s, env, os.Stdout))
	}
	if err := vmtest.WriteSummary(os.Stdout, sum); err != nil {
		fmt.Fprintf(os.Stderr, "vmtest runner: %v\n", err)
		return 1
	}
	return 0
}

// setup mounts what a Debian host has and the tests use, brings lo up and
// returns what failed.
func setup() []string {
	var failed []string
	for _, m := range []struct{ source, target, fstype, data string }{
		{"proc", "/proc", "proc", ""},
		{"sysfs", "/sys", "sysfs", ""},
		{"devpts", "/dev/pts", "devpts", "ptmxmode=0666"},
		{"tmpfs", "/dev/shm", "tmpfs", ""},
		{"tmpfs", "/run", "tmpfs", "mode=0755"},
		{"tmpfs", "/tmp", "tmpfs", "mode=1777"},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", ""},
		{"bpf", "/sys/fs/bpf", "bpf", "mode=0700"},
		{"securityfs", "/sys/kernel/security", "securityfs", ""},
		{"tracefs", "/sys/kernel/tracing", "tracefs", ""},
		{"debugfs", "/sys/kernel/debug", "debugfs", ""},
	} {
		if err := mount(m.source, m.target, m.fstype, m.data); err != nil {
			failed = append(failed, err.Error())
		}
	}
	// Debian's kernels start Yama at ptrace_scope 1; the host the suites
	// are written on has no Yama, and the trace guard's test needs 0 to see
	// the guard's own refusals.
	if err := os.WriteFile("/proc/sys/kernel/yama/ptrace_scope", []byte("0"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		failed = append(failed, fmt.Sprintf("yama ptrace_scope 0: %v", err))
	}
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		failed = append(failed, fmt.Sprintf("lo up: %v", err))
	}
	return failed
}

// loadModule loads the module file at path; a compressed one (.ko.xz) is
// handed to the kernel as it is (MODULE_INIT_COMPRESSED_FILE, 6.0+ with
// CONFIG_MODULE_DECOMPRESS). A module already there is fine.
func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("module %s: %w", path, err)
	}
	defer f.Close()
	flags := 0
	if strings.HasSuffix(path, ".xz") || strings.HasSuffix(path, ".zst") || strings.HasSuffix(path, ".gz") {
		flags = unix.MODULE_INIT_COMPRESSED_FILE
	}
	if err := unix.FinitModule(int(f.Fd()), "", flags); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load module %s: %w", filepath.Base(path), err)
	}
	return nil
}

// guards loads procgate's programs (without attaching them) on a cgroup
// and bpffs directory of its own and returns what bpf.Guards says.
func guards() ([]vmtest.Guard, error) {
	cg := "/sys/fs/cgroup/vmtest-guards"
	if err := os.Mkdir(cg, 0o755); err != nil {
		return nil, fmt.Errorf("guards: %w", err)
	}
	defer os.Remove(cg)
	dir := "/sys/fs/bpf/vmtest-guards"
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	e, err := bpf.Open(bpf.Options{BPFDir: dir, CgroupDir: cg, Log: log})
	if err != nil {
		return nil, fmt.Errorf("guards: %w", err)
	}
	var out []vmtest.Guard
	for _, g := range e.Guards() {
		out = append(out, vmtest.Guard{Name: g.Name, Active: g.Active, Why: g.Why})
	}
	e.Close()
	if _, err := bpf.Uninstall(dir); err != nil {
		return out, fmt.Errorf("guards: %w", err)
	}
	os.Remove(dir)
	return out, nil
}
