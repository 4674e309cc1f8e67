//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// DNS-name grants need the answers an app gets: its DNS queries (UDP and
// TCP to port 53, IPv4 and IPv6) go to the daemon's DNS proxy instead of the
// resolver it asked (bpf/names.go, dnsproxy/), which forwards them there,
// learns the answer's addresses into name_grants and only then replies.
// Only apps with name grants (APP_NAMES), and only in network namespaces
// where the daemon runs a proxy (dns_proxies): elsewhere the query goes on
// untouched and an audit event says its answers grant nothing.
//
// These programs are attached after the authorize programs of procgate.c
// on the same hooks, so the query is decided for the resolver the app
// asked, and then rewritten. Each redirected socket gets its own loopback
// destination 127.a.b.c (a.b.c: 24 bits of its socket cookie) on the
// proxy's port: the proxy, bound to the port on every address, reads the
// destination of each query to find the socket's app and resolver in
// dns_redirects, and replies from that address, which recvmsg4 rewrites
// back to the resolver's so that the app sees the answer come from where
// it asked (glibc checks). IPv6 resolvers: see redirect6. Kernel
// assumptions: bpf_get_socket_cookie and bpf_get_netns_cookie in sock_addr
// programs (5.8+), cgroup/recvmsg4 and recvmsg6 (5.2+).

#include "decision.h"

char __license[] SEC("license") = "Dual MIT/GPL";

#define REASON_DNS_UNOBSERVED 18

// Where the daemon's proxies listen, by the cookie of the network
// namespace each serves: the port (network order), on every loopback
// address of that namespace. A query from a namespace with no entry goes
// on to its resolver, and an audit event (dns-unobserved) tells the daemon,
// which may start a proxy there.
struct dns_proxy_info {
	__u16 port;
	__u16 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct dns_proxy_info);
	__uint(max_entries, 4096);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_proxies SEC(".maps");

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

// A redirected socket of an IPv6 resolver, by its whole cookie: IPv6
// loopback is one address, so the proxy (bound to [::1]) finds the socket
// behind a query by its source through sock_diag and looks its cookie up
// here.
struct dns_redirect6 {
	__u32 resolver[4]; // IPv6, network order
	__u16 port;        // network order
	__u8 proto;        // PROTO_TCP, PROTO_UDP
	__u8 pad;
	__u32 app_id;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u64);
	__type(value, struct dns_redirect6);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_redirects6 SEC(".maps");

// unobserved is the resolver a query asked, for the audit event of a
// query from a network namespace no proxy serves.
static __always_inline void unobserved(struct bpf_sock_addr *ctx, int v6, struct dest *d)
{
	d->port = 53;
	if (!v6) {
		__u32 ip = ctx->user_ip4;
		d->family = 4;
		__builtin_memcpy(d->addr, &ip, 4);
		return;
	}
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
	if (w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff)) {
		d->family = 4;
		__builtin_memcpy(d->addr, &w3, 4);
		return;
	}
	d->family = 6;
	__builtin_memcpy(&d->addr[0], &w0, 4);
	__builtin_memcpy(&d->addr[4], &w1, 4);
	__builtin_memcpy(&d->addr[8], &w2, 4);
	__builtin_memcpy(&d->addr[12], &w3, 4);
}

// dns_query says whether to redirect a query to port 53: the proxy that
// serves it, with the app's id and the query's protocol, or 0 to leave it
// alone. v6: the hook is connect6 or sendmsg6.
static __always_inline struct dns_proxy_info *dns_query(struct bpf_sock_addr *ctx, int v6, __u8 *proto, __u32 *app_id, __u8 hook)
{
	if (ctx->protocol == IPPROTO_TCP)
		*proto = PROTO_TCP;
	else if (ctx->protocol == IPPROTO_UDP)
		*proto = PROTO_UDP;
	else
		return 0;
	struct generation_info *info = current_generation();
	if (!info)
		return 0;
	__u32 slot = info->slot & 1;
	__u64 cgroup_id = 0;
	struct app_info *app = principal(slot, info, &cgroup_id);
	if (!app || !(app->flags & APP_NAMES))
		return 0;
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct dns_proxy_info *px = bpf_map_lookup_elem(&dns_proxies, &netns);
	if (!px || !px->port) {
		struct dest d = { .proto = *proto };
		unobserved(ctx, v6, &d);
		audit(&d, app->app_id, cgroup_id, info->generation, info->audit_rate, 1, REASON_DNS_UNOBSERVED, hook);
		return 0;
	}
	*app_id = app->app_id;
	return px;
}

// redirect_key records a socket of an IPv4 resolver (network order) in
// dns_redirects and returns its loopback address 127.a.b.c (host order), or
// 0 when it could not.
static __always_inline __u32 redirect_key(struct bpf_sock_addr *ctx, __u32 resolver, __u8 proto, __u32 app_id)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u32 key = cookie & 0xffffff;
	if (!key)
		key = 1; // 127.0.0.0 is no host
	struct dns_redirect r = { .cookie = cookie, .resolver = resolver, .port = (__u16)ctx->user_port,
				  .proto = proto, .app_id = app_id };
	if (bpf_map_update_elem(&dns_redirects, &key, &r, BPF_ANY))
		return 0;
	return 0x7f000000 | key;
}

static __always_inline int redirect4(struct bpf_sock_addr *ctx, __u8 hook)
{
	if (ctx->user_port != bpf_htons(53))
		return 1;
	__u8 proto = 0;
	__u32 app_id = 0;
	struct dns_proxy_info *px = dns_query(ctx, 0, &proto, &app_id, hook);
	if (!px)
		return 1;
	__u32 lo = redirect_key(ctx, ctx->user_ip4, proto, app_id);
	if (!lo)
		return 1;
	ctx->user_ip4 = bpf_htonl(lo);
	ctx->user_port = px->port;
	return 1;
}

// An AF_INET6 socket's query. To an IPv4-mapped resolver it goes to
// ::ffff:127.a.b.c, as an IPv4 socket's to 127.a.b.c (the kernel then
// speaks IPv4; an unconnected socket's sendmsg to a mapped address runs
// sendmsg4, not this). To an IPv6 resolver it goes to [::1] on the proxy's
// port, recorded by cookie in dns_redirects6.
static __always_inline int redirect6(struct bpf_sock_addr *ctx, __u8 hook)
{
	if (ctx->user_port != bpf_htons(53))
		return 1;
	__u8 proto = 0;
	__u32 app_id = 0;
	struct dns_proxy_info *px = dns_query(ctx, 1, &proto, &app_id, hook);
	if (!px)
		return 1;
	__u32 w[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	if (w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff)) {
		__u32 lo = redirect_key(ctx, w[3], proto, app_id);
		if (!lo)
			return 1;
		ctx->user_ip6[3] = bpf_htonl(lo);
	} else {
		__u64 cookie = bpf_get_socket_cookie(ctx);
		struct dns_redirect6 r = { .resolver = { w[0], w[1], w[2], w[3] }, .port = (__u16)ctx->user_port,
					   .proto = proto, .app_id = app_id };
		if (bpf_map_update_elem(&dns_redirects6, &cookie, &r, BPF_ANY))
			return 1;
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
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

SEC("cgroup/connect6")
int dns_connect6(struct bpf_sock_addr *ctx)
{
	return redirect6(ctx, HOOK_CONNECT6);
}

SEC("cgroup/sendmsg6")
int dns_sendmsg6(struct bpf_sock_addr *ctx)
{
	return redirect6(ctx, HOOK_SENDMSG6);
}

// from_proxy: the datagram's source port is the proxy's.
static __always_inline int from_proxy(struct bpf_sock_addr *ctx)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct dns_proxy_info *px = bpf_map_lookup_elem(&dns_proxies, &netns);
	return px && px->port && ctx->user_port == px->port;
}

// The redirect of the socket at 127.a.b.c (host order), if it is this
// socket's.
static __always_inline struct dns_redirect *redirect_at(struct bpf_sock_addr *ctx, __u32 ip)
{
	__u32 key = ip & 0xffffff;
	struct dns_redirect *r = bpf_map_lookup_elem(&dns_redirects, &key);
	if (!r || r->cookie != bpf_get_socket_cookie(ctx))
		return 0;
	return r;
}

// A reply from the proxy to a redirected socket comes from the resolver
// the socket asked.
SEC("cgroup/recvmsg4")
int dns_recvmsg4(struct bpf_sock_addr *ctx)
{
	// Every UDP recvmsg() of every task that asks for the sender runs
	// this: most are not from loopback, and cost one test.
	__u32 ip = bpf_ntohl(ctx->user_ip4);
	if ((ip >> 24) != 127 || !from_proxy(ctx))
		return 1;
	struct dns_redirect *r = redirect_at(ctx, ip);
	if (!r)
		return 1;
	ctx->user_ip4 = r->resolver;
	ctx->user_port = r->port;
	return 1;
}

SEC("cgroup/recvmsg6")
int dns_recvmsg6(struct bpf_sock_addr *ctx)
{
	// As recvmsg4: one test for what is not from [::1] or ::ffff:127/104.
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
	if (w0 || w1)
		return 1;
	if (w2 == 0 && w3 == bpf_htonl(1)) {
		if (!from_proxy(ctx))
			return 1;
		__u64 cookie = bpf_get_socket_cookie(ctx);
		struct dns_redirect6 *r = bpf_map_lookup_elem(&dns_redirects6, &cookie);
		if (!r)
			return 1;
		ctx->user_ip6[0] = r->resolver[0];
		ctx->user_ip6[1] = r->resolver[1];
		ctx->user_ip6[2] = r->resolver[2];
		ctx->user_ip6[3] = r->resolver[3];
		ctx->user_port = r->port;
		return 1;
	}
	__u32 ip = bpf_ntohl(w3);
	if (w2 != bpf_htonl(0x0000ffff) || (ip >> 24) != 127 || !from_proxy(ctx))
		return 1;
	struct dns_redirect *r = redirect_at(ctx, ip);
	if (!r)
		return 1;
	ctx->user_ip6[3] = r->resolver;
	ctx->user_port = r->port;
	return 1;
}
