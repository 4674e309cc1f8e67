package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/cgroups"
)

// Ways into the identity of an app through cgroups and namespaces: move
// into the holder's app cgroup (by cgroup.procs, cgroup.threads or
// clone3(CLONE_INTO_CGROUP)), first from a user and cgroup namespace of our
// own, and leave the network namespace.

// envVictim carries the victim cgroup's path (and envMount the cgroup2
// mount it is below) to a technique's second stage, which may run in
// namespaces where it cannot find them itself: in a new cgroup namespace,
// mountinfo shows the host's cgroup2 mount with a root outside the
// namespace.
const (
	envVictim = "PROCGATE_ATTACK_VICTIM_CGROUP"
	envMount  = "PROCGATE_ATTACK_CGROUP2_MOUNT"
)

// victimCgroup is the holder's cgroup, found as anyone can: from
// /proc/PID/cgroup and the cgroup2 mount.
func (e *env) victimCgroup() (string, error) {
	if v := os.Getenv(envVictim); v != "" {
		return v, nil
	}
	h, err := e.dialHolder()
	if err != nil {
		return "", err
	}
	defer h.Close()
	info, _, err := h.request("info")
	if err != nil {
		return "", err
	}
	return cgroups.OfPID(info.Pid)
}

// plainConnect is the second step of the cgroup techniques: an ordinary
// connection to the target from wherever the first step put the process.
func (e *env) plainConnect(a attempt) attempt {
	b := e.tcp(tcpCase{dst: e.cfg.target4})
	b.Detail = joinDetail(a.Detail, b.Detail)
	return b
}

func joinDetail(a, b string) string {
	switch {
	case a == "":
		return b
	case b == "":
		return a
	}
	return a + "; " + b
}

// cgroupWriteTry writes this process's pid (or, for threads, this thread's
// id) into the victim's cgroup.procs (cgroup.threads), then connects.
func (e *env) cgroupWriteTry(threads bool) attempt {
	a := attempt{Dest: destString(e.cfg.target4, e.cfg.tcpPort, "tcp")}
	victim, err := e.victimCgroup()
	if err != nil {
		return a.unavailable("find the holder's cgroup", err)
	}
	file, id := "cgroup.procs", os.Getpid()
	if threads {
		// The connect must come from the thread that moved.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		file, id = "cgroup.threads", unix.Gettid()
	}
	if err := os.WriteFile(filepath.Join(victim, file), []byte(strconv.Itoa(id)), 0); err != nil {
		return a.failed("write "+file+" of the holder's app cgroup", err)
	}
	a.Detail = "moved into " + victim
	return e.plainConnect(a)
}

// stage2 runs this technique's second stage in a child process started
// with attr, and returns its attempt; a child that cannot be started is the
// technique's failure.
func (e *env) stage2(a attempt, what string, attr *syscall.SysProcAttr, victim string) attempt {
	if victim != "" {
		os.Setenv(envVictim, victim)
		if mount, err := cgroups.Mount(); err == nil {
			os.Setenv(envMount, mount)
		}
	}
	b := spawnOne(e.cfg, e.tech.name, 2, attr)
	if b.Stage == "spawn" {
		b.Stage = what
		b.Dest = a.Dest
	}
	return b
}

// cloneIntoCgroupTry starts a process directly in the victim's cgroup with
// clone3(CLONE_INTO_CGROUP); that process connects.
func (e *env) cloneIntoCgroupTry() attempt {
	if e.cfg.stage == 2 {
		return e.plainConnect(attempt{Detail: "started in the holder's app cgroup"})
	}
	a := attempt{Dest: destString(e.cfg.target4, e.cfg.tcpPort, "tcp")}
	victim, err := e.victimCgroup()
	if err != nil {
		return a.unavailable("find the holder's cgroup", err)
	}
	dir, err := unix.Open(victim, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return a.failed("open the holder's cgroup", err)
	}
	defer unix.Close(dir)
	return e.stage2(a, "clone3(CLONE_INTO_CGROUP)", &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: dir}, "")
}

// userNS returns the attributes of a child in a new user namespace (plus
// extra), mapping its root to our user, as an unprivileged user may.
func userNS(extra uintptr) *syscall.SysProcAttr {
	uid, gid := os.Geteuid(), os.Getegid()
	return &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER | extra,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: uid, Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: gid, Size: 1}},
	}
}

// userNSMoveTry: in a user and cgroup namespace of our own (root there),
// write our pid into the victim's cgroup.procs through the host's mount;
// with mount, mount a cgroup2 of our own cgroup namespace first and look
// for the victim there.
func (e *env) userNSMoveTry(mount bool) attempt {
	a := attempt{Dest: destString(e.cfg.target4, e.cfg.tcpPort, "tcp")}
	if e.cfg.stage == 1 {
		victim, err := e.victimCgroup()
		if err != nil {
			return a.unavailable("find the holder's cgroup", err)
		}
		flags := uintptr(syscall.CLONE_NEWCGROUP)
		if mount {
			flags |= syscall.CLONE_NEWNS
		}
		return e.stage2(a, "clone(CLONE_NEWUSER|CLONE_NEWCGROUP)", userNS(flags), victim)
	}
	victim := os.Getenv(envVictim)
	procs := filepath.Join(victim, "cgroup.procs")
	if mount {
		mnt, cleanup, err := mountOwnCgroup2()
		if err != nil {
			return a.failed("mount cgroup2 in the new namespaces", err)
		}
		defer cleanup()
		// Our cgroup namespace's root is our own cgroup: the victim's is
		// somewhere else, and its path relative to the host's mount does
		// not exist here.
		rel, err := filepath.Rel(os.Getenv(envMount), victim)
		if err != nil || strings.HasPrefix(rel, "..") {
			return a.failed("locate the victim below the cgroup2 mount", fmt.Errorf("%s is not below %q", victim, os.Getenv(envMount)))
		}
		procs = filepath.Join(mnt, rel, "cgroup.procs")
	}
	if err := os.WriteFile(procs, []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
		a = a.failed("write "+procs, err)
		a.Detail = "as root of a new user namespace"
		return a
	}
	return e.plainConnect(attempt{Detail: "moved into " + victim + " from a new user namespace"})
}

// mountOwnCgroup2 mounts the cgroup2 file system of this cgroup namespace on
// a new directory, in this (new, made private) mount namespace. cleanup
// unmounts it and removes the directory, which the host's /tmp sees.
func mountOwnCgroup2() (dir string, cleanup func(), err error) {
	if err := unix.Mount("none", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return "", nil, fmt.Errorf("make mounts private: %w", err)
	}
	if dir, err = os.MkdirTemp("", "attack-cgroup2-"); err != nil {
		return "", nil, err
	}
	if err := unix.Mount("cgroup2", dir, "cgroup2", 0, ""); err != nil {
		os.Remove(dir)
		return "", nil, fmt.Errorf("mount cgroup2 on %s: %w", dir, err)
	}
	return dir, func() {
		_ = unix.Unmount(dir, unix.MNT_DETACH)
		_ = os.Remove(dir)
	}, nil
}

// netnsTry leaves for a new network namespace (with a user namespace when
// unprivileged) and tries the target from there, by TCP or a raw socket
// (which the new user namespace allows).
func (e *env) netnsTry(raw bool) attempt {
	a := attempt{Dest: destString(e.cfg.target4, e.cfg.tcpPort, "tcp")}
	if raw {
		a.Dest = destString(e.cfg.target4, 0, "icmp echo")
	}
	if e.cfg.stage == 1 {
		attr := &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
		if os.Geteuid() != 0 || raw {
			attr = userNS(syscall.CLONE_NEWNET)
		}
		return e.stage2(a, "clone(CLONE_NEWNET)", attr, "")
	}
	const note = "from a new network namespace (only lo, down; no route)"
	var b attempt
	if raw {
		b = e.rawTry(rawCase{proto: unix.IPPROTO_ICMP, what: "icmp echo", build: buildEcho(false)})
	} else {
		b = e.tcp(tcpCase{dst: e.cfg.target4})
	}
	b.Detail = joinDetail(note, b.Detail)
	return b
}
