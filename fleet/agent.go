package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Status is what a host reports under StatusKey.
type Status struct {
	Host   string   `json:"host"`
	Labels []string `json:"labels,omitempty"`
	// Revision is the etcd revision of the policy in force.
	Revision   int64     `json:"revision"`
	AppliedAt  time.Time `json:"applied_at"`
	Generation uint32    `json:"generation"`
	// PolicySHA256 is the hash of the documents in force (policy.Hash of
	// the merged documents, as procgate status shows it).
	PolicySHA256 string `json:"policy_sha256,omitempty"`
	// Error is the last policy refused (at ErrorRevision), kept until a
	// good one applies; the policy of Revision stays in force meanwhile.
	Error         string `json:"error,omitempty"`
	ErrorRevision int64  `json:"error_revision,omitempty"`
	Version       string `json:"version"`
	// Source is "etcd", or "last-known-good" while the host enforces the
	// policy it kept on disk because etcd could not be reached at boot.
	Source string `json:"source"`
	// SeenAt is when the host last wrote this.
	SeenAt time.Time `json:"seen_at"`
}

// Sources of the policy in force.
const (
	SourceEtcd     = "etcd"
	SourceLastGood = "last-known-good"
)

// AgentOptions configure a daemon's side of the fleet.
type AgentOptions struct {
	Client   *clientv3.Client
	Host     Host
	StateDir string // where the last good policy is kept
	Version  string
	Log      *slog.Logger
	// LeaseTTL is the status key's lease: a host silent this long
	// disappears from fleet status. 0: 15s.
	LeaseTTL time.Duration
	// Heartbeat is how often the status is written again (its seen_at);
	// 0: 30s.
	Heartbeat time.Duration
}

// Agent follows the policy documents in etcd and reports what the daemon
// applied. It never decides what is enforced: it hands snapshots to the
// daemon, which applies or refuses them.
type Agent struct {
	o       AgentOptions
	cli     *clientv3.Client
	log     *slog.Logger
	updates chan Snapshot
	resync  chan struct{}
	report  chan struct{}
	// beforeWatch, in tests, runs between a list and its watch.
	beforeWatch func(rev int64)

	mu        sync.Mutex
	status    Status
	connected bool
	lastErr   string
}

// NewAgent makes the agent of o.Host; Run starts it.
func NewAgent(o AgentOptions) *Agent {
	if o.LeaseTTL == 0 {
		o.LeaseTTL = 15 * time.Second
	}
	if o.Heartbeat == 0 {
		o.Heartbeat = 30 * time.Second
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	labels := make([]string, 0, len(o.Host.Labels))
	for _, l := range o.Host.Labels {
		labels = append(labels, l.String())
	}
	return &Agent{
		o: o, cli: o.Client, log: o.Log,
		updates: make(chan Snapshot, 1),
		resync:  make(chan struct{}, 1),
		report:  make(chan struct{}, 1),
		status:  Status{Host: o.Host.Name, Labels: labels, Version: o.Version},
	}
}

// First is the policy to enforce at boot: the documents in etcd when etcd
// answers within timeout and they merge; otherwise the last good policy
// kept on disk (fromDisk). With neither, an error: the daemon must not
// start open.
func (a *Agent) First(ctx context.Context, timeout time.Duration) (snap Snapshot, fromDisk bool, err error) {
	lctx, cancel := context.WithTimeout(ctx, timeout)
	snap, err = a.list(lctx, 0)
	cancel()
	if err == nil {
		if _, _, err = snap.Merge(a.o.Host); err == nil {
			return snap, false, nil
		}
	}
	etcdErr := err
	snap, err = LoadLastGood(a.o.StateDir)
	if err != nil {
		return Snapshot{}, false, fmt.Errorf("no policy: etcd: %v; %w", etcdErr, err)
	}
	a.log.Warn("enforcing the last good policy from disk", "revision", snap.Revision, "etcd_err", etcdErr)
	return snap, true, nil
}

// Updates are the snapshots to apply, the newest only: a daemon that was
// busy skips the revisions it missed.
func (a *Agent) Updates() <-chan Snapshot { return a.updates }

// Resync re-reads every document (SIGHUP).
func (a *Agent) Resync() {
	select {
	case a.resync <- struct{}{}:
	default:
	}
}

// Outcome is what the daemon did with a snapshot.
type Outcome struct {
	// Generation is the generation in force after it.
	Generation uint32
	// PolicySHA256 is the hash of the documents in force (policy.Hash).
	PolicySHA256 string
	// Err: the snapshot was refused, the previous policy stays.
	Err error
	// FromDisk: the policy in force is the last good one kept on disk.
	FromDisk bool
}

// Applied records the daemon's outcome for snap: no error, the policy of
// snap.Revision is in force (and is kept as the last good); else it was
// refused and the previous one stays.
func (a *Agent) Applied(snap Snapshot, o Outcome) {
	a.mu.Lock()
	st := &a.status
	if o.Err != nil {
		st.Error, st.ErrorRevision = o.Err.Error(), snap.Revision
	} else {
		st.Revision, st.Generation, st.AppliedAt = snap.Revision, o.Generation, time.Now().UTC()
		st.PolicySHA256 = o.PolicySHA256
		st.Error, st.ErrorRevision = "", 0
		st.Source = SourceEtcd
		if o.FromDisk {
			st.Source = SourceLastGood
		}
	}
	a.mu.Unlock()
	if o.Err == nil && !o.FromDisk {
		if serr := SaveLastGood(a.o.StateDir, a.o.Host, snap); serr != nil {
			a.log.Error("cannot keep the policy as last good", "revision", snap.Revision, "err", serr)
		}
	}
	select {
	case a.report <- struct{}{}:
	default:
	}
}

// State is the agent's view for the daemon's status: its report and
// whether etcd answers.
func (a *Agent) State() (Status, bool, string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.status, a.connected, a.lastErr
}

func (a *Agent) setConnected(ok bool, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if ok != a.connected {
		if ok {
			a.log.Info("etcd reachable", "host", a.o.Host.Name)
		} else {
			a.log.Warn("etcd unreachable; the policy in force stays", "err", err)
		}
	}
	a.connected = ok
	if err != nil {
		a.lastErr = err.Error()
	} else {
		a.lastErr = ""
	}
}

// Run follows the documents and reports the status until ctx ends.
func (a *Agent) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); a.follow(ctx) }()
	go func() { defer wg.Done(); a.reportLoop(ctx) }()
	wg.Wait()
}

// list reads the host's documents (Host.Keys) and the fleet-wide
// revocations in one transaction, so at one revision: at rev, or the
// newest when rev is 0. Only those keys: with etcd's RBAC a host may read
// its own documents and no other host's.
func (a *Agent) list(ctx context.Context, rev int64) (Snapshot, error) {
	var ops []clientv3.Op
	for _, w := range a.keys() {
		opts := slices.Clone(w.opts)
		if rev > 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		ops = append(ops, clientv3.OpGet(w.key, opts...))
	}
	resp, err := a.cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return Snapshot{}, fmt.Errorf("read the policy documents of %s from etcd: %w", a.o.Host.Name, err)
	}
	s := Snapshot{Revision: resp.Header.Revision, Docs: map[string][]byte{}, ModRevisions: map[string]int64{}}
	if rev > 0 {
		s.Revision = rev
	}
	for _, r := range resp.Responses {
		for _, kv := range r.GetResponseRange().GetKvs() {
			s.Docs[string(kv.Key)] = kv.Value
			s.ModRevisions[string(kv.Key)] = kv.ModRevision
		}
	}
	return s, nil
}

// keyRange is one key, or a prefix, the agent reads and watches.
type keyRange struct {
	key  string
	opts []clientv3.OpOption
}

// keys are what a host reads: its documents and the revocations
// (hostReads, what its etcd role grants).
func (a *Agent) keys() []keyRange {
	var out []keyRange
	for _, g := range hostReads(a.o.Host) {
		w := keyRange{key: g.Key}
		if g.Prefix {
			w.opts = []clientv3.OpOption{clientv3.WithPrefix()}
		}
		out = append(out, w)
	}
	return out
}

func list(ctx context.Context, cli *clientv3.Client, rev int64) (Snapshot, error) {
	opts := []clientv3.OpOption{clientv3.WithPrefix()}
	if rev > 0 {
		opts = append(opts, clientv3.WithRev(rev))
	}
	resp, err := cli.Get(ctx, PolicyPrefix, opts...)
	if err != nil {
		return Snapshot{}, fmt.Errorf("read %s from etcd: %w", PolicyPrefix, err)
	}
	s := Snapshot{Revision: resp.Header.Revision, Docs: map[string][]byte{}, ModRevisions: map[string]int64{}}
	if rev > 0 {
		s.Revision = rev
	}
	for _, kv := range resp.Kvs {
		s.Docs[string(kv.Key)] = kv.Value
		s.ModRevisions[string(kv.Key)] = kv.ModRevision
	}
	return s, nil
}

func (a *Agent) publish(s Snapshot) {
	select {
	case <-a.updates: // superseded
	default:
	}
	a.updates <- s
}

// follow lists, then watches from the list's revision; any end of the
// watch (compaction, a lost connection, SIGHUP) lists again, so no change
// is lost: a list is the whole state.
func (a *Agent) follow(ctx context.Context) {
	var bo backoff
	for ctx.Err() == nil {
		snap, err := a.list(ctx, 0)
		if err != nil {
			a.setConnected(false, err)
			bo.wait(ctx)
			continue
		}
		a.setConnected(true, nil)
		bo.reset()
		a.publish(snap)
		if a.beforeWatch != nil {
			a.beforeWatch(snap.Revision)
		}
		err = a.watch(ctx, snap.Revision)
		if ctx.Err() != nil {
			return
		}
		a.log.Info("re-reading the policy documents", "after_revision", snap.Revision, "why", err)
		if !errors.Is(err, errResync) && !errors.Is(err, rpctypes.ErrCompacted) {
			bo.wait(ctx)
		}
	}
}

var errResync = errors.New("resync asked")

// watch publishes a snapshot at the revision of each change after rev. It
// returns when the watch ends: compacted past rev, closed, or a resync.
// One watch per document key and one on the revocations (a handful, on
// one stream), not one on the policy prefix, for the same reason list
// reads only the host's keys.
func (a *Agent) watch(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	type got struct {
		wr clientv3.WatchResponse
		ok bool
	}
	all := make(chan got)
	for _, w := range a.keys() {
		wch := a.cli.Watch(wctx, w.key, append(slices.Clone(w.opts), clientv3.WithRev(rev+1))...)
		go func() {
			for {
				wr, ok := <-wch
				select {
				case all <- got{wr, ok}:
				case <-wctx.Done():
					return
				}
				if !ok {
					return
				}
			}
		}()
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.resync:
			return errResync
		case g := <-all:
			if !g.ok {
				return errors.New("watch closed")
			}
			if err := g.wr.Err(); err != nil {
				return fmt.Errorf("watch the policy documents from revision %d: %w", rev+1, err)
			}
			if len(g.wr.Events) == 0 {
				continue
			}
			// The documents as of the last change in this response: every
			// key at that one revision, never a mix of two. A transaction
			// that wrote several keys shows on several watches: read once.
			at := g.wr.Events[len(g.wr.Events)-1].Kv.ModRevision
			if at <= rev {
				continue
			}
			snap, err := a.list(ctx, at)
			if err != nil {
				return err
			}
			a.publish(snap)
			rev = at
		}
	}
}

// reportLoop keeps the status key written under a lease kept alive: a host
// that dies, or is cut off for longer than the lease, disappears.
func (a *Agent) reportLoop(ctx context.Context) {
	var lease clientv3.LeaseID
	var alive <-chan *clientv3.LeaseKeepAliveResponse
	var bo backoff
	beat := time.NewTicker(a.o.Heartbeat)
	defer beat.Stop()
	dirty := false
	for ctx.Err() == nil {
		if lease == 0 {
			l, ch, err := a.grant(ctx)
			if err != nil {
				a.setConnected(false, err)
				bo.wait(ctx)
				continue
			}
			lease, alive, dirty = l, ch, true
		}
		if dirty {
			if err := a.put(ctx, lease); err != nil {
				a.setConnected(false, err)
				lease = 0
				bo.wait(ctx)
				continue
			}
			bo.reset()
			dirty = false
		}
		select {
		case <-ctx.Done():
		case <-a.report:
			dirty = true
		case <-beat.C:
			dirty = true
		case _, ok := <-alive:
			if !ok {
				// Expired, revoked or unreachable past the TTL: a new
				// lease and the status again.
				a.setConnected(false, errors.New("status lease lost"))
				lease = 0
			}
		}
	}
}

func (a *Agent) grant(ctx context.Context) (clientv3.LeaseID, <-chan *clientv3.LeaseKeepAliveResponse, error) {
	gctx, cancel := context.WithTimeout(ctx, a.o.LeaseTTL)
	defer cancel()
	g, err := a.cli.Grant(gctx, int64(a.o.LeaseTTL/time.Second))
	if err != nil {
		return 0, nil, fmt.Errorf("grant the status lease: %w", err)
	}
	ch, err := a.cli.KeepAlive(ctx, g.ID)
	if err != nil {
		return 0, nil, fmt.Errorf("keep the status lease alive: %w", err)
	}
	return g.ID, ch, nil
}

func (a *Agent) put(ctx context.Context, lease clientv3.LeaseID) error {
	a.mu.Lock()
	a.status.SeenAt = time.Now().UTC()
	data, err := json.Marshal(a.status)
	a.mu.Unlock()
	if err != nil {
		return err
	}
	pctx, cancel := context.WithTimeout(ctx, a.o.LeaseTTL)
	defer cancel()
	if _, err := a.cli.Put(pctx, StatusKey(a.o.Host.Name), string(data), clientv3.WithLease(lease)); err != nil {
		return fmt.Errorf("write %s: %w", StatusKey(a.o.Host.Name), err)
	}
	a.setConnected(true, nil)
	return nil
}

// backoff waits 200ms doubling to 10s, with jitter so that a fleet does
// not come back in step after an outage.
type backoff struct{ d time.Duration }

func (b *backoff) reset() { b.d = 0 }

func (b *backoff) wait(ctx context.Context) {
	switch {
	case b.d == 0:
		b.d = 200 * time.Millisecond
	case b.d < 10*time.Second:
		b.d = min(2*b.d, 10*time.Second)
	}
	d := b.d/2 + rand.N(b.d/2+1)
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
