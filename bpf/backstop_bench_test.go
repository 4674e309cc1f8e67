package bpf

import (
	"encoding/binary"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/internal/nstest"
)

// BenchmarkBackstopEgress measures one run of the egress backstop on a
// packet of each kind, through BPF_PROG_TEST_RUN: the kernel runs the
// program b.N times on a copy of the packet and reports the mean time of
// a run, without the clock reads that the BPF statistics of `make bench`
// add to every run (they put ~66 ns on an empty program). The packet's
// socket is the kernel's test socket, of the benchmark's cgroup, which no
// app claims; nothing is attached.
//
//	go test -run '^$' -bench BackstopEgress ./bpf/
func BenchmarkBackstopEgress(b *testing.B) {
	nstest.RequireRoot(b)
	e := benchEnforcer(b, nstest.Cgroup(b))
	const policy = "version: 1\ninternal:\n  prefixes: [10.0.0.0/8, 'fd00::/8']\napps:\n  - name: db\n    allow:\n      - to: 10.1.2.0/24\n"
	gen, err := e.Apply(Generation{Rules: mustPolicy(b, policy), AppIDs: map[string]uint32{"db": 1}})
	if err != nil {
		b.Fatal(err)
	}
	// The usual UDP datagram to an internal destination: its sendmsg hook
	// handed the verdict over on this CPU, for a task of the socket's
	// cgroup (the test socket is the benchmark's). Every CPU's entry, so
	// that it holds wherever the run lands.
	self, err := cgroups.OfPID(os.Getpid())
	if err != nil {
		b.Fatal(err)
	}
	selfID, err := cgroups.ID(self)
	if err != nil {
		b.Fatal(err)
	}
	internal4 := [4]byte{10, 1, 2, 3}
	handoff := procgateVerdictEntry{State: uint64(gen) << 32, CgroupId: selfID, AppId: 1}
	copy(handoff.D.Addr[:], internal4[:])
	handoff.D.Port, handoff.D.Family, handoff.D.Proto = 53, 4, protoUDP
	hookHandoff, err := ebpf.LoadPinnedMap(filepath.Join(e.opts.BPFDir, "hook_handoff"), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer hookHandoff.Close()
	for cpu := uint32(0); cpu < uint32(runtime.NumCPU()); cpu++ {
		if err := hookHandoff.Put(cpu, handoff); err != nil {
			b.Fatal(err)
		}
	}
	const (
		syn    = 0x02
		ack    = 0x10
		synAck = syn | ack
	)
	external4, external6 := [4]byte{198, 51, 100, 7}, [16]byte{0x20, 0x01, 0x0d, 0xb8, 15: 7}
	for _, c := range []struct {
		name string
		pkt  []byte
		want uint32 // the verdict: 1 passes
	}{
		{"tcp4-ack", tcp4(external4, ack), 1},
		{"tcp4-synack", tcp4(external4, synAck), 1},
		{"tcp6-ack", tcp6(external6, ack), 1},
		{"tcp4-syn-external", tcp4(external4, syn), 1},
		{"udp4-external", udp4(external4), 1},
		{"udp4-internal-handoff", udp4(internal4), 1},
		{"tcp4-syn-internal-unbound", tcp4(internal4, syn), 0},
	} {
		b.Run(c.name, func(b *testing.B) {
			got, per, err := e.harden.BackstopEgress.Benchmark(c.pkt, b.N, b.ResetTimer)
			if err != nil {
				b.Fatal(err)
			}
			if got != c.want {
				b.Fatalf("verdict %d, want %d", got, c.want)
			}
			b.ReportMetric(float64(per.Nanoseconds()), "ns/run")
		})
	}
}

// Test packets as BPF_PROG_TEST_RUN takes them for a cgroup_skb program:
// an Ethernet header (which the kernel pulls) and the IP packet.
func ether(typ uint16, ip []byte) []byte {
	p := make([]byte, 14, 14+len(ip))
	binary.BigEndian.PutUint16(p[12:], typ)
	return append(p, ip...)
}

func tcp4(dst [4]byte, flags byte) []byte {
	ip := make([]byte, 40)
	ip[0], ip[9] = 0x45, 6
	binary.BigEndian.PutUint16(ip[2:], 40)
	copy(ip[12:], []byte{10, 9, 9, 9})
	copy(ip[16:], dst[:])
	binary.BigEndian.PutUint16(ip[22:], 5432) // destination port
	ip[32] = 5 << 4
	ip[33] = flags
	return ether(0x0800, ip)
}

func udp4(dst [4]byte) []byte {
	ip := make([]byte, 28)
	ip[0], ip[9] = 0x45, 17
	binary.BigEndian.PutUint16(ip[2:], 28)
	copy(ip[16:], dst[:])
	binary.BigEndian.PutUint16(ip[22:], 53)
	binary.BigEndian.PutUint16(ip[24:], 8)
	return ether(0x0800, ip)
}

func tcp6(dst [16]byte, flags byte) []byte {
	ip := make([]byte, 60)
	ip[0], ip[6] = 0x60, 6
	binary.BigEndian.PutUint16(ip[4:], 20)
	copy(ip[24:], dst[:])
	binary.BigEndian.PutUint16(ip[42:], 5432)
	ip[52] = 5 << 4
	ip[53] = flags
	return ether(0x86dd, ip)
}

// benchEnforcer opens an enforcer on the cgroup root of a benchmark, with
// its pins in a bpffs of its own, and uninstalls it when the benchmark ends.
func benchEnforcer(b *testing.B, root string) *Enforcer {
	bpfDir := filepath.Join(nstest.BPFFS(b), "procgate")
	e, err := Open(Options{BPFDir: bpfDir, CgroupDir: root, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		e.Close()
		if _, err := Uninstall(bpfDir); err != nil {
			b.Errorf("uninstall: %v", err)
		}
	})
	return e
}
