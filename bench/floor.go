package main

import (
	"fmt"
	"maps"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
)

// The floor: what a program costs at each of procgate's hooks before it
// does anything. The empty-programs variant attaches, at every hook that
// procgate's default set uses on the bench's paths (not sockops: the
// handover guard's tracker is off unless an app needs it, and the
// procgate-noapp-tracker and procgate-traceable rows show its price), a
// program that only
// returns "go on": its wall-clock ratio is what the kernel charges for
// running a program there at all, and its BPF run time, per hook, is
// what the kernel's statistics report for a program that does nothing
// (mostly the statistics' own clock reads). No design of procgate's
// programs can go below either.

// floorHook is one hook of the empty-programs variant.
type floorHook struct {
	name   string // as procgate's pinned programs (prog_<name>), for the report
	typ    ebpf.ProgramType
	attach ebpf.AttachType
	ret    int32 // the hook's "go on"
}

var floorHooks = []floorHook{
	{"sock_create", ebpf.CGroupSock, ebpf.AttachCGroupInetSockCreate, 1},
	{"connect4", ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect, 1},
	{"connect6", ebpf.CGroupSockAddr, ebpf.AttachCGroupInet6Connect, 1},
	{"sendmsg4", ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP4Sendmsg, 1},
	{"sendmsg6", ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP6Sendmsg, 1},
	{"egress", ebpf.CGroupSKB, ebpf.AttachCGroupInetEgress, 1},
}

// attachFloor attaches to v's cgroup, at every floor hook, the program
// own has for it (own's are then v's to close) or else an empty one, and
// keeps them all in v.progs for the BPF statistics.
func (b *bench) attachFloor(v *variant, own map[string]*ebpf.Program) error {
	cg := filepath.Join(b.host.cgroup, v.Name)
	v.progs = maps.Clone(own)
	if v.progs == nil {
		v.progs = map[string]*ebpf.Program{}
	}
	b.host.undo.push(func() error {
		closeProgs(v.progs)
		return nil
	})
	for _, h := range floorHooks {
		prog, ok := v.progs[h.name]
		if !ok {
			var err error
			prog, err = ebpf.NewProgram(&ebpf.ProgramSpec{
				Name:         "empty_" + h.name,
				Type:         h.typ,
				AttachType:   h.attach,
				License:      "MIT",
				Instructions: asm.Instructions{asm.Mov.Imm32(asm.R0, h.ret), asm.Return()},
			})
			if err != nil {
				return fmt.Errorf("load empty %s program: %w", h.name, err)
			}
			v.progs[h.name] = prog
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: h.attach, Program: prog})
		if err != nil {
			return fmt.Errorf("attach %s program to %s: %w", h.name, cg, err)
		}
		b.host.undo.push(l.Close)
	}
	return nil
}
