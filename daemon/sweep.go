package daemon

import (
	"context"
	"os"

	"github.com/procgate/procgate/bpf"
)

// sweep ends the live sockets the generation gen no longer allows and
// returns how many. It runs after every Apply: a revoke, a reload, a change
// of routes or binaries. Sockets are found in the daemon's own network
// namespace only (where `procgate run` starts apps); apps in other
// namespaces keep their connections. A failed sweep is logged: the new
// generation is in force either way, for every new attempt. Reconciler
// only.
func (d *Daemon) sweep(gen uint32) int {
	opts := bpf.SweepOptions{}
	// Sockets made in the apps' directory by an app since removed from the
	// policy have no grants left.
	if _, err := os.Stat(d.appDirs.Base); err == nil {
		opts.Fence = d.appDirs.Base
	}
	res, err := d.enf.Sweep(opts)
	// The generation's names: applyEffective publishes before it sweeps.
	names := d.current().appNames
	for _, s := range res.Ended {
		d.log.Debug("live socket ended", "generation", gen, "app", names[s.AppID], "proto", s.Proto.String(),
			"local", s.Local.String(), "peer", s.Peer.String(), "cgroup_id", s.CgroupID)
	}
	for _, s := range res.Failed {
		d.log.Warn("live socket could not be ended", "generation", gen, "app", names[s.AppID], "proto", s.Proto.String(),
			"local", s.Local.String(), "peer", s.Peer.String(), "err", s.Err)
	}
	if err != nil {
		d.log.Error("sweep of live sockets failed; new attempts are decided by the new generation all the same",
			"generation", gen, "method", string(res.Method), "ended", len(res.Ended), "err", err)
	}
	if len(res.Ended) > 0 || len(res.Failed) > 0 {
		d.log.Info("live sockets ended", "generation", gen, "ended", len(res.Ended), "failed", len(res.Failed),
			"conntrack_removed", res.Conntrack, "method", string(res.Method), "took", res.Took)
	}
	return len(res.Ended)
}

// reloadNow is Reload(true) for the API: the generation and how many live
// sockets it ended.
func (d *Daemon) reloadNow(ctx context.Context) (gen uint32, ended int, err error) {
	if cerr := d.call(ctx, func() {
		gen, err = d.reload(true)
		ended = d.current().ended
	}); cerr != nil {
		return d.generation(), 0, cerr
	}
	return gen, ended, err
}
