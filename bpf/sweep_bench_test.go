package bpf

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/probe"
)

// BenchmarkSweep measures one sweep after a revocation that ends n TCP
// connections of an app, among 2n sockets in the namespace (the peer's
// ends stay), with conntrack tracking every flow. The peer is a holder of
// no app that keeps its ends as bare descriptors: nothing of it wakes on
// the resets, which the destroys deliver on loopback themselves. Timed: the walk, the
// destroys and the conntrack deletes (also reported alone); not the Apply
// before it. ms/walk is a sweep of the same sockets before the revocation,
// which ends none: the walk alone; the rest of ms/sweep is the destroys.
//
//	go test -run '^$' -bench Sweep -benchtime 3x ./bpf/
func BenchmarkSweep(b *testing.B) {
	for _, method := range []SweepMethod{SweepIterator, SweepNetlink} {
		for _, n := range []int{10, 1000, 10000} {
			b.Run(fmt.Sprintf("%s/sockets=%d", method, n), func(b *testing.B) { benchSweep(b, method, n) })
		}
	}
}

func benchSweep(b *testing.B, method SweepMethod, n int) {
	nstest.RequireRoot(b)
	root, ns := nstest.Cgroup(b), nstest.NetNS(b)
	nstest.AnyIPLoopback(b, ns)
	app := nstest.ChildCgroup(b, root, "db")
	e := benchEnforcer(b, root)
	if method == SweepIterator && e.sweep.err != nil {
		b.Skipf("kernel feature missing: socket iterators with bpf_sock_destroy (6.5+): %v", e.sweep.err)
	}
	mount, err := cgroups.Mount()
	if err != nil {
		b.Fatal(err)
	}
	id, err := cgroups.ID(app)
	if err != nil {
		b.Fatal(err)
	}
	level, err := cgroups.Level(mount, app)
	if err != nil {
		b.Fatal(err)
	}
	const granted = "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: db\n    allow:\n      - to: 10.1.2.0/24\n"
	apply := func(y string) {
		b.Helper()
		g := Generation{Rules: mustPolicy(b, y), AppIDs: map[string]uint32{"db": 1}, Bindings: []Binding{{App: "db", CgroupID: id, Level: level}}}
		if _, err := e.Apply(g); err != nil {
			b.Fatal(err)
		}
	}
	apply(granted)
	if err := e.Attach(); err != nil {
		b.Fatal(err)
	}
	nft := exec.Command("nsenter", "--net="+ns, nstest.Program(b, "nft"), "-f", "-")
	nft.Stdin = strings.NewReader("table inet track {\n chain out {\n type filter hook output priority 0; ct state new,established accept\n }\n}\n")
	if out, err := nft.CombinedOutput(); err != nil {
		b.Fatalf("nft in bench netns: %v\n%s", err, out)
	}
	peerCgroup := nstest.ChildCgroup(b, root, "peer")
	startPeer := func() *probe.Holder {
		b.Helper()
		p, err := probe.StartHolder(peerCgroup, ns)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := p.Listen("s", "0.0.0.0:5432"); err != nil {
			p.Close()
			b.Fatal(err)
		}
		return p
	}
	peer := startPeer()
	b.Cleanup(func() { peer.Close() })

	var took, ctTook, walkTook time.Duration
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		apply(granted)
		h, err := probe.StartHolder(app, ns)
		if err != nil {
			b.Fatal(err)
		}
		if err := h.Open("c", "10.1.2.3:5432/tcp", probe.Connect, n); err != nil {
			b.Fatal(err)
		}
		if err := peer.Await("s", n); err != nil {
			b.Fatal(err)
		}
		var walk SweepResult
		if err := nstest.InNS(b, ns, func() error {
			var err error
			walk, err = e.Sweep(SweepOptions{Method: method})
			return err
		}); err != nil {
			b.Fatal(err)
		}
		if len(walk.Ended) != 0 {
			b.Fatalf("a sweep under the granting policy ended %d sockets", len(walk.Ended))
		}
		walkTook += walk.Took
		apply(strings.Replace(granted, "    allow:\n      - to: 10.1.2.0/24\n", "", 1))
		var res SweepResult
		b.StartTimer()
		err = nstest.InNS(b, ns, func() error {
			var err error
			res, err = e.Sweep(SweepOptions{Method: method})
			return err
		})
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		if len(res.Ended) != n || len(res.Failed) != 0 || res.Conntrack != n {
			b.Fatalf("ended %d, failed %d, conntrack entries %d; want %d, 0, %d", len(res.Ended), len(res.Failed), res.Conntrack, n, n)
		}
		if err := h.Expect("c", n, true); err != nil {
			b.Fatal(err)
		}
		took += res.Took
		ctTook += res.ConntrackTook
		h.Close()
		peer.Close()
		peer = startPeer()
	}
	b.ReportMetric(float64(took.Microseconds())/float64(b.N)/1000, "ms/sweep")
	b.ReportMetric(float64(took.Nanoseconds())/float64(b.N)/float64(n)/1000, "µs/socket")
	// Apart, as the deletes once cost ten times the walk and destroys.
	b.ReportMetric(float64(ctTook.Nanoseconds())/float64(b.N)/float64(n)/1000, "µs/conntrack-entry")
	b.ReportMetric(float64(walkTook.Microseconds())/float64(b.N)/1000, "ms/walk")
}
