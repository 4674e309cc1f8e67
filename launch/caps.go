package launch

import (
	"fmt"
	"os"
	"runtime"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
)

// capNumbers maps the names of ruleset.LauncherDrops to capability numbers.
var capNumbers = map[string]uintptr{
	"net_raw":    unix.CAP_NET_RAW,
	"net_admin":  unix.CAP_NET_ADMIN,
	"sys_admin":  unix.CAP_SYS_ADMIN,
	"bpf":        unix.CAP_BPF,
	"perfmon":    unix.CAP_PERFMON,
	"sys_ptrace": unix.CAP_SYS_PTRACE,
	"sys_module": unix.CAP_SYS_MODULE,
	"sys_rawio":  unix.CAP_SYS_RAWIO,
	"mknod":      unix.CAP_MKNOD,
	"sys_boot":   unix.CAP_SYS_BOOT,
}

// Confinement is what the launcher takes from an app's processes.
type Confinement struct {
	// Drop are the capabilities removed from the bounding, inheritable and
	// ambient sets: no exec in the app, not even of a set-user-ID-root
	// binary or one with file capabilities, gets them back.
	Drop []string
	// NoNewPrivs sets no_new_privs: set-user-ID, set-group-ID and file
	// capabilities have no effect at exec.
	NoNewPrivs bool
}

// ConfinementOf says what the launcher takes from app: the capabilities of
// ruleset.LauncherDrops not in app.KeepCaps, and no_new_privs when the app
// pins its binaries (exe:) and none of them is set-user-ID, set-group-ID or
// has file capabilities. An app without exe: may run anything, including
// sudo or a set-user-ID helper its users rely on, so it keeps the ability
// to exec them (bounded by the dropped capabilities); an app whose pinned
// binary needs privilege at exec keeps it too.
func ConfinementOf(app ruleset.App) Confinement {
	c := Confinement{NoNewPrivs: len(app.Exe) > 0}
	for _, name := range ruleset.LauncherDrops {
		if !slices.Contains(app.KeepCaps, name) {
			c.Drop = append(c.Drop, name)
		}
	}
	for _, e := range app.Exe {
		if gainsPrivilege(e.Path) {
			c.NoNewPrivs = false
		}
	}
	return c
}

// gainsPrivilege: would an exec of path change credentials? A file that
// cannot be read counts as yes, so that no_new_privs never breaks it.
func gainsPrivilege(path string) bool {
	st, err := os.Stat(path)
	if err != nil {
		return true
	}
	if st.Mode()&(os.ModeSetuid|os.ModeSetgid) != 0 {
		return true
	}
	sz, err := unix.Getxattr(path, "security.capability", nil)
	return err == nil && sz > 0
}

// confineThread applies c to the calling OS thread, which must be locked
// and never unlocked: credentials are per thread, and a child forked from
// this thread inherits them. Dropping from the bounding set needs
// CAP_SETPCAP; a capability already out of the bounding set is skipped.
func confineThread(c Confinement) error {
	var mask [2]uint32
	for _, name := range c.Drop {
		n, ok := capNumbers[name]
		if !ok {
			return fmt.Errorf("unknown capability %q", name)
		}
		mask[n/32] |= 1 << (n % 32)
		in, err := unix.PrctlRetInt(unix.PR_CAPBSET_READ, n, 0, 0, 0)
		if err != nil {
			return fmt.Errorf("read bounding set for cap_%s: %w", name, err)
		}
		if in == 0 {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, n, 0, 0, 0); err != nil {
			return fmt.Errorf("drop cap_%s from the bounding set (the launcher needs CAP_SETPCAP): %w", name, err)
		}
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("read capabilities: %w", err)
	}
	if data[0].Inheritable&mask[0] != 0 || data[1].Inheritable&mask[1] != 0 {
		data[0].Inheritable &^= mask[0]
		data[1].Inheritable &^= mask[1]
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			return fmt.Errorf("clear inheritable capabilities: %w", err)
		}
	}
	// Ambient capabilities survive exec of ordinary binaries: none at all.
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	if c.NoNewPrivs {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("set no_new_privs: %w", err)
		}
	}
	return nil
}

// onConfinedThread runs start on a fresh OS thread confined by c (and in
// the network namespace enter switches to, if any). The thread is never
// unlocked: the Go runtime discards it when start returns, so no goroutine
// ever runs with its credentials or in its namespace.
func onConfinedThread(c Confinement, enter func() error, start func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if enter != nil {
			if err := enter(); err != nil {
				done <- err
				return
			}
		}
		if err := confineThread(c); err != nil {
			done <- err
			return
		}
		done <- start()
	}()
	return <-done
}
