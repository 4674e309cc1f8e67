package audit

import (
	"context"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/procgate/procgate/internal/nstest"
)

// ringbufEmitter loads a socket filter that writes raw to ring, as the
// kernel hooks do with their events; it is run with BPF_PROG_TEST_RUN, so
// nothing is attached anywhere.
func ringbufEmitter(t *testing.T, ring *ebpf.Map, raw []byte) *ebpf.Program {
	t.Helper()
	if len(raw)%8 != 0 {
		t.Fatalf("event of %d bytes is not a whole number of words", len(raw))
	}
	size := int16(len(raw))
	var insns asm.Instructions
	for off := 0; off < len(raw); off += 8 {
		word := binary.NativeEndian.Uint64(raw[off:])
		insns = append(insns,
			asm.LoadImm(asm.R1, int64(word), asm.DWord),
			asm.StoreMem(asm.RFP, -size+int16(off), asm.R1, asm.DWord))
	}
	insns = append(insns,
		asm.LoadMapPtr(asm.R1, ring.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, int32(-size)),
		asm.Mov.Imm(asm.R3, int32(size)),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnRingbufOutput.Call(),
		asm.Mov.Imm(asm.R0, 0),
		asm.Return(),
	)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SocketFilter, License: "GPL", Instructions: insns})
	if err != nil {
		t.Fatalf("load ring buffer emitter: %v", err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

// TestRunWithRingbufReader drives Run with a real ring buffer reader: events
// arrive as the kernel writes them, and cancelling the context interrupts a
// Read blocked on an empty ring.
func TestRunWithRingbufReader(t *testing.T) {
	nstest.RequireRoot(t)
	ring, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.RingBuf, MaxEntries: 4096})
	if err != nil {
		t.Fatalf("create ring buffer: %v", err)
	}
	defer ring.Close()
	const n = 3
	e := denyV4()
	e.AppID = 1
	prog := ringbufEmitter(t, ring, e.encode(t))
	for range n {
		// Socket filters want at least an Ethernet header of input.
		if _, err := prog.Run(&ebpf.RunOptions{Data: make([]byte, 14)}); err != nil {
			t.Fatalf("run ring buffer emitter: %v", err)
		}
	}
	reader, err := ringbuf.NewReader(ring)
	if err != nil {
		t.Fatal(err)
	}
	a, err := New(reader, Options{Annotate: testAnnotate, Log: quietLog()})
	if err != nil {
		reader.Close()
		t.Fatal(err)
	}
	live, cancel := a.Subscribe(n)
	defer cancel()
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- a.Run(ctx) }()
	for i := range n {
		r := <-live
		if r.App != "web" || r.Dest != "10.1.2.3:5432/tcp" || r.Verdict != "deny" || r.CgroupID != 77 {
			t.Errorf("record %d is %+v, not the event written", i, r)
		}
	}
	// The ring is empty now, so Run is blocked in Read until the cancel.
	stop()
	if err := <-done; err != nil {
		t.Errorf("Run after cancel: %v", err)
	}
	if _, err := reader.Read(); !errors.Is(err, ringbuf.ErrClosed) {
		t.Errorf("reader after Run: %v, want it closed", err)
	}
	if got, want := a.Stats(), (Stats{Events: n}); got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
}
