package pinhole

import (
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/pinholetest"
	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/ruleset"
)

// BenchmarkHostGuard measures what the host guard costs per packet, from the
// kernel's own run-time accounting of guard_ingress (BPF_ENABLE_STATS, on
// only while the benchmark runs): for a datagram to an auxiliary socket
// (storage lookup, header reads, allow lookup) and to another socket of the
// subtree (storage lookup only). Run as root:
//
//	go test -run '^$' -bench HostGuard ./pinhole/
func BenchmarkHostGuard(b *testing.B) {
	in := &ruleset.Inbound{Ports: []ruleset.PortRange{{Lo: 40000, Hi: 40010}}, Proto: ruleset.Both}
	r := newKernelRig(b, in, slog.New(slog.NewTextHandler(io.Discard, nil)))
	k, appDir, ns := r.k, r.appDir, r.ns
	lo := netip.MustParseAddr("127.0.0.1")
	if err := k.Allow(perimeter.Key{Peer: lo, Proto: perimeter.UDP, Host: lo, Port: 40002}); err != nil {
		b.Fatal(err)
	}
	srv := pinholetest.Start(b, appDir, ns)
	srv.Do("bind 40002")
	srv.Do("bind 41002")
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Skipf("BPF run-time statistics: %v", err)
	}
	defer stats.Close()
	for _, port := range []string{"40002", "41002"} {
		b.Run("port="+port, func(b *testing.B) {
			c, err := nstest.DialIn(ns, "udp", "127.0.0.1:"+port, time.Second)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			before, err := k.objs.GuardIngress.Stats()
			if err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, 64)
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write([]byte("ping")); err != nil {
					b.Fatal(err)
				}
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := c.Read(buf); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			after, err := k.objs.GuardIngress.Stats()
			if err != nil {
				b.Fatal(err)
			}
			if runs := after.RunCount - before.RunCount; runs > 0 {
				b.ReportMetric(float64(after.Runtime-before.Runtime)/float64(runs), "guard-ns/pkt")
			}
		})
	}
}
