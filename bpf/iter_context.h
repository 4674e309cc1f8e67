// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// The contexts of the kernel's tcp and udp socket iterators (struct
// bpf_iter__tcp and bpf_iter__udp): pointers in 8-byte slots
// (__bpf_md_ptr), a fixed layout, so no relocation is needed. Shared by
// bpf/sweep.c and pinhole/pinhole.c, which define struct sock_common
// their own way.

#ifndef PROCGATE_ITER_CONTEXT_H
#define PROCGATE_ITER_CONTEXT_H

#include <linux/types.h>

struct seq_file;
struct sock_common;
struct udp_sock;

struct bpf_iter_meta {
	struct seq_file *seq;
	__u64 session_id;
	__u64 seq_num;
};

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
	__u32 uid;
};

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
	__u32 uid;
	int bucket;
};

#endif // PROCGATE_ITER_CONTEXT_H
