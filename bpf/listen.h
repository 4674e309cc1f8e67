// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// An app's listen: for the calling task: shared by the bind hooks
// (procgate.c) and the BPF LSM socket_listen program (lsmguard.c).

#ifndef PROCGATE_LISTEN_H
#define PROCGATE_LISTEN_H

#include "decision.h"

// listen_refused: is the calling task of an app with listen: that does not
// list d->port? A refusal is counted and audited here; for an app in audit
// mode it is a would-be refusal, which is not refused. Binds of a process
// of no app, or of an app without listen:, cost the generation lookup and
// one flag test, or (in generations with listen: apps) the principal
// lookup.
static __always_inline int listen_refused(const struct dest *d, __u8 hook)
{
	struct generation_info *info = current_generation();
	if (!info || !(info->flags & GEN_LISTEN))
		return 0;
	__u32 slot = info->slot & 1;
	__u64 cgroup_id;
	// task_app, not principal: a process marked by migrate.c stays
	// restricted (listen: takes away, it grants nothing).
	struct app_info *app = task_app(slot, info, &cgroup_id);
	if (!app || !(app->flags & APP_LISTEN))
		return 0;
	__u32 app_id = app->app_id;
	struct rule_key k = { .prefixlen = 32, .tag = bpf_htonl((slot ? TAG_SLOT : 0) | TAG_LISTEN | (app_id & 0xffff)) };
	struct rule_value *l = bpf_map_lookup_elem(&rules, &k);
	if (l && port_allowed(slot, l->tcp_first, l->tcp_count, d->port))
		return 0;
	if (app->flags & APP_AUDIT_ONLY) {
		would_deny(WHO_TASK, d, app_id, cgroup_id, info->generation, info->audit_rate, REASON_LISTEN, hook);
		return 0;
	}
	count(app_id, COUNT_DENY);
	audit(d, app_id, cgroup_id, info->generation, info->audit_rate, 0, REASON_LISTEN, hook);
	return 1;
}

#endif
