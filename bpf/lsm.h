// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// What the BPF LSM programs of harden.c and lsmguard.c share: the kernel's
// socket structs as they read them, and the refusal of a device or socket
// an app may not have.

#ifndef PROCGATE_LSM_H
#define PROCGATE_LSM_H

#include "decision.h"

// The fields of the kernel's socket structs the programs read, relocated
// at load (CO-RE): struct sock_common's skc_daddr, skc_dport, skc_num,
// skc_family and skc_v6_daddr.
struct in6_addr___lsm {
	union {
		__u32 u6_addr32[4];
	} in6_u; // s6_addr32 is a macro for in6_u.u6_addr32
} __attribute__((preserve_access_index));

struct sock_common___lsm {
	__u32 skc_daddr;
	__u16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	struct in6_addr___lsm skc_v6_daddr;
} __attribute__((preserve_access_index));

struct sock___lsm {
	struct sock_common___lsm __sk_common;
} __attribute__((preserve_access_index));

struct socket___lsm {
	struct sock___lsm *sk;
} __attribute__((preserve_access_index));

// refuse_as_raw_socket counts and audits the refusal of a device or
// socket the calling task of app_id may not have, as a raw socket's: the
// event has no destination, the unspecified IPv4 address.
static __always_inline void refuse_as_raw_socket(__u32 app_id, __u64 cgroup_id, const struct generation_info *info, __u8 hook)
{
	struct dest d = { .family = 4 };
	// Not a constant to the compiler: see guard_sock_create (harden.c).
	asm volatile("" : : "r"(&d) : "memory");
	count(app_id, COUNT_DENY);
	audit(&d, app_id, cgroup_id, info->generation, info->audit_rate, 0, REASON_RAW_SOCKET, hook);
}

#endif
