package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/procgate/procgate/policy"
)

// RevokePrefix holds the fleet-wide revocations, one key per app
// (RevokeKey). Every daemon on the store reads them with its documents, at
// the same revision, and applies them as `procgate revoke` on the host
// would: new attempts and live sockets.
const RevokePrefix = Prefix + "revocations/"

// RevokeKey is app's fleet-wide revocation.
func RevokeKey(app string) string { return RevokePrefix + app }

// Revocation is what is withdrawn from one app on every host: all its
// grants, or the grants of these numbers (their places in the app's
// merged allow list, where the fleet document's grants come first).
type Revocation struct {
	All    bool      `json:"all,omitempty"`
	Grants []int     `json:"grants,omitempty"`
	At     time.Time `json:"at"`
}

func (r Revocation) String() string {
	if r.All {
		return "all grants"
	}
	var out []string
	for _, g := range r.Grants {
		out = append(out, fmt.Sprintf("#%d", g))
	}
	if len(out) == 0 {
		return "nothing"
	}
	return "grants " + strings.Join(out, ",")
}

// Revocations are the snapshot's fleet-wide revocations by app. A value
// that does not read as a Revocation withdraws all of its app's grants
// (the key names the app: failing closed costs nothing more than the
// revoke meant) and comes back among the problems, for the log.
func (s Snapshot) Revocations() (map[string]Revocation, []error) {
	out := map[string]Revocation{}
	var problems []error
	for k, v := range s.Docs {
		app, ok := strings.CutPrefix(k, RevokePrefix)
		if !ok {
			continue
		}
		r, err := decodeRevocation(v)
		if err != nil {
			problems = append(problems, fmt.Errorf("%s: not a revocation (%v): all of %s's grants withdrawn", k, err, app))
		}
		if r.All || len(r.Grants) > 0 {
			out[app] = r
		}
	}
	return out, problems
}

// decodeRevocation reads a stored revocation. A value that is none (not
// JSON of one, or a grant numbered below 0) withdraws all of the app's
// grants, and the error says why.
func decodeRevocation(v []byte) (Revocation, error) {
	var r Revocation
	err := json.Unmarshal(v, &r)
	if err == nil && slices.ContainsFunc(r.Grants, func(g int) bool { return g < 0 }) {
		err = errors.New("a grant numbered below 0")
	}
	if err != nil {
		return Revocation{All: true}, err
	}
	return r, nil
}

// Revoke changes app's fleet-wide revocation: withdraws all its grants
// (grant nil) or one, or with restore gives them (or it) back. The change
// is a compare-and-swap on the key, retried when another administrator's
// change came between the read and the write. It returns the revocation
// now in force and the revision written.
func Revoke(ctx context.Context, cli *clientv3.Client, app string, grant *int, restore bool) (Revocation, int64, error) {
	if err := policy.CheckAppName(app); err != nil {
		return Revocation{}, 0, err
	}
	if grant != nil && *grant < 0 {
		return Revocation{}, 0, fmt.Errorf("grant #%d: grants are numbered from 0", *grant)
	}
	key := RevokeKey(app)
	for {
		resp, err := cli.Get(ctx, key)
		if err != nil {
			return Revocation{}, 0, fmt.Errorf("read %s: %w", key, err)
		}
		var r Revocation
		base := int64(0)
		if len(resp.Kvs) == 1 {
			base = resp.Kvs[0].ModRevision
			r, _ = decodeRevocation(resp.Kvs[0].Value) // as the daemons read it
		}
		switch {
		case restore && grant == nil:
			r = Revocation{}
		case restore:
			r.Grants = slices.DeleteFunc(r.Grants, func(g int) bool { return g == *grant })
		case grant != nil:
			if !slices.Contains(r.Grants, *grant) {
				r.Grants = append(r.Grants, *grant)
				slices.Sort(r.Grants)
			}
		default:
			r.All = true
		}
		r.At = time.Now().UTC()
		op := clientv3.OpDelete(key)
		if r.All || len(r.Grants) > 0 {
			data, err := json.Marshal(r)
			if err != nil {
				return Revocation{}, 0, fmt.Errorf("encode %s: %w", key, err)
			}
			op = clientv3.OpPut(key, string(data))
		}
		txn, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", base)).Then(op).Commit()
		if err != nil {
			return Revocation{}, 0, fmt.Errorf("write %s: %w", key, err)
		}
		if txn.Succeeded {
			return r, txn.Header.Revision, nil
		}
		if err := ctx.Err(); err != nil {
			return Revocation{}, 0, fmt.Errorf("write %s: %w", key, err)
		}
	}
}
