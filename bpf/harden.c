//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// Backstops for the paths the sock_addr hooks of procgate.c do not see.
//
// - guard_sock_create: no raw IP or packet sockets inside app cgroups. Such a
//   socket sends what it likes without connect() or a UDP sendmsg(): a
//   CAP_NET_RAW holder in an app (root run as an app) could reach any port of
//   any internal host. Processes outside app cgroups need CAP_NET_RAW for
//   them anyway, which an unprivileged attacker lacks.
// - backstop_egress: every packet a socket below the attach point sends to an
//   internal destination (and, for a sandboxed app, to any destination) is
//   decided again, by the socket's cgroup: new TCP
//   connections (SYN without ACK, including TCP Fast Open), every UDP and
//   UDP-Lite datagram, ICMP echo requests, and any other IP protocol. This
//   catches raw sockets, ping sockets, and whatever a future syscall path
//   does without the connect hooks. Packets of established TCP connections
//   pass untouched, so bulk traffic pays one header read and one trie lookup
//   at most.
//
// Both share the maps of decision.h with procgate.c through pinning.

#include "decision.h"
#include "lsm.h"

char __license[] SEC("license") = "Dual MIT/GPL";

#define AF_INET 2
#define AF_INET6 10
#define AF_PACKET 17
#define AF_XDP 44
#define SOCK_RAW 3
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_ICMPV6 58
#define NEXTHDR_FRAGMENT 44
#define ICMP_ECHO 8
#define ICMPV6_ECHO_REQUEST 128
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

SEC("cgroup/sock_create")
int guard_sock_create(struct bpf_sock *ctx)
{
	if (ctx->family != AF_PACKET && ctx->type != SOCK_RAW)
		return 1;
	struct generation_info *info = current_generation();
	if (!info)
		return 1; // the connect hooks already deny everything
	__u64 cgroup_id;
	// By cgroup alone, marks of migrate.c aside: a marked process' sockets
	// still belong to the app's cgroup, where the egress backstop would
	// take a raw socket's packets for the app's.
	struct app_info *app = principal_of(WHO_TASK, NULL, info->slot & 1, info, &cgroup_id);
	if (!app)
		return 1;
	__u32 app_id = app->app_id;
	// The event has no destination: the unspecified address of the
	// socket's family. The family comes from ctx on purpose: with a
	// constant dest, clang 14's BPF backend lowered audit()'s copy of
	// d->addr from the constant and dropped every other store to the event
	// (an event of zeros but pid, uid and comm: "address family 0").
	struct dest d = { .family = ctx->family == AF_INET6 ? 6 : 4 };
	count(app_id, COUNT_DENY);
	audit(&d, app_id, cgroup_id, info->generation, info->audit_rate, 0, REASON_RAW_SOCKET, HOOK_SOCK_CREATE);
	return 0;
}

// The packet's socket's cgroup (v2), as bpf_skb_cgroup_id gives it, read
// in place: on the bench's 6.18 guest, whose return thunks make every
// call and return dear, the helper cost ~10 ns more a run than the loads
// (BenchmarkBackstopEgress, udp4-internal-handoff), on each UDP datagram
// and TCP SYN that the backstop recognises as decided. bpf_cast_to_kern_ctx
// (a kfunc of 6.2 and later, which the verifier turns into a register
// move) gives the kernel's sk_buff; its socket's sk_cgrp_data.cgroup is
// what the helper reads (sock_cgroup_ptr, 5.15 and later). A request or
// time-wait socket has no sk_cgrp_data: the helper answers for those (a
// listener's, or none). skb_cgroup_in_place is set by the loader where
// the kernel's BTF has the kfunc; where it is 0 the verifier drops the
// in-place branch, and the kfunc's call with it.
const volatile __u8 skb_cgroup_in_place = 0;

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;

struct sock_common___skb {
	unsigned char skc_state;
} __attribute__((preserve_access_index));
struct sock_cgroup_data___skb {
	struct cgroup___cur *cgroup;
} __attribute__((preserve_access_index));
struct sock___skb {
	struct sock_common___skb __sk_common;
	struct sock_cgroup_data___skb sk_cgrp_data;
} __attribute__((preserve_access_index));
struct sk_buff___skb {
	struct sock___skb *sk;
} __attribute__((preserve_access_index));

static __always_inline __u64 skb_cgroup_id(struct __sk_buff *skb)
{
	if (skb_cgroup_in_place) {
		struct sk_buff___skb *k = bpf_cast_to_kern_ctx(skb);
		struct sock___skb *sk = k->sk;
		if (!sk)
			return 0;
		unsigned char state = sk->__sk_common.skc_state;
		if (state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV)
			return sk->sk_cgrp_data.cgroup->kn->id;
	}
	return bpf_skb_cgroup_id(skb);
}

// Leading bytes of the headers this program reads; only what it needs.
struct __attribute__((aligned(4))) ip4_head {
	__u8 ver_ihl;
	__u8 tos;
	__u16 tot_len;
	__u16 id;
	__u16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__u16 check;
	__u8 saddr[4];
	__u8 daddr[4];
};

struct ip6_head {
	__u32 ver_tc_flow;
	__u16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct ip6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__u16 frag_off; // offset << 3 | flags
	__u32 id;
};

// l4 is what the backstop needs from the transport header.
struct l4 {
	__u16 sport;
	__u16 dport;
	__u8 tcp_flags;
	__u8 icmp_type;
};

// read_head copies len bytes at off of the packet (off from the network
// header): straight from the linear data where they are (every header a
// local socket builds is), by bpf_skb_load_bytes otherwise. Saves two
// helper calls per packet on the path every packet takes.
//
// Copied a word at a time: a local socket's network header starts
// aligned (LL_RESERVED_SPACE) and the transport header 4 bytes after it
// times the header length, and `to` is 4-aligned. Were a header not
// aligned, the loads would still be right: the verifier checks packet
// alignment only where unaligned access is slow (not x86-64 or arm64).
// Byte by byte, a TCP packet's two headers took ~60 instructions on the
// path every packet of every socket takes.
static __always_inline int read_head(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (off <= 64 && data + off + len <= end) {
		__builtin_memcpy(__builtin_assume_aligned(to, 4), __builtin_assume_aligned(data + off, 4), len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

static __always_inline int load_l4(struct __sk_buff *skb, __u32 off, __u8 proto, struct l4 *l)
{
	switch (proto) {
	case IPPROTO_TCP: {
		__u8 h[16] __attribute__((aligned(4)));
		if (read_head(skb, off, h, 14))
			return -1;
		l->dport = (h[2] << 8) | h[3];
		l->tcp_flags = h[13];
		return 0;
	}
	case IPPROTO_UDP:
	case IPPROTO_UDPLITE: {
		__u8 h[4] __attribute__((aligned(4)));
		if (read_head(skb, off, h, sizeof(h)))
			return -1;
		l->dport = (h[2] << 8) | h[3];
		return 0;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
	{
		__u8 h[4] __attribute__((aligned(4)));
		if (read_head(skb, off, h, 1))
			return -1;
		l->icmp_type = h[0];
		return 0;
	}
	}
	return 0;
}

// remember keeps an allowed verdict of a UDP datagram no hook saw (a
// connected socket's) for the socket's next datagrams. Only for internal
// destinations: there a full decision costs two trie lookups and a port
// search, more than the allocation of the socket's storage once; an
// external one costs a lookup that ends near the trie's root. cgroup_id
// is the socket's cgroup (skb_principal's).
static __always_inline void remember(struct bpf_sock *sk, __u64 cgroup_id, const struct dest *d, __u32 generation,
				     __u32 app_id, __u32 app_flags)
{
	struct verdict_entry *v = bpf_sk_storage_get(&socket_verdicts, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (v)
		put_verdict(v, cgroup_id, d, generation, app_id, app_flags | VERDICT_SOCKET_CGROUP);
}

// mark_socket_cgroup notes in a socket's verdict that its cgroup_id, which
// the connect hook set to the connecting task's cgroup, is the socket's
// own (VERDICT_SOCKET_CGROUP), so that its next datagrams need not read
// the socket's cgroup; only if the entry still holds that verdict.
static __always_inline void mark_socket_cgroup(struct verdict_entry *v, __u32 generation, __u64 sk_cgroup)
{
	__u64 want = (__u64)generation << 32;
	if (!entry_lock(v, want))
		return;
	if (v->cgroup_id == sk_cgroup)
		v->app_flags |= VERDICT_SOCKET_CGROUP;
	entry_unlock(v, want);
}

// pass_everyone lets a packet an everyone grant allows pass, and keeps the
// verdict for a UDP socket's next datagrams: it holds for any principal, so
// no handover check either (anyone may send there).
static __always_inline int pass_everyone(struct bpf_sock *sk, __u64 cgroup_id, const struct dest *d, __u32 generation,
					 __u32 app_id, __u32 app_flags)
{
	if (sk && d->proto == PROTO_UDP)
		remember(sk, cgroup_id, d, generation, app_id, app_flags | VERDICT_EVERYONE);
	return 1;
}

// The handover guard for UDP. A datagram of a connected socket has no
// address, so no sendmsg hook sees it, and the egress backstop decides it
// by the socket's cgroup: an app's connected socket would carry whatever a
// process outside the app that got the descriptor sends. UDP, unlike TCP,
// transmits in the sending task (udp_sendmsg → ip_finish_output → here,
// before any qdisc), so the sender is the current task, unless this runs
// in softirq (asynchronous IPsec crypto resuming output) or a kernel
// thread; those are not attributed and pass. On x86-64 softirqs run on the
// CPU's own IRQ stack (CONFIG_SOFTIRQ_ON_OWN_STACK), so "on the current
// task's stack" tells task context apart without the preempt count, which
// a cgroup_skb program cannot read here (no kallsyms address for per-CPU
// variables). A packet an NFQUEUE verdict reinjects passes here in the
// task that gave the verdict: on hosts where such a firewall queues apps'
// internal UDP, the daemon runs with --udp-handover=false (GEN_NO_UDP_HANDOVER)
// or the app says handover: allow (SECURITY.md).
#define PF_KTHREAD 0x00200000
// THREAD_SIZE of x86-64 without KASAN. A larger task stack only makes the
// test fail open (the datagram passes), never deny. The Go loader turns
// the check off where softirqs may run on task stacks (PREEMPT_RT, other
// architectures: bpf.UDPHandover). The helpers used here
// (bpf_get_current_task and CO-RE reads in cgroup_skb) need a 6.x kernel
// and a loader with CAP_PERFMON.
#define TASK_STACK_SIZE (16 * 1024)

struct task_struct___snd {
	unsigned int flags;
	void *stack;
} __attribute__((preserve_access_index));

// stack_probe turns an address on this program's stack into a number (a
// privileged loader may store a pointer in a map value).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} stack_probe SEC(".maps");

static __always_inline int in_sender_task(void)
{
	struct task_struct___snd *t = (struct task_struct___snd *)bpf_get_current_task();
	if (BPF_CORE_READ(t, flags) & PF_KTHREAD)
		return 0;
	__u32 zero = 0;
	__u64 *slot = bpf_map_lookup_elem(&stack_probe, &zero);
	if (!slot)
		return 0;
	volatile __u64 anchor = 0;
	*slot = (__u64)&anchor;
	__u64 sp = *(volatile __u64 *)slot;
	__u64 base = (__u64)BPF_CORE_READ(t, stack);
	return sp - base < TASK_STACK_SIZE;
}

// task_in_app: is the current task one of app_id's processes, in this
// generation, as the connect hook would judge it (its cgroup's app,
// migration marks, exe: pinning)? cgroup_id and task_app say who it is.
static __always_inline int task_in_app(__u32 slot, const struct generation_info *info, __u32 app_id,
				       __u64 *cgroup_id, __u32 *task_app)
{
	struct app_info *a = principal(slot, info, cgroup_id);
	*task_app = a ? a->app_id : 0;
	return a && a->app_id == app_id && (!(a->flags & APP_EXE_PINNED) || exe_allowed(slot, app_id));
}

// socket_cgroup_mate: is the writer, in writer_cgroup, the maker of a
// socket of an app with app_flags made in sk_cgroup, or one of its cgroup
// mates, so that the handover checks pass it without asking task_in_app?
// The usual case: one comparison. Not for an app pinned to its binaries
// (which one runs is checked), nor for a user app (a cgroup mate may be
// of another uid), nor for a task migrate.c marked.
static __always_inline int socket_cgroup_mate(__u64 writer_cgroup, __u64 sk_cgroup, __u32 app_flags)
{
	return writer_cgroup == sk_cgroup && !(app_flags & (APP_EXE_PINNED | APP_BY_USER)) && !migrated();
}

// foreign_udp_sender: is a datagram of app_id's socket being sent, in its
// sender's own context, by a task that is not one of app_id's processes?
// sk_cgroup is the socket's cgroup; sender and sender_app say who sent,
// for the audit record (set when it returns 1). Where no check applies,
// it answers before reading the sender's cgroup.
static __always_inline int foreign_udp_sender(__u64 sk_cgroup, __u32 slot, const struct generation_info *info,
					      __u32 app_id, __u32 app_flags, __u64 *sender, __u32 *sender_app)
{
	if ((app_flags & APP_HANDOVER_ALLOWED) || (info->flags & GEN_NO_UDP_HANDOVER))
		return 0;
	*sender = current_cgroup_id();
	*sender_app = 0;
	if (socket_cgroup_mate(*sender, sk_cgroup, app_flags))
		return 0;
	if (!in_sender_task())
		return 0;
	return !task_in_app(slot, info, app_id, sender, sender_app);
}

// skb_principal is the principal of the packet's socket, whose cgroup is
// cgroup_id (skb_cgroup_id: the caller reads it once, and keeps it for the
// audit record and the handover check): the deepest app cgroup among
// cgroup_id and its ancestors, else the match.user
// app of the socket's uid (sk_uid: the fsuid of the task that made the
// socket, as bpf_get_socket_uid gives; in softirq there is no sending task
// whose real uid could be read). It differs from the hooks' real uid only
// for a socket made with another fsuid (a setuid program, setfsuid):
// docs/policy.md, Principals.
static __always_inline struct app_info *skb_principal(struct __sk_buff *skb, __u32 slot,
						      const struct generation_info *info, __u64 cgroup_id)
{
	struct app_info *a = principal_in(WHO_SKB, skb, slot, info, cgroup_id);
	if (!a)
		a = user_principal(slot, info, bpf_get_socket_uid(skb));
	return a;
}

// deny_handover counts and audits a datagram refused by the UDP handover
// guard; the sender sees EPERM.
static __always_inline int deny_handover(const struct dest *d, __u64 sender, __u32 sender_app, __u32 generation,
					 __u32 rate, __u8 hook)
{
	count(sender_app, COUNT_DENY);
	audit(d, sender_app, sender, generation, rate, 0, REASON_HANDOVER, hook);
	return 0;
}

// egress is the backstop; udp_handover, a constant, says whether it runs the
// UDP handover check (foreign_udp_sender and its audit record), whose
// current-task helpers cgroup_skb programs lack on older kernels (6.1
// refuses bpf_get_current_cgroup_id there, 6.12 bpf_get_current_uid_gid;
// 6.18 has them): without it the compiler leaves them out.
static __always_inline int egress(struct __sk_buff *skb, const int udp_handover)
{
	struct dest d = {};
	struct l4 l = {};
	__u8 proto;
	__u8 hook;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct ip4_head ip;
		if (read_head(skb, 0, &ip, sizeof(ip)))
			return 1;
		// A later fragment carries no transport header; its first
		// fragment was decided.
		if (bpf_ntohs(ip.frag_off) & 0x1fff)
			return 1;
		d.family = 4;
		__builtin_memcpy(d.addr, ip.daddr, 4);
		proto = ip.protocol;
		if (load_l4(skb, (ip.ver_ihl & 0x0f) * 4, proto, &l))
			return 1;
		hook = HOOK_EGRESS4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ip6_head ip;
		if (read_head(skb, 0, &ip, sizeof(ip)))
			return 1;
		d.family = 6;
		__builtin_memcpy(d.addr, ip.daddr, 16);
		proto = ip.nexthdr;
		__u32 off = sizeof(ip);
		if (proto == NEXTHDR_FRAGMENT) {
			struct ip6_frag f;
			if (read_head(skb, off, &f, sizeof(f)))
				return 1;
			if (bpf_ntohs(f.frag_off) & ~7)
				return 1; // a later fragment
			proto = f.nexthdr;
			off += sizeof(f);
		}
		if (load_l4(skb, off, proto, &l))
			return 1;
		hook = HOOK_EGRESS6;
	} else {
		return 1;
	}

	// What is no attempt at all passes before any map lookup: most packets
	// are of established TCP connections.
	switch (proto) {
	case IPPROTO_TCP:
		// Only new connections: packets of an established one were
		// decided at its SYN, and replies of accepted connections are
		// no connection attempt at all.
		if ((l.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
			return 1;
		d.proto = PROTO_TCP;
		d.port = l.dport;
		break;
	case IPPROTO_UDP:
	case IPPROTO_UDPLITE:
		d.proto = PROTO_UDP;
		d.port = l.dport;
		break;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		// Echo requests reach a host; errors and replies the kernel
		// sends on its own are answers, not attempts.
		if (l.icmp_type != ICMP_ECHO && l.icmp_type != ICMPV6_ECHO_REQUEST)
			return 1;
		break;
	}

	struct generation_info *info = current_generation();
	if (!info)
		return 1; // the connect hooks already deny everything
	__u32 slot = info->slot & 1;
	__u32 generation = info->generation;

	// The connect or sendmsg hook usually decided this very packet a moment
	// ago (hook_handoff), and a connected UDP socket's datagrams go where
	// its connect, or its first datagram, went (socket_verdicts): a
	// matching verdict of this generation stands. Both are found in O(1),
	// before any lookup of the policy.
	struct bpf_sock *sk = skb->sk;
	if (sk && d.proto) {
		struct verdict_copy c = {};
		int hit = 0, own = 0; // own: the socket's verdict (socket_verdicts)
		__u32 cpu = bpf_get_smp_processor_id();
		struct verdict_entry *v = bpf_map_lookup_elem(&hook_handoff, &cpu);
		if (v)
			hit = verdict_matches(v, &d, generation, &c);
		// Socket storage takes the socket as skb->sk gives it: the
		// helper returns NULL for a request or time-wait socket itself.
		if (!hit && d.proto == PROTO_UDP) {
			v = bpf_sk_storage_get(&socket_verdicts, sk, 0, 0);
			if (v)
				own = hit = verdict_matches(v, &d, generation, &c);
		}
		// An everyone grant's verdict holds for every principal.
		if (hit && (c.app_flags & VERDICT_EVERYONE))
			return 1;
		if (hit) {
			// The same cgroup has the same principal in a generation
			// (the usual case: the socket's maker connected it).
			int known = own && (c.app_flags & VERDICT_SOCKET_CGROUP);
			__u64 sk_cgroup = known ? c.cgroup_id : skb_cgroup_id(skb);
			int same = sk_cgroup == c.cgroup_id;
			if (same && own && !known && v)
				mark_socket_cgroup(v, generation, sk_cgroup);
			if (!same) {
				struct app_info *a = skb_principal(skb, slot, info, sk_cgroup);
				same = a && a->app_id == c.app_id;
			}
			if (same) {
				__u64 sender;
				__u32 sender_app;
				if (udp_handover && d.proto == PROTO_UDP &&
				    foreign_udp_sender(sk_cgroup, slot, info, c.app_id, c.app_flags, &sender, &sender_app))
					return deny_handover(&d, sender, sender_app, generation, info->audit_rate, hook);
				return 1;
			}
		}
	}
	if (sk)
		sk = bpf_sk_fullsock(sk); // what socket storage takes

	// External: untouched, but for sandboxes (outside: deny), which are
	// asked for only in generations that have one.
	int internal = is_internal(slot, &d);
	if (!internal && !(info->flags & GEN_SANDBOX))
		return 1;

	__u64 cgroup_id = skb_cgroup_id(skb);
	struct app_info *app = skb_principal(skb, slot, info, cgroup_id);
	__u32 app_id = app ? app->app_id : 0;
	__u32 app_flags = app ? app->flags : 0;
	if (!internal && !(app_flags & APP_OUTSIDE_DENY))
		return 1;
	__u8 reason = REASON_UNBOUND;
	if (app) {
		reason = REASON_PROTO;
		__u8 why = d.proto ? own_allows(slot, app_id, app_flags, grant_of(slot, app_id, &d), &d, &reason) : 0;
		if (why) {
			if (udp_handover && d.proto == PROTO_UDP) {
				__u64 sender;
				__u32 sender_app;
				if (foreign_udp_sender(cgroup_id, slot, info, app_id, app_flags, &sender, &sender_app))
					return deny_handover(&d, sender, sender_app, generation, info->audit_rate, hook);
			}
			// Counted when the connect or sendmsg hook allowed it. A
			// name grant's address expires: its verdict is never
			// remembered.
			if (why == REASON_GRANTED && sk && d.proto == PROTO_UDP)
				remember(sk, cgroup_id, &d, generation, app_id, app_flags);
			return 1;
		}
	}
	int everyone;
	if (others_allow(slot, info, &d, internal, app_flags, &reason, &everyone, 0))
		return everyone ? pass_everyone(sk, cgroup_id, &d, generation, app_id, app_flags) : 1;
	if (app_flags & APP_AUDIT_ONLY) {
		// Passes, audited once: a UDP socket's next datagrams to the
		// same place hit the remembered verdict.
		would_deny(WHO_SKB, &d, app_id, cgroup_id, generation, info->audit_rate, reason, hook);
		if (sk && d.proto == PROTO_UDP)
			remember(sk, cgroup_id, &d, generation, app_id, app_flags);
		return 1;
	}
	count(app_id, COUNT_DENY);
	audit_as(WHO_SKB, &d, app_id, cgroup_id, generation, info->audit_rate, 0, reason, hook);
	return 0;
}

SEC("cgroup_skb/egress")
int backstop_egress(struct __sk_buff *skb)
{
	return egress(skb, 1);
}

// backstop_egress_plain is the backstop without the UDP handover check, for
// kernels that refuse backstop_egress (6.1, 6.12); the loader falls back to
// it and Guards reports the UDP handover guard missing.
SEC("cgroup_skb/egress")
int backstop_egress_plain(struct __sk_buff *skb)
{
	return egress(skb, 0);
}

// The handover guard. An established TCP connection is not decided again
// packet by packet, so a connection an app opened to an internal
// destination would carry whatever any holder of the socket writes: a
// process outside the app that got the descriptor by SCM_RIGHTS. The
// connect hooks mark such sockets (socket_owners); when the connection is
// established, track_owned_sockets puts the socket in owned_sockets, and
// guard_handover, the sk_msg program of that sockhash, runs in the writing
// task for every sendmsg, write, sendfile or splice to it (io_uring's
// workers and SQPOLL thread belong to the submitting process) and refuses
// (EACCES) data from a task that is not the app's. A kernel hook in the
// writer's own context, unlike the egress path, where data queued by one
// task leaves from softirq. Sockets pay for it only when an app connected
// them to an internal destination. Kernel assumptions (checked on 6.18):
// sockops with skops->sk and socket storage (5.10+), sk_msg with the
// current-task helpers, io_uring workers as threads of the submitter
// (5.12+), and tcp_bpf keeping a drop verdict for the socket (after one
// refused write the connection takes no data from anyone). Not covered: a
// socket handed over before it is established (a blocking write waiting
// for the handshake, TCP_FASTOPEN_CONNECT's first write) goes out through
// plain tcp_sendmsg, and connections established before the guard was
// attached; SECURITY.md lists them.
#define OWNED_SOCKETS (1 << 16)

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__type(key, __u64); // socket cookie
	__type(value, __u64);
	__uint(max_entries, OWNED_SOCKETS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} owned_sockets SEC(".maps");

// owned_sockets_full counts marked connections that did not fit in
// owned_sockets (more than OWNED_SOCKETS at once): not guarded.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} owned_sockets_full SEC(".maps");

// owned_sockets_unmatched counts marked connections established with
// another peer than the one marked: a refused connect re-used elsewhere, or
// a connect program that runs after procgate's (a parent cgroup's: a
// socket load balancer) rewrote the destination. Not guarded.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} owned_sockets_unmatched SEC(".maps");

SEC("sockops")
int track_owned_sockets(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 1;
	struct socket_owner *o = bpf_sk_storage_get(&socket_owners, sk, 0, 0);
	if (!o)
		return 1;
	// The peer it is established with must be the marked destination: a
	// socket whose marked connect failed may have connected elsewhere
	// since (an external host), and is no app's internal connection.
	// Fields read once, unconditionally, and pinned in registers:
	// otherwise clang shares one moved context pointer between the IPv4
	// and IPv6 loads, which the verifier refuses.
	__u32 family = skops->family, ip4 = skops->remote_ip4, port = skops->remote_port;
	__u32 w0 = skops->remote_ip6[0], w1 = skops->remote_ip6[1], w2 = skops->remote_ip6[2], w3 = skops->remote_ip6[3];
	asm volatile("" : "+r"(family), "+r"(ip4), "+r"(port), "+r"(w0), "+r"(w1), "+r"(w2), "+r"(w3));
	struct dest peer = { .proto = PROTO_TCP, .port = (__u16)bpf_ntohl(port) };
	if (family == AF_INET6 && !(w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff))) {
		peer.family = 6;
		__builtin_memcpy(&peer.addr[0], &w0, 4);
		__builtin_memcpy(&peer.addr[4], &w1, 4);
		__builtin_memcpy(&peer.addr[8], &w2, 4);
		__builtin_memcpy(&peer.addr[12], &w3, 4);
	} else {
		peer.family = 4; // AF_INET, or IPv4-mapped as the connect hook decided it
		if (family == AF_INET6)
			ip4 = w3;
		__builtin_memcpy(peer.addr, &ip4, 4);
	}
	if (!same_dest(&peer, &o->d)) {
		bpf_sk_storage_delete(&socket_owners, sk);
		bump(&owned_sockets_unmatched);
		return 1;
	}
	__u64 cookie = bpf_get_socket_cookie(skops);
	if (bpf_sock_hash_update(skops, &owned_sockets, &cookie, BPF_NOEXIST))
		bump(&owned_sockets_full);
	return 1;
}

SEC("sk_msg")
int guard_handover(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	if (!sk)
		return SK_PASS;
	struct socket_owner *o = bpf_sk_storage_get(&socket_owners, sk, 0, 0);
	if (!o)
		return SK_PASS;
	// The app writing from the cgroup it connected from: the common case,
	// the socket-storage lookup above and a cgroup read in place.
	__u64 cgroup_id = current_cgroup_id();
	if (socket_cgroup_mate(cgroup_id, o->cgroup_id, o->flags))
		return SK_PASS;

	struct generation_info *info = current_generation();
	__u32 app_id = 0, generation = 0, rate = 1000;
	if (info) {
		generation = info->generation;
		rate = info->audit_rate;
		if (task_in_app(info->slot & 1, info, o->app_id, &cgroup_id, &app_id))
			return SK_PASS;
	}
	// The socket is in owned_sockets only if its peer is the destination
	// its mark holds (track_owned_sockets): that is what the record names.
	count(app_id, COUNT_DENY);
	audit(&o->d, app_id, cgroup_id, generation, rate, 0, REASON_HANDOVER, HOOK_TCP_SEND);
	return SK_DROP;
}

// guard_packet_socket: no packet or XDP sockets inside app cgroups. AF_PACKET never
// runs cgroup/sock_create (that hook is for inet sockets only), so this is a
// BPF LSM hook attached to the same cgroup (lsm_cgroup, 6.0+, needs the bpf
// LSM active). Arguments come as the hook's: socket_create(family, type,
// protocol, kern).
SEC("lsm_cgroup/socket_create")
int guard_packet_socket(unsigned long long *ctx)
{
	int family = (int)ctx[0];
	int kern = (int)ctx[3];
	// AF_XDP frames in copy mode go to the driver as well: no IP hook.
	if (kern || (family != AF_PACKET && family != AF_XDP))
		return 1;
	struct generation_info *info = current_generation();
	if (!info)
		return 1;
	__u64 cgroup_id;
	// By cgroup alone, marks of migrate.c aside: a marked process' sockets
	// still belong to the app's cgroup, where the egress backstop would
	// take a raw socket's packets for the app's.
	struct app_info *app = principal_of(WHO_TASK_HELPER, NULL, info->slot & 1, info, &cgroup_id);
	if (!app)
		return 1;
	refuse_as_raw_socket(app->app_id, cgroup_id, info, HOOK_SOCK_CREATE);
	return 0;
}

// The handover guard where BPF LSM loads: the same check as guard_handover
// (and, for connected UDP sockets the connect hooks marked under
// GEN_UDP_MARKS, as the egress backstop's UDP handover check, which 6.1 and
// 6.12 refuse), in security_socket_sendmsg, which every sendmsg, write, send and io_uring
// send passes in the writing task (sendfile and splice too on 6.5+, where
// they reach sock_sendmsg with MSG_SPLICE_PAGES; before, sendpage skips
// it). Host-wide, so that a writer outside the enforced cgroup is judged
// too; a socket that is no app's connection costs one socket storage
// lookup. No sockhash entry, no sockops program and no tcp_bpf send path:
// a marked connection costs its socket storage alone, and it is guarded
// from its connect on (a write that waits for the handshake, or a
// TCP_FASTOPEN_CONNECT first write, is judged as well). The peer must be
// the marked destination (a socket whose marked connect failed may have
// connected elsewhere since), compared only when a foreign task writes.
// Refused writes fail with EACCES; the connection stays usable by the app.
//
// Kernel assumptions: BPF LSM with trampolines (the loader tries it and
// falls back to the sockhash guard), socket storage from LSM programs
// (5.11+), struct sock_common's skc_daddr, skc_dport, skc_v6_daddr and
// skc_family (lsm.h).
SEC("lsm/socket_sendmsg")
int guard_handover_lsm(unsigned long long *ctx)
{
	struct socket___lsm *sock = (struct socket___lsm *)ctx[0];
	struct sock___lsm *sk = sock->sk;
	if (!sk)
		return 0;
	struct socket_owner *o = bpf_sk_storage_get(&socket_owners, sk, 0, 0);
	if (!o)
		return 0;
	__u64 cgroup_id = current_cgroup_id();
	if (socket_cgroup_mate(cgroup_id, o->cgroup_id, o->flags))
		return 0;
	struct generation_info *info = current_generation();
	__u32 app_id = 0, generation = 0, rate = 1000;
	if (info) {
		generation = info->generation;
		rate = info->audit_rate;
		if (task_in_app(info->slot & 1, info, o->app_id, &cgroup_id, &app_id))
			return 0;
	}
	// A marked socket is TCP, or connected UDP (GEN_UDP_MARKS): the mark
	// holds the protocol, which a socket keeps.
	struct dest peer = { .proto = o->d.proto, .port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport)) };
	__u32 w[4] = {};
	BPF_CORE_READ_INTO(&w, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr32);
	if (BPF_CORE_READ(sk, __sk_common.skc_family) == AF_INET6 && !(w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff))) {
		peer.family = 6;
		__builtin_memcpy(peer.addr, w, 16);
	} else {
		__u32 ip4 = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		peer.family = 4;
		__builtin_memcpy(peer.addr, &ip4, 4);
	}
	if (!same_dest(&peer, &o->d))
		return 0; // connected elsewhere since: no app's internal connection
	count(app_id, COUNT_DENY);
	audit(&o->d, app_id, cgroup_id, generation, rate, 0, REASON_HANDOVER, o->d.proto == PROTO_UDP ? HOOK_UDP_SEND : HOOK_TCP_SEND);
	return -EACCES;
}
