//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// procgate's route authorization: decides every connect() and UDP sendmsg()
// of the tasks below the cgroup this is attached to.
//
//   allow(p, d) = d not internal || (principal(p) && some grant of p covers d)
//
// Policy generations. Everything a decision reads lives in per-generation
// inner maps, reached through ARRAY_OF_MAPS outers with two slots. A decision
// reads policy_active once and uses slot (generation & 1) for every lookup,
// so it sees one generation whole. The loader fills the idle slot, flips
// policy_active, then updates an outer map: the kernel runs synchronize_rcu()
// after any update of a map-of-maps (maybe_wait_bpf_programs, since 5.x), so
// when that returns no decision still uses the old slot and the next reload
// may overwrite it.
//
// Kernel assumptions: cgroup sock_addr hooks may call
// bpf_get_current_{cgroup_id,ancestor_cgroup_id,pid_tgid,uid_gid,comm}
// (6.1+ via cgroup_current_func_proto); ring buffer (5.8+).

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char __license[] SEC("license") = "Dual MIT/GPL";

#define MAX_CGROUP_LEVEL 32
#define MAX_APPS 65536
#define PORT_SEARCH_STEPS 18 // log2(max port ranges) + 1, bounds the search loop

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif

enum reason {
	REASON_NOT_INTERNAL = 1,
	REASON_GRANTED = 2,
	REASON_UNBOUND = 3,
	REASON_NO_GRANT = 4,
	REASON_PORT = 5,
	REASON_NO_POLICY = 6,
};

// Counter slots per app id: index app_id * COUNTER_SLOTS + slot.
enum counter_slot {
	COUNT_ALLOW = 0,      // internal destination, granted
	COUNT_DENY = 1,       // internal destination, denied
	COUNT_EXTERNAL = 2,   // not internal, passed
	COUNT_AUDIT_DROP = 3, // audit event not sent (rate limit or full ring)
	COUNTER_SLOTS = 4,
};

enum hook {
	HOOK_CONNECT4 = 1,
	HOOK_CONNECT6 = 2,
	HOOK_SENDMSG4 = 3,
	HOOK_SENDMSG6 = 4,
};

#define PROTO_TCP 1
#define PROTO_UDP 2

#define APP_AUDIT_ALLOW 1

struct lpm_v4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

struct lpm_v6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

// Grant tries are keyed by app first: prefixlen = 32 + the prefix's length,
// so a lookup only ever matches the app's own grants.
struct grant_v4_key {
	__u32 prefixlen;
	__u32 app_id; // big-endian, so that it is the key's leading 32 bits
	__u8 addr[4];
};

struct grant_v6_key {
	__u32 prefixlen;
	__u32 app_id;
	__u8 addr[16];
};

// The union of every grant of one app that contains this prefix: the loader
// pushes less specific grants down into more specific ones, so the longest
// match alone decides. Ports are sorted disjoint ranges in port_ranges.
struct grant_value {
	__u32 tcp_first;
	__u32 tcp_count;
	__u32 udp_first;
	__u32 udp_count;
};

struct port_range {
	__u16 lo;
	__u16 hi;
};

struct app_info {
	__u32 app_id;
	__u32 flags;
};

struct generation_info {
	__u32 generation;
	__u32 min_level; // shallowest and deepest cgroup level of any app cgroup
	__u32 max_level;
	__u32 audit_rate; // events per second per app
};

struct audit_event {
	__u64 ts_ns; // CLOCK_MONOTONIC (bpf_ktime_get_ns)
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 gid;
	__u32 app_id;
	__u32 generation;
	__u8 allowed;
	__u8 reason;
	__u8 hook;
	__u8 proto; // PROTO_TCP, PROTO_UDP, 0 other
	__u16 port; // host order
	__u8 family; // 4 or 6 (as decided: IPv4-mapped is 4)
	__u8 pad;
	__u8 addr[16]; // IPv4 in the first 4 bytes
	char comm[16];
};

struct audit_budget {
	__u64 window; // second (ktime / 1e9) the count belongs to
	__u32 count;
	__u32 pad;
};

// ---- inner map templates (the loader creates one set per generation) ----

struct internal_v4_map {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lpm_v4_key);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} internal_v4_inner SEC(".maps");

struct internal_v6_map {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lpm_v6_key);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} internal_v6_inner SEC(".maps");

struct grant_v4_map {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct grant_v4_key);
	__type(value, struct grant_value);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} grant_v4_inner SEC(".maps");

struct grant_v6_map {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct grant_v6_key);
	__type(value, struct grant_value);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} grant_v6_inner SEC(".maps");

struct port_ranges_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct port_range);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_INNER_MAP); // sizes differ per generation
} port_ranges_inner SEC(".maps");

struct app_by_cgroup_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct app_info);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} app_by_cgroup_inner SEC(".maps");

struct generation_info_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct generation_info);
	__uint(max_entries, 1);
} policy_info_inner SEC(".maps");

// ---- outers: two slots each, pinned by name so enforcement outlives the daemon ----

#define OUTER(name, inner_type)                                                \
	struct {                                                               \
		__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);                      \
		__uint(max_entries, 2);                                        \
		__type(key, __u32);                                            \
		__uint(pinning, LIBBPF_PIN_BY_NAME);                           \
		__array(values, struct inner_type);                            \
	} name SEC(".maps")

OUTER(internal_v4, internal_v4_map);
OUTER(internal_v6, internal_v6_map);
OUTER(grant_v4, grant_v4_map);
OUTER(grant_v6, grant_v6_map);
OUTER(port_ranges, port_ranges_map);
OUTER(app_by_cgroup, app_by_cgroup_map);
OUTER(policy_info, generation_info_map);

// The generation in force; its low bit is the slot.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, MAX_APPS * COUNTER_SLOTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} verdict_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); // app id
	__type(value, struct audit_budget);
	__uint(max_entries, MAX_APPS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} audit_budgets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} audit_events SEC(".maps");

// Forces bpf2go to emit Go types for structs only the loader uses.
const struct audit_event *unused_audit_event __attribute__((unused));
const struct grant_v4_key *unused_grant_v4_key __attribute__((unused));
const struct grant_v6_key *unused_grant_v6_key __attribute__((unused));

struct dest {
	__u8 addr[16];
	__u16 port;
	__u8 family;
	__u8 proto;
};

static __always_inline void count(__u32 app_id, __u32 slot)
{
	__u32 key = app_id * COUNTER_SLOTS + slot;
	__u64 *v = bpf_map_lookup_elem(&verdict_counters, &key);
	if (v)
		*v += 1;
}

// Kernel-side rate limit per app: a denial storm must not flood the ring
// buffer or the daemon. Races between CPUs only blur the limit slightly.
static __always_inline int audit_allowed(__u32 app_id, __u32 rate)
{
	__u64 window = bpf_ktime_get_ns() / 1000000000ULL;
	struct audit_budget *b = bpf_map_lookup_elem(&audit_budgets, &app_id);
	if (!b) {
		struct audit_budget fresh = { .window = window, .count = 1 };
		bpf_map_update_elem(&audit_budgets, &app_id, &fresh, BPF_NOEXIST);
		return 1;
	}
	if (b->window != window) {
		b->window = window;
		b->count = 1;
		return 1;
	}
	if (b->count >= rate)
		return 0;
	__sync_fetch_and_add(&b->count, 1);
	return 1;
}

static __always_inline void audit(const struct dest *d, __u32 app_id, __u64 cgroup_id, __u32 generation,
				  __u32 rate, __u8 allowed, __u8 reason, __u8 hook)
{
	if (!audit_allowed(app_id, rate)) {
		count(app_id, COUNT_AUDIT_DROP);
		return;
	}
	struct audit_event *e = bpf_ringbuf_reserve(&audit_events, sizeof(*e), 0);
	if (!e) {
		count(app_id, COUNT_AUDIT_DROP);
		return;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 uid_gid = bpf_get_current_uid_gid();
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = cgroup_id;
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->uid = (__u32)uid_gid;
	e->gid = uid_gid >> 32;
	e->app_id = app_id;
	e->generation = generation;
	e->allowed = allowed;
	e->reason = reason;
	e->hook = hook;
	e->proto = d->proto;
	e->port = d->port;
	e->family = d->family;
	e->pad = 0;
	__builtin_memcpy(e->addr, d->addr, sizeof(e->addr));
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	bpf_ringbuf_submit(e, 0);
}

// The deepest app cgroup among the calling task's cgroup and its ancestors.
// Only levels where some app cgroup lives are probed.
static __always_inline struct app_info *principal(void *apps, const struct generation_info *info, __u64 *cgroup_id)
{
	__u64 id = bpf_get_current_cgroup_id();
	*cgroup_id = id;
	struct app_info *a = bpf_map_lookup_elem(apps, &id);
	if (a)
		return a;
	__u32 max = info->max_level;
	for (__u32 i = 0; i < MAX_CGROUP_LEVEL; i++) {
		if (i > max)
			break;
		__u32 level = max - i;
		if (level < info->min_level)
			break;
		__u64 anc = bpf_get_current_ancestor_cgroup_id(level);
		if (!anc)
			continue; // the task's cgroup is shallower than this level
		a = bpf_map_lookup_elem(apps, &anc);
		if (a)
			return a;
	}
	return NULL;
}

// Binary search of sorted disjoint ranges [first, first+count).
static __always_inline int port_allowed(void *ranges, __u32 first, __u32 count, __u16 port)
{
	__u32 lo = first, hi = first + count; // candidates in [lo, hi)
	for (int i = 0; i < PORT_SEARCH_STEPS; i++) {
		if (lo >= hi)
			return 0;
		__u32 mid = lo + (hi - lo) / 2;
		struct port_range *r = bpf_map_lookup_elem(ranges, &mid);
		if (!r)
			return 0;
		if (port < r->lo)
			hi = mid;
		else if (port > r->hi)
			lo = mid + 1;
		else
			return 1;
	}
	return 0;
}

// Returns 1 to let the syscall go on, 0 for EPERM.
static __always_inline int decide(struct dest *d, __u8 hook)
{
	__u32 zero = 0;
	__u32 *gen = bpf_map_lookup_elem(&policy_active, &zero);
	if (!gen)
		return 0;
	__u32 generation = *gen;
	__u32 slot = generation & 1;

	void *info_map = bpf_map_lookup_elem(&policy_info, &slot);
	void *internal = bpf_map_lookup_elem(d->family == 4 ? (void *)&internal_v4 : (void *)&internal_v6, &slot);
	if (!info_map || !internal)
		goto no_policy;
	struct generation_info *info = bpf_map_lookup_elem(info_map, &zero);
	if (!info || info->generation != generation)
		goto no_policy;

	void *is_internal;
	if (d->family == 4) {
		struct lpm_v4_key k = { .prefixlen = 32 };
		__builtin_memcpy(k.addr, d->addr, 4);
		is_internal = bpf_map_lookup_elem(internal, &k);
	} else {
		struct lpm_v6_key k = { .prefixlen = 128 };
		__builtin_memcpy(k.addr, d->addr, 16);
		is_internal = bpf_map_lookup_elem(internal, &k);
	}

	void *apps = bpf_map_lookup_elem(&app_by_cgroup, &slot);
	if (!apps)
		goto no_policy;
	__u64 cgroup_id = 0;
	struct app_info *app = 0;
	if (!is_internal) {
		// Count per app even for external traffic: cheap (per-CPU array)
		// and it tells an operator the hook sees the app at all.
		app = principal(apps, info, &cgroup_id);
		count(app ? app->app_id : 0, COUNT_EXTERNAL);
		return 1;
	}

	app = principal(apps, info, &cgroup_id);
	if (!app) {
		count(0, COUNT_DENY);
		audit(d, 0, cgroup_id, generation, info->audit_rate, 0, REASON_UNBOUND, hook);
		return 0;
	}
	__u32 app_id = app->app_id;
	__u32 app_flags = app->flags;

	struct grant_value *g;
	void *grants = bpf_map_lookup_elem(d->family == 4 ? (void *)&grant_v4 : (void *)&grant_v6, &slot);
	if (!grants)
		goto no_policy;
	if (d->family == 4) {
		struct grant_v4_key k = { .prefixlen = 64, .app_id = bpf_htonl(app_id) };
		__builtin_memcpy(k.addr, d->addr, 4);
		g = bpf_map_lookup_elem(grants, &k);
	} else {
		struct grant_v6_key k = { .prefixlen = 160, .app_id = bpf_htonl(app_id) };
		__builtin_memcpy(k.addr, d->addr, 16);
		g = bpf_map_lookup_elem(grants, &k);
	}
	__u8 reason = REASON_NO_GRANT;
	if (g) {
		reason = REASON_PORT;
		void *ranges = bpf_map_lookup_elem(&port_ranges, &slot);
		if (!ranges)
			goto no_policy;
		int ok = 0;
		if (d->proto == PROTO_TCP)
			ok = port_allowed(ranges, g->tcp_first, g->tcp_count, d->port);
		else if (d->proto == PROTO_UDP)
			ok = port_allowed(ranges, g->udp_first, g->udp_count, d->port);
		if (ok) {
			count(app_id, COUNT_ALLOW);
			if (app_flags & APP_AUDIT_ALLOW)
				audit(d, app_id, cgroup_id, generation, info->audit_rate, 1, REASON_GRANTED, hook);
			return 1;
		}
	}
	count(app_id, COUNT_DENY);
	audit(d, app_id, cgroup_id, generation, info->audit_rate, 0, reason, hook);
	return 0;

no_policy:
	// Fail closed: without a whole policy we cannot tell internal from
	// external, so nothing below the attach point may connect.
	count(0, COUNT_DENY);
	audit(d, 0, bpf_get_current_cgroup_id(), generation, 1000, 0, REASON_NO_POLICY, hook);
	return 0;
}

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

static __always_inline int decide4(struct bpf_sock_addr *ctx, __u8 hook)
{
	struct dest d = { .family = 4, .proto = proto_of(ctx) };
	__u32 ip = ctx->user_ip4;
	__builtin_memcpy(d.addr, &ip, 4);
	d.port = bpf_ntohs((__u16)ctx->user_port);
	return decide(&d, hook);
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
		return decide(&d, hook);
	}
	d.family = 6;
	__builtin_memcpy(&d.addr[0], &w0, 4);
	__builtin_memcpy(&d.addr[4], &w1, 4);
	__builtin_memcpy(&d.addr[8], &w2, 4);
	__builtin_memcpy(&d.addr[12], &w3, 4);
	return decide(&d, hook);
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
