// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// principal_of for a struct cgroup pointer, for programs that have one
// rather than a calling task or a packet: the socket sweep (sweep.c) and
// the migration marks (migrate.c). Include after decision.h.
//
// Kernel assumption: struct cgroup has ancestors[] (6.0+).

#ifndef PROCGATE_CGROUP_PRINCIPAL_H
#define PROCGATE_CGROUP_PRINCIPAL_H

struct kernfs_node___cg {
	__u64 id;
} __attribute__((preserve_access_index));

struct cgroup___cg {
	struct kernfs_node___cg *kn;
	int level;
	struct cgroup___cg *ancestors[];
} __attribute__((preserve_access_index));

static __always_inline __u64 cgroup_id_of(struct cgroup___cg *cg)
{
	return BPF_CORE_READ(cg, kn, id);
}

// ancestor_at is cg's ancestor at level (cg itself at its own level), or
// NULL. The index is computed outside bpf_core_read: everything inside it
// is relocated against kernel types.
static __always_inline struct cgroup___cg *ancestor_at(struct cgroup___cg *cg, __u32 level)
{
	struct cgroup___cg *anc = NULL;
	bpf_core_read(&anc, sizeof(anc), &cg->ancestors[level & (MAX_CGROUP_LEVEL - 1)]);
	return anc;
}

// cgroup_principal is the deepest app cgroup among cg and its ancestors;
// *cgroup_id is cg's id.
static __always_inline struct app_info *cgroup_principal(struct cgroup___cg *cg, __u32 slot,
							 const struct generation_info *info, __u64 *cgroup_id)
{
	struct app_key key = { .cgroup_id = cgroup_id_of(cg), .slot = slot };
	*cgroup_id = key.cgroup_id;
	struct app_info *a = bpf_map_lookup_elem(&app_by_cgroup, &key);
	if (a)
		return a;
	int own = BPF_CORE_READ(cg, level);
	__u32 max = info->max_level;
	for (__u32 i = 0; i < MAX_CGROUP_LEVEL; i++) {
		if (i > max)
			break;
		__u32 level = max - i;
		if (level < info->min_level)
			break;
		if ((int)level > own)
			continue; // the cgroup is shallower than this level
		struct cgroup___cg *anc = ancestor_at(cg, level);
		if (!anc)
			continue;
		key.cgroup_id = cgroup_id_of(anc);
		a = bpf_map_lookup_elem(&app_by_cgroup, &key);
		if (a)
			return a;
	}
	return NULL;
}

#endif // PROCGATE_CGROUP_PRINCIPAL_H
