package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/pmezard/go-difflib/difflib"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/procgate/procgate/policy"
)

// Target is the document a push or a diff is about: the fleet document, a
// group's overlay or a host's.
type Target struct {
	Group *Label
	Host  string
}

// Key is the target's document key.
func (t Target) Key() string {
	switch {
	case t.Group != nil:
		return GroupKey(*t.Group)
	case t.Host != "":
		return HostKey(t.Host)
	}
	return FleetKey
}

// ErrStale is a push whose base is no longer the document in etcd.
var ErrStale = errors.New("stale base")

// Push writes data as t's document, after checking it merges with the
// documents in etcd. The write is a compare-and-swap on the document's mod
// revision: base when not 0 (as `policy diff` showed it), else the one
// read for the check; a document changed since is refused with ErrStale.
// It returns the revision written.
func Push(ctx context.Context, cli *clientv3.Client, t Target, data []byte, base int64) (int64, error) {
	snap, err := list(ctx, cli, 0)
	if err != nil {
		return 0, err
	}
	key := t.Key()
	if err := Check(ctx, cli, snap, t, data); err != nil {
		return 0, err
	}
	have := snap.ModRevisions[key]
	if base == 0 {
		base = have
	}
	resp, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", base)).
		Then(clientv3.OpPut(key, string(data))).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return 0, fmt.Errorf("write %s: %w", key, err)
	}
	if !resp.Succeeded {
		now := int64(0)
		if r := resp.Responses[0].GetResponseRange(); r != nil && len(r.Kvs) > 0 {
			now = r.Kvs[0].ModRevision
		}
		return 0, fmt.Errorf("%w: %s was changed at revision %d since the base %d this push was made from; nothing written. See the change with `procgate policy diff`, then push again", ErrStale, key, now, base)
	}
	return resp.Header.Revision, nil
}

// Check validates data as t's document against the other documents of
// snap: a fleet document on its own and with each overlay in etcd; an
// overlay with the fleet document (and, for a host that reported its
// labels, with its groups' overlays).
func Check(ctx context.Context, cli *clientv3.Client, snap Snapshot, t Target, data []byte) error {
	docs := maps(snap.Docs)
	docs[t.Key()] = data
	next := Snapshot{Revision: snap.Revision, Docs: docs}
	if t.Group == nil && t.Host == "" {
		if _, _, err := policy.ParseFiles([]policy.File{{Path: FleetKey, Data: data}}); err != nil {
			return err
		}
		var errs []error
		for _, k := range slices.Sorted(mapKeys(docs)) {
			if k == FleetKey || !(strings.HasPrefix(k, GroupPrefix) || strings.HasPrefix(k, HostPrefix)) {
				continue
			}
			files := []policy.File{{Path: FleetKey, Data: data}, {Path: k, Data: docs[k]}}
			if _, _, err := policy.ParseFiles(files); err != nil {
				errs = append(errs, fmt.Errorf("with overlay %s: %w", k, err))
			}
		}
		return errors.Join(errs...)
	}
	h := Host{}
	if t.Group != nil {
		h.Labels = []Label{*t.Group}
	} else {
		h = hostOf(ctx, cli, t.Host)
	}
	_, _, err := next.Merge(h)
	return err
}

// hostOf is host name with the labels its status reports (none when it
// never reported).
func hostOf(ctx context.Context, cli *clientv3.Client, name string) Host {
	h := Host{Name: name}
	resp, err := cli.Get(ctx, StatusKey(name))
	if err != nil || len(resp.Kvs) == 0 {
		return h
	}
	var st Status
	if json.Unmarshal(resp.Kvs[0].Value, &st) != nil {
		return h
	}
	for _, s := range st.Labels {
		if l, err := ParseLabel(s); err == nil {
			h.Labels = append(h.Labels, l)
		}
	}
	return h
}

// DiffDocument is the unified diff from t's document in etcd to data.
func DiffDocument(ctx context.Context, cli *clientv3.Client, t Target, data []byte) (string, int64, error) {
	snap, err := list(ctx, cli, 0)
	if err != nil {
		return "", 0, err
	}
	key := t.Key()
	return unified(key+"@"+fmt.Sprint(snap.ModRevisions[key]), key+" (new)", snap.Docs[key], data), snap.ModRevisions[key], nil
}

// DiffHost is the unified diff of host name's merged policy: from the
// revision it applied to the newest (data nil), or from the newest to the
// newest with data as its host overlay.
func DiffHost(ctx context.Context, cli *clientv3.Client, name string, data []byte) (string, error) {
	h := hostOf(ctx, cli, name)
	now, err := list(ctx, cli, 0)
	if err != nil {
		return "", err
	}
	from, to := now, now
	fromName, toName := fmt.Sprintf("%s@%d", name, now.Revision), name+" (with the new overlay)"
	if data != nil {
		docs := maps(now.Docs)
		docs[HostKey(name)] = data
		to = Snapshot{Revision: now.Revision, Docs: docs}
	} else {
		st, err := hostStatus(ctx, cli, name)
		if err != nil {
			return "", err
		}
		if from, err = list(ctx, cli, st.Revision); err != nil {
			return "", fmt.Errorf("the policy %s applied (revision %d): %w", name, st.Revision, err)
		}
		fromName, toName = fmt.Sprintf("%s@%d (applied)", name, st.Revision), fmt.Sprintf("%s@%d (newest)", name, now.Revision)
	}
	a, err := from.Merged(h)
	if err != nil {
		return "", err
	}
	b, err := to.Merged(h)
	if err != nil {
		return "", err
	}
	return unified(fromName, toName, a, b), nil
}

func hostStatus(ctx context.Context, cli *clientv3.Client, name string) (Status, error) {
	resp, err := cli.Get(ctx, StatusKey(name))
	if err != nil {
		return Status{}, fmt.Errorf("read %s: %w", StatusKey(name), err)
	}
	if len(resp.Kvs) == 0 {
		return Status{}, fmt.Errorf("host %s has no status in etcd: it is not running, or never reached etcd", name)
	}
	var st Status
	if err := json.Unmarshal(resp.Kvs[0].Value, &st); err != nil {
		return Status{}, fmt.Errorf("read %s: %w", StatusKey(name), err)
	}
	return st, nil
}

func unified(fromName, toName string, a, b []byte) string {
	out, _ := difflib.GetUnifiedDiffString(difflib.UnifiedDiff{
		A: difflib.SplitLines(string(a)), B: difflib.SplitLines(string(b)),
		FromFile: fromName, ToFile: toName, Context: 3,
	})
	return out
}

// HostState is one host in FleetStatus.
type HostState struct {
	Status
	// Newest is the newest change of a document this host merges (the
	// fleet document, its groups', its own) or of a revocation.
	Newest int64 `json:"newest_revision"`
	// Behind: the host's revision is older than Newest.
	Behind bool `json:"behind"`
}

// Overview is `procgate fleet status`.
type Overview struct {
	// Newest is the revision of the newest change of any policy document
	// or fleet-wide revocation.
	Newest int64       `json:"newest_revision"`
	Hosts  []HostState `json:"hosts"`
	At     time.Time   `json:"at"`
}

// FleetStatus reads every host's status and the newest policy change, in
// one revision.
func FleetStatus(ctx context.Context, cli *clientv3.Client) (Overview, error) {
	pol, err := cli.Get(ctx, PolicyPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return Overview{}, fmt.Errorf("read %s: %w", PolicyPrefix, err)
	}
	st, err := cli.Get(ctx, StatusPrefix, clientv3.WithPrefix(), clientv3.WithRev(pol.Header.Revision))
	if err != nil {
		return Overview{}, fmt.Errorf("read %s: %w", StatusPrefix, err)
	}
	rv, err := cli.Get(ctx, RevokePrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithRev(pol.Header.Revision))
	if err != nil {
		return Overview{}, fmt.Errorf("read %s: %w", RevokePrefix, err)
	}
	o := Overview{At: time.Now().UTC()}
	mod := map[string]int64{}
	for _, kv := range pol.Kvs {
		o.Newest = max(o.Newest, kv.ModRevision)
		mod[string(kv.Key)] = kv.ModRevision
	}
	// Every host applies every revocation.
	revoked := int64(0)
	for _, kv := range rv.Kvs {
		revoked = max(revoked, kv.ModRevision)
	}
	o.Newest = max(o.Newest, revoked)
	for _, kv := range st.Kvs {
		if !strings.HasSuffix(string(kv.Key), "/status") {
			continue
		}
		var h HostState
		if err := json.Unmarshal(kv.Value, &h.Status); err != nil {
			h.Host, h.Error = strings.TrimSuffix(strings.TrimPrefix(string(kv.Key), StatusPrefix), "/status"), "unreadable status: "+err.Error()
		}
		host := Host{Name: h.Host}
		for _, l := range h.Labels {
			if lb, err := ParseLabel(l); err == nil {
				host.Labels = append(host.Labels, lb)
			}
		}
		h.Newest = revoked
		for _, k := range host.Keys() {
			h.Newest = max(h.Newest, mod[k])
		}
		h.Behind = h.Revision < h.Newest
		o.Hosts = append(o.Hosts, h)
	}
	slices.SortFunc(o.Hosts, func(a, b HostState) int { return strings.Compare(a.Host, b.Host) })
	return o, nil
}

func maps(m map[string][]byte) map[string][]byte {
	out := make(map[string][]byte, len(m)+1)
	for k, v := range m {
		out[k] = v
	}
	return out
}

func mapKeys(m map[string][]byte) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}
