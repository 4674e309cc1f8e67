//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// DNS-name grants need the answers an app gets: its DNS queries (UDP and
// TCP to port 53, IPv4) go to the daemon's DNS proxy instead of the
// resolver it asked (bpf/names.go, dnsproxy/), which forwards them there,
// learns the answer's addresses into name_grants and only then replies.
// Only apps with name grants (APP_NAMES), and only in the daemon's network
// namespace, where the proxy listens: elsewhere the query goes on untouched
// and an audit event says its answers grant nothing.
//
// These programs are attached after the authorize programs of procgate.c
// on the same hooks, so the query is decided for the resolver the app
// asked, and then rewritten. Each redirected socket gets its own loopback
// destination 127.a.b.c (a.b.c: 24 bits of its socket cookie) on the
// proxy's port: the proxy, bound to the port on every address, reads the
// destination of each query to find the socket's app and resolver in
// dns_redirects, and replies from that address, which recvmsg4 rewrites
// back to the resolver's so that the app sees the answer come from where
// it asked (glibc checks). Kernel assumptions: bpf_get_socket_cookie and
// bpf_get_netns_cookie in sock_addr programs (5.8+), cgroup/recvmsg4
// (5.2+).

#include "decision.h"

char __license[] SEC("license") = "Dual MIT/GPL";

#define REASON_DNS_UNOBSERVED 18

// Where the proxy listens: its port (network order) and the network
// namespace it serves (0: no proxy).
struct dns_proxy_info {
	__u64 netns_cookie;
	__u16 port;
	__u16 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct dns_proxy_info);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_proxy SEC(".maps");

// A redirected socket, by the low 24 bits of its cookie (the loopback
// destination it was sent to): the resolver it asked and its app. The
// cookie is kept whole, so that recvmsg4 rewrites only this socket's
// replies; the proxy trusts the entry of the destination a query came to.
struct dns_redirect {
	__u64 cookie;
	__u32 resolver; // IPv4, network order
	__u16 port;     // network order
	__u8 proto;     // PROTO_TCP, PROTO_UDP
	__u8 pad;
	__u32 app_id;
	__u32 pad2;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u32);
	__type(value, struct dns_redirect);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_redirects SEC(".maps");

static __always_inline int redirect4(struct bpf_sock_addr *ctx, __u8 hook)
{
	if (ctx->user_port != bpf_htons(53))
		return 1;
	__u8 proto = 0;
	if (ctx->protocol == IPPROTO_TCP)
		proto = PROTO_TCP;
	else if (ctx->protocol == IPPROTO_UDP)
		proto = PROTO_UDP;
	if (!proto)
		return 1;
	struct generation_info *info = current_generation();
	if (!info)
		return 1;
	__u32 slot = info->slot & 1;
	__u64 cgroup_id;
	struct app_info *app = principal(slot, info, &cgroup_id);
	if (!app || !(app->flags & APP_NAMES))
		return 1;
	__u32 zero = 0;
	struct dns_proxy_info *px = bpf_map_lookup_elem(&dns_proxy, &zero);
	if (!px || !px->port)
		return 1;
	if (bpf_get_netns_cookie(ctx) != px->netns_cookie) {
		struct dest d = { .family = 4, .proto = proto, .port = 53 };
		__u32 ip = ctx->user_ip4;
		__builtin_memcpy(d.addr, &ip, 4);
		audit(&d, app->app_id, cgroup_id, info->generation, info->audit_rate, 1, REASON_DNS_UNOBSERVED, hook);
		return 1;
	}
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u32 key = cookie & 0xffffff;
	if (!key)
		key = 1; // 127.0.0.0 is no host
	struct dns_redirect r = { .cookie = cookie, .resolver = ctx->user_ip4, .port = (__u16)ctx->user_port,
				  .proto = proto, .app_id = app->app_id };
	if (bpf_map_update_elem(&dns_redirects, &key, &r, BPF_ANY))
		return 1;
	ctx->user_ip4 = bpf_htonl(0x7f000000 | key);
	ctx->user_port = px->port;
	return 1;
}

SEC("cgroup/connect4")
int dns_connect4(struct bpf_sock_addr *ctx)
{
	return redirect4(ctx, HOOK_CONNECT4);
}

SEC("cgroup/sendmsg4")
int dns_sendmsg4(struct bpf_sock_addr *ctx)
{
	return redirect4(ctx, HOOK_SENDMSG4);
}

// A reply from the proxy to a redirected socket comes from the resolver
// the socket asked.
SEC("cgroup/recvmsg4")
int dns_recvmsg4(struct bpf_sock_addr *ctx)
{
	// Every UDP recvmsg() of every task that asks for the sender runs
	// this: most are not from loopback, and cost one test.
	__u32 ip = bpf_ntohl(ctx->user_ip4);
	if ((ip >> 24) != 127)
		return 1;
	__u32 zero = 0;
	struct dns_proxy_info *px = bpf_map_lookup_elem(&dns_proxy, &zero);
	if (!px || !px->port || ctx->user_port != px->port)
		return 1;
	__u32 key = ip & 0xffffff;
	struct dns_redirect *r = bpf_map_lookup_elem(&dns_redirects, &key);
	if (!r || r->cookie != bpf_get_socket_cookie(ctx))
		return 1;
	ctx->user_ip4 = r->resolver;
	ctx->user_port = r->port;
	return 1;
}
