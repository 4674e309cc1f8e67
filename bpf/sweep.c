//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// Live-socket revocation: after a new generation is in force, end the
// sockets of app processes whose destination it no longer allows. The
// connect and sendmsg hooks decide new attempts only; a TCP connection or a
// connected UDP socket made under an earlier generation would live on.
//
// sweep_tcp and sweep_udp are socket iterators (iter/tcp 5.9+, iter/udp
// 5.9+, bpf_sock_destroy 6.5+). Reading one walks the TCP or UDP sockets of
// the network namespace of the process that opened it; for each socket the
// iterator holds the socket's lock, so bpf_sock_destroy ends it right there
// (TCP: RST to the peer, ECONNABORTED to the owner; UDP: ECONNABORTED and the
// socket is disconnected). Every socket ended (or that failed to end) is
// written to the iterator's output as a struct sweep_record.
//
// The decision is the hooks' own, from the same pinned maps (decision.h),
// with the generation in force:
// - the principal is the deepest app cgroup among the cgroup the socket was
//   created in and its ancestors, else the match.user app of the socket's
//   uid (what the egress backstop uses too);
// - a socket no app claims is left alone, unless its cgroup lies below the
//   fence (the directory of all app cgroups): then it belonged to an app
//   that was removed from the policy, and it has no grants;
// - an app in audit mode (mode: audit) keeps its sockets, as its denials
//   pass;
// - listeners, unconnected UDP sockets, TIME_WAIT and request sockets are
//   skipped, and so are accepted TCP connections (their local port is one a
//   listener of the namespace listens on; listeners come first in the walk):
//   grants are about the connections an app makes, not those it answers.

#include "decision.h"
#include "cgroup_principal.h"

char __license[] SEC("license") = "Dual MIT/GPL";

#define AF_INET 2
#define AF_INET6 10

// Just the kernel fields the sweep reads (CO-RE: offsets come from the
// running kernel's BTF when the programs load). Kernel assumptions: struct
// sock_cgroup_data holds a struct cgroup pointer (5.15+) and struct cgroup
// has ancestors[] (6.0+); both older than bpf_sock_destroy.
struct sock_cgroup_data___sw {
	struct cgroup___cg *cgroup;
} __attribute__((preserve_access_index));

struct in6_addr___sw {
	__u8 s6_addr[16];
};

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr___sw skc_v6_daddr;
	struct in6_addr___sw skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct kuid___sw {
	__u32 val;
} __attribute__((preserve_access_index));

struct sock___sw {
	struct sock_common __sk_common;
	struct sock_cgroup_data___sw sk_cgrp_data;
	struct kuid___sw sk_uid; // the fsuid of the socket's maker, as bpf_get_socket_uid gives it
} __attribute__((preserve_access_index));

#include "iter_context.h"

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

// What one run of the iterators needs: written by the loader before each
// run. Private to the sweeper (not pinned).
#define MAX_SWEEP_SHARDS 4

struct sweep_config {
	__u64 fence_id; // cgroup id of the directory of all app cgroups; 0: none
	__u32 fence_level;
	__u32 run; // tells this run's listener marks from an earlier run's
	// The TCP walk of a run may be split in shards, each walk read by a
	// thread of its own (shard_tid, by thread id) and ending only its
	// share of the doomed sockets, so that the kernel's teardown of the
	// sockets, most of a sweep's time, runs on several CPUs. 0 or 1
	// shard: one walk ends them all.
	__u32 shards;
	__u32 shard_tid[MAX_SWEEP_SHARDS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct sweep_config);
	__uint(max_entries, 1);
} sweep_run SEC(".maps");

// The TCP ports listeners of the walked namespace listen on, by the run
// that saw them. An active connect never gets a port a listener holds
// (autobind skips ports with a bind bucket a listener made), so a connection
// on such a port was accepted.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 65536);
} sweep_listen_ports SEC(".maps");

// A sweep_record's kind; bpf2go -type emits it for bpf/sweep.go.
enum record_kind {
	RECORD_ENDED = 1,  // the socket is being ended
	RECORD_FAILED = 2, // ... and bpf_sock_destroy failed: err says why
};

// One socket ended, or that could not be ended.
struct sweep_record {
	__u64 cgroup_id;
	__u32 app_id; // 0: below the fence, in no app of the generation
	__s32 err;    // bpf_sock_destroy's answer (RECORD_FAILED)
	__u8 family;  // 4 or 6 as decided (an IPv4-mapped peer is 4)
	__u8 proto;   // PROTO_TCP or PROTO_UDP
	__u16 sport;  // host order
	__u16 dport;  // host order
	__u8 state;
	__u8 kind; // RECORD_ENDED or RECORD_FAILED
	__u8 saddr[16]; // IPv4 in the first 4 bytes
	__u8 daddr[16];
};

// Forces bpf2go to emit the Go type.
const struct sweep_record *unused_sweep_record __attribute__((unused));
const enum record_kind *unused_record_kind __attribute__((unused));

// sock_principal is principal_of for a socket: the deepest app cgroup among
// the socket's cgroup and its ancestors. *fenced is set when the cgroup is
// below the fence.
static __always_inline struct app_info *sock_principal(struct sock___sw *sk, __u32 slot,
						       const struct generation_info *info,
						       const struct sweep_config *cfg, __u64 *cgroup_id,
						       int *fenced)
{
	struct cgroup___cg *cg = BPF_CORE_READ(sk, sk_cgrp_data.cgroup);
	if (!cg)
		return NULL;
	int own = BPF_CORE_READ(cg, level);
	if (cfg->fence_id && own >= (int)cfg->fence_level && cfg->fence_level < MAX_CGROUP_LEVEL) {
		struct cgroup___cg *anc = ancestor_at(cg, cfg->fence_level);
		*fenced = anc && cgroup_id_of(anc) == cfg->fence_id;
	}
	return cgroup_principal(cg, slot, info, cgroup_id);
}

// is_v4_mapped: ::ffff:a.b.c.d
static __always_inline int is_v4_mapped(const __u8 *a)
{
	for (int i = 0; i < 10; i++)
		if (a[i])
			return 0;
	return a[10] == 0xff && a[11] == 0xff;
}

// doomed fills rec and says whether the socket must end: its principal's
// grants under the generation in force do not cover its peer.
static __always_inline int doomed(struct sock___sw *sk, __u8 proto, const struct sweep_config *cfg,
				  struct sweep_record *rec)
{
	struct generation_info *info = current_generation();
	if (!info)
		return 0; // no policy: nothing to decide by (the hooks deny all new attempts)
	__u32 slot = info->slot & 1;

	struct sock_common *skc = &sk->__sk_common;
	struct dest d = { .proto = proto };
	rec->proto = proto;
	rec->state = BPF_CORE_READ(skc, skc_state);
	rec->sport = BPF_CORE_READ(skc, skc_num);
	rec->dport = bpf_ntohs(BPF_CORE_READ(skc, skc_dport));
	d.port = rec->dport;
	unsigned short family = BPF_CORE_READ(skc, skc_family);
	if (family == AF_INET) {
		__be32 da = BPF_CORE_READ(skc, skc_daddr), sa = BPF_CORE_READ(skc, skc_rcv_saddr);
		__builtin_memcpy(rec->daddr, &da, 4);
		__builtin_memcpy(rec->saddr, &sa, 4);
		rec->family = 4;
	} else if (family == AF_INET6) {
		BPF_CORE_READ_INTO(&rec->daddr, skc, skc_v6_daddr);
		BPF_CORE_READ_INTO(&rec->saddr, skc, skc_v6_rcv_saddr);
		rec->family = 6;
		if (is_v4_mapped(rec->daddr)) {
			// Decided as IPv4, as the connect hooks do.
			rec->family = 4;
			__builtin_memcpy(rec->daddr, &rec->daddr[12], 4);
			__builtin_memset(&rec->daddr[4], 0, 12);
			__builtin_memcpy(rec->saddr, &rec->saddr[12], 4);
			__builtin_memset(&rec->saddr[4], 0, 12);
		}
	} else {
		return 0;
	}
	d.family = rec->family;
	__builtin_memcpy(d.addr, rec->daddr, sizeof(d.addr));
	int internal = is_internal(slot, &d);
	if (!internal && !(info->flags & GEN_SANDBOX))
		return 0;

	int fenced = 0;
	struct app_info *app = sock_principal(sk, slot, info, cfg, &rec->cgroup_id, &fenced);
	if (!app && !fenced)
		// The match.user app of the socket's uid, as the egress
		// backstop finds it (harden.c, skb_principal).
		app = user_principal(slot, info, BPF_CORE_READ(sk, sk_uid.val));
	if (app) {
		__u8 reason;
		rec->app_id = app->app_id;
		if (!internal && !(app->flags & APP_OUTSIDE_DENY))
			return 0;
		if (own_allows(slot, rec->app_id, app->flags, grant_of(slot, rec->app_id, &d), &d, &reason))
			return 0;
		int everyone;
		// mode: audit: nothing of the app's policy is enforced, its
		// live sockets neither (its next attempts are would-deny).
		return !others_allow(slot, info, &d, internal, app->flags, &reason, &everyone, 0) && !(app->flags & APP_AUDIT_ONLY);
	}
	if (!internal)
		return 0;
	// An app removed from the policy: no grants left but everyone's.
	return fenced && !everyone_allows(slot, info, &d, 0);
}

// Output. When a record does not fit in the iterator's buffer, the kernel
// drops everything this call wrote and shows the same socket again with an
// empty buffer on the next read(). So a socket is destroyed only after its
// record is written (emit), and a failure is a second record of the same
// socket (failed): if that one does not fit, both go and the whole decision
// is made again, on a socket that is still alive.
static __always_inline int emit(struct seq_file *seq, struct sweep_record *rec)
{
	rec->kind = RECORD_ENDED;
	return bpf_seq_write(seq, rec, sizeof(*rec)) == 0;
}

static __always_inline void failed(struct seq_file *seq, struct sweep_record *rec)
{
	if (rec->err == 0)
		return;
	rec->kind = RECORD_FAILED;
	bpf_seq_write(seq, rec, sizeof(*rec));
}

// own_share says whether the socket falls to the shard of this walk.
// Kernel assumption: read() of an iterator runs the program in the
// reader's task (bpf_seq_read), so the current thread names the shard. A
// reader the run does not name walks as the only shard. The share is a
// hash of the socket's ports and skc_daddr (the IPv4 peer; on an IPv6
// socket a fixed placeholder or the mapped IPv4 peer), the same in every
// walk; the multiply spreads the ephemeral ports, which the kernel hands
// out mostly of one parity.
static __always_inline int own_share(struct sock_common *skc, const struct sweep_config *cfg)
{
	__u32 shards = cfg->shards;
	if (shards <= 1 || shards > MAX_SWEEP_SHARDS)
		return 1;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u32 shard = shards;
	for (__u32 i = 0; i < MAX_SWEEP_SHARDS; i++)
		if (i < shards && cfg->shard_tid[i] == tid)
			shard = i;
	if (shard == shards)
		return 1;
	__u32 h = BPF_CORE_READ(skc, skc_num) | (__u32)BPF_CORE_READ(skc, skc_dport) << 16;
	h ^= BPF_CORE_READ(skc, skc_daddr);
	h *= 0x9e3779b1u;
	return (h >> 16) % shards == shard;
}

SEC("iter/tcp")
int sweep_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	if (!skc)
		return 0;
	struct sock___sw *sk = (struct sock___sw *)skc;
	__u8 state = BPF_CORE_READ(sk, __sk_common.skc_state);
	__u32 zero = 0;
	struct sweep_config *cfg = bpf_map_lookup_elem(&sweep_run, &zero);
	if (!cfg)
		return 0;
	__u32 port = BPF_CORE_READ(sk, __sk_common.skc_num);
	// Kernel assumption (iter/tcp since 5.9, bpf_iter_tcp_seq_next): a
	// walk passes every listener of the namespace (the listening hash)
	// before the first established socket. Every shard's walk of a run
	// marks them all with the same run number, so each walk has marked
	// every listener itself before it decides on a connection, whatever
	// the other walks are doing.
	if (state == TCP_LISTEN) {
		__u32 *mark = bpf_map_lookup_elem(&sweep_listen_ports, &port);
		if (mark)
			*mark = cfg->run;
		return 0;
	}
	// Request and TIME_WAIT sockets are no full sockets (and no
	// connection an app can use); a closed one has nothing to end.
	if (state == TCP_NEW_SYN_RECV || state == TCP_TIME_WAIT || state == TCP_CLOSE)
		return 0;
	__u32 *mark = bpf_map_lookup_elem(&sweep_listen_ports, &port);
	if (mark && *mark == cfg->run)
		return 0; // accepted, not made by the app
	if (!own_share(skc, cfg))
		return 0;
	struct sweep_record rec = {};
	if (!doomed(sk, PROTO_TCP, cfg, &rec))
		return 0;
	if (emit(ctx->meta->seq, &rec))
		rec.err = bpf_sock_destroy(skc);
	failed(ctx->meta->seq, &rec);
	return 0;
}

SEC("iter/udp")
int sweep_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *usk = ctx->udp_sk;
	if (!usk)
		return 0;
	struct sock___sw *sk = (struct sock___sw *)usk;
	// Only connected sockets: an unconnected one names its peer at each
	// sendmsg, which the sendmsg hooks decide.
	if (BPF_CORE_READ(sk, __sk_common.skc_state) != TCP_ESTABLISHED)
		return 0;
	__u32 zero = 0;
	struct sweep_config *cfg = bpf_map_lookup_elem(&sweep_run, &zero);
	if (!cfg)
		return 0;
	struct sweep_record rec = {};
	if (!doomed(sk, PROTO_UDP, cfg, &rec))
		return 0;
	if (emit(ctx->meta->seq, &rec))
		rec.err = bpf_sock_destroy((struct sock_common *)usk);
	failed(ctx->meta->seq, &rec);
	return 0;
}
