package bpf

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/procgate/procgate/internal/bpfpin"
)

// tunGuard refuses apps' processes TUN and TAP devices (lsmguard.c): host-wide
// BPF LSM programs, optional like listenGuard; each is loaded on its own,
// so that a hook one kernel lacks does not take the other guard along.
type tunGuard struct {
	GuardTunCreate      *ebpf.Program `ebpf:"guard_tun_create"`
	GuardTunOpen        *ebpf.Program `ebpf:"guard_tun_open"`
	GuardTunAttachQueue *ebpf.Program `ebpf:"guard_tun_attach_queue"`
}

// listenGuard judges the port listen() binds a never-bound socket to as a
// bind to port 0 (lsmguard.c).
type listenGuard struct {
	GuardListen *ebpf.Program `ebpf:"guard_listen"`
}

// loadTaskGuards loads lsmguard.c's guards, their maps taken from the
// pins in bpfDir (after the main object's load); a guard's error is nil
// when it loaded.
func (e *Enforcer) loadTaskGuards() {
	specs, err := loadLsmguard()
	if err != nil {
		e.tunErr = fmt.Errorf("load embedded LSM guard objects: %w", err)
		e.listenErr = e.tunErr
		return
	}
	opts := bpfpin.Maps(e.opts.BPFDir)
	if e.tunErr = specs.LoadAndAssign(&e.tun, opts); e.tunErr != nil {
		e.tun = tunGuard{}
	}
	if e.listenErr = specs.LoadAndAssign(&e.listen, opts); e.listenErr != nil {
		e.listen = listenGuard{}
	}
}

// attachTaskGuards attaches the guards that loaded; one that does not
// attach is reported missing.
func (e *Enforcer) attachTaskGuards() {
	if e.tunErr == nil {
		if e.tunErr = e.attachTracing(e.tunHooks()); e.tunErr != nil {
			e.opts.Log.Warn("guard NOT active", "guard", "tun-devices", "why", e.tunErr)
		}
	}
	if e.listenErr == nil {
		if e.listenErr = e.attachTracing(e.listenHooks()); e.listenErr != nil {
			e.opts.Log.Warn("guard NOT active", "guard", "listen-autobind", "why", e.listenErr)
		}
	}
}

// tunHooks and listenHooks are lsmguard.c's programs, named as their
// pinned links.
func (e *Enforcer) tunHooks() []tracingHook {
	return []tracingHook{
		{"lsm_tun_create", e.tun.GuardTunCreate},
		{"lsm_tun_open", e.tun.GuardTunOpen},
		{"lsm_tun_attach_queue", e.tun.GuardTunAttachQueue},
	}
}

func (e *Enforcer) listenHooks() []tracingHook {
	return []tracingHook{{"lsm_listen", e.listen.GuardListen}}
}
