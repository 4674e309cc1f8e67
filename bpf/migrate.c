//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// Marks processes that enter an app cgroup by a way around the launcher:
// a write of the app's cgroup.procs (or cgroup.threads), or a
// clone3(CLONE_INTO_CGROUP), made by a process that is not trusted to place
// processes. A marked process has no principal (decision.h,
// migrated_tasks), nor have its children: root launched into one app by
// `procgate run` cannot become another, although uid 0 owns the app
// cgroups' files and needs no capability to move.
//
// Trusted to place processes: a process, not marked, with CAP_SYS_ADMIN
// effective in the initial user namespace: the daemon, root outside the
// apps, systemd placing a unit, a container runtime. The launcher drops
// CAP_SYS_ADMIN from every app's bounding set (unless the app keeps it), so
// no process it started, nor any descendant, wherever it moves, is ever
// trusted again. Position is no test: the tracepoint fires after the move,
// when a process that moved itself is already at its destination, and a
// process that left its app would look like one outside every app. Root
// placed in an app by other means keeps CAP_SYS_ADMIN, and with it the
// power to undo procgate altogether (SECURITY.md). A trusted move clears a
// mark.
//
// These are tp_btf programs: no cgroup attach point sees a migration, and
// BPF LSM and fentry programs (and kprobes, without a kprobe PMU) do not
// load on every kernel; tp_btf programs need no trampoline. They run for
// every task of the host, so each returns after a cheap test when nothing
// concerns it.
//
// Kernel assumptions: struct cgroup has ancestors[] (6.0+);
// trace_cgroup_attach_task(dst_cgrp, path, task, threadgroup) fires once
// per cgroup_attach_task with the leader of the moved thread group, after
// the move; trace_sched_process_fork(parent, child) fires with the child
// already in its cgroup (CLONE_INTO_CGROUP included) and running nothing;
// sched_process_exit(task, ...) fires in the exiting task; kernel_cap_t is
// 64 bits (a u64 since 6.3, two u32 before: the same bits on little-endian).

#include "decision.h"
#include "cgroup_principal.h"

char __license[] SEC("license") = "Dual MIT/GPL";

struct css_set___mg {
	struct cgroup___cg *dfl_cgrp;
} __attribute__((preserve_access_index));

struct atomic___mg {
	int counter;
};

struct signal_struct___mg {
	struct atomic___mg live;
} __attribute__((preserve_access_index));

struct user_namespace___mg {
	int level;
} __attribute__((preserve_access_index));

struct kernel_cap___mg {
	__u64 val;
};

struct cred___mg {
	struct kernel_cap___mg cap_effective;
	struct user_namespace___mg *user_ns;
} __attribute__((preserve_access_index));

// kernel_cap_t before 6.3 (a u64 since then): two 32-bit words, the
// low one holding CAP_SYS_ADMIN.
struct kernel_cap___old {
	__u32 cap[2];
};

struct cred___old {
	struct kernel_cap___old cap_effective;
} __attribute__((preserve_access_index));

struct task_struct___mg {
	int tgid;
	__u64 start_time;
	struct task_struct___mg *group_leader;
	struct css_set___mg *cgroups;
	struct signal_struct___mg *signal;
	const struct cred___mg *cred;
} __attribute__((preserve_access_index));

#define CAP_SYS_ADMIN 21

// trusted: may the calling task place processes in app cgroups? Not
// marked, and CAP_SYS_ADMIN effective in the initial user namespace.
static __always_inline int trusted(void)
{
	if (migrated())
		return 0;
	struct task_struct___mg *t = (struct task_struct___mg *)bpf_get_current_task();
	if (BPF_CORE_READ(t, cred, user_ns, level) != 0)
		return 0;
	const struct cred___mg *cred = BPF_CORE_READ(t, cred);
	__u64 caps;
	if (bpf_core_field_exists(cred->cap_effective.val))
		caps = BPF_CORE_READ(cred, cap_effective.val);
	else // 6.1, 6.2
		caps = BPF_CORE_READ((const struct cred___old *)cred, cap_effective.cap[0]);
	return (caps >> CAP_SYS_ADMIN) & 1;
}

static __always_inline void mark(struct task_struct___mg *t)
{
	__u32 tgid = BPF_CORE_READ(t, tgid);
	__u64 start = BPF_CORE_READ(t, group_leader, start_time);
	// Seen before the mark is: a reader that finds the mark has seen
	// this too (the update below is a full barrier).
	__u32 zero = 0;
	__u32 *seen = bpf_map_lookup_elem(&migration_marks_seen, &zero);
	if (seen && !*seen)
		__sync_fetch_and_add(seen, 1);
	// Full map: the mark is lost (fail open); 65536 processes moved
	// between apps at once is far beyond any legitimate use.
	bpf_map_update_elem(&migrated_tasks, &tgid, &start, BPF_ANY);
}

// judge marks t, which the calling task moved (or cloned) into cg, when
// the caller is not trusted and cg belongs to an app; except a move within
// the caller's own app, where the caller's cgroup is still its own (not
// when it moved itself: then it already is at the destination).
static __always_inline void judge(struct task_struct___mg *t, struct cgroup___cg *cg, int self)
{
	if (trusted()) {
		__u32 tgid = BPF_CORE_READ(t, tgid);
		bpf_map_delete_elem(&migrated_tasks, &tgid); // a trusted move clears a mark
		return;
	}
	struct generation_info *info = current_generation();
	if (!info)
		return; // no policy: the hooks deny every internal destination
	__u32 slot = info->slot & 1;
	__u64 to_id;
	struct app_info *to = cgroup_principal(cg, slot, info, &to_id);
	if (!to)
		return;
	if (!self) {
		__u64 cgroup_id;
		struct app_info *from = principal_of(WHO_TASK, NULL, slot, info, &cgroup_id);
		if (from && from->app_id == to->app_id && !migrated())
			return;
	}
	mark(t);
}

struct cgroup_root___fl {
	int hierarchy_id;
} __attribute__((preserve_access_index));

struct kernfs_node___fl {
	__u64 id;
	const char *name;
} __attribute__((preserve_access_index));

struct cgroup___fl {
	struct kernfs_node___fl *kn;
	struct cgroup_root___fl *root;
} __attribute__((preserve_access_index));

struct css_set___fl {
	struct cgroup___fl *dfl_cgrp;
} __attribute__((preserve_access_index));

struct task_struct___fl {
	struct css_set___fl *cgroups;
} __attribute__((preserve_access_index));

// on_default_hierarchy: is cg a cgroup2 cgroup? The calling task's default
// cgroup is on the default hierarchy by definition.
static __always_inline int on_default_hierarchy(struct cgroup___fl *cg)
{
	struct task_struct___fl *t = (struct task_struct___fl *)bpf_get_current_task();
	return BPF_CORE_READ(cg, root) == BPF_CORE_READ(t, cgroups, dfl_cgrp, root);
}

SEC("tp_btf/cgroup_attach_task")
int mark_migration(unsigned long long *ctx)
{
	struct task_struct___mg *t = (struct task_struct___mg *)ctx[2];
	// A move in a v1 hierarchy changes no principal, and its cgroup's id
	// is of another id space, which may hold an app cgroup's number.
	if (!on_default_hierarchy((struct cgroup___fl *)ctx[0]))
		return 0;
	int self = BPF_CORE_READ(t, tgid) == (int)(bpf_get_current_pid_tgid() >> 32);
	judge(t, (struct cgroup___cg *)ctx[0], self);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int mark_fork(unsigned long long *ctx)
{
	struct task_struct___mg *child = (struct task_struct___mg *)ctx[1];
	if (migrated()) {
		mark(child); // children of a marked process are marked
		return 0;
	}
	// Only a clone3(CLONE_INTO_CGROUP) puts the child elsewhere than its
	// parent. The common fork shares its parent's css_set: two loads
	// through the tracepoint's and the helper's BTF pointers (no probe
	// reads; bpf_get_current_task_btf is 5.11+).
	struct task_struct___mg *parent = (struct task_struct___mg *)bpf_get_current_task_btf();
	if ((unsigned long)child->cgroups == (unsigned long)parent->cgroups)
		return 0;
	struct cgroup___cg *cg = BPF_CORE_READ(child, cgroups, dfl_cgrp);
	if (cgroup_id_of(cg) == bpf_get_current_cgroup_id())
		return 0;
	judge(child, cg, 0);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int forget_exit(unsigned long long *ctx)
{
	// Nothing to forget on a host where no process was ever marked.
	if (!any_migration_mark())
		return 0;
	// The last thread of the process: do_exit has counted it out of
	// signal->live already.
	struct task_struct___mg *t = (struct task_struct___mg *)ctx[0];
	if (BPF_CORE_READ(t, signal, live.counter) != 0)
		return 0;
	__u32 tgid = BPF_CORE_READ(t, tgid);
	bpf_map_delete_elem(&migrated_tasks, &tgid);
	return 0;
}

// Following unit and cgroup apps (match.unit, match.cgroup). A unit's
// restart removes its cgroup and makes a new one, with a new id, before
// systemd moves the restarted service into it: the new cgroup must be the
// app's before any process runs there, or the service's first connect is
// unbound. So the cgroup is bound here, inside mkdir(2), before the call
// returns to the manager that made it: no poll or inotify watch could be
// that early.
//
// The patterns come from the loader, per slot: cgroup_exact_patterns holds exact
// paths (units, globs without '*'), cgroup_glob_patterns the globs by their parent
// directory, each a prefix and a suffix around one '*' in the last
// component. A new cgroup is bound in every slot whose patterns match it,
// so that a reload filling the idle slot does not miss a cgroup made
// between its scan of the tree and its switch (the loader writes a slot's
// patterns before it scans). Paths are as the tracepoint gives them:
// absolute below the cgroup2 mount ("/system.slice/nginx.service").
//
// Kernel assumptions: trace_cgroup_mkdir(cgrp, path) and
// trace_cgroup_rmdir(cgrp, path) fire for every hierarchy (v1 ones
// included: only the default hierarchy's cgroups are taken, by their
// root), mkdir's after the cgroup is made and before mkdir(2) returns, with
// the path from kernfs_path (up to TRACE_CGROUP_PATH_LEN, 1024 bytes);
// cgroup ids are kernfs node ids, never reused while the system runs.

#define CGROUP_PATH_LEN 256 // longer paths are followed by the loader's scans only
#define GLOB_PART_LEN 64
#define GLOBS_PER_PARENT 4

struct cgroup_path_key {
	__u32 slot;
	char path[CGROUP_PATH_LEN]; // zero-padded
};

struct cgroup_glob {
	struct app_info app; // app_id 0: unused
	__u32 prefix_len;
	__u32 suffix_len;
	char prefix[GLOB_PART_LEN];
	char suffix[GLOB_PART_LEN];
};

struct cgroup_globs {
	struct cgroup_glob globs[GLOBS_PER_PARENT]; // in policy order: the first match wins
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct cgroup_path_key);
	__type(value, struct app_info);
	__uint(max_entries, 2 * 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cgroup_exact_patterns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct cgroup_path_key);
	__type(value, struct cgroup_globs);
	__uint(max_entries, 2 * 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cgroup_glob_patterns SEC(".maps");

// Scratch for follow_mkdir: the key and the new cgroup's last component do
// not fit the BPF stack.
struct mkdir_scratch {
	struct cgroup_path_key key;
	char name[CGROUP_PATH_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct mkdir_scratch);
	__uint(max_entries, 1);
} mkdir_scratch SEC(".maps");

// glob_matches: is name[0..len) prefix + anything + suffix?
static __always_inline int glob_matches(const struct cgroup_glob *g, const char *name, __u32 len)
{
	__u32 plen = g->prefix_len, slen = g->suffix_len;
	if (plen > GLOB_PART_LEN || slen > GLOB_PART_LEN || plen + slen > len)
		return 0;
	for (__u32 i = 0; i < GLOB_PART_LEN; i++) {
		if (i >= plen)
			break;
		if (name[i & (CGROUP_PATH_LEN - 1)] != g->prefix[i])
			return 0;
	}
	for (__u32 i = 0; i < GLOB_PART_LEN; i++) {
		if (i >= slen)
			break;
		if (name[(len - slen + i) & (CGROUP_PATH_LEN - 1)] != g->suffix[i])
			return 0;
	}
	return 1;
}

static __always_inline void bind_cgroup(__u64 id, __u32 slot, const struct app_info *app)
{
	struct app_key k = { .cgroup_id = id, .slot = slot };
	// Full map: not bound (fail closed: the cgroup's processes are
	// unbound); the loader's next scan binds it.
	bpf_map_update_elem(&app_by_cgroup, &k, app, BPF_ANY);
}

SEC("tp_btf/cgroup_mkdir")
int follow_mkdir(unsigned long long *ctx)
{
	struct cgroup___fl *cg = (struct cgroup___fl *)ctx[0];
	const char *path = (const char *)ctx[1];
	if (!on_default_hierarchy(cg))
		return 0;
	__u32 zero = 0;
	struct mkdir_scratch *s = bpf_map_lookup_elem(&mkdir_scratch, &zero);
	if (!s)
		return 0;
	__builtin_memset(&s->key, 0, sizeof(s->key));
	long n = bpf_probe_read_kernel_str(s->key.path, sizeof(s->key.path), path);
	if (n <= 1 || n >= CGROUP_PATH_LEN)
		return 0; // unreadable, or too long for a key: the loader's scans only
	__u64 id = BPF_CORE_READ(cg, kn, id);
	int exact = 0;
	for (__u32 slot = 0; slot < 2; slot++) {
		s->key.slot = slot;
		struct app_info *a = bpf_map_lookup_elem(&cgroup_exact_patterns, &s->key);
		if (a) {
			bind_cgroup(id, slot, a);
			exact |= 1 << slot;
		}
	}
	if (exact == 3)
		return 0;
	// The parent's path is the path without "/" and the last component,
	// which is the cgroup's kernfs name. Read again, only that far, into
	// the zeroed key: no loop over the path (the verifier would walk each
	// of its bytes with every length).
	long name_n = bpf_probe_read_kernel_str(s->name, sizeof(s->name), BPF_CORE_READ(cg, kn, name));
	if (name_n <= 1)
		return 0;
	__u32 len = n - 1, name_len = name_n - 1;
	if (name_len + 1 > len)
		return 0;
	__u32 last = len - name_len - 1; // the '/' before the name
	__builtin_memset(&s->key.path, 0, sizeof(s->key.path));
	if (bpf_probe_read_kernel_str(s->key.path, (last & (CGROUP_PATH_LEN - 1)) + 1, path) < 0)
		return 0;
	for (__u32 slot = 0; slot < 2; slot++) {
		if (exact & (1 << slot))
			continue; // an exact path comes before every glob
		s->key.slot = slot;
		struct cgroup_globs *gs = bpf_map_lookup_elem(&cgroup_glob_patterns, &s->key);
		if (!gs)
			continue;
		for (int g = 0; g < GLOBS_PER_PARENT; g++) {
			if (gs->globs[g].app.app_id && glob_matches(&gs->globs[g], s->name, name_len)) {
				bind_cgroup(id, slot, &gs->globs[g].app);
				break;
			}
		}
	}
	return 0;
}

SEC("tp_btf/cgroup_rmdir")
int forget_rmdir(unsigned long long *ctx)
{
	struct cgroup___fl *cg = (struct cgroup___fl *)ctx[0];
	if (!on_default_hierarchy(cg))
		return 0;
	struct app_key k = { .cgroup_id = BPF_CORE_READ(cg, kn, id) };
	for (__u32 slot = 0; slot < 2; slot++) {
		k.slot = slot;
		bpf_map_delete_elem(&app_by_cgroup, &k);
	}
	__u64 id = k.cgroup_id;
	bpf_map_delete_elem(&principal_cache, &id);
	return 0;
}

// Forces bpf2go to emit Go types for the loader's pattern entries.
const struct cgroup_path_key *unused_cgroup_path_key __attribute__((unused));
const struct cgroup_globs *unused_cgroup_globs __attribute__((unused));
