package bpf

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/internal/bpfpin"
	"github.com/procgate/procgate/ruleset"
)

// SweepMethod is how live sockets are found and ended.
type SweepMethod string

const (
	// SweepAuto uses the socket iterators where the kernel has them, and
	// sock_diag otherwise.
	SweepAuto SweepMethod = ""
	// SweepIterator: iter/tcp and iter/udp programs that call
	// bpf_sock_destroy (6.5+), deciding from the pinned maps.
	SweepIterator SweepMethod = "iterator"
	// SweepNetlink: a sock_diag dump, decided in Go with ruleset.Decide,
	// and SOCK_DESTROY requests (CONFIG_INET_DIAG_DESTROY; cgroup ids in the
	// dump need 5.7+).
	SweepNetlink SweepMethod = "netlink"
)

// SweepOptions says which sockets a sweep may end besides those of apps.
type SweepOptions struct {
	// Fence is the cgroup directory that holds every app cgroup (the
	// daemon's <cgroup-root>/procgate.apps). A socket made below it that no
	// app of the generation claims belonged to an app since removed from the
	// policy: it counts as a principal without grants. "": none.
	Fence  string
	Method SweepMethod
}

// EndedSocket is one socket a sweep ended, or failed to end.
type EndedSocket struct {
	Proto    ruleset.Proto // TCP or UDP
	Local    netip.AddrPort
	Peer     netip.AddrPort // IPv4-mapped peers as IPv4
	CgroupID uint64         // where the socket was made
	AppID    uint32         // 0: below the fence, in no app of the generation
	Err      error          // nil: ended
}

// SweepResult is what a sweep did.
type SweepResult struct {
	Method SweepMethod
	Ended  []EndedSocket
	Failed []EndedSocket
	// Conntrack counts connection-tracking entries of ended flows removed.
	Conntrack int
	// ConntrackTook is the part of Took spent removing them.
	ConntrackTook time.Duration
	Took          time.Duration
}

// maxSweepShards bounds the TCP walks of one sweep: sweep.c's
// MAX_SWEEP_SHARDS, the threads its config can name.
const maxSweepShards = len(sweepSweepConfig{}.ShardTid)

// sweepShards is how many TCP walks a sweep runs at once, each on a thread
// of its own: one per CPU this process may run on. Each walk passes every
// socket (only the teardowns are shared out), so more walks than CPUs to
// run them only cost more. A variable for tests, which run more walks
// than CPUs.
var sweepShards = func() int {
	return max(1, min(runtime.GOMAXPROCS(0), runtime.NumCPU(), maxSweepShards))
}

// sweeper holds the programs of sweep.c; they share the pinned maps of the
// main object.
type sweeper struct {
	objs sweepObjects
	// tcp and udp are the iterator links; each read of a new file from
	// them is one walk.
	tcp, udp *link.Iter
	// shardable: the kernel's TCP walk sees every socket once while
	// other walks end sockets (tcpWalkResumesByCookie).
	shardable bool
	// err says why the iterators are missing (nil: loaded).
	err error
	mu  sync.Mutex // one sweep at a time: run and out are a sweep's
	run uint32
	// out holds each walk's output (the TCP shards', then UDP's), kept
	// from sweep to sweep: fresh memory for 10,000 records cost as much
	// in page faults as decoding them.
	out []bytes.Buffer
}

// openSweeper loads the iterators after the main object has pinned its maps.
// A kernel without socket iterators or bpf_sock_destroy leaves err set, and
// sweeps use sock_diag.
func openSweeper(bpfDir string, log *slog.Logger) *sweeper {
	s := &sweeper{}
	spec, err := loadSweep()
	if err == nil {
		err = spec.LoadAndAssign(&s.objs, bpfpin.Maps(bpfDir))
	}
	if err == nil {
		s.tcp, err = link.AttachIter(link.IterOptions{Program: s.objs.SweepTcp})
	}
	if err == nil {
		s.udp, err = link.AttachIter(link.IterOptions{Program: s.objs.SweepUdp})
	}
	if err != nil {
		s.close()
		s.err = err
		log.Warn("socket iterators not available; live sockets are ended through sock_diag", "err", err)
	}
	s.shardable = tcpWalkResumesByCookie()
	return s
}

// tcpWalkResumesByCookie says whether the kernel's TCP iterator resumes a
// walk at the next read() by the cookies of the sockets of the bucket it
// had not shown yet (6.16+, "bpf: tcp: Avoid socket skips and repeats
// during iteration": union bpf_tcp_iter_batch_item has a cookie), so that
// it shows every socket that lives through the walk exactly once. Before,
// it resumed by an offset into the bucket, and a socket that another
// shard's walk ended meanwhile ahead of that offset made it skip one (a
// sweep of 2,000 doomed sockets in 3 shards missed one on 6.12): there,
// a sweep runs one TCP walk.
func tcpWalkResumesByCookie() bool {
	kernel, err := btf.LoadKernelSpec()
	if err != nil {
		return false
	}
	var item *btf.Union
	if err := kernel.TypeByName("bpf_tcp_iter_batch_item", &item); err != nil {
		return false
	}
	for _, m := range item.Members {
		if m.Name == "cookie" {
			return true
		}
	}
	return false
}

func (s *sweeper) close() {
	if s == nil {
		return
	}
	for _, l := range []*link.Iter{s.tcp, s.udp} {
		if l != nil {
			l.Close()
		}
	}
	s.objs.Close()
}

// Sweep ends the live sockets of the calling thread's network namespace
// that the generation in force no longer allows: TCP connections (any state
// but listening, TIME_WAIT and half-open accepted ones) and connected UDP
// sockets of app processes whose peer is internal and not covered by a
// grant of their app, IPv4 and IPv6; then the conntrack entries of those
// flows. Sockets of processes in no app (unless below opts.Fence), sockets
// to external destinations, and connections the app accepted are left
// alone. A connect() decided under the previous generation that has not yet
// put its socket in the kernel's tables when the walk passes is missed.
func (e *Enforcer) Sweep(opts SweepOptions) (SweepResult, error) {
	start := time.Now()
	res := SweepResult{Method: opts.Method}
	if res.Method == SweepAuto {
		res.Method = SweepIterator
		if e.sweep == nil || e.sweep.err != nil {
			res.Method = SweepNetlink
		}
	}
	var fence fenceRef
	if opts.Fence != "" {
		var err error
		if fence, err = fenceOf(opts.Fence); err != nil {
			return res, err
		}
	}
	var found []EndedSocket
	var err error
	switch res.Method {
	case SweepIterator:
		if e.sweep == nil || e.sweep.err != nil {
			return res, fmt.Errorf("socket iterators not loaded: %w", e.sweepErr())
		}
		found, err = e.sweep.sweep(fence)
	case SweepNetlink:
		found, err = e.sweepNetlink(fence)
	default:
		return res, fmt.Errorf("unknown sweep method %q", res.Method)
	}
	for _, s := range found {
		if s.Err != nil {
			res.Failed = append(res.Failed, s)
		} else {
			res.Ended = append(res.Ended, s)
		}
	}
	if len(res.Ended) > 0 {
		ctStart := time.Now()
		n, ctErr := deleteConntrack(res.Ended)
		res.Conntrack, res.ConntrackTook = n, time.Since(ctStart)
		if ctErr != nil {
			e.opts.Log.Debug("conntrack entries of ended sockets not removed", "err", ctErr)
		}
	}
	res.Took = time.Since(start)
	return res, err
}

func (e *Enforcer) sweepErr() error {
	if e.sweep == nil {
		return errors.New("enforcer closed")
	}
	return e.sweep.err
}

// fenceRef is the fence as the kernel names cgroups.
type fenceRef struct {
	id    uint64
	level int
}

func fenceOf(dir string) (fenceRef, error) {
	mount, err := cgroups.Mount()
	if err != nil {
		return fenceRef{}, err
	}
	id, err := cgroups.ID(dir)
	if err != nil {
		return fenceRef{}, fmt.Errorf("sweep fence: %w", err)
	}
	level, err := cgroups.Level(mount, dir)
	if err != nil {
		return fenceRef{}, fmt.Errorf("sweep fence: %w", err)
	}
	return fenceRef{id: id, level: level}, nil
}

// sweep walks the sockets once: the TCP walk as shards at once, each read
// by a thread of its own and ending its share of the doomed sockets, then
// UDP on this thread after the first shard (its destroys send nothing and
// cost little). The records come shard by shard, then UDP's; each socket
// is ended by one walk, its records together. One TCP walk where the
// kernel's walks could skip sockets others end (tcpWalkResumesByCookie).
func (s *sweeper) sweep(fence fenceRef) ([]EndedSocket, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// The thread whose id the run names for shard 0.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	shards := sweepShards()
	if !s.shardable {
		shards = 1
	}
	for len(s.out) < shards+1 {
		s.out = append(s.out, bytes.Buffer{})
	}
	s.run++
	cfg := sweepSweepConfig{FenceId: fence.id, FenceLevel: uint32(fence.level), Run: s.run, Shards: uint32(shards)}
	cfg.ShardTid[0] = uint32(unix.Gettid())

	files := make([]io.ReadCloser, shards+1) // the TCP shards', then UDP's
	recs := make([][]EndedSocket, len(files))
	errs := make([]error, len(files))
	read := func(i int) {
		recs[i], errs[i] = readIter(files[i], &s.out[i])
		files[i].Close()
		if errs[i] != nil {
			errs[i] = fmt.Errorf("walk %s sockets: %w", walkName(i, shards), errs[i])
		}
	}
	// The other shards' threads: each says its id, then reads its walk
	// once the run's settings name it and the walks are open (or
	// returns, if they could not be).
	type shardTid struct{ shard, tid int }
	tids := make(chan shardTid)
	start := make(chan bool)
	var wg sync.WaitGroup
	for i := 1; i < shards; i++ {
		wg.Go(func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			tids <- shardTid{i, unix.Gettid()}
			if <-start {
				read(i)
			}
		})
	}
	for range shards - 1 {
		t := <-tids
		cfg.ShardTid[t.shard] = uint32(t.tid)
	}
	err := s.open(&cfg, files)
	if err != nil {
		close(start)
		wg.Wait()
		return nil, err
	}
	for range shards - 1 {
		start <- true
	}
	read(0)
	read(shards)
	wg.Wait()
	var out []EndedSocket
	for _, r := range recs {
		out = append(out, r...)
	}
	return out, errors.Join(errs...)
}

// open writes the run's settings and opens its walks into files: the TCP
// walk once per shard, then UDP. They are opened here: a walk covers the
// network namespace of the thread that opens its file, whichever thread
// reads it. On error none stays open.
func (s *sweeper) open(cfg *sweepSweepConfig, files []io.ReadCloser) error {
	if err := s.objs.SweepRun.Put(uint32(0), cfg); err != nil {
		return fmt.Errorf("write sweep settings: %w", err)
	}
	for i := range files {
		l := s.tcp
		if i == len(files)-1 {
			l = s.udp
		}
		r, err := l.Open()
		if err != nil {
			for _, f := range files[:i] {
				f.Close()
			}
			return fmt.Errorf("open %s iterator: %w", walkName(i, len(files)-1), err)
		}
		files[i] = r
	}
	return nil
}

// walkName names walk i of a sweep with shards TCP walks, in errors.
func walkName(i, shards int) string {
	switch {
	case i == shards:
		return "udp"
	case shards == 1:
		return "tcp"
	}
	return fmt.Sprintf("tcp (shard %d of %d)", i, shards)
}

// readIter reads a walk to its end, its output in buf, and decodes its
// records. A socket whose destroy failed has an ended record and then a
// failed one.
func readIter(r io.Reader, buf *bytes.Buffer) ([]EndedSocket, error) {
	buf.Reset()
	if _, err := buf.ReadFrom(r); err != nil {
		return nil, fmt.Errorf("read iterator: %w", err)
	}
	data := buf.Bytes()
	const size = int(unsafe.Sizeof(sweepSweepRecord{}))
	if len(data)%size != 0 {
		return nil, fmt.Errorf("iterator output of %d bytes is no whole number of %d-byte records", len(data), size)
	}
	if len(data) == 0 {
		return nil, nil
	}
	// The records are sweep.c's struct as bpf2go lays it out for Go (no
	// implicit padding: TestSweepRecordLayout), in this machine's byte
	// order: viewed in place, where binary.Decode took 0.3 µs a record.
	if uintptr(unsafe.Pointer(&data[0]))%unsafe.Alignof(sweepSweepRecord{}) != 0 {
		return nil, errors.New("iterator output misaligned for its records")
	}
	recs := unsafe.Slice((*sweepSweepRecord)(unsafe.Pointer(&data[0])), len(data)/size)
	out := make([]EndedSocket, 0, len(recs))
	for _, rec := range recs {
		s := endedOf(rec)
		switch rec.Kind {
		case recordEnded:
			out = append(out, s)
		case recordFailed:
			if n := len(out); n > 0 && out[n-1].Local == s.Local && out[n-1].Peer == s.Peer && out[n-1].Proto == s.Proto {
				out[n-1].Err = s.Err
			} else {
				out = append(out, s)
			}
		default:
			return nil, fmt.Errorf("iterator record of unknown kind %d", rec.Kind)
		}
	}
	return out, nil
}

// Kinds of sweep_record: sweep.c's enum record_kind, generated.
const (
	recordEnded  = uint8(sweepRecordKindRECORD_ENDED)
	recordFailed = uint8(sweepRecordKindRECORD_FAILED)
)

func endedOf(rec sweepSweepRecord) EndedSocket {
	s := EndedSocket{Proto: ruleset.TCP, CgroupID: rec.CgroupId, AppID: rec.AppId}
	if rec.Proto == protoUDP {
		s.Proto = ruleset.UDP
	}
	addr := func(b [16]byte) netip.Addr {
		if rec.Family == 4 {
			return netip.AddrFrom4([4]byte(b[:4]))
		}
		return netip.AddrFrom16(b)
	}
	s.Local = netip.AddrPortFrom(addr(rec.Saddr), rec.Sport)
	s.Peer = netip.AddrPortFrom(addr(rec.Daddr), rec.Dport)
	if rec.Kind == recordFailed {
		s.Err = unix.Errno(-rec.Err)
	}
	return s
}
