package bpf

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"github.com/vishvananda/netlink"

	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/policy"
	"github.com/procgate/procgate/ruleset"
)

func mustPolicy(t testing.TB, y string) *ruleset.Ruleset {
	t.Helper()
	rs, _, err := policy.Parse("policy.yaml", []byte(y))
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// servers listens in a namespace on every port the sweep tests connect to
// and keeps what it accepts; it runs in the test process, outside the
// enforced cgroup, so its sockets belong to no app.
type servers struct {
	t     testing.TB
	mu    sync.Mutex
	conns []net.Conn
	lns   []net.Listener
	pcs   []net.PacketConn
}

func startServers(t testing.TB, ns string, tcp, udp []string) *servers {
	t.Helper()
	s := &servers{t: t}
	t.Cleanup(s.close)
	if err := nstest.InNS(t, ns, func() error {
		for _, a := range tcp {
			ln, err := net.Listen("tcp", a)
			if err != nil {
				return err
			}
			s.lns = append(s.lns, ln)
		}
		for _, a := range udp {
			pc, err := net.ListenPacket("udp", a)
			if err != nil {
				return err
			}
			s.pcs = append(s.pcs, pc)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, ln := range s.lns {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				s.mu.Lock()
				s.conns = append(s.conns, c)
				s.mu.Unlock()
			}
		}()
	}
	return s
}

// dialFrom connects from the test process (no app) with a source address of
// the namespace, and keeps the connection.
func (s *servers) dialFrom(ns, src, dst string, n int) {
	s.t.Helper()
	if err := nstest.InNS(s.t, ns, func() error {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		for range n {
			c, err := d.Dial("tcp", dst)
			if err != nil {
				return err
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
		}
		return nil
	}); err != nil {
		s.t.Fatal(err)
	}
}

func (s *servers) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ln := range s.lns {
		ln.Close()
	}
	for _, pc := range s.pcs {
		pc.Close()
	}
	for _, c := range s.conns {
		c.Close()
	}
}

func (w *world) holder(cgroup string) *probe.Holder {
	w.t.Helper()
	h, err := probe.StartHolder(cgroup, w.netns)
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { h.Close() })
	return h
}

// holderAs is holder for a holder that runs as uid.
func (w *world) holderAs(cgroup string, uid int) *probe.Holder {
	w.t.Helper()
	h, err := probe.StartHolderAs(cgroup, w.netns, uid)
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { h.Close() })
	return h
}

func mustOpen(t testing.TB, h *probe.Holder, group, dest string, m probe.Method, n int) {
	t.Helper()
	if err := h.Open(group, dest, m, n); err != nil {
		t.Fatal(err)
	}
}

// sweepIn runs a sweep from a thread in the world's namespace.
func (w *world) sweepIn(opts SweepOptions) SweepResult {
	w.t.Helper()
	var res SweepResult
	if err := nstest.InNS(w.t, w.netns, func() error {
		var err error
		res, err = w.e.Sweep(opts)
		return err
	}); err != nil {
		w.t.Fatalf("sweep: %v", err)
	}
	if len(res.Failed) > 0 {
		w.t.Fatalf("sweep could not end %d sockets: %+v", len(res.Failed), res.Failed)
	}
	return res
}

// group is a holder's group and what must become of it.
type group struct {
	h     *probe.Holder
	name  string
	n     int
	ended bool
}

func checkGroups(t *testing.T, when string, groups []group) {
	t.Helper()
	for _, g := range groups {
		if err := g.h.Expect(g.name, g.n, g.ended); err != nil {
			t.Errorf("%s: %v", when, err)
		}
	}
}

// conntrackFlows lists the namespace's tracked flows as "proto src:sport dst:dport".
func conntrackFlows(t *testing.T, ns string) []string {
	t.Helper()
	var out []string
	if err := nstest.InNS(t, ns, func() error {
		for _, fam := range []netlink.InetFamily{2, 10} {
			flows, err := netlink.ConntrackTableList(netlink.ConntrackTable, fam)
			if err != nil {
				return err
			}
			for _, f := range flows {
				out = append(out, fmt.Sprintf("%d %s %s", f.Forward.Protocol,
					netip.AddrPortFrom(addrOf(f.Forward.SrcIP), f.Forward.SrcPort), netip.AddrPortFrom(addrOf(f.Forward.DstIP), f.Forward.DstPort)))
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

func addrOf(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

func flowOf(s EndedSocket) string {
	proto := 6
	if s.Proto == ruleset.UDP {
		proto = 17
	}
	return fmt.Sprintf("%d %s %s", proto, s.Local, s.Peer)
}

const sweepPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8, fd00::/8]
apps:
  - name: db
    allow:
      - to: 10.1.2.0/24
        proto: tcp
        ports: [5432]
      - to: fd00:1::/64
        ports: [443, 53]
      - to: 10.9.0.0/16
        proto: udp
        ports: [53]
  - name: other
    allow:
      - to: 10.1.2.0/24
        proto: tcp
        ports: [5432]
  - name: gone
    allow:
      - to: 10.0.0.0/8
`

// TestSweep: after a generation that withdraws grants (or an app), a
// sweep ends exactly the sockets the app made to destinations it may no
// longer reach, IPv4, IPv6 and IPv4-mapped, TCP and connected UDP, and
// their conntrack entries; external connections, other apps' sockets,
// sockets of no app and connections the app accepted stay. Both ways of
// sweeping must do the same.
func TestSweep(t *testing.T) {
	for _, method := range []SweepMethod{SweepIterator, SweepNetlink} {
		t.Run(string(method), func(t *testing.T) { testSweep(t, method) })
	}
	// What the daemon uses: the iterators where they load, sock_diag
	// where they do not (before 6.5).
	t.Run("auto", func(t *testing.T) { testSweep(t, SweepAuto) })
}

func testSweep(t *testing.T, method SweepMethod) {
	w := newWorld(t, "db", "other")
	if method == SweepIterator && w.e.sweep.err != nil {
		t.Skipf("kernel feature missing: socket iterators with bpf_sock_destroy (6.5+): %v", w.e.sweep.err)
	}
	// The app cgroups of a daemon live in one directory, the fence; a
	// socket made there by an app since removed has no grants left.
	fence := nstest.ChildCgroup(t, w.root, "apps")
	w.cgroups["gone"] = nstest.ChildCgroup(t, fence, "gone")
	w.cgroups["gone/run"] = w.cgroups["gone"]
	// Track connections, so that the sweep has conntrack entries to remove.
	nft := exec.Command("nsenter", "--net="+w.netns, nstest.Program(t, "nft"), "-f", "-")
	nft.Stdin = strings.NewReader("table inet track {\n chain out {\n type filter hook output priority 0; ct state new,established accept\n }\n}\n")
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("nft in test netns: %v\n%s", err, out)
	}
	srv := startServers(t, w.netns, []string{"0.0.0.0:5432", "[::]:443", "0.0.0.0:80"}, []string{"[::]:53"})

	// A process of no app, with internal connections made before any
	// enforcement: no grant was ever withdrawn from it.
	unbound := w.holder(w.cgroups["/unbound"])
	mustOpen(t, unbound, "internal", "10.1.2.3:5432/tcp", probe.Connect, 2)

	rs := mustPolicy(t, sweepPolicy)
	w.apply(rs)
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	db, other, gone := w.holder(w.cgroups["db/run"]), w.holder(w.cgroups["other/run"]), w.holder(w.cgroups["gone/run"])
	mustOpen(t, db, "tcp4", "10.1.2.3:5432/tcp", probe.Connect, 3)
	mustOpen(t, db, "mapped", "10.1.2.4:5432/tcp", probe.Mapped, 2)
	mustOpen(t, db, "tcp6", "[fd00:1::5]:443/tcp", probe.Connect, 2)
	mustOpen(t, db, "udp4", "10.9.0.1:53/udp", probe.Connect, 2)
	mustOpen(t, db, "udp6", "[fd00:1::6]:53/udp", probe.Connect, 1)
	mustOpen(t, db, "external", "192.0.2.10:80/tcp", probe.Connect, 1)
	// Connections an internal peer made to the app are not the app's to
	// lose: grants are about what it connects to.
	bound, err := db.Listen("accepted", "10.1.2.3:7000")
	if err != nil {
		t.Fatal(err)
	}
	srv.dialFrom(w.netns, "10.7.7.7", bound, 2)
	if err := db.Await("accepted", 2); err != nil {
		t.Fatal(err)
	}
	mustOpen(t, other, "tcp4", "10.1.2.3:5432/tcp", probe.Connect, 2)
	mustOpen(t, gone, "tcp4", "10.1.2.3:5432/tcp", probe.Connect, 2)

	groups := map[string]*group{}
	for _, g := range []group{
		{h: db, name: "tcp4", n: 3}, {h: db, name: "mapped", n: 2}, {h: db, name: "tcp6", n: 2},
		{h: db, name: "udp4", n: 2}, {h: db, name: "udp6", n: 1}, {h: db, name: "external", n: 1},
		{h: db, name: "accepted", n: 2}, {h: other, name: "tcp4", n: 2}, {h: gone, name: "tcp4", n: 2},
		{h: unbound, name: "internal", n: 2},
	} {
		groups[fmt.Sprintf("%d/%s", g.h.Pid(), g.name)] = &g
	}
	state := func(when string) {
		t.Helper()
		var all []group
		for _, g := range groups {
			all = append(all, *g)
		}
		checkGroups(t, when, all)
	}
	end := func(h *probe.Holder, names ...string) {
		for _, n := range names {
			groups[fmt.Sprintf("%d/%s", h.Pid(), n)].ended = true
		}
	}
	state("before any sweep")
	if res := w.sweepIn(SweepOptions{Fence: fence, Method: method}); len(res.Ended) != 0 {
		t.Fatalf("a sweep with nothing withdrawn ended %d sockets: %+v", len(res.Ended), res.Ended)
	}
	state("after a sweep with nothing withdrawn")

	ids := appIDs(rs)
	for _, step := range []struct {
		name  string
		apply func(rs *ruleset.Ruleset) *ruleset.Ruleset
		ends  func()
		want  int
	}{
		{
			name: "grant #0 of db withdrawn, app gone removed",
			apply: func(rs *ruleset.Ruleset) *ruleset.Ruleset {
				rs.Apps[0].Grants = rs.Apps[0].Grants[1:]
				rs.Apps = rs.Apps[:2]
				return rs
			},
			ends: func() { end(db, "tcp4", "mapped"); end(gone, "tcp4") },
			want: 7,
		},
		{
			name: "every grant of db withdrawn",
			apply: func(rs *ruleset.Ruleset) *ruleset.Ruleset {
				rs.Apps[0].Grants = nil
				rs.Apps = rs.Apps[:2]
				return rs
			},
			ends: func() { end(db, "tcp6", "udp4", "udp6") },
			want: 5,
		},
	} {
		before := conntrackFlows(t, w.netns)
		next := step.apply(mustPolicy(t, sweepPolicy))
		g := Generation{Rules: next, AppIDs: ids}
		for _, a := range next.Apps {
			g.Bindings = append(g.Bindings, w.binding(a.Name))
		}
		if _, err := w.e.Apply(g); err != nil {
			t.Fatal(err)
		}
		res := w.sweepIn(SweepOptions{Fence: fence, Method: method})
		if want := autoMethod(w.e, method); res.Method != want {
			t.Errorf("%s: the sweep used %q, want %q (iterators: %v)", step.name, res.Method, want, w.e.sweep.err)
		}
		step.ends()
		state(step.name)
		if len(res.Ended) != step.want {
			t.Errorf("%s: %d sockets ended, want %d: %+v", step.name, len(res.Ended), step.want, res.Ended)
		}
		for _, s := range res.Ended {
			switch s.CgroupID {
			case w.binding("db").CgroupID, w.binding("gone").CgroupID:
			default:
				t.Errorf("%s: ended a socket of cgroup %d: %+v", step.name, s.CgroupID, s)
			}
		}
		// Every ended flow's conntrack entry is gone, and no other.
		after := conntrackFlows(t, w.netns)
		var ended []string
		for _, s := range res.Ended {
			ended = append(ended, flowOf(s))
		}
		for _, f := range ended {
			if !slices.Contains(before, f) {
				t.Errorf("%s: ended flow %s had no conntrack entry before the sweep", step.name, f)
			}
			if slices.Contains(after, f) {
				t.Errorf("%s: conntrack entry of ended flow %s is still there", step.name, f)
			}
		}
		if got := len(before) - len(after); got != len(ended) || res.Conntrack != len(ended) {
			t.Errorf("%s: %d conntrack entries went (%d reported), want %d", step.name, got, res.Conntrack, len(ended))
		}
		t.Logf("%s: %d sockets ended in %v by %s, %d conntrack entries removed", step.name, len(res.Ended), res.Took, res.Method, res.Conntrack)
	}
	if res := w.sweepIn(SweepOptions{Fence: fence, Method: method}); len(res.Ended) != 0 {
		t.Fatalf("a second sweep ended %d more sockets: %+v", len(res.Ended), res.Ended)
	}
	state("after a second sweep")
}

// autoMethod is the method a sweep asked for method must use on this kernel.
func autoMethod(e *Enforcer, method SweepMethod) SweepMethod {
	switch {
	case method != SweepAuto:
		return method
	case e.sweep.err != nil:
		return SweepNetlink
	}
	return SweepIterator
}

func (w *world) binding(app string) Binding {
	w.t.Helper()
	dir := w.cgroups[app]
	id, err := cgroups.ID(dir)
	if err != nil {
		w.t.Fatal(err)
	}
	level, err := cgroups.Level(w.mount, dir)
	if err != nil {
		w.t.Fatal(err)
	}
	return Binding{App: app, CgroupID: id, Level: level}
}

// TestSweepRecordLayout: readIter views the iterator's output as Go
// records in place, which holds while the Go struct has no padding that
// the C struct has not (binary.Size counts only fields).
func TestSweepRecordLayout(t *testing.T) {
	if got, want := int(unsafe.Sizeof(sweepSweepRecord{})), binary.Size(sweepSweepRecord{}); got != want {
		t.Errorf("sweepSweepRecord is %d bytes in memory, %d in fields", got, want)
	}
}

// TestSweepShards: a sweep whose TCP walks (or sock_diag destroys) run as
// several shards ends every doomed socket once, whichever shard it falls
// to, and keeps the others, among them connections the app accepted on a
// destination it lost (each walk must see the listener before them).
func TestSweepShards(t *testing.T) {
	for _, method := range []SweepMethod{SweepIterator, SweepNetlink} {
		t.Run(string(method), func(t *testing.T) { testSweepShards(t, method) })
	}
}

func testSweepShards(t *testing.T, method SweepMethod) {
	const shards, doomed, kept, accepted = 3, 2000, 500, 200
	defer func(f func() int) { sweepShards = f }(sweepShards)
	sweepShards = func() int { return shards }
	w := newWorld(t, "db")
	if method == SweepIterator && w.e.sweep.err != nil {
		t.Skipf("kernel feature missing: socket iterators with bpf_sock_destroy (6.5+): %v", w.e.sweep.err)
	}
	if method == SweepIterator && !w.e.sweep.shardable {
		t.Skip("kernel feature missing: TCP iterator that resumes by socket cookies (6.16+): sweeps run one walk")
	}
	srv := startServers(t, w.netns, []string{"0.0.0.0:5432", "0.0.0.0:6543"}, nil)
	const granted = `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: db
    allow:
      - to: 10.1.2.0/24
        ports: [5432]
`
	w.apply(mustPolicy(t, granted+"      - to: 10.1.3.0/24\n        ports: [6543]\n"))
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	db := w.holder(w.cgroups["db/run"])
	mustOpen(t, db, "doomed", "10.1.3.3:6543/tcp", probe.Connect, doomed)
	mustOpen(t, db, "kept", "10.1.2.3:5432/tcp", probe.Connect, kept)
	bound, err := db.Listen("accepted", "10.1.3.3:7000")
	if err != nil {
		t.Fatal(err)
	}
	srv.dialFrom(w.netns, "10.7.7.7", bound, accepted)
	if err := db.Await("accepted", accepted); err != nil {
		t.Fatal(err)
	}
	if res := w.sweepIn(SweepOptions{Method: method}); len(res.Ended) != 0 {
		t.Fatalf("a sweep with nothing withdrawn ended %d sockets", len(res.Ended))
	}

	w.apply(mustPolicy(t, granted))
	res := w.sweepIn(SweepOptions{Method: method})
	checkGroups(t, "after the sweep", []group{
		{h: db, name: "doomed", n: doomed, ended: true},
		{h: db, name: "kept", n: kept},
		{h: db, name: "accepted", n: accepted},
	})
	seen := map[string]bool{}
	for _, s := range res.Ended {
		if seen[flowOf(s)] {
			t.Errorf("socket %s ended twice", flowOf(s))
		}
		seen[flowOf(s)] = true
		if s.Peer != netip.MustParseAddrPort("10.1.3.3:6543") {
			t.Errorf("ended a socket to %s", s.Peer)
		}
	}
	if len(res.Ended) != doomed {
		t.Errorf("%d sockets ended, want %d", len(res.Ended), doomed)
	}
	if method == SweepIterator {
		checkShares(t, w.e.sweep, shards)
	}
	if res := w.sweepIn(SweepOptions{Method: method}); len(res.Ended) != 0 {
		t.Errorf("a second sweep ended %d more sockets", len(res.Ended))
	}
}

// checkShares: the walks' outputs are kept until the next sweep: each
// shard of the last one ended its own share (its thread was the one the
// run named), and some.
func checkShares(t *testing.T, s *sweeper, shards int) {
	t.Helper()
	for i := range shards {
		var buf bytes.Buffer
		ended, err := readIter(bytes.NewReader(s.out[i].Bytes()), &buf)
		if err != nil {
			t.Fatal(err)
		}
		if len(ended) == 0 {
			t.Errorf("shard %d of %d ended no socket", i, shards)
		}
		for _, e := range ended {
			if got := shareOf(e, shards); got != i {
				t.Errorf("shard %d ended %s, of shard %d", i, flowOf(e), got)
			}
		}
	}
}

// shareOf is the shard of sweep.c's own_share for an IPv4 TCP socket: the
// kernel's fields as it reads them, in this machine's byte order.
func shareOf(s EndedSocket, shards int) int {
	daddr := s.Peer.Addr().As4()
	dport := binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, s.Peer.Port()))
	h := uint32(s.Local.Port()) | uint32(dport)<<16
	h ^= binary.NativeEndian.Uint32(daddr[:])
	h *= 0x9e3779b1
	return int(h>>16) % shards
}
