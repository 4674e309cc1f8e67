//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// The bench's minimal-decision lane: the bare per-app decision that issue
// 13 measured as "a minimal eBPF decision", and nothing else: the
// cgroup's app, whether the destination is internal, and the app's grant
// for it with its port ranges. No counters, no audit, no handoff to an
// egress backstop, no caches, no generations: its cost is what the
// lookups alone cost, which no design that decides at these hooks can go
// below.
//
// IPv4 only: the bench's latency destinations are IPv4 (the lane runs
// the floor's empty programs at connect6 and sendmsg6).

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char __license[] SEC("license") = "Dual MIT/GPL";

// The bench's grants have two port ranges; a few more fit.
#define MAX_RANGES 4
// As large as the bench's largest policy (maxPolicy in policy.go).
#define MAX_PREFIXES (1 << 20)

struct internal_key {
	__u32 prefixlen; // of addr
	__u32 addr;      // network order
};

// grant_key matches app exactly and addr by prefix: prefixlen counts the
// 32 bits of app too.
struct grant_key {
	__u32 prefixlen;
	__u32 app;
	__u32 addr; // network order
};

struct port_range {
	__u16 lo;
	__u16 hi;
};

struct port_set {
	__u32 n;
	struct port_range ranges[MAX_RANGES];
};

struct grant_ports {
	struct port_set tcp;
	struct port_set udp;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);   // cgroup id
	__type(value, __u32); // app id
	__uint(max_entries, 64);
} app_of_cgroup SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct internal_key);
	__type(value, __u8);
	__uint(max_entries, MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} internal_prefixes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct grant_key);
	__type(value, struct grant_ports);
	__uint(max_entries, MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} grants SEC(".maps");

static __always_inline int in_ports(const struct port_set *s, __u16 port)
{
	__u32 n = s->n;
#pragma unroll
	for (int i = 0; i < MAX_RANGES; i++) {
		if (i < n && port >= s->ranges[i].lo && port <= s->ranges[i].hi)
			return 1;
	}
	return 0;
}

enum proto { PROTO_TCP, PROTO_UDP, PROTO_OTHER };

// decide: 1 allows, 0 denies (EPERM). A process of no app may reach
// external destinations only; no grant names a protocol but TCP and UDP.
static __always_inline int decide(struct bpf_sock_addr *ctx, enum proto proto)
{
	__u64 cgroup = bpf_get_current_cgroup_id();
	__u32 *app = bpf_map_lookup_elem(&app_of_cgroup, &cgroup);
	struct internal_key ik = {.prefixlen = 32, .addr = ctx->user_ip4};
	if (!bpf_map_lookup_elem(&internal_prefixes, &ik))
		return 1;
	if (!app)
		return 0;
	struct grant_key gk = {.prefixlen = 64, .app = *app, .addr = ctx->user_ip4};
	struct grant_ports *g = bpf_map_lookup_elem(&grants, &gk);
	if (!g || proto == PROTO_OTHER)
		return 0;
	return in_ports(proto == PROTO_TCP ? &g->tcp : &g->udp, bpf_ntohs((__u16)ctx->user_port));
}

SEC("cgroup/connect4")
int minimal_connect4(struct bpf_sock_addr *ctx)
{
	switch (ctx->protocol) {
	case IPPROTO_TCP:
		return decide(ctx, PROTO_TCP);
	case IPPROTO_UDP:
		return decide(ctx, PROTO_UDP);
	}
	return decide(ctx, PROTO_OTHER);
}

SEC("cgroup/sendmsg4")
int minimal_sendmsg4(struct bpf_sock_addr *ctx)
{
	return decide(ctx, PROTO_UDP);
}
