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
	__u64 caps = BPF_CORE_READ(t, cred, cap_effective.val);
	return (caps >> CAP_SYS_ADMIN) & 1;
}

static __always_inline void mark(struct task_struct___mg *t)
{
	__u32 tgid = BPF_CORE_READ(t, tgid);
	__u64 start = BPF_CORE_READ(t, group_leader, start_time);
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

SEC("tp_btf/cgroup_attach_task")
int mark_migration(unsigned long long *ctx)
{
	struct task_struct___mg *t = (struct task_struct___mg *)ctx[2];
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
	// parent.
	struct cgroup___cg *cg = BPF_CORE_READ(child, cgroups, dfl_cgrp);
	if (cgroup_id_of(cg) == bpf_get_current_cgroup_id())
		return 0;
	judge(child, cg, 0);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int forget_exit(unsigned long long *ctx)
{
	// The last thread of the process: do_exit has counted it out of
	// signal->live already.
	struct task_struct___mg *t = (struct task_struct___mg *)ctx[0];
	if (BPF_CORE_READ(t, signal, live.counter) != 0)
		return 0;
	__u32 tgid = BPF_CORE_READ(t, tgid);
	bpf_map_delete_elem(&migrated_tasks, &tgid);
	return 0;
}
