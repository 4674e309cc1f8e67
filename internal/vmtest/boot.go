package vmtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// Guest is what each boot gets: the init, the test binaries and the plan's
// suites (their Binary and Dir are host paths here, guest paths in the
// plan).
type Guest struct {
	Init   string
	Suites []SuiteSpec
	Tools  []string
	// Memory in MiB and CPUs of the VM, and how long one boot may take.
	MemoryMiB, CPUs int
	Timeout         time.Duration
}

// BuildInitramfs writes the initramfs for kernel k to path: the init, the
// host tools, /etc/passwd and /etc/group, the test binaries with their
// testdata, k's modules and the plan. It returns the modules it could not
// find.
func BuildInitramfs(path string, g Guest, k Fetched) (missing []string, err error) {
	mods, missing, err := ResolveModules(k.Root, k.Version, NeededModules)
	if err != nil {
		return nil, err
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("initramfs: %w", err)
	}
	defer f.Close()
	a, err := NewArchive(f)
	if err != nil {
		return nil, fmt.Errorf("initramfs: %w", err)
	}
	for _, t := range g.Tools {
		if err := a.HostProgram(t); err != nil {
			return nil, err
		}
	}
	for _, p := range []string{"/etc/passwd", "/etc/group"} {
		if err := a.CopyFile(p, p); err != nil {
			return nil, err
		}
	}
	for _, d := range []string{"/dev", "/proc", "/sys", "/tmp", "/run", "/root", "/var/tmp"} {
		if err := a.Dir(d); err != nil {
			return nil, err
		}
	}
	if err := a.CopyFile("/init", g.Init); err != nil {
		return nil, err
	}
	plan := Plan{}
	for _, m := range mods {
		dst := filepath.Join("/vmtest/modules", filepath.Base(m))
		if err := a.CopyFile(dst, m); err != nil {
			return nil, err
		}
		plan.Modules = append(plan.Modules, dst)
	}
	for _, s := range g.Suites {
		dir := filepath.Join("/tests", s.Name)
		if td := filepath.Join(s.Dir, "testdata"); isDir(td) {
			if err := a.CopyTree(filepath.Join(dir, "testdata"), td); err != nil {
				return nil, err
			}
		}
		for _, name := range s.Files {
			if err := a.CopyFile(filepath.Join(dir, name), filepath.Join(s.Dir, name)); err != nil {
				return nil, err
			}
		}
		bin := filepath.Join(dir, filepath.Base(s.Binary))
		if err := a.CopyFile(bin, s.Binary); err != nil {
			return nil, err
		}
		gs := s
		gs.Binary, gs.Dir = bin, dir
		plan.Suites = append(plan.Suites, gs)
	}
	b, err := json.MarshalIndent(plan, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := a.File(PlanPath, b, 0o644); err != nil {
		return nil, err
	}
	if err := a.Close(); err != nil {
		return nil, fmt.Errorf("initramfs: %w", err)
	}
	return missing, f.Close()
}

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}

// Boot runs kernel vmlinuz with initrd under qemu (TCG: this machine's KVM
// does not work nested), the console into log and, when live is not nil,
// there too as it comes. It returns the guest's summary.
func Boot(ctx context.Context, vmlinuz, initrd string, g Guest, log string, live io.Writer) (Summary, error) {
	ctx, cancel := context.WithTimeout(ctx, g.Timeout)
	defer cancel()
	lf, err := os.Create(log)
	if err != nil {
		return Summary{}, err
	}
	defer lf.Close()
	var console bytes.Buffer
	out := io.MultiWriter(lf, &console)
	if live != nil {
		out = io.MultiWriter(out, live)
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64",
		// -cx16: qemu 7.2's TCG corrupts EFLAGS in the kernel's per-CPU
		// cmpxchg16b (6.12's SLUB fast path double-faults within seconds);
		// without CX16 the kernel uses its own emulation of it.
		"-accel", "tcg", "-cpu", "max,-cx16",
		"-m", fmt.Sprint(g.MemoryMiB), "-smp", fmt.Sprint(g.CPUs),
		"-display", "none", "-vga", "none", "-monitor", "none", "-serial", "stdio",
		"-no-reboot", "-nodefaults",
		"-kernel", vmlinuz, "-initrd", initrd,
		// loglevel=3: errors only, so that kernel messages seldom cut into
		// the test output; the summary does not mind them anyway.
		"-append", "console=ttyS0 quiet loglevel=3 panic=-1 oops=panic")
	cmd.Stdout, cmd.Stderr = out, out
	cmd.WaitDelay = 5 * time.Second
	runErr := cmd.Run()
	s, err := ReadSummary(&console)
	switch {
	case err == nil:
		return s, nil
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return s, fmt.Errorf("no summary after %v (console in %s): %w", g.Timeout, log, err)
	case runErr != nil:
		return s, fmt.Errorf("qemu: %v (console in %s): %w", runErr, log, err)
	}
	return s, fmt.Errorf("console in %s: %w", log, err)
}
