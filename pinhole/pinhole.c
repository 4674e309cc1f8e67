//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// What the pinhole agent sees of the apps whose policy says
// `inbound: dynamic`, and the host's own guard of their auxiliary ports.
//
// Sockets of a dynamic app (its cgroup, or a descendant, is in pinhole_apps;
// or, for an app with match:, the enforcer's principal lookup finds it)
// on one of its control or auxiliary ports get a pinhole_socks entry when
// they are bound (post_bind4/6: the binding task is current, so the app,
// tgid and uid are the binder's). The entry is socket-local storage with
// BPF_F_CLONE, so a connection a control listener accepts inherits it:
// sockops has no current task, and this is how passive-established knows
// whose control connection it is. No LD_PRELOAD: the kernel sees every bind,
// listen and close, of static Go binaries too.
//
// Events (pinhole_events):
// - AUX_OPEN: a UDP bind (post_bind) or a TCP listen (sockops LISTEN_CB) on
//   an auxiliary port;
// - AUX_CLOSE: the release of that socket (cgroup/sock_release: close,
//   exit, crash, and exec with close-on-exec all release it), for TCP its
//   listener's change to TCP_CLOSE (STATE_CB; MPTCP listeners, see below);
// - CONTROL_OPEN: a connection accepted on a control port (sockops
//   PASSIVE_ESTABLISHED_CB), with both ends;
// - CONTROL_CLOSE: its end, the first of its TCP_CLOSE state change
//   (STATE_CB, asked for with bpf_sock_ops_cb_flags_set) and its release.
//
// guard_ingress (cgroup_skb/ingress) drops, on the host, new TCP connections
// (SYN without ACK) and UDP datagrams to an auxiliary socket from any peer
// the agent has not put in pinhole_allow. It is an ingress program and not
// an nftables rule in the host's table because the verdict needs the
// receiving socket (which app, which port is auxiliary right now): the
// socket's storage says so at no lookup cost, and the program sits in the
// same cgroup subtree as the rest of procgate, so uninstall removes it with
// the rest and it touches no table the host's firewall owns.
//
// Kernel assumptions (6.1+): post_bind and sock_release may call
// bpf_get_current_{pid_tgid,uid_gid,ancestor_cgroup_id} and
// bpf_sk_storage_get; sockops may call bpf_sk_storage_get on ctx->sk;
// LISTEN_CB and PASSIVE_ESTABLISHED_CB run without cb flags.

// decision.h (bpf/) gives the enforcer's principal lookup, against the
// enforcer's maps, pinned by name in the same BPF directory: a unit,
// cgroup, container or user app is found as the connect hooks find it.
// Its PROTO_ macros are the same numbers as enum pinhole_proto below.
#include "decision.h"
#undef PROTO_TCP
#undef PROTO_UDP

char __license[] SEC("license") = "Dual MIT/GPL";

#define AF_INET 2
#define AF_INET6 10
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define MAX_CGROUP_LEVEL 32

// The enums below are the single truth for the Go side: bpf2go -type
// emits them into pinhole_bpfel.go (pinhole/gen.go), and pinhole/event.go
// and pinhole/kernel.go use those generated constants.

// A socket's protocol (port_key.proto, sock_owner.proto, pinhole_event.proto).
enum pinhole_proto {
	PROTO_TCP = 1,
	PROTO_UDP = 2,
};

// What a port of an app is (pinhole_ports values).
enum port_role {
	PORT_CONTROL = 1,
	PORT_AUX = 2,
};

// What a socket is (sock_owner.kind).
enum sock_kind {
	SOCK_CONTROL_LISTENER = 1, // bound to a control port
	SOCK_AUX = 2,              // bound to an auxiliary port: guarded, its release ends the holes
	SOCK_CONTROL_CONN = 3,     // a control connection: its peer gets holes
	SOCK_AUX_CONN = 4,         // a connection accepted on an auxiliary port
	SOCK_DONE = 5,             // a control connection or auxiliary listener whose end was reported
};

enum event_kind {
	EVENT_AUX_OPEN = 1,
	EVENT_AUX_CLOSE = 2,
	EVENT_CONTROL_OPEN = 3,
	EVENT_CONTROL_CLOSE = 4,
	EVENT_AUX_PEER = 5, // listed only (list_*_socks): a connection on an auxiliary port, with its peer
};

struct pinhole_app {
	__u32 app_id;
	__u32 pad;
};

struct port_key {
	__u32 app_id;
	__u16 port; // host order
	__u8 proto; // PROTO_TCP or PROTO_UDP
	__u8 pad;
};

struct sock_owner {
	__u64 cgroup_id;
	__u32 app_id;
	__u32 tgid;
	__u32 uid;
	__u16 port;
	__u8 proto;
	__u8 kind;
};

struct allow_key {
	__u8 family; // 4 or 6
	__u8 proto;
	__u16 port; // host order: the local (auxiliary) port
	__u8 peer[16]; // IPv4 in the first 4 bytes
};

struct pinhole_event {
	__u64 cookie; // the socket's cookie: its identity across events
	__u64 cgroup_id;
	__u32 app_id;
	__u32 tgid;
	__u32 tid;
	__u32 uid;
	__u8 kind;
	__u8 proto;
	__u8 family; // 4 or 6, of the socket
	__u8 pad;
	__u16 local_port; // host order
	__u16 remote_port;
	__u8 local_addr[16];
	__u8 remote_addr[16];
};

// Cgroups of dynamic apps, by cgroup id; the daemon fills it.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct pinhole_app);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pinhole_apps SEC(".maps");

// pinhole_principals[0] is 1 while some dynamic app has match: (unit,
// cgroup, container, user), written by the daemon: only then does a bind
// outside pinhole_apps pay for the enforcer's principal lookup.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pinhole_principals SEC(".maps");

// Control and auxiliary ports of each dynamic app, one entry per port.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct port_key);
	__type(value, __u8);
	__uint(max_entries, 1 << 21);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pinhole_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__type(key, int);
	__type(value, struct sock_owner);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pinhole_socks SEC(".maps");

// Peers the host lets in to an auxiliary port: the holes the agent holds.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct allow_key);
	__type(value, __u8);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pinhole_allow SEC(".maps");

// Packets guard_ingress dropped.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pinhole_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pinhole_events SEC(".maps");

// Holding the PASV answer (docs/pinholes.md, "The race of the first data
// connection"): each auxiliary open reported to the agent counts in
// pinhole_hold_opened (written here only); the agent counts in
// pinhole_hold_released (written there only) the ones whose holes it has
// asked the gateway for and got an answer. While an app has more opened
// than released, and before the deadline of its last open, hold_egress
// drops the data segments of its control connections: TCP keeps them
// queued, and the agent's release runs kick_control_socks, which pushes
// them at once. The deadline bounds the hold without the agent: after it,
// TCP's probe timer (at least 200 ms) sends the data.
#define HOLD_MAX_NS (100ULL * 1000 * 1000)

struct hold_opened {
	__u64 opened;
	__u64 deadline; // bpf_ktime_get_ns
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); // app id
	__type(value, struct hold_opened);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pinhole_hold_opened SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); // app id
	__type(value, __u64);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pinhole_hold_released SEC(".maps");

// Data segments hold_egress dropped (held).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pinhole_held SEC(".maps");

const struct hold_opened *unused_hold_opened __attribute__((unused));
const struct pinhole_event *unused_pinhole_event __attribute__((unused));
const struct allow_key *unused_allow_key __attribute__((unused));
const struct port_key *unused_port_key __attribute__((unused));
// Enums reach BTF, and so bpf2go, only through a typed declaration.
const enum pinhole_proto *unused_pinhole_proto __attribute__((unused));
const enum port_role *unused_port_role __attribute__((unused));
const enum sock_kind *unused_sock_kind __attribute__((unused));
const enum event_kind *unused_event_kind __attribute__((unused));

// app_of_current is the app id of the calling task, 0 for none: a
// launched dynamic app's by its cgroup or its nearest ancestor that is one
// (pinhole_apps), else, while some dynamic app has match:, the enforcer's
// principal of the task (decision.h: the deepest app cgroup, then the
// match.user app of its real uid; none for a process marked as migrated).
// Only apps with ports in pinhole_ports are dynamic: the caller looks.
static __always_inline __u32 app_of_current(__u64 *cgroup_id)
{
	__u64 id = bpf_get_current_cgroup_id();
	*cgroup_id = id;
	struct pinhole_app *a = bpf_map_lookup_elem(&pinhole_apps, &id);
	if (a)
		return a->app_id;
	for (int level = MAX_CGROUP_LEVEL - 1; level >= 0; level--) {
		id = bpf_get_current_ancestor_cgroup_id(level);
		if (!id)
			continue;
		a = bpf_map_lookup_elem(&pinhole_apps, &id);
		if (a)
			return a->app_id;
	}
	__u32 zero = 0;
	__u32 *principals = bpf_map_lookup_elem(&pinhole_principals, &zero);
	if (!principals || !*principals)
		return 0;
	struct generation_info *info = current_generation();
	if (!info)
		return 0;
	__u64 ignored;
	struct app_info *app = principal(info->slot & 1, info, &ignored);
	return app ? app->app_id : 0;
}

static __always_inline __u8 proto_of(__u32 protocol)
{
	if (protocol == IPPROTO_TCP)
		return PROTO_TCP;
	if (protocol == IPPROTO_UDP)
		return PROTO_UDP;
	return 0;
}

// hold_open counts an auxiliary open the agent will see, and starts or
// extends the app's hold.
static __always_inline void hold_open(__u32 app_id)
{
	__u64 deadline = bpf_ktime_get_ns() + HOLD_MAX_NS;
	struct hold_opened *h = bpf_map_lookup_elem(&pinhole_hold_opened, &app_id);
	if (!h) {
		struct hold_opened first = { .opened = 0, .deadline = deadline };
		bpf_map_update_elem(&pinhole_hold_opened, &app_id, &first, BPF_NOEXIST);
		h = bpf_map_lookup_elem(&pinhole_hold_opened, &app_id);
		if (!h)
			return;
	}
	h->deadline = deadline;
	__sync_fetch_and_add(&h->opened, 1);
}

static __always_inline void emit(__u64 cookie, const struct sock_owner *o, __u8 kind, __u8 family, __u16 local_port,
				 __u16 remote_port, const __u32 *local, const __u32 *remote)
{
	struct pinhole_event *e = bpf_ringbuf_reserve(&pinhole_events, sizeof(*e), 0);
	if (!e)
		return;
	// Only an open the agent will read holds: it is the agent that
	// releases it.
	if (kind == EVENT_AUX_OPEN)
		hold_open(o->app_id);
	__builtin_memset(e, 0, sizeof(*e));
	e->cookie = cookie;
	e->cgroup_id = o->cgroup_id;
	e->app_id = o->app_id;
	e->tgid = o->tgid;
	e->uid = o->uid;
	e->kind = kind;
	e->proto = o->proto;
	e->family = family == AF_INET6 ? 6 : 4;
	e->local_port = local_port;
	e->remote_port = remote_port;
	if (local)
		__builtin_memcpy(e->local_addr, local, 16);
	if (remote)
		__builtin_memcpy(e->remote_addr, remote, 16);
	bpf_ringbuf_submit(e, 0);
}

// v6 is a constant after inlining: post_bind4 may not read src_ip6.
static __always_inline int on_bind(struct bpf_sock *sk, int v6)
{
	__u64 cgroup_id;
	__u32 app_id = app_of_current(&cgroup_id);
	if (!app_id)
		return 1;
	__u8 proto = proto_of(sk->protocol);
	if (!proto)
		return 1;
	struct port_key pk = { .app_id = app_id, .port = (__u16)sk->src_port, .proto = proto };
	__u8 *what = bpf_map_lookup_elem(&pinhole_ports, &pk);
	if (!what)
		return 1;
	struct sock_owner *o = bpf_sk_storage_get(&pinhole_socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o)
		return 1;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	o->cgroup_id = cgroup_id;
	o->app_id = app_id;
	o->tgid = pid_tgid >> 32;
	o->uid = (__u32)bpf_get_current_uid_gid();
	o->port = pk.port;
	o->proto = proto;
	o->kind = *what == PORT_AUX ? SOCK_AUX : SOCK_CONTROL_LISTENER;
	// A TCP socket opens holes when it listens (sockops), a UDP one now.
	if (o->kind == SOCK_AUX && proto == PROTO_UDP) {
		__u32 local[4] = {};
		if (v6) {
			local[0] = sk->src_ip6[0];
			local[1] = sk->src_ip6[1];
			local[2] = sk->src_ip6[2];
			local[3] = sk->src_ip6[3];
		} else {
			local[0] = sk->src_ip4;
		}
		emit(bpf_get_socket_cookie(sk), o, EVENT_AUX_OPEN, v6 ? AF_INET6 : AF_INET, pk.port, 0, local, 0);
	}
	return 1;
}

SEC("cgroup/post_bind4")
int observe_post_bind4(struct bpf_sock *sk)
{
	return on_bind(sk, 0);
}

SEC("cgroup/post_bind6")
int observe_post_bind6(struct bpf_sock *sk)
{
	return on_bind(sk, 1);
}

#define V(field) (*(volatile __u32 *)&(field))

SEC("sockops")
int observe_sockops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 1;
	__u32 op = skops->op;
	if (op != BPF_SOCK_OPS_TCP_LISTEN_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	struct sock_owner *o = bpf_sk_storage_get(&pinhole_socks, sk, 0, 0);
	if (!o)
		return 1;
	__u32 family = skops->family;
	// Every address field is read whatever the family: reads in the two
	// branches of a family test get merged by the compiler into one load
	// through a selected pointer, which the verifier refuses for ctx.
	// The loads are volatile so that they stay where they are written.
	__u32 local[4] = { V(skops->local_ip6[0]), V(skops->local_ip6[1]), V(skops->local_ip6[2]), V(skops->local_ip6[3]) };
	__u32 remote[4] = { V(skops->remote_ip6[0]), V(skops->remote_ip6[1]), V(skops->remote_ip6[2]), V(skops->remote_ip6[3]) };
	__u32 local4 = V(skops->local_ip4), remote4 = V(skops->remote_ip4);
	if (family != AF_INET6) {
		local[0] = local4;
		remote[0] = remote4;
		local[1] = local[2] = local[3] = 0;
		remote[1] = remote[2] = remote[3] = 0;
	}
	__u16 lport = (__u16)skops->local_port;
	__u16 rport = bpf_ntohl(skops->remote_port) & 0xffff;
	switch (op) {
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		if (o->kind == SOCK_AUX) {
			// The listener's close is seen as its change to TCP_CLOSE: an
			// MPTCP listener (Go's default since 1.24) is bound through
			// a kernel subflow socket, which has no sock_release of its
			// own, and the MPTCP socket released has no storage.
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
			emit(bpf_get_socket_cookie(skops), o, EVENT_AUX_OPEN, family, lport, 0, local, 0);
		}
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		// o is this connection's own copy of its listener's entry.
		if (o->kind == SOCK_CONTROL_LISTENER) {
			o->kind = SOCK_CONTROL_CONN;
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
			emit(bpf_get_socket_cookie(skops), o, EVENT_CONTROL_OPEN, family, lport, rport, local, remote);
		} else if (o->kind == SOCK_AUX) {
			o->kind = SOCK_AUX_CONN;
		}
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			break;
		if (o->kind == SOCK_CONTROL_CONN) {
			o->kind = SOCK_DONE;
			emit(bpf_get_socket_cookie(skops), o, EVENT_CONTROL_CLOSE, family, lport, rport, local, remote);
		} else if (o->kind == SOCK_AUX && skops->args[0] == BPF_TCP_LISTEN) {
			o->kind = SOCK_DONE;
			emit(bpf_get_socket_cookie(skops), o, EVENT_AUX_CLOSE, family, o->port, 0, local, 0);
		}
		break;
	}
	return 1;
}

SEC("cgroup/sock_release")
int observe_sock_release(struct bpf_sock *sk)
{
	struct sock_owner *o = bpf_sk_storage_get(&pinhole_socks, sk, 0, 0);
	if (!o)
		return 1;
	if (o->kind == SOCK_AUX) {
		o->kind = SOCK_DONE;
		emit(bpf_get_socket_cookie(sk), o, EVENT_AUX_CLOSE, sk->family, o->port, 0, 0, 0);
	} else if (o->kind == SOCK_CONTROL_CONN) {
		o->kind = SOCK_DONE;
		emit(bpf_get_socket_cookie(sk), o, EVENT_CONTROL_CLOSE, sk->family, o->port, 0, 0, 0);
	}
	return 1;
}

static __always_inline int drop(void)
{
	bump(&pinhole_drops);
	return 0;
}

// owner_of is the tag of the full socket a packet belongs to, if any.
static __always_inline struct sock_owner *owner_of(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return NULL;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return NULL;
	return bpf_sk_storage_get(&pinhole_socks, sk, 0, 0);
}

SEC("cgroup_skb/ingress")
int guard_ingress(struct __sk_buff *skb)
{
	struct sock_owner *o = owner_of(skb);
	if (!o || o->kind != SOCK_AUX)
		return 1;
	// Guarded while the policy says so: an app no longer dynamic, or a
	// port no longer auxiliary, is not the agent's to open any more.
	struct port_key pk = { .app_id = o->app_id, .port = o->port, .proto = o->proto };
	__u8 *what = bpf_map_lookup_elem(&pinhole_ports, &pk);
	if (!what || *what != PORT_AUX)
		return 1;
	struct allow_key k = { .proto = o->proto, .port = o->port };
	__u8 l4;
	__u32 l4off;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u8 vihl;
		if (bpf_skb_load_bytes(skb, 0, &vihl, 1) || bpf_skb_load_bytes(skb, 9, &l4, 1) ||
		    bpf_skb_load_bytes(skb, 12, k.peer, 4))
			return drop();
		k.family = 4;
		l4off = (vihl & 0xf) * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 6, &l4, 1) || bpf_skb_load_bytes(skb, 8, k.peer, 16))
			return drop();
		k.family = 6;
		l4off = 40;
	} else {
		return drop();
	}
	if (o->proto == PROTO_TCP) {
		// Only new connections: a connection that got in while the hole was
		// open may outlive it, as it does at the gateway (ct established).
		if (l4 != IPPROTO_TCP)
			return drop(); // an extension header in front of TCP: fail closed
		__u8 flags;
		if (bpf_skb_load_bytes(skb, l4off + 13, &flags, 1))
			return drop();
		if (!(flags & TCP_FLAG_SYN) || (flags & TCP_FLAG_ACK))
			return 1;
	}
	if (bpf_map_lookup_elem(&pinhole_allow, &k))
		return 1;
	return drop();
}

// list_tcp_socks and list_udp_socks (TCP and UDP socket iterators of the
// daemon's network namespace) write, as the events they made, the auxiliary
// sockets still bound (TCP: listening) and the control connections still
// established: a restarted daemon starts from them instead of losing their
// holes. They also write the established connections accepted on auxiliary
// ports (EVENT_AUX_PEER; a connected UDP auxiliary socket is an
// EVENT_AUX_OPEN with its remote address): the socket view of which hole a
// peer still uses. (An iterator over pinhole_socks itself, iter/bpf_sk_storage_map,
// is refused on this kernel like the other BTF tracing attach points; the
// TCP and UDP iterators are not.) The socket is a BTF pointer, read
// directly; CO-RE gives the fields' offsets of the running kernel.
#define TCP_ESTABLISHED 1
#define TCP_LISTEN 10

struct in6_addr___ph {
	__u8 s6_addr[16];
};

struct atomic64___ph {
	__s64 counter;
};

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr___ph skc_v6_daddr;
	struct in6_addr___ph skc_v6_rcv_saddr;
	struct atomic64___ph skc_cookie;
} __attribute__((preserve_access_index));

#include "../bpf/iter_context.h"

static __always_inline void list_sock(struct seq_file *seq, struct sock_common *sk)
{
	struct sock_owner *o = bpf_sk_storage_get(&pinhole_socks, sk, 0, 0);
	if (!o)
		return;
	struct pinhole_event e = {};
	__u8 state = sk->skc_state;
	if (o->kind == SOCK_AUX) {
		if (o->proto == PROTO_TCP && state != TCP_LISTEN)
			return; // bound, not listening: no hole yet
		e.kind = EVENT_AUX_OPEN;
	} else if (o->kind == SOCK_AUX_CONN) {
		// A connection an auxiliary listener accepted: its peer uses the
		// hole (the agent's stale-hole check).
		if (state != TCP_ESTABLISHED)
			return;
		e.kind = EVENT_AUX_PEER;
	} else if (o->kind == SOCK_CONTROL_CONN) {
		if (state != TCP_ESTABLISHED)
			return;
		e.kind = EVENT_CONTROL_OPEN;
	} else {
		return;
	}
	e.cookie = sk->skc_cookie.counter;
	e.cgroup_id = o->cgroup_id;
	e.app_id = o->app_id;
	e.tgid = o->tgid;
	e.uid = o->uid;
	e.proto = o->proto;
	e.local_port = sk->skc_num;
	e.remote_port = bpf_ntohs(sk->skc_dport);
	if (sk->skc_family == AF_INET6) {
		e.family = 6;
		for (int i = 0; i < 16; i++) {
			e.local_addr[i] = sk->skc_v6_rcv_saddr.s6_addr[i];
			e.remote_addr[i] = sk->skc_v6_daddr.s6_addr[i];
		}
	} else {
		e.family = 4;
		__be32 l = sk->skc_rcv_saddr;
		__be32 r = sk->skc_daddr;
		__builtin_memcpy(e.local_addr, &l, 4);
		__builtin_memcpy(e.remote_addr, &r, 4);
	}
	bpf_seq_write(seq, &e, sizeof(e));
}

SEC("iter/tcp")
int list_tcp_socks(struct bpf_iter__tcp *ctx)
{
	if (ctx->sk_common)
		list_sock(ctx->meta->seq, ctx->sk_common);
	return 0;
}

SEC("iter/udp")
int list_udp_socks(struct bpf_iter__udp *ctx)
{
	if (ctx->udp_sk)
		list_sock(ctx->meta->seq, (struct sock_common *)ctx->udp_sk);
	return 0;
}

// hold_egress drops the data segments of a dynamic app's control
// connections while the app has an auxiliary open the agent has not
// released, before that open's deadline (see HOLD_MAX_NS). Returning 0
// fails the transmission with EPERM: TCP keeps the segment in its write
// queue unsent and sends it when kicked, on new data or an incoming
// segment, or at the latest by its probe timer.
SEC("cgroup_skb/egress")
int hold_egress(struct __sk_buff *skb)
{
	struct sock_owner *o = owner_of(skb); // a control connection is TCP
	if (!o || o->kind != SOCK_CONTROL_CONN)
		return 1;
	__u32 app_id = o->app_id;
	struct hold_opened *h = bpf_map_lookup_elem(&pinhole_hold_opened, &app_id);
	if (!h)
		return 1;
	__u64 *released = bpf_map_lookup_elem(&pinhole_hold_released, &app_id);
	if (h->opened <= (released ? *released : 0) || bpf_ktime_get_ns() >= h->deadline)
		return 1;
	// Data only: a pure ACK, SYN or FIN carries no answer to hold.
	__u32 l4off, total;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u8 vihl;
		__be16 len;
		if (bpf_skb_load_bytes(skb, 0, &vihl, 1) || bpf_skb_load_bytes(skb, 2, &len, 2))
			return 1;
		l4off = (vihl & 0xf) * 4;
		total = bpf_ntohs(len);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		__be16 len;
		if (bpf_skb_load_bytes(skb, 4, &len, 2))
			return 1;
		l4off = 40;
		total = 40 + bpf_ntohs(len);
	} else {
		return 1;
	}
	__u8 doff;
	if (bpf_skb_load_bytes(skb, l4off + 12, &doff, 1))
		return 1;
	if (total <= l4off + (doff >> 4) * 4)
		return 1;
	bump(&pinhole_held);
	return 0;
}

#define SOL_TCP 6
#define TCP_NODELAY 1

// kick_control_socks (run by the agent after a release) pushes what
// hold_egress held: setting TCP_NODELAY runs tcp_push_pending_frames. An
// app's own setting is kept: when it had Nagle on, it is set on again.
SEC("iter/tcp")
int kick_control_socks(struct bpf_iter__tcp *ctx)
{
	struct sock_common *sk = ctx->sk_common;
	if (!sk || sk->skc_state != TCP_ESTABLISHED)
		return 0;
	struct sock_owner *o = bpf_sk_storage_get(&pinhole_socks, sk, 0, 0);
	if (!o || o->kind != SOCK_CONTROL_CONN)
		return 0;
	int was = 0, on = 1;
	if (bpf_getsockopt(sk, SOL_TCP, TCP_NODELAY, &was, sizeof(was)))
		return 0;
	bpf_setsockopt(sk, SOL_TCP, TCP_NODELAY, &on, sizeof(on));
	if (!was)
		bpf_setsockopt(sk, SOL_TCP, TCP_NODELAY, &was, sizeof(was));
	return 0;
}
