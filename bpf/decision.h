// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// The decision function's data and code, shared by every program of
// procgate.c: the maps of a policy generation, principal lookup, the
// internal-prefix and grant lookups, counters and audit.
//
// Policy generations. Every entry a decision reads carries a slot (0 or 1):
// rules and app_by_cgroup in their keys, port_ranges by index. A decision
// reads the generation in force once (policy_current) and uses its slot for
// every lookup, so it sees one generation whole. The loader clears and fills
// the idle slot, then replaces policy_current's inner map: the kernel runs
// synchronize_rcu() after an update of a map-of-maps (maybe_wait_bpf_programs),
// so when that update returns no decision still reads the old slot, and the
// next reload may reuse it. One RCU grace period per reload.
//
// Kernel assumptions: cgroup sock_addr hooks may call
// bpf_get_current_{cgroup_id,ancestor_cgroup_id,pid_tgid,uid_gid,comm}
// (6.1+ via cgroup_current_func_proto); ring buffer (5.8+); batch updates of
// LPM tries (the loader falls back to single updates).

#ifndef PROCGATE_DECISION_H
#define PROCGATE_DECISION_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#define MAX_CGROUP_LEVEL 32
#define MAX_APPS 65536
#define PORT_SEARCH_STEPS 18 // log2(max port ranges) + 1, bounds the search loop

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif

// The error of a refused bind, listen or handover write (asm-generic/errno-base.h).
#define EACCES 13

enum reason {
	REASON_NOT_INTERNAL = 1,
	REASON_GRANTED = 2,
	REASON_UNBOUND = 3,
	REASON_NO_GRANT = 4,
	REASON_PORT = 5,
	REASON_NO_POLICY = 6,
	REASON_RAW_SOCKET = 7, // raw IP, packet or XDP socket, or a TUN device, in an app
	REASON_PROTO = 8,      // internal, and not TCP or UDP (ICMP, raw IP): no grant can cover it
	REASON_EXE = 9,        // the app pins binaries and the task runs another one
	REASON_HANDOVER = 10,  // an app's TCP connection written to by a task outside the app
	REASON_EVERYONE = 11,  // an everyone grant covers it (allowed; the principal's own grants do not)
	REASON_OUTSIDE = 12,   // not internal, and the app is a sandbox (outside: deny) with no grant for it
	REASON_LISTEN = 13,    // a bind to a port the app's listen: does not list
	REASON_LOOPBACK = 14,  // a sandboxed app's loopback destination, decided by its loopback:
	REASON_NAME = 16,      // allowed by a DNS-name grant through a learned answer (name_grants)
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
	HOOK_EGRESS4 = 5, // cgroup_skb egress backstop
	HOOK_EGRESS6 = 6,
	HOOK_SOCK_CREATE = 7,
	HOOK_TCP_SEND = 8, // sk_msg on a connection an app opened to an internal destination
	HOOK_BIND4 = 9,    // cgroup/bind4: an app with listen:
	HOOK_BIND6 = 10,
	HOOK_UDP_SEND = 11, // BPF LSM socket_sendmsg on a connected UDP socket an app marked
	HOOK_TUN = 12,      // BPF LSM tun_dev_create, tun_dev_open, tun_dev_attach_queue (lsmguard.c)
	HOOK_LISTEN = 13,   // BPF LSM socket_listen: listen() on a never-bound socket (lsmguard.c)
};

// How a principal's cgroup is found: the calling task's (sock_addr hooks,
// sock_create), or the cgroup of the socket that sent a packet (cgroup_skb).
// The kind is a constant after inlining, so each program type keeps only the
// helpers it may call.
#define WHO_TASK 0
#define WHO_SKB 1

// TCP states (include/net/tcp_states.h), as sock_common's skc_state holds
// them; a connected UDP socket is TCP_ESTABLISHED too.
#define TCP_ESTABLISHED 1
#define TCP_TIME_WAIT 6
#define TCP_CLOSE 7
#define TCP_LISTEN 10
#define TCP_NEW_SYN_RECV 12
// The calling task's, by bpf_get_current_cgroup_id: for a program loaded
// without CO-RE relocations (lsm_cgroup.go's loader takes none), which
// current_cgroup_id needs.
#define WHO_TASK_HELPER 2

#define PROTO_TCP 1
#define PROTO_UDP 2

#define APP_AUDIT_ALLOW 1
#define APP_EXE_PINNED 2 // only the binaries in app_exes hold the app's grants
#define APP_HANDOVER_ALLOWED 4 // policy handover: allow: no handover guard for its connections
#define APP_BY_USER 8 // a match.user app (app_by_uid): its processes share cgroups with other users'

// outside: deny: the app reaches only grants, external destinations too;
// with APP_LOOPBACK_DENY not even loopback. (4 and 8 are other flags'.)
#define APP_OUTSIDE_DENY 16
#define APP_LOOPBACK_DENY 32
// listen: the app may bind only the ports of its listen entry in the rules
// trie (TAG_LISTEN).
#define APP_LISTEN 64

// The app has DNS-name grants: a destination its trie grants miss is asked
// of name_grants (names.go).
#define APP_NAMES 128

// mode: audit: what the app's policy refuses passes, counted in
// would_deny_counters and audited as AUDIT_WOULD_DENY. Tested only where
// a decision denies, so that allowed attempts pay nothing for it.
#define APP_AUDIT_ONLY 256

// The grants of `everyone` sit in the rules trie under an app id that no
// app gets (bpf.MaxApps keeps app ids below it).
#define EVERYONE_APP_ID 0xffff

// In a verdict_entry's app_flags: allowed by an everyone grant, or external
// in a generation without sandboxes, so the verdict holds for a socket of
// any principal.
#define VERDICT_EVERYONE (1U << 31)

// In a socket_verdicts entry's app_flags: cgroup_id is the cgroup of the
// socket the entry is on, which a socket keeps for its life, so the egress
// backstop takes it from the entry instead of reading it again
// (bpf_skb_cgroup_id) for each datagram.
#define VERDICT_SOCKET_CGROUP (1U << 30)

// One trie holds every generation's internal prefixes and grants. The tag
// (big-endian, so it is the key's leading 32 bits and always matched whole)
// is slot << 31 | is_v6 << 30 | app_id, with app_id 0 for the internal set;
// prefixlen = 32 + the prefix's length, IPv4 addresses in addr[0..3].
struct rule_key {
	__u32 prefixlen;
	__u32 tag;
	__u8 addr[16];
};

#define TAG_SLOT (1U << 31)
#define TAG_V6 (1U << 30)
// An app's listen: ports, one entry per app of prefixlen 32 (the tag
// alone): slot << 31 | TAG_LISTEN | app_id; the bind ports are the entry's
// tcp ranges.
#define TAG_LISTEN (1U << 29)

// For a grant entry: the union of every grant of the app that contains this
// prefix. The loader pushes less specific grants down into more specific
// ones, so the longest match alone decides. Ports are sorted disjoint ranges
// at port_ranges[slot * PORTS_PER_SLOT + first ...]. Internal-set entries
// carry zeros.
struct rule_value {
	__u32 tcp_first;
	__u32 tcp_count;
	__u32 udp_first;
	__u32 udp_count;
	__u32 flags; // RULE_*
};

// A grant entry whose prefix lies inside one internal prefix: a destination
// that matches it is internal, and the decision needs no lookup of the
// internal set (the common case, a granted connect, then costs one trie
// lookup instead of two).
#define RULE_INSIDE_INTERNAL 1

#define PORTS_PER_SLOT (1U << 18)

struct port_range {
	__u16 lo;
	__u16 hi;
};

struct app_key {
	__u64 cgroup_id;
	__u32 slot;
	__u32 pad;
};

struct app_info {
	__u32 app_id;
	__u32 flags;
};

struct generation_info {
	__u32 generation;
	__u32 slot;
	__u32 min_level; // shallowest and deepest cgroup level of any app cgroup
	__u32 max_level;
	__u32 audit_rate; // events per second per app
	__u32 flags;      // GEN_*
};

// The host's NFQUEUE firewall reinjects apps' UDP in its own task: the UDP
// handover check would take its verdicts for foreign sends (harden.c).
#define GEN_NO_UDP_HANDOVER 1
// The generation has everyone grants: only then is the everyone entry of the
// rules trie asked, when a principal's own grants do not allow.
#define GEN_EVERYONE 2
// Some app matches processes by uid (app_by_uid): without it, a task in no
// app cgroup costs no further lookup.
#define GEN_USER_APPS 4
// Some app is a sandbox (outside: deny): the egress backstop then asks the
// principal of packets to external destinations too, not only internal.
#define GEN_SANDBOX 16
// Some app has listen:: only then do the bind hooks look for the principal.
#define GEN_LISTEN 32
// The TCP handover guard marks only connections whose connecting process
// is open to tracing (open_to_tracing): the others rely on the trace guard
// (bpf.Generation.TrustTraceGuard).
#define GEN_TRUST_TRACE_GUARD 64
// The connect hooks mark an app's connected UDP sockets in socket_owners
// too, for the BPF LSM handover program (bpf.Generation.udpMarks).
#define GEN_UDP_MARKS 128

struct audit_event {
	__u64 ts_ns; // CLOCK_MONOTONIC (bpf_ktime_get_ns)
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 gid;
	__u32 app_id;
	__u32 generation;
	__u8 allowed; // 0 denied, 1 allowed, AUDIT_WOULD_DENY
	__u8 reason;
	__u8 hook;
	__u8 proto; // PROTO_TCP, PROTO_UDP, 0 other
	__u16 port; // host order
	__u8 family; // 4 or 6 (as decided: IPv4-mapped is 4)
	__u8 pad;
	__u8 addr[16]; // IPv4 in the first 4 bytes
	char comm[16];
};

// In audit_event.allowed: denied by the app's policy, and let pass because
// the app is in audit mode (APP_AUDIT_ONLY).
#define AUDIT_WOULD_DENY 2

struct audit_budget {
	__u64 window; // second (ktime / 1e9) the count belongs to
	__u32 count;
	__u32 pad;
};

// The generation in force. Replacing the inner map is the switch: the kernel
// runs synchronize_rcu() after any update of a map-of-maps, so when the
// update returns no decision still reads the previous slot.
struct generation_info_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct generation_info);
	__uint(max_entries, 1);
} generation_info_inner SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct generation_info_map);
} policy_current SEC(".maps");

// Caps, not allocations: without preallocation, memory follows the policy.
// Two generations live side by side during a reload.
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct rule_key);
	__type(value, struct rule_value);
	__uint(max_entries, 4 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct port_range);
	__uint(max_entries, 2 * PORTS_PER_SLOT);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} port_ranges SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct app_key);
	__type(value, struct app_info);
	__uint(max_entries, 2 * 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} app_by_cgroup SEC(".maps");

// match.user apps: the principal of a task in no app cgroup, by its real
// uid (hooks) or its socket's uid (egress backstop).
struct user_key {
	__u32 slot;
	__u32 uid;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct user_key);
	__type(value, struct app_info);
	__uint(max_entries, 2 * 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} app_by_uid SEC(".maps");

// user_principal is the match.user app of uid in the slot, or NULL.
static __always_inline struct app_info *user_principal(__u32 slot, const struct generation_info *info, __u32 uid)
{
	if (!(info->flags & GEN_USER_APPS))
		return NULL;
	struct user_key k = { .slot = slot, .uid = uid };
	return bpf_map_lookup_elem(&app_by_uid, &k);
}

// The binaries of apps with exe:, by the file the kernel runs (inode and
// device as the kernel encodes them), so a rename or a symlink changes
// nothing and an exec of another binary loses the grants at once.
struct exe_key {
	__u32 slot;
	__u32 app_id;
	__u64 ino;
	__u64 dev;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct exe_key);
	__type(value, __u8);
	__uint(max_entries, 2 * 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} app_exes SEC(".maps");

// DNS-name grants: the addresses DNS answers gave an app for names its
// grants name, learned by the daemon's DNS proxy (bpf/names.go), which
// writes them here before it relays the answer. Keyed by the slot of a
// policy generation like every entry a decision reads, so that a reload
// switches them with the rest; each of up to NAME_PARTS name grants of the
// app that the address was learned for contributes its ports (in the
// slot's port_ranges) and its own expiry. The kernel checks the expiry
// (bpf_ktime_get_ns, CLOCK_MONOTONIC): a daemon that is slow to delete an
// entry cannot keep it alive.
#define NAME_PARTS 4

struct name_key {
	__u32 slot;
	__u32 app_id;
	__u8 addr[16]; // IPv4 in the first 4 bytes
	__u8 family;
	__u8 pad[7];
};

struct name_part {
	__u64 expires_ns; // 0: unused part
	__u32 tcp_first;
	__u32 tcp_count;
	__u32 udp_first;
	__u32 udp_count;
};

struct name_value {
	struct name_part part[NAME_PARTS];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct name_key);
	__type(value, struct name_value);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} name_grants SEC(".maps");

// Just the kernel fields the exe check reads (CO-RE: offsets come from the
// running kernel's BTF when the program loads).
struct super_block___pg {
	__u32 s_dev;
} __attribute__((preserve_access_index));
struct inode___pg {
	unsigned long i_ino;
	struct super_block___pg *i_sb;
} __attribute__((preserve_access_index));
struct file___pg {
	struct inode___pg *f_inode;
} __attribute__((preserve_access_index));
struct mm_struct___pg {
	struct file___pg *exe_file;
} __attribute__((preserve_access_index));
struct task_struct___pg {
	struct mm_struct___pg *mm;
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, MAX_APPS * COUNTER_SLOTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} verdict_counters SEC(".maps");

// Per app id: attempts of an app in audit mode that its policy refuses and
// that passed. A map of its own, not a slot of verdict_counters, so that
// the pinned verdict_counters of an earlier version stays compatible.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, MAX_APPS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} would_deny_counters SEC(".maps");

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

struct dest {
	__u8 addr[16];
	__u16 port;
	__u8 family;
	__u8 proto;
	__u32 pad; // zero: dests are compared as three words (same_dest)
} __attribute__((aligned(8)));

// Verdicts the egress backstop may reuse instead of deciding a packet again.
// An entry says: in generation `generation`, sending to `d` was allowed for
// a socket of app `app_id`, and a socket of cgroup `cgroup_id` has that
// principal (an external destination's, in a generation without
// sandboxes, every principal's: VERDICT_EVERYONE). A verdict depends on
// nothing else, so it is the same for every socket of that principal,
// whichever socket it was made for. The backstop uses an
// entry only when generation and destination match exactly, and for an app
// only when the packet's socket is of that cgroup or, looked up, of that
// app; after a reload every entry is stale at once.
//
// Entries are read and written under a try-lock, the VERDICT_BUSY bit of
// their state word (which also holds the generation): a torn entry could
// pair one generation with another generation's destination. Nobody waits
// for it: a hook that finds the entry busy hands nothing over, a backstop
// that finds it busy decides the packet in full. Not a bpf_spin_lock: that
// one disables interrupts around the copy, which costs about 45 ns per
// lock and unlock on a paravirtualized guest (measured on the 6.18 VM of
// bench/), more than the rest of the backstop's check; the try-lock is one
// compare-and-exchange and one exchange (about 9 ns there). Both are full
// barriers (BPF atomics with fetch, 5.12+), so a reader on another CPU
// sees the fields a writer left before its unlock.
//
// Two places hold them:
// - hook_handoff, one entry per CPU, written by the connect and sendmsg
//   hooks when they allow an internal destination: the packet that call
//   sends next (the SYN, the datagram) leaves on the same CPU unless the
//   task migrated in between, and then it is decided in full. No
//   allocation, so a fresh TCP socket per connect costs nothing more
//   (socket storage would cost an allocation per socket).
// - socket_verdicts, socket storage: a connected UDP socket's destination,
//   written by the connect hook when it allows it (once per socket and
//   generation), or by the backstop when it allows a datagram of a socket
//   whose connect no hook saw. Its datagrams pass no hook; the backstop
//   finds their verdict on the socket.
// Not the pinned names of the spin-locked entries of earlier versions
// (verdict_handoff, verdict_cache): their maps' BTF keeps a lock at the
// offset the try-lock takes, which programs may not touch.
#define VERDICT_BUSY 1ULL

struct verdict_entry {
	__u64 state; // generation << 32, | VERDICT_BUSY while a program copies the entry
	__u64 cgroup_id; // a cgroup whose principal is app_id in this generation
	__u32 app_id;
	__u32 app_flags; // app_id's flags (APP_*) in this generation
	struct dest d;
};

#define HANDOFF_CPUS 1024 // CPUs with a higher id get no handoff

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct verdict_entry);
	__uint(max_entries, HANDOFF_CPUS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hook_handoff SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__type(key, int);
	__type(value, struct verdict_entry);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} socket_verdicts SEC(".maps");

// socket_owners marks the TCP sockets (and, under GEN_UDP_MARKS, the
// connected UDP sockets) an app connected to an internal destination (set
// by the connect hooks when they allow one): the
// connection is the app's, and only the app's processes may write to it
// (harden.c, guard_handover). Socket storage, freed with the socket.
struct socket_owner {
	__u64 cgroup_id; // the connecting task's cgroup
	__u32 app_id;
	__u32 flags;   // the app's flags then (APP_EXE_PINNED)
	struct dest d; // where it connected: a socket whose connect failed may connect again elsewhere
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__type(key, int);
	__type(value, struct socket_owner);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} socket_owners SEC(".maps");

static __always_inline int same_dest(const struct dest *a, const struct dest *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

// entry_lock takes the entry's try-lock if its state is `want` (not busy):
// one compare-and-exchange, never a wait.
static __always_inline int entry_lock(struct verdict_entry *v, __u64 want)
{
	return !(want & VERDICT_BUSY) && __sync_val_compare_and_swap(&v->state, want, want | VERDICT_BUSY) == want;
}

// entry_unlock leaves the entry in state `to` (an exchange: a full barrier,
// so the fields written before it are seen with it).
static __always_inline void entry_unlock(struct verdict_entry *v, __u64 to)
{
	__sync_lock_test_and_set(&v->state, to);
}

static __always_inline void put_verdict(struct verdict_entry *v, __u64 cgroup_id, const struct dest *d,
					__u32 generation, __u32 app_id, __u32 app_flags)
{
	if (!entry_lock(v, *(volatile __u64 *)&v->state))
		return; // another program has it: the backstop decides in full
	v->cgroup_id = cgroup_id;
	v->app_id = app_id;
	v->app_flags = app_flags;
	v->d = *d;
	entry_unlock(v, (__u64)generation << 32);
}

// A verdict_entry as read: what the backstop checks the packet against.
struct verdict_copy {
	__u64 cgroup_id;
	__u32 app_id;
	__u32 app_flags;
};

// verdict_matches: does the entry hold an allowed verdict of this
// generation for d? Fills c for the principal check. A first look without
// the lock skips the usual miss (another destination) cheaply; only the
// locked copy counts, taken only from the state of this generation.
static __always_inline int verdict_matches(struct verdict_entry *v, const struct dest *d, __u32 generation,
					   struct verdict_copy *c)
{
	__u64 want = (__u64)generation << 32;
	if (*(volatile __u64 *)&v->state != want || !same_dest(&v->d, d))
		return 0;
	if (!entry_lock(v, want))
		return 0;
	c->cgroup_id = v->cgroup_id;
	c->app_id = v->app_id;
	c->app_flags = v->app_flags;
	struct dest got = v->d;
	entry_unlock(v, want);
	return same_dest(&got, d);
}

// Forces bpf2go to emit Go types for structs only the loader uses.
const struct audit_event *unused_audit_event __attribute__((unused));

// bump adds one to a one-slot per-CPU counter (the handover guard's
// owned_sockets_full and owned_sockets_unmatched, pinhole's pinhole_drops
// and pinhole_held).
static __always_inline void bump(void *counter)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(counter, &zero);
	if (n)
		*n += 1;
}

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

// audit_as sends an event; with who == WHO_SKB there is no reliable calling
// task (a packet may leave from softirq), so pid, uid and comm stay empty.
static __always_inline void audit_as(int who, const struct dest *d, __u32 app_id, __u64 cgroup_id, __u32 generation,
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
	__builtin_memset(e, 0, sizeof(*e));
	if (who == WHO_TASK) {
		__u64 pid_tgid = bpf_get_current_pid_tgid();
		__u64 uid_gid = bpf_get_current_uid_gid();
		e->pid = pid_tgid >> 32;
		e->tid = (__u32)pid_tgid;
		e->uid = (__u32)uid_gid;
		e->gid = uid_gid >> 32;
		bpf_get_current_comm(e->comm, sizeof(e->comm));
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = cgroup_id;
	e->app_id = app_id;
	e->generation = generation;
	e->allowed = allowed;
	e->reason = reason;
	e->hook = hook;
	e->proto = d->proto;
	e->port = d->port;
	e->family = d->family;
	__builtin_memcpy(e->addr, d->addr, sizeof(e->addr));
	bpf_ringbuf_submit(e, 0);
}

static __always_inline void audit(const struct dest *d, __u32 app_id, __u64 cgroup_id, __u32 generation, __u32 rate,
				  __u8 allowed, __u8 reason, __u8 hook)
{
	audit_as(WHO_TASK, d, app_id, cgroup_id, generation, rate, allowed, reason, hook);
}

// would_deny counts and audits a denial of an app in audit mode
// (APP_AUDIT_ONLY), which its caller then lets pass.
static __always_inline void would_deny(int who, const struct dest *d, __u32 app_id, __u64 cgroup_id, __u32 generation,
				       __u32 rate, __u8 reason, __u8 hook)
{
	__u64 *n = bpf_map_lookup_elem(&would_deny_counters, &app_id);
	if (n)
		*n += 1;
	audit_as(who, d, app_id, cgroup_id, generation, rate, AUDIT_WOULD_DENY, reason, hook);
}

// The calling task's cgroup (v2) as the kernel's BTF describes it: what
// bpf_get_current_cgroup_id returns, task_dfl_cgroup(current)->kn->id.
struct kernfs_node___cur {
	__u64 id;
} __attribute__((preserve_access_index));
struct cgroup___cur {
	struct kernfs_node___cur *kn;
} __attribute__((preserve_access_index));
struct css_set___cur {
	struct cgroup___cur *dfl_cgrp;
} __attribute__((preserve_access_index));
struct task_struct___cur {
	struct css_set___cur *cgroups;
} __attribute__((preserve_access_index));

// current_cgroup_id is bpf_get_current_cgroup_id read in place: four loads
// through the task's BTF pointer instead of a helper that takes and drops
// the RCU read lock in calls of their own. Every app's connect and
// datagram asks it; on the bench's 6.18 guest (an AMD EPYC, whose return
// thunks make each call and return dear) the helper took ~24 ns a call,
// the loads ~3 (BenchmarkBackstopEgress, udp4-internal-handoff).
// Programs run in an RCU read-side section, which keeps the css_set and
// its cgroup alive while they are read; a task that moves meanwhile is
// seen in the old cgroup or the new, as with the helper. Where a pointer
// is NULL the load gives 0: no cgroup, no app. Needs
// bpf_get_current_task_btf, a base helper of every program type on the
// kernels of docs/kernels.md (6.1 and later, CAP_PERFMON loaders).
static __always_inline __u64 task_cgroup_id(void *task)
{
	struct task_struct___cur *t = task;
	return t->cgroups->dfl_cgrp->kn->id;
}

static __always_inline __u64 current_cgroup_id(void)
{
	return task_cgroup_id(bpf_get_current_task_btf());
}

static __always_inline __u64 cgroup_of(int who, void *ctx)
{
	if (who == WHO_SKB)
		return bpf_skb_cgroup_id(ctx);
	if (who == WHO_TASK_HELPER)
		return bpf_get_current_cgroup_id();
	return current_cgroup_id();
}

static __always_inline __u64 ancestor_of(int who, void *ctx, int level)
{
	if (who == WHO_SKB)
		return bpf_skb_ancestor_cgroup_id(ctx, level);
	return bpf_get_current_ancestor_cgroup_id(level);
}

// principal_cache: what the ancestor walk of principal_of found for a
// cgroup that is no app cgroup itself (a process of no app, or one below
// its app's cgroup), and in which generation. An entry counts only for its
// own generation: a reload that binds or unbinds an ancestor starts a new
// one. Within a generation a cgroup's ancestors' bindings do not change
// (follow_mkdir binds only a cgroup it sees made, before it has
// descendants or processes; rmdir only unbinds a cgroup gone for good,
// and drops its entry here). Keyed by cgroup id alone, so each cgroup has
// one entry, replaced when the generation moves on; an entry holds the
// app cgroup's id, whose app_by_cgroup entry a hit reads. Full (65536
// cgroups of no app seen): not cached, walked.
struct principal_entry {
	__u32 generation;
	__u32 pad;
	__u64 app_cgroup; // the app cgroup the walk found; 0: none
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct principal_entry);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} principal_cache SEC(".maps");

// ancestor_principal is the deepest app cgroup among the ancestors of
// key's cgroup, which is no app cgroup itself. Only levels where some app
// cgroup lives are probed, once per cgroup and generation
// (principal_cache).
static __always_inline struct app_info *ancestor_principal(int who, void *ctx, const struct generation_info *info,
							   struct app_key key)
{
	struct app_info *a;
	__u64 id = key.cgroup_id;
	struct principal_entry *c = bpf_map_lookup_elem(&principal_cache, &id);
	// A hit is looked up in app_by_cgroup again: every principal_of then
	// returns an entry of that map (or NULL), and the verifier follows
	// one kind of pointer, not two, through the rest of each program.
	if (c && c->generation == info->generation) {
		if (!c->app_cgroup)
			return NULL;
		key.cgroup_id = c->app_cgroup;
		return bpf_map_lookup_elem(&app_by_cgroup, &key);
	}
	struct principal_entry fresh = { .generation = info->generation };
	a = NULL;
	__u32 max = info->max_level;
	for (__u32 i = 0; i < MAX_CGROUP_LEVEL; i++) {
		if (i > max)
			break;
		__u32 level = max - i;
		if (level < info->min_level)
			break;
		key.cgroup_id = ancestor_of(who, ctx, level);
		if (!key.cgroup_id)
			continue; // the cgroup is shallower than this level
		a = bpf_map_lookup_elem(&app_by_cgroup, &key);
		if (a)
			break;
	}
	// Filled after the loop, so that the verifier sees one state leave it
	// whatever the level the walk ended at.
	if (a)
		fresh.app_cgroup = key.cgroup_id;
	bpf_map_update_elem(&principal_cache, &id, &fresh, BPF_ANY);
	return a;
}

// principal_in is the deepest app cgroup among cgroup_id, the cgroup of
// who (ctx), and its ancestors.
static __always_inline struct app_info *principal_in(int who, void *ctx, __u32 slot, const struct generation_info *info,
						     __u64 cgroup_id)
{
	struct app_key key = { .cgroup_id = cgroup_id, .slot = slot };
	struct app_info *a = bpf_map_lookup_elem(&app_by_cgroup, &key);
	if (a)
		return a;
	return ancestor_principal(who, ctx, info, key);
}

// principal_of is the deepest app cgroup among the cgroup and its ancestors.
static __always_inline struct app_info *principal_of(int who, void *ctx, __u32 slot, const struct generation_info *info,
						     __u64 *cgroup_id)
{
	*cgroup_id = cgroup_of(who, ctx);
	return principal_in(who, ctx, slot, info, *cgroup_id);
}

// Processes that entered an app cgroup through a migration or a
// clone3(CLONE_INTO_CGROUP) made from inside another app, or by a process
// so marked (migrate.c marks them, and their children). Root in one app
// cannot become another by writing its cgroup.procs. By process (tgid); the
// value is the start time of the process' leader, so that a reused pid is
// never taken for a marked one.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);   // tgid
	__type(value, __u64); // group_leader->start_time
	__uint(max_entries, 1 << 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} migrated_tasks SEC(".maps");

// migration_marks_seen[0] is 1 once migrate.c marked a process (it is never
// reset while the maps are pinned): until then, on most hosts for ever,
// migrated() answers without a lookup, and the host-wide fork and exit
// tracepoints return at once for every process.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} migration_marks_seen SEC(".maps");

static __always_inline int any_migration_mark(void)
{
	__u32 zero = 0;
	__u32 *seen = bpf_map_lookup_elem(&migration_marks_seen, &zero);
	return !seen || *seen; // no array: look up as before
}

struct task_struct___mig {
	int tgid;
	__u64 start_time;
	struct task_struct___mig *group_leader;
} __attribute__((preserve_access_index));

// migrated: is the calling task's process marked in migrated_tasks?
static __always_inline int migrated(void)
{
	if (!any_migration_mark())
		return 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 *start = bpf_map_lookup_elem(&migrated_tasks, &tgid);
	if (!start)
		return 0;
	struct task_struct___mig *task = (struct task_struct___mig *)bpf_get_current_task();
	return *start == BPF_CORE_READ(task, group_leader, start_time);
}

// task_app is the calling task's app, or NULL, whether or not its process
// is marked in migrated_tasks: the deepest app cgroup among its cgroup and
// their ancestors (launched, unit and cgroup apps), else the match.user
// app of its real uid (the uid bpf_get_current_uid_gid gives: the user who
// runs the process, which a setuid binary it runs does not change, and
// which changes only by setuid(2) with privilege).
static __always_inline struct app_info *task_app(__u32 slot, const struct generation_info *info, __u64 *cgroup_id)
{
	struct app_info *a = principal_of(WHO_TASK, NULL, slot, info, cgroup_id);
	if (!a)
		a = user_principal(slot, info, (__u32)bpf_get_current_uid_gid());
	return a;
}

// principal is the calling task's app (task_app), or NULL. A process
// marked in migrated_tasks has none: it holds no app's grants, not even
// its user's.
static __always_inline struct app_info *principal(__u32 slot, const struct generation_info *info, __u64 *cgroup_id)
{
	struct app_info *a = task_app(slot, info, cgroup_id);
	if (a && migrated())
		return NULL;
	return a;
}

// The calling task's ids (kuid_t and kgid_t are one-member structs).
struct kid___tg {
	__u32 val;
};
struct cred___tg {
	struct kid___tg uid;
	struct kid___tg gid;
	struct kid___tg suid;
	struct kid___tg sgid;
	struct kid___tg euid;
	struct kid___tg egid;
} __attribute__((preserve_access_index));
struct task_struct___tg {
	const struct cred___tg *cred;
} __attribute__((preserve_access_index));

// task_uid is the calling task's real uid (task: its BTF pointer), as
// bpf_get_current_uid_gid gives it, read in place.
static __always_inline __u32 task_uid(void *task)
{
	struct task_struct___tg *t = task;
	const struct cred___tg *c = t->cred;
	return c ? c->uid.val : 0;
}

// principal_memo: per CPU, the principal the connect and sendmsg hooks
// last found for their task: its cgroup (and, in a generation with user
// apps, its real uid), the generation, and the app or none, so that the
// next call from that cgroup on the CPU skips the lookups. For an app
// cgroup's own process that is one hash lookup (app_by_cgroup: connect4
// 224 -> 190 ns per run, sendmsg4 197 -> 167, the bench's BPF run time);
// for a process below its app's cgroup (a service's sub-cgroups), of no
// app, or of a user app, two or three (app_by_cgroup, principal_cache,
// app_by_uid). Exact: it is principal_of and user_principal's answer,
// which within a generation changes for no (cgroup, uid). The active
// slot's bindings change within a generation only by follow_mkdir, at a
// cgroup's mkdir, before the kernel makes it visible (kernfs_activate)
// and so before any process can enter it, and by forget_rmdir, for a
// cgroup gone with all its descendants; a cgroup id is never reused
// (principal_cache rests on the same facts). A process that moves to
// another cgroup, or changes its uid, asks again.
//
// Programs on one CPU may preempt each other (a hook may be scheduled out,
// migration disabled): a reader copies the entry and checks that seq did
// not move; a writer takes the entry by making seq odd with one
// compare-and-exchange, or leaves it (another writer has it). Every
// access is from the entry's own CPU, so compiler barriers order them.
// Not pinned: a new program starts with an empty entry (seq 0).
struct principal_memo {
	__u64 seq; // odd while a program writes the entry
	__u64 cgroup_id;
	__u32 generation;
	__u32 uid; // the task's real uid in a generation with user apps, else 0
	struct app_info app; // app_id 0: none
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct principal_memo);
	__uint(max_entries, 1);
} principal_memo SEC(".maps");

#define compiler_barrier() asm volatile("" ::: "memory")

// A per-CPU memo entry's seq word (principal_memo, dest_memo): odd while a
// program writes the entry, 0 before the first write. memo_read_begin
// gives the seq a reader must find again at memo_read_end for its copy to
// be whole (0: do not read); memo_write_begin takes the entry for a writer
// with one compare-and-exchange, or says another writer has it.
static __always_inline __u64 memo_read_begin(__u64 *seq)
{
	__u64 s = *(volatile __u64 *)seq;
	if (s & 1)
		return 0;
	compiler_barrier();
	return s;
}

static __always_inline int memo_read_end(__u64 *seq, __u64 s)
{
	compiler_barrier();
	return *(volatile __u64 *)seq == s;
}

static __always_inline int memo_write_begin(__u64 *seq, __u64 *s)
{
	*s = *(volatile __u64 *)seq;
	return !(*s & 1) && __sync_val_compare_and_swap(seq, *s, *s + 1) == *s;
}

static __always_inline void memo_write_end(__u64 *seq, __u64 s)
{
	compiler_barrier();
	*(volatile __u64 *)seq = s + 2;
}

static __always_inline int memo_get(struct principal_memo *m, __u32 generation, __u64 cgroup_id, __u32 uid,
				    struct app_info *out)
{
	__u64 seq = memo_read_begin(&m->seq);
	if (!seq || m->generation != generation || m->cgroup_id != cgroup_id || m->uid != uid)
		return 0;
	*out = m->app;
	return memo_read_end(&m->seq, seq);
}

static __always_inline void memo_put(struct principal_memo *m, __u32 generation, __u64 cgroup_id, __u32 uid,
				     const struct app_info *app)
{
	__u64 seq;
	if (!memo_write_begin(&m->seq, &seq))
		return;
	m->generation = generation;
	m->cgroup_id = cgroup_id;
	m->uid = uid;
	m->app = *app;
	memo_write_end(&m->seq, seq);
}

// hook_principal is principal() for the connect and sendmsg hooks, by
// value: the app's id (0: none), with its flags in *app_flags. Taken from
// principal_memo when the CPU's last call was from the same cgroup (and
// uid) in the same generation.
static __always_inline __u32 hook_principal(__u32 slot, const struct generation_info *info, void *task,
					     __u64 *cgroup_id, __u32 *app_flags)
{
	struct app_key key = { .cgroup_id = task_cgroup_id(task), .slot = slot };
	*cgroup_id = key.cgroup_id;
	*app_flags = 0;
	__u32 uid = (info->flags & GEN_USER_APPS) ? task_uid(task) : 0;
	__u32 zero = 0;
	struct principal_memo *m = bpf_map_lookup_elem(&principal_memo, &zero);
	struct app_info got;
	if (!m || !memo_get(m, info->generation, key.cgroup_id, uid, &got)) {
		struct app_info *a = principal_in(WHO_TASK, NULL, slot, info, key.cgroup_id);
		if (!a)
			a = user_principal(slot, info, uid);
		if (a)
			got = *a;
		else
			__builtin_memset(&got, 0, sizeof(got));
		if (m)
			memo_put(m, info->generation, key.cgroup_id, uid, &got);
	}
	if (!got.app_id || migrated())
		return 0;
	*app_flags = got.flags;
	return got.app_id;
}

// open_to_tracing: may a process without CAP_SYS_PTRACE trace the calling
// task (ptrace, pidfd_getfd, process_vm_writev)? ptrace_may_access()
// admits such a caller only if its uid equals the target's real, effective
// and saved uid and its gid the target's three gids: a task whose uids or
// gids are not all equal (the launcher's trace guard: real gid the guard
// gid, effective and saved the user's) admits none. A non-dumpable task
// with equal ids is counted as open: erring this way only guards more.
// task is the calling task's BTF pointer (bpf_get_current_task_btf, a
// base helper of every program type on the kernels of docs/kernels.md,
// 6.1 and later), which the hook reads its cgroup through too: the
// verifier turns the loads into plain ones with an exception entry. Two
// bpf_probe_read_kernel calls instead cost 65 ns on every app's TCP
// connect (connect4 315 -> 250 ns per run in the bench's BPF run time).
static __always_inline int open_to_tracing(void *task)
{
	struct task_struct___tg *t = task;
	const struct cred___tg *c = t->cred;
	if (!c)
		return 1;
	return c->uid.val == c->suid.val && c->uid.val == c->euid.val && c->gid.val == c->sgid.val &&
	       c->gid.val == c->egid.val;
}

// Binary search of sorted disjoint ranges [first, first+count) of a slot.
static __always_inline int port_allowed(__u32 slot, __u32 first, __u32 count, __u16 port)
{
	__u32 base = slot * PORTS_PER_SLOT;
	__u32 lo = first, hi = first + count; // candidates in [lo, hi)
	for (int i = 0; i < PORT_SEARCH_STEPS; i++) {
		if (lo >= hi)
			return 0;
		__u32 mid = lo + (hi - lo) / 2;
		__u32 idx = base + mid;
		struct port_range *r = bpf_map_lookup_elem(&port_ranges, &idx);
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

// current_generation is the generation in force, NULL when there is none.
static __always_inline struct generation_info *current_generation(void)
{
	__u32 zero = 0;
	void *current = bpf_map_lookup_elem(&policy_current, &zero);
	if (!current)
		return NULL;
	return bpf_map_lookup_elem(current, &zero);
}

static __always_inline __u32 family_tag(__u32 slot, const struct dest *d)
{
	return (slot ? TAG_SLOT : 0) | (d->family == 6 ? TAG_V6 : 0);
}

// is_internal: does the destination fall in an internal prefix of the slot?
static __always_inline int is_internal(__u32 slot, const struct dest *d)
{
	struct rule_key k = { .prefixlen = 32 + (d->family == 4 ? 32 : 128), .tag = bpf_htonl(family_tag(slot, d)) };
	__builtin_memcpy(k.addr, d->addr, sizeof(k.addr));
	return bpf_map_lookup_elem(&rules, &k) != NULL;
}

// grant_of is app_id's longest matching grant entry for the destination.
static __always_inline struct rule_value *grant_of(__u32 slot, __u32 app_id, const struct dest *d)
{
	struct rule_key k = { .prefixlen = 32 + (d->family == 4 ? 32 : 128),
			      .tag = bpf_htonl(family_tag(slot, d) | (app_id & 0xffff)) };
	__builtin_memcpy(k.addr, d->addr, sizeof(k.addr));
	return bpf_map_lookup_elem(&rules, &k);
}

// ports_allow: do the grant entry's ports of the destination's protocol
// cover its port? Sets *reason for a denial.
static __always_inline int ports_allow(__u32 slot, const struct rule_value *g, const struct dest *d, __u8 *reason)
{
	*reason = REASON_NO_GRANT;
	if (!g)
		return 0;
	*reason = REASON_PORT;
	if (d->proto == PROTO_TCP)
		return port_allowed(slot, g->tcp_first, g->tcp_count, d->port);
	if (d->proto == PROTO_UDP)
		return port_allowed(slot, g->udp_first, g->udp_count, d->port);
	return 0;
}

// name_allows: has a DNS answer, not yet expired, given app_id d's address
// for a name grant whose ports take d? Asked only when the app's trie
// grants miss and the app has name grants (APP_NAMES).
static __always_inline int name_allows(__u32 slot, __u32 app_id, const struct dest *d)
{
	if (d->proto != PROTO_TCP && d->proto != PROTO_UDP)
		return 0;
	struct name_key k = { .slot = slot, .app_id = app_id, .family = d->family };
	__builtin_memcpy(k.addr, d->addr, sizeof(k.addr));
	struct name_value *v = bpf_map_lookup_elem(&name_grants, &k);
	if (!v)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	for (int i = 0; i < NAME_PARTS; i++) {
		struct name_part *p = &v->part[i];
		if (p->expires_ns <= now)
			continue;
		if (d->proto == PROTO_TCP ? port_allowed(slot, p->tcp_first, p->tcp_count, d->port)
					  : port_allowed(slot, p->udp_first, p->udp_count, d->port))
			return 1;
	}
	return 0;
}

// own_allows: does one of app_id's own grants take d, its longest matching
// trie entry g or an address a DNS answer gave one of its name grants?
// REASON_GRANTED or REASON_NAME, or 0 with *reason set for the denial
// (REASON_NO_GRANT, REASON_PORT). The connect hooks, the egress backstop
// and the sweep decide an app's own grants by it.
static __always_inline __u8 own_allows(__u32 slot, __u32 app_id, __u32 app_flags, const struct rule_value *g,
				       const struct dest *d, __u8 *reason)
{
	if (ports_allow(slot, g, d, reason))
		return REASON_GRANTED;
	if ((app_flags & APP_NAMES) && name_allows(slot, app_id, d))
		return REASON_NAME;
	return 0;
}

// is_loopback: does d reach this host's loopback? 127.0.0.0/8 and ::1,
// and the unspecified addresses, which connect() and sendto() take for
// the local host (ruleset.IsLoopback).
static __always_inline int is_loopback(const struct dest *d)
{
	const __u32 *w = (const __u32 *)d->addr;
	if (d->family == 4)
		return d->addr[0] == 127 || w[0] == 0;
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && (w[3] == 0 || w[3] == bpf_htonl(1));
}

// exe_allowed: does the calling task run one of the app's binaries?
// Needs bpf_get_current_task and bpf_probe_read_kernel (CAP_PERFMON loaders;
// a kernel locked down for confidentiality refuses them).
static __always_inline int exe_allowed(__u32 slot, __u32 app_id)
{
	struct task_struct___pg *task = (struct task_struct___pg *)bpf_get_current_task();
	struct exe_key k = { .slot = slot, .app_id = app_id };
	k.ino = BPF_CORE_READ(task, mm, exe_file, f_inode, i_ino);
	k.dev = BPF_CORE_READ(task, mm, exe_file, f_inode, i_sb, s_dev);
	return k.ino && bpf_map_lookup_elem(&app_exes, &k) != NULL;
}

// What the tries say about one destination for one principal in one
// generation: the result of the decision's trie lookups, which depends on
// nothing else. Cached per (generation, app, address) in dest_lookups, an
// LRU hash, so that the next connect to the same host costs one hash lookup
// instead of two walks of a trie whose depth grows with the policy
// (microseconds at a million prefixes, with cold caches). Exact: an entry
// is the lookups' result for its key, and a generation's tries never change
// while it is in force; entries of older generations are never read again
// and age out.
struct lookup_key {
	__u32 generation;
	__u32 app_id; // 0: an unbound task (only the internal set is asked)
	__u8 addr[16];
	__u8 family;
	__u8 pad[7];
} __attribute__((aligned(8))); // compared as four words (same_lookup_key)

struct lookup_result {
	struct rule_value grant; // the longest matching grant entry, if has_grant
	__u8 internal;
	__u8 has_grant;
	__u8 pad[2];
};

#define LOOKUP_CACHE_ENTRIES 16384 // a host's working set of destinations

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lookup_key);
	__type(value, struct lookup_result);
	__uint(max_entries, LOOKUP_CACHE_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dest_lookups SEC(".maps");

// lookup_dest_shared fills r with the trie lookups' result for k (d's
// address), from dest_lookups or, on a miss, from the tries.
static __always_inline void lookup_dest_shared(__u32 slot, const struct lookup_key *k, const struct dest *d,
					       struct lookup_result *r)
{
	struct lookup_result *c = bpf_map_lookup_elem(&dest_lookups, k);
	if (c) {
		*r = *c;
		return;
	}
	__builtin_memset(r, 0, sizeof(*r));
	if (k->app_id) {
		struct rule_value *g = grant_of(slot, k->app_id, d);
		if (g) {
			r->grant = *g;
			r->has_grant = 1;
		}
	}
	// The everyone entry needs no internal-set lookup: it is asked only
	// once the destination is known to need a grant.
	if (k->app_id != EVERYONE_APP_ID)
		r->internal = (r->has_grant && (r->grant.flags & RULE_INSIDE_INTERNAL)) || is_internal(slot, d);
	bpf_map_update_elem(&dest_lookups, k, r, BPF_ANY); // full: LRU evicts
}

// dest_memo: per CPU, a direct-mapped table of dest_lookups' latest
// entries (by a hash of the address and app), in front of it. A hit costs
// a per-CPU array lookup, which the kernel inlines on x86-64 and arm64
// from 6.10, and a compare of the key: no call, where dest_lookups' hash
// lookup is one (on the bench's 6.18 guest, with its return thunks, ~45
// ns of every connect and datagram). Exact as dest_lookups is, with the
// same key: its entries are results of a pure function of the key. 256
// entries of 64 bytes, 16 KiB a CPU, in the hooks' object only (memo in
// lookup_dest): a CPU's working set of destinations; two destinations
// that share an entry take turns in it, and the rest fall through to
// dest_lookups. Written and read under the seq word as
// principal_memo is (programs on one CPU may preempt each other). Not
// pinned: a new program starts with empty entries (seq 0).
struct dest_memo {
	__u64 seq;
	struct lookup_key key;
	struct lookup_result result;
};

#define DEST_MEMO_BITS 8

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct dest_memo);
	__uint(max_entries, 1 << DEST_MEMO_BITS);
} dest_memo SEC(".maps");

static __always_inline int same_lookup_key(const struct lookup_key *a, const struct lookup_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

// dest_memo_entry is k's entry of the CPU's dest_memo (NULL: no map). A
// multiplicative hash of the address words and the app, whose top bits
// depend on every bit of them: neighbouring addresses spread.
static __always_inline struct dest_memo *dest_memo_entry(const struct lookup_key *k)
{
	const __u32 *w = (const __u32 *)k->addr;
	__u32 h = (w[0] ^ w[1] ^ w[2] ^ w[3] ^ k->app_id) * 0x9e3779b1u;
	__u32 i = h >> (32 - DEST_MEMO_BITS);
	return bpf_map_lookup_elem(&dest_memo, &i);
}

// lookup_dest fills r with the trie lookups' result for d and app_id (0:
// unbound): with memo (the connect and sendmsg hooks, a constant) from
// the CPU's dest_memo first, else from dest_lookups, else from the tries.
// The egress backstop and the sweep ask only for denials and everyone
// grants, seldom and rarely again: without the memo, their objects carry
// no dest_memo of their own. An app's grant is looked up first, because
// a grant entry inside an internal prefix also answers "is it internal".
static __always_inline void lookup_dest(__u32 slot, __u32 generation, __u32 app_id, const struct dest *d,
					struct lookup_result *r, const int memo)
{
	struct lookup_key k = { .generation = generation, .app_id = app_id, .family = d->family };
	__builtin_memcpy(k.addr, d->addr, sizeof(k.addr));
	if (!memo) {
		lookup_dest_shared(slot, &k, d, r);
		return;
	}
	struct dest_memo *m = dest_memo_entry(&k);
	if (m) {
		__u64 seq = memo_read_begin(&m->seq);
		if (seq && same_lookup_key(&m->key, &k)) {
			*r = m->result;
			if (memo_read_end(&m->seq, seq))
				return;
		}
	}
	lookup_dest_shared(slot, &k, d, r);
	__u64 seq;
	if (m && memo_write_begin(&m->seq, &seq)) {
		m->key = k;
		m->result = *r;
		memo_write_end(&m->seq, seq);
	}
}

// everyone_allows: does an everyone grant cover d? Callers ask only when
// the principal's own grants do not allow, so a granted connect never pays
// for it; a generation without everyone grants answers from its flags.
// The trie walk is cached in dest_lookups under EVERYONE_APP_ID, keyed by
// generation like every entry there; memo as lookup_dest's.
static __always_inline int everyone_allows(__u32 slot, const struct generation_info *info, const struct dest *d,
					   const int memo)
{
	if (!(info->flags & GEN_EVERYONE) || !d->proto)
		return 0;
	struct lookup_result r;
	lookup_dest(slot, info->generation, EVERYONE_APP_ID, d, &r, memo);
	__u8 reason;
	return ports_allow(slot, r.has_grant ? &r.grant : NULL, d, &reason);
}

// others_allow: for a destination the principal's own grants do not take,
// is it allowed all the same: a sandbox's loopback (unless loopback:
// deny), or an everyone grant (*everyone)? Sets *reason for a denial of a
// destination outside the internal prefixes. Used by the connect hooks,
// the egress backstop and the sweep alike; memo as lookup_dest's.
static __always_inline int others_allow(__u32 slot, const struct generation_info *info, const struct dest *d,
					int internal, __u32 app_flags, __u8 *reason, int *everyone, const int memo)
{
	*everyone = 0;
	if (!internal) {
		*reason = REASON_OUTSIDE;
		if (is_loopback(d)) {
			*reason = REASON_LOOPBACK;
			if (!(app_flags & APP_LOOPBACK_DENY))
				return 1;
		}
	}
	// Only now, when the principal's own grants do not allow.
	*everyone = everyone_allows(slot, info, d, memo);
	return *everyone;
}

// A verdict: allowed or not, and for an allowed one what the verdict cache
// may remember (see struct verdict_entry).
struct verdict {
	int allow;
	int handoff; // allowed, and the egress backstop would decide it in full: hand it over
	int owned;   // allowed by the app's own grant to an internal destination: the app's connection
	int named;   // allowed by a name grant, whose address expires: the verdict holds only for now
	__u32 generation;
	__u32 app_id; // the principal (0: none)
	__u32 app_flags; // its flags, with VERDICT_EVERYONE when an everyone grant allowed
	__u32 gen_flags; // the generation's (GEN_*)
	__u64 cgroup_id; // the calling task's
};

// decide is the decision function for the calling task (task, its BTF
// pointer); it counts and audits. v->allow is 1 to let the syscall go
// on, 0 for EPERM.
static __always_inline void decide(struct dest *d, __u8 hook, void *task, struct verdict *v)
{
	__u64 cgroup_id = 0;
	__builtin_memset(v, 0, sizeof(*v));
	struct generation_info *info = current_generation();
	if (!info)
		goto no_policy;
	__u32 slot = info->slot & 1;
	__u32 generation = info->generation;
	v->generation = generation;
	v->gen_flags = info->flags;

	__u32 app_flags;
	__u32 app_id = hook_principal(slot, info, task, &cgroup_id, &app_flags);
	struct lookup_result r;
	lookup_dest(slot, generation, app_id, d, &r, 1);
	if (!r.internal && !(app_flags & APP_OUTSIDE_DENY)) {
		// Counted per app even for external traffic: cheap (per-CPU
		// array) and it tells an operator the hook sees the app at all.
		count(app_id, COUNT_EXTERNAL);
		v->allow = 1;
		// In a generation without sandboxes every principal may send
		// there: handed to the backstop as a verdict for anyone, whose
		// O(1) recognition costs less than its own internal-set lookup.
		if (!(info->flags & GEN_SANDBOX)) {
			v->handoff = 1;
			v->app_flags = VERDICT_EVERYONE;
		}
		return;
	}
	// Internal, or a sandbox's external destination: only grants allow
	// (and a sandbox's loopback).
	v->app_id = app_id;
	v->app_flags = app_flags;
	v->cgroup_id = cgroup_id;
	__u8 reason = REASON_UNBOUND;
	if (app_id) {
		__u8 why = 0;
		if ((app_flags & APP_EXE_PINNED) && !exe_allowed(slot, app_id))
			reason = REASON_EXE;
		else
			why = own_allows(slot, app_id, app_flags, r.has_grant ? &r.grant : NULL, d, &reason);
		if (why) {
			count(app_id, COUNT_ALLOW);
			if (app_flags & APP_AUDIT_ALLOW)
				audit(d, app_id, cgroup_id, generation, info->audit_rate, 1, why, hook);
			v->allow = v->handoff = 1;
			v->owned = r.internal;
			v->named = why == REASON_NAME;
			return;
		}
	}
	int everyone;
	if (others_allow(slot, info, d, r.internal, app_flags, &reason, &everyone, 1)) {
		v->allow = v->handoff = 1;
		if (!everyone) {
			count(app_id, COUNT_EXTERNAL); // a sandbox's loopback
			return;
		}
		count(app_id, COUNT_ALLOW);
		if (app_flags & APP_AUDIT_ALLOW)
			audit(d, app_id, cgroup_id, generation, info->audit_rate, 1, REASON_EVERYONE, hook);
		v->app_flags |= VERDICT_EVERYONE;
		return;
	}
	if (app_flags & APP_AUDIT_ONLY) {
		// Passes; handed to the backstop like an allowed verdict, so
		// that the packet it sends is not audited a second time. Not
		// the app's connection for the handover guard (owned): under
		// enforcement it would not exist.
		would_deny(WHO_TASK, d, app_id, cgroup_id, generation, info->audit_rate, reason, hook);
		v->allow = v->handoff = 1;
		return;
	}
	count(app_id, COUNT_DENY);
	audit(d, app_id, cgroup_id, generation, info->audit_rate, 0, reason, hook);
	return;

no_policy:
	// Fail closed: without a policy we cannot tell internal from external,
	// so nothing below the attach point may connect.
	count(0, COUNT_DENY);
	audit(d, 0, bpf_get_current_cgroup_id(), 0, 1000, 0, REASON_NO_POLICY, hook);
}

#endif // PROCGATE_DECISION_H
