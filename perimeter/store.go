package perimeter

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// HolesPrefix is where the holes of a site live in etcd, one key each:
// HolesPrefix + "PROTO/PEER/HOST/PORT", the value the Hole as JSON, the
// key attached to an etcd lease that ends with the hole's. Every gateway of
// the site writes the holes its agents ask for and programs its own table
// from all of them (active-active).
const HolesPrefix = "/procgate/perimeter/holes/"

// txnOps is how many operations go in one etcd transaction: etcd's
// default --max-txn-ops is 128.
const txnOps = 128

// HoleStore keeps a site's holes in etcd.
type HoleStore struct {
	cli *clientv3.Client
	log *slog.Logger
	// Timeout bounds each request to etcd; 5s if zero.
	Timeout time.Duration
}

// NewHoleStore is a store of holes in the etcd cli reaches.
func NewHoleStore(cli *clientv3.Client, log *slog.Logger) *HoleStore {
	if log == nil {
		log = slog.Default()
	}
	return &HoleStore{cli: cli, log: log}
}

func (s *HoleStore) ctx() (context.Context, context.CancelFunc) {
	d := s.Timeout
	if d == 0 {
		d = 5 * time.Second
	}
	return context.WithTimeout(context.Background(), d)
}

// holeKey is k's key in etcd.
func holeKey(k Key) string {
	return HolesPrefix + k.Proto.String() + "/" + k.Peer.String() + "/" + k.Host.String() + "/" + strconv.Itoa(int(k.Port))
}

// keyOfHole reads what holeKey writes.
func keyOfHole(s string) (Key, error) {
	f := strings.Split(strings.TrimPrefix(s, HolesPrefix), "/")
	if len(f) != 4 {
		return Key{}, fmt.Errorf("etcd key %q: want %sPROTO/PEER/HOST/PORT", s, HolesPrefix)
	}
	port, err := strconv.Atoi(f[3])
	if err != nil {
		return Key{}, fmt.Errorf("etcd key %q: port: %w", s, err)
	}
	k, err := Target{Proto: f[0], Peer: f[1], Host: f[2], Port: port}.Key()
	if err != nil {
		return Key{}, fmt.Errorf("etcd key %q: %w", s, err)
	}
	return k, nil
}

// decodeHole reads a hole's key and value.
func decodeHole(key, value []byte) (Hole, error) {
	k, err := keyOfHole(string(key))
	if err != nil {
		return Hole{}, err
	}
	var h Hole
	if err := json.Unmarshal(value, &h); err != nil {
		return Hole{}, fmt.Errorf("etcd key %s: %w", key, err)
	}
	if h.Key != k {
		return Hole{}, fmt.Errorf("etcd key %s holds hole %s", key, h.Key)
	}
	if err := checkName("delegate", h.Delegate); err != nil {
		return Hole{}, fmt.Errorf("etcd key %s: %w", key, err)
	}
	if err := checkName("user", h.User); err != nil {
		return Hole{}, fmt.Errorf("etcd key %s: %w", key, err)
	}
	return h, nil
}

// Put writes holes, each attached to an etcd lease that ends with it (to
// the second above): holes of one batch with the same lease share one
// etcd lease, and their writes go in transactions of up to txnOps.
func (s *HoleStore) Put(holes []Hole, now time.Time) error {
	byTTL := map[int64][]Hole{}
	for _, h := range holes {
		ttl := int64((h.Expires.Sub(now) + time.Second - 1) / time.Second)
		if ttl < 1 {
			continue // its lease has ended: nothing to share
		}
		byTTL[ttl] = append(byTTL[ttl], h)
	}
	for ttl, hs := range byTTL {
		ctx, cancel := s.ctx()
		lease, err := s.cli.Grant(ctx, ttl)
		cancel()
		if err != nil {
			return fmt.Errorf("etcd lease of %ds for %d holes: %w", ttl, len(hs), err)
		}
		var ops []clientv3.Op
		for _, h := range hs {
			h.Packets, h.Bytes = 0, 0
			v, err := json.Marshal(h)
			if err != nil {
				return fmt.Errorf("encode hole %s: %w", h.Key, err)
			}
			ops = append(ops, clientv3.OpPut(holeKey(h.Key), string(v), clientv3.WithLease(lease.ID)))
		}
		if err := s.txn(ops); err != nil {
			return fmt.Errorf("write %d holes to etcd: %w", len(hs), err)
		}
	}
	return nil
}

// Delete removes holes.
func (s *HoleStore) Delete(keys []Key) error {
	var ops []clientv3.Op
	for _, k := range keys {
		ops = append(ops, clientv3.OpDelete(holeKey(k)))
	}
	if err := s.txn(ops); err != nil {
		return fmt.Errorf("delete %d holes from etcd: %w", len(keys), err)
	}
	return nil
}

func (s *HoleStore) txn(ops []clientv3.Op) error {
	for len(ops) > 0 {
		n := min(len(ops), txnOps)
		ctx, cancel := s.ctx()
		_, err := s.cli.Txn(ctx).Then(ops[:n]...).Commit()
		cancel()
		if err != nil {
			return err
		}
		ops = ops[n:]
	}
	return nil
}

// List reads every hole and the revision it read them at. A key that does
// not decode is logged and skipped: one bad key must not cost the site its
// other holes.
func (s *HoleStore) List() ([]Hole, int64, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	resp, err := s.cli.Get(ctx, HolesPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("list holes in etcd: %w", err)
	}
	var out []Hole
	for _, kv := range resp.Kvs {
		h, err := decodeHole(kv.Key, kv.Value)
		if err != nil {
			s.log.Warn("hole in etcd skipped", "error", err.Error())
			continue
		}
		out = append(out, h)
	}
	return out, resp.Header.Revision, nil
}

// Follow keeps c's holes those in etcd until ctx ends: it lists them
// (c.Replace), then applies every change the watch reports (c.Apply). A
// watch that fails or falls behind a compaction lists again; so does a
// reconnection after etcd was away.
func (s *HoleStore) Follow(ctx context.Context, c *Controller, rev int64) {
	for ctx.Err() == nil {
		if rev == 0 {
			holes, r, err := s.List()
			if err == nil {
				err = c.Replace(holes)
			}
			if err != nil {
				s.log.Error("holes from etcd not applied; trying again", "error", err.Error())
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
				continue
			}
			rev = r
		}
		rev = s.watch(ctx, c, rev)
	}
}

// watch applies the changes after rev until the watch ends; it returns the
// revision to go on from, or 0 to list again.
func (s *HoleStore) watch(ctx context.Context, c *Controller, rev int64) int64 {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for resp := range s.cli.Watch(wctx, HolesPrefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1)) {
		if err := resp.Err(); err != nil {
			s.log.Warn("watch of the holes in etcd ended; listing them again", "error", err.Error())
			return 0
		}
		var put []Hole
		var del []Key
		for _, ev := range resp.Events {
			if ev.Type == clientv3.EventTypeDelete {
				k, err := keyOfHole(string(ev.Kv.Key))
				if err == nil {
					del = append(del, k)
				}
				continue
			}
			h, err := decodeHole(ev.Kv.Key, ev.Kv.Value)
			if err != nil {
				s.log.Warn("hole in etcd skipped", "error", err.Error())
				continue
			}
			put = append(put, h)
		}
		if err := c.Apply(put, del); err != nil {
			s.log.Error("holes from etcd not applied; listing them again", "error", err.Error())
			return 0
		}
		rev = resp.Header.Revision
	}
	if ctx.Err() == nil {
		s.log.Warn("watch of the holes in etcd closed; listing them again")
	}
	return 0
}
