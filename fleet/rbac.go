package fleet

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"go.etcd.io/etcd/api/v3/authpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Grant is one key, or one prefix, a role may read (or read and write).
type Grant struct {
	Key    string
	Prefix bool
	Write  bool
}

func (g Grant) String() string {
	s := g.permName() + " " + g.Key
	if g.Prefix {
		s += "*"
	}
	return s
}

// Role is an etcd role for one user: its name and grants.
type Role struct {
	User, Name string
	Grants     []Grant
}

// HostRole is what host h's daemon needs and nothing more: read its
// documents (the fleet's, its groups', its own) and the revocations, and
// write its status. It cannot read another host's overlay, nor a group's
// it is not labelled with.
func HostRole(h Host) Role {
	grants := append(hostReads(h), Grant{Key: StatusKey(h.Name), Write: true})
	return Role{User: h.Name, Name: "procgate-host-" + h.Name, Grants: grants}
}

// hostReads are the keys and prefixes h's agent reads and watches (its
// documents, then the fleet-wide revocations): what HostRole lets it read,
// so that the role and the agent cannot drift apart.
func hostReads(h Host) []Grant {
	var out []Grant
	for _, k := range h.Keys() {
		out = append(out, Grant{Key: k})
	}
	return append(out, Grant{Key: RevokePrefix, Prefix: true})
}

// GatewayRole is a perimeter gateway's: the holes and the site rules.
func GatewayRole(user string) Role {
	return Role{User: user, Name: "procgate-gateway", Grants: []Grant{{Key: Prefix + "perimeter/", Prefix: true, Write: true}}}
}

// AdminRole is an administrator's: every procgate key (push, diff, fleet
// status, revoke --fleet), and nothing else of the cluster's.
func AdminRole(user string) Role {
	return Role{User: user, Name: "procgate-admin", Grants: []Grant{{Key: Prefix, Prefix: true, Write: true}}}
}

func (g Grant) rangeEnd() string {
	if g.Prefix {
		return clientv3.GetPrefixRangeEnd(g.Key)
	}
	return ""
}

// permName is etcd's (and etcdctl's) name of g's permission.
func (g Grant) permName() string {
	if g.Write {
		return "readwrite"
	}
	return "read"
}

func (g Grant) perm() clientv3.PermissionType {
	if g.Write {
		return clientv3.PermissionType(clientv3.PermReadWrite)
	}
	return clientv3.PermissionType(clientv3.PermRead)
}

// Commands are the etcdctl commands that set r up, for an administrator
// who runs them by hand or from a configuration manager.
func (r Role) Commands() []string {
	out := []string{
		"etcdctl user add " + r.User + " --no-password",
		"etcdctl role add " + r.Name,
	}
	for _, g := range r.Grants {
		prefix := ""
		if g.Prefix {
			prefix = " --prefix=true"
		}
		out = append(out, fmt.Sprintf("etcdctl role grant-permission %s%s %s %s", r.Name, prefix, g.permName(), g.Key))
	}
	return append(out, "etcdctl user grant-role "+r.User+" "+r.Name)
}

// Apply sets r up in etcd (as etcd's root user): the user without a
// password (it authenticates by its certificate's common name), the role
// with exactly r's grants (a grant it had and r has not, such as the
// group of a label the host lost, is revoked), and the role given to the
// user. Running it again changes nothing.
func (r Role) Apply(ctx context.Context, cli *clientv3.Client) error {
	if _, err := cli.UserAddWithOptions(ctx, r.User, "", &clientv3.UserAddOptions{NoPassword: true}); err != nil && !errors.Is(rpctypes.Error(err), rpctypes.ErrUserAlreadyExist) {
		return fmt.Errorf("add etcd user %s: %w", r.User, err)
	}
	if _, err := cli.RoleAdd(ctx, r.Name); err != nil && !errors.Is(rpctypes.Error(err), rpctypes.ErrRoleAlreadyExist) {
		return fmt.Errorf("add etcd role %s: %w", r.Name, err)
	}
	have, err := cli.RoleGet(ctx, r.Name)
	if err != nil {
		return fmt.Errorf("read etcd role %s: %w", r.Name, err)
	}
	want := map[[2]string]Grant{}
	for _, g := range r.Grants {
		want[[2]string{g.Key, g.rangeEnd()}] = g
	}
	for _, p := range have.Perm {
		k := [2]string{string(p.Key), string(p.RangeEnd)}
		if g, ok := want[k]; ok && (p.PermType == authpb.READWRITE) == g.Write {
			delete(want, k) // already granted
			continue
		}
		if _, err := cli.RoleRevokePermission(ctx, r.Name, k[0], k[1]); err != nil {
			return fmt.Errorf("revoke %s from etcd role %s: %w", k[0], r.Name, err)
		}
	}
	for _, g := range r.Grants {
		if _, ok := want[[2]string{g.Key, g.rangeEnd()}]; !ok {
			continue
		}
		if _, err := cli.RoleGrantPermission(ctx, r.Name, g.Key, g.rangeEnd(), g.perm()); err != nil {
			return fmt.Errorf("grant %s to etcd role %s: %w", g, r.Name, err)
		}
	}
	if _, err := cli.UserGrantRole(ctx, r.User, r.Name); err != nil {
		return fmt.Errorf("give etcd role %s to user %s: %w", r.Name, r.User, err)
	}
	return nil
}

func (r Role) String() string {
	var gs []string
	for _, g := range r.Grants {
		gs = append(gs, g.String())
	}
	return fmt.Sprintf("user %s, role %s: %s", r.User, r.Name, strings.Join(gs, ", "))
}
