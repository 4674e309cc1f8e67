//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// Guards that only BPF LSM hooks can hold, host-wide, judging the calling
// task (task_app): loaded where the kernel loads BPF LSM programs (the bpf
// LSM active, trampolines), each optional; Guards says which are.
//
// - guard_tun_*: no TUN or TAP device created or attached by an app's
//   process. A TUN device's packets are written from user space, belong to
//   no socket and pass no cgroup program: routed on, they reach whatever
//   the host reaches. Creating one needs CAP_NET_ADMIN (root placed in an
//   app); `procgate run` drops it.
// - guard_listen: listen() on a socket never bound binds it to an
//   ephemeral port the kernel picks (inet_autobind), without the bind
//   hooks: judged here as a bind to port 0, which an app with listen: may
//   make only if it lists 0.
//
// Both share the maps of decision.h with procgate.c through pinning.
//
// Kernel assumptions: BPF LSM with trampolines; the tun_dev_* hooks have
// their 5.x signatures (tun_dev_create(void), tun_dev_open(void *),
// tun_dev_attach_queue(void *)); struct sock_common's skc_family and
// skc_num.

#include "decision.h"
#include "listen.h"
#include "lsm.h"

char __license[] SEC("license") = "Dual MIT/GPL";

#define AF_INET 2
#define AF_INET6 10
#define EPERM 1
// tun_refused: is the calling task an app's? Counted and audited as a raw
// socket would be.
static __always_inline int tun_refused(void)
{
	struct generation_info *info = current_generation();
	if (!info)
		return 0;
	__u64 cgroup_id;
	struct app_info *app = task_app(info->slot & 1, info, &cgroup_id);
	if (!app)
		return 0;
	refuse_as_raw_socket(app->app_id, cgroup_id, info, HOOK_TUN);
	return 1;
}

// A new device (TUNSETIFF of a name no device has).
SEC("lsm/tun_dev_create")
int guard_tun_create(unsigned long long *ctx)
{
	return tun_refused() ? -EPERM : 0;
}

// An existing, persistent device (TUNSETIFF of its name).
SEC("lsm/tun_dev_open")
int guard_tun_open(unsigned long long *ctx)
{
	return tun_refused() ? -EPERM : 0;
}

// A queue of a multi-queue device attached again (TUNSETQUEUE).
SEC("lsm/tun_dev_attach_queue")
int guard_tun_attach_queue(unsigned long long *ctx)
{
	return tun_refused() ? -EPERM : 0;
}

// listen(2) runs security_socket_listen before the protocol's listen, which
// binds a socket still without a local port (skc_num 0) to an ephemeral
// one. A bound socket's port was judged by the bind hooks.
SEC("lsm/socket_listen")
int guard_listen(unsigned long long *ctx)
{
	struct socket___lsm *sock = (struct socket___lsm *)ctx[0];
	struct sock___lsm *sk = sock->sk;
	if (!sk)
		return 0;
	unsigned short family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	if (BPF_CORE_READ(sk, __sk_common.skc_num))
		return 0;
	struct dest d = { .family = family == AF_INET ? 4 : 6, .proto = PROTO_TCP };
	return listen_refused(&d, HOOK_LISTEN) ? -EACCES : 0;
}
