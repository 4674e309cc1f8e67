//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// procgate's route authorization: decides every connect() and UDP sendmsg()
// of the tasks below the cgroup this is attached to.
//
//   allow(p, d) = d in Everyone(d) || d not internal
//                 || (principal(p) && some grant of p covers d)
//
// The decision itself, and the maps it reads, are in decision.h. The bind
// hooks enforce apps' listen: (authorize_bind4/6).

#include "decision.h"
#include "listen.h"

char __license[] SEC("license") = "Dual MIT/GPL";

static __always_inline __u8 proto_of(struct bpf_sock_addr *ctx)
{
	switch (ctx->protocol) {
	case IPPROTO_TCP:
	case IPPROTO_MPTCP:
		return PROTO_TCP;
	case IPPROTO_UDP:
	case IPPROTO_UDPLITE:
		return PROTO_UDP;
	}
	return 0;
}

// verdict_of decides, and hands an allowed verdict to the egress backstop,
// which sees the packet this call sends next (hook_handoff), and for a
// connected UDP socket every datagram after it (socket_verdicts).
static __always_inline int verdict_of(struct bpf_sock_addr *ctx, struct dest *d, __u8 hook)
{
	struct verdict v;
	// The calling task (bpf_get_current_task_btf): read once for the
	// principal's cgroup and the handover guard's open_to_tracing.
	void *task = bpf_get_current_task_btf();
	decide(d, hook, task, &v);
	if (!v.allow)
		return 0;
	// Only verdicts the backstop would decide otherwise: an external
	// destination in a generation with sandboxes is decided by the
	// socket's principal there.
	if (!v.handoff)
		return 1;
	// A TCP connection an app's own grant let to an internal destination
	// is the app's: mark it, so that only the app's processes may write to
	// it once it is established (harden.c, guard_handover). One an
	// everyone grant let through is anyone's. MPTCP's subflows are other
	// sockets and are not marked.
	// Marked only where the guard closes something no other guard does
	// (GEN_TRUST_TRACE_GUARD): a connecting process under the trace guard
	// cannot have its sockets copied (pidfd_getfd needs ptrace access), and
	// the app giving one away (SCM_RIGHTS) could as well relay its bytes.
	// The mark is the guard's whole per-connection cost (socket storage,
	// and on kernels without BPF LSM a sockhash entry when established).
	// A connected UDP socket is marked as well where the BPF LSM handover
	// program judges its writers (GEN_UDP_MARKS): there the egress
	// backstop's UDP handover check is refused (6.1, 6.12).
	if (v.owned && (hook == HOOK_CONNECT4 || hook == HOOK_CONNECT6) && ctx->sk && !(v.app_flags & APP_HANDOVER_ALLOWED) &&
	    (ctx->protocol == IPPROTO_TCP ? !(v.gen_flags & GEN_TRUST_TRACE_GUARD) || open_to_tracing(task)
					  : (v.gen_flags & GEN_UDP_MARKS) &&
						    (ctx->protocol == IPPROTO_UDP || ctx->protocol == IPPROTO_UDPLITE))) {
		struct socket_owner *o = bpf_sk_storage_get(&socket_owners, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (o) {
			o->cgroup_id = v.cgroup_id;
			o->app_id = v.app_id;
			o->flags = v.app_flags;
			o->d = *d;
		}
	}
	// A connected UDP socket pays once: its datagrams pass no hook, and
	// the backstop takes this verdict from the socket until the generation
	// changes. Not a name grant's, which expires with its DNS answer.
	if ((hook == HOOK_CONNECT4 || hook == HOOK_CONNECT6) && d->proto == PROTO_UDP && ctx->sk && !v.named) {
		struct verdict_entry *sv = bpf_sk_storage_get(&socket_verdicts, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (sv)
			put_verdict(sv, v.cgroup_id, d, v.generation, v.app_id, v.app_flags);
		return 1;
	}
	__u32 cpu = bpf_get_smp_processor_id();
	struct verdict_entry *h = bpf_map_lookup_elem(&hook_handoff, &cpu);
	if (h)
		put_verdict(h, v.cgroup_id, d, v.generation, v.app_id, v.app_flags);
	return 1;
}

static __always_inline int decide4(struct bpf_sock_addr *ctx, __u8 hook)
{
	struct dest d = { .family = 4, .proto = proto_of(ctx) };
	__u32 ip = ctx->user_ip4;
	__builtin_memcpy(d.addr, &ip, 4);
	d.port = bpf_ntohs((__u16)ctx->user_port);
	return verdict_of(ctx, &d, hook);
}

static __always_inline int decide6(struct bpf_sock_addr *ctx, __u8 hook)
{
	struct dest d = { .proto = proto_of(ctx) };
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
	d.port = bpf_ntohs((__u16)ctx->user_port);
	// An AF_INET6 socket reaches IPv4 through ::ffff:a.b.c.d; the kernel then
	// routes it as IPv4 without running connect4, so decide it as IPv4 here.
	if (w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff)) {
		d.family = 4;
		__builtin_memcpy(d.addr, &w3, 4);
		return verdict_of(ctx, &d, hook);
	}
	d.family = 6;
	__builtin_memcpy(&d.addr[0], &w0, 4);
	__builtin_memcpy(&d.addr[4], &w1, 4);
	__builtin_memcpy(&d.addr[8], &w2, 4);
	__builtin_memcpy(&d.addr[12], &w3, 4);
	return verdict_of(ctx, &d, hook);
}

SEC("cgroup/connect4")
int authorize_connect4(struct bpf_sock_addr *ctx)
{
	return decide4(ctx, HOOK_CONNECT4);
}

SEC("cgroup/connect6")
int authorize_connect6(struct bpf_sock_addr *ctx)
{
	return decide6(ctx, HOOK_CONNECT6);
}

SEC("cgroup/sendmsg4")
int authorize_sendmsg4(struct bpf_sock_addr *ctx)
{
	return decide4(ctx, HOOK_SENDMSG4);
}

SEC("cgroup/sendmsg6")
int authorize_sendmsg6(struct bpf_sock_addr *ctx)
{
	return decide6(ctx, HOOK_SENDMSG6);
}

// The bind hooks: an app with listen: may bind only the ports it lists,
// TCP and UDP (and any other protocol with ports); everyone else binds
// untouched (listen.h).
//
// A bind hook returning 0 fails the bind with EPERM unless the program set
// another error: bpf_set_retval(-EACCES) makes it EACCES, as for a port
// below ip_unprivileged_port_start (sock_addr programs get the helper from
// cgroup_common_func_proto, 6.1+, as the current-task helpers). Only explicit
// binds run the hook: connect()'s and sendto()'s automatic bind of an
// unbound socket to an ephemeral port do not, so clients keep working; an
// explicit bind to port 0 is refused unless listen: lists 0. listen()'s
// automatic bind does not either: lsmguard.c's socket_listen program
// judges it as a bind to port 0 where BPF LSM loads.

static __always_inline int authorize_bind(struct dest *d, __u8 hook)
{
	if (!listen_refused(d, hook))
		return 1;
	bpf_set_retval(-EACCES);
	return 0;
}

SEC("cgroup/bind4")
int authorize_bind4(struct bpf_sock_addr *ctx)
{
	struct dest d = { .family = 4, .proto = proto_of(ctx) };
	__u32 ip = ctx->user_ip4;
	__builtin_memcpy(d.addr, &ip, 4);
	d.port = bpf_ntohs((__u16)ctx->user_port);
	return authorize_bind(&d, HOOK_BIND4);
}

SEC("cgroup/bind6")
int authorize_bind6(struct bpf_sock_addr *ctx)
{
	struct dest d = { .family = 6, .proto = proto_of(ctx) };
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
	d.port = bpf_ntohs((__u16)ctx->user_port);
	__builtin_memcpy(&d.addr[0], &w0, 4);
	__builtin_memcpy(&d.addr[4], &w1, 4);
	__builtin_memcpy(&d.addr[8], &w2, 4);
	__builtin_memcpy(&d.addr[12], &w3, 4);
	return authorize_bind(&d, HOOK_BIND6);
}

// The enums of decision.h the Go side takes its constants from (bpf2go
// -type needs them in the object's BTF).
const enum reason *unused_reason __attribute__((unused));
const enum counter_slot *unused_counter_slot __attribute__((unused));
const enum hook *unused_hook __attribute__((unused));
