package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

// lsmCgroupLoadable: can loadLSMCgroup load the program? Not if it has
// CO-RE relocations or calls to other BPF functions, which that loader
// does not resolve. A program of decision.h's helpers can gain either by
// a change far from it (TestLSMCgroupLoadable checks the committed ones).
func lsmCgroupLoadable(spec *ebpf.ProgramSpec) error {
	for i := range spec.Instructions {
		ins := &spec.Instructions[i]
		switch {
		case btf.CORERelocationMetadata(ins) != nil:
			return fmt.Errorf("%s: CO-RE relocations are not supported here", spec.Name)
		case ins.IsFunctionReference() || ins.IsFunctionCall() && ins.Reference() != "":
			return fmt.Errorf("%s: calls to other BPF functions are not supported here", spec.Name)
		}
	}
	return nil
}

// loadLSMCgroup loads an lsm_cgroup program, its maps taken from their pins
// in bpfDir. cilium/ebpf (v0.22) finds the kernel's attach target for
// lsm/ programs but not for lsm_cgroup/ ones, so its load reaches the
// kernel without attach_btf_id and fails ("Tracing programs must provide
// btf_id") on every kernel. This load does what it would: the program's
// map references become the pinned maps' descriptors, attach_btf_id is
// bpf_lsm_<hook> in the kernel's BTF, and BPF_PROG_LOAD runs with
// expected_attach_type BPF_LSM_CGROUP (Linux 6.0+). It takes programs
// without CO-RE relocations or calls to other functions (harden.c's
// guard_packet_socket inlines everything) and refuses others.
func loadLSMCgroup(spec *ebpf.ProgramSpec, bpfDir string) (*ebpf.Program, error) {
	if spec == nil {
		return nil, errors.New("no lsm_cgroup program in the object")
	}
	if err := lsmCgroupLoadable(spec); err != nil {
		return nil, err
	}
	kernel, err := btf.LoadKernelSpec()
	if err != nil {
		return nil, fmt.Errorf("kernel BTF: %w", err)
	}
	var hook *btf.Func
	if err := kernel.TypeByName("bpf_lsm_"+spec.AttachTo, &hook); err != nil {
		return nil, fmt.Errorf("LSM hook %s in the kernel's BTF: %w", spec.AttachTo, err)
	}
	hookID, err := kernel.TypeID(hook)
	if err != nil {
		return nil, fmt.Errorf("LSM hook %s: %w", spec.AttachTo, err)
	}
	insns := spec.Copy().Instructions
	var maps []*ebpf.Map
	defer func() {
		for _, m := range maps {
			m.Close()
		}
	}()
	for i := range insns {
		ins := &insns[i]
		if ins.IsLoadFromMap() && ins.Reference() != "" {
			m, err := ebpf.LoadPinnedMap(filepath.Join(bpfDir, ins.Reference()), nil)
			if err != nil {
				return nil, fmt.Errorf("%s: map %s: %w", spec.Name, ins.Reference(), err)
			}
			maps = append(maps, m)
			if err := ins.AssociateMap(m); err != nil {
				return nil, fmt.Errorf("%s: map %s: %w", spec.Name, ins.Reference(), err)
			}
		}
	}

	var code bytes.Buffer
	if err := insns.Marshal(&code, binary.LittleEndian); err != nil {
		return nil, fmt.Errorf("%s: %w", spec.Name, err)
	}
	fd, errno := progLoad(spec.Name, code.Bytes(), spec.License, uint32(hookID), nil)
	if errno != 0 {
		// Again with the verifier's log, for the error. A log of a big
		// program overflows and fails with ENOSPC; the first load's
		// error is the one that counts.
		log := make([]byte, 1<<20)
		progLoad(spec.Name, code.Bytes(), spec.License, uint32(hookID), log)
		log, _, _ = bytes.Cut(log, []byte{0})
		return nil, fmt.Errorf("load %s (lsm_cgroup/%s): %w: %s", spec.Name, spec.AttachTo, errno, lastLines(string(log), 3))
	}
	p, err := ebpf.NewProgramFromFD(int(fd))
	if err != nil {
		unix.Close(int(fd))
		return nil, fmt.Errorf("%s: %w", spec.Name, err)
	}
	return p, nil
}

// progLoad runs BPF_PROG_LOAD for an lsm_cgroup program; a non-nil log
// gets the verifier's log.
func progLoad(name string, code []byte, license string, hookID uint32, log []byte) (uintptr, unix.Errno) {
	lic := append([]byte(license), 0)
	attr := progLoadAttr{
		progType:           uint32(ebpf.LSM),
		insnCnt:            uint32(len(code) / 8),
		insns:              uint64(uintptr(unsafe.Pointer(&code[0]))),
		license:            uint64(uintptr(unsafe.Pointer(&lic[0]))),
		expectedAttachType: uint32(ebpf.AttachLSMCgroup),
		attachBTFID:        hookID,
	}
	if log != nil {
		attr.logLevel, attr.logSize, attr.logBuf = 1, uint32(len(log)), uint64(uintptr(unsafe.Pointer(&log[0])))
	}
	copy(attr.progName[:len(attr.progName)-1], name)
	fd, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_LOAD, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	runtime.KeepAlive(code)
	runtime.KeepAlive(lic)
	runtime.KeepAlive(log)
	return fd, errno
}

// progLoadAttr is the head of union bpf_attr for BPF_PROG_LOAD
// (include/uapi/linux/bpf.h), up to attach_btf_obj_fd.
type progLoadAttr struct {
	progType           uint32
	insnCnt            uint32
	insns              uint64
	license            uint64
	logLevel           uint32
	logSize            uint32
	logBuf             uint64
	kernVersion        uint32
	progFlags          uint32
	progName           [16]byte
	progIfindex        uint32
	expectedAttachType uint32
	progBTFFD          uint32
	funcInfoRecSize    uint32
	funcInfo           uint64
	funcInfoCnt        uint32
	lineInfoRecSize    uint32
	lineInfo           uint64
	lineInfoCnt        uint32
	attachBTFID        uint32
	attachBTFObjFD     uint32
}

// lastLines is the end of a verifier log: where it says what it refused.
func lastLines(log string, n int) string {
	lines := bytes.Split(bytes.TrimSpace([]byte(log)), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte(" / ")))
}
