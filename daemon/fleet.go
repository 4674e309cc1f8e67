package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/fleet"
	"github.com/procgate/procgate/internal/version"
	"github.com/procgate/procgate/policy"
	"github.com/procgate/procgate/ruleset"
)

// FleetConfig takes the policy from etcd (--policy-store etcd) instead of
// the policy file.
type FleetConfig struct {
	Etcd fleet.Config
	Host fleet.Host
	// FirstTimeout is how long the daemon waits for etcd at start before
	// it boots from the last good policy on disk; 0: 5s.
	FirstTimeout time.Duration
	// LeaseTTL is the status key's lease (0: fleet's default).
	LeaseTTL time.Duration
}

// fleetSource is the daemon's policy source when it comes from etcd: the
// agent hands it snapshots (one etcd revision each), applyFleet turns
// each into a generation, and the agent reports the outcome. The flow
// stays one way: etcd -> snapshot -> policy -> ruleset -> bpf.
type fleetSource struct {
	cli   *clientv3.Client
	agent *fleet.Agent
	host  fleet.Host
	// first is the revision read at start and whether it came from the
	// last good policy on disk, etcd not having answered at boot; the
	// State says which is in force after it.
	firstRevision int64
	firstFromDisk bool
}

// openFleet connects to etcd and reads the first policy: etcd's, or the
// last good one on disk when etcd does not answer; neither is an error
// (the daemon does not start open).
func (d *Daemon) openFleet(ctx context.Context) (*ruleset.Ruleset, string, []string, fleet.Snapshot, error) {
	fc := d.cfg.Fleet
	cli, err := fc.Etcd.Client()
	if err != nil {
		return nil, "", nil, fleet.Snapshot{}, err
	}
	agent := fleet.NewAgent(fleet.AgentOptions{
		Client: cli, Host: fc.Host, StateDir: d.cfg.StateDir, Version: version.Get().String(),
		Log: d.log.With("source", "etcd"), LeaseTTL: fc.LeaseTTL,
	})
	timeout := fc.FirstTimeout
	if timeout == 0 {
		timeout = 5 * time.Second
	}
	snap, fromDisk, err := agent.First(ctx, timeout)
	if err != nil {
		cli.Close()
		return nil, "", nil, snap, fmt.Errorf("policy from etcd for host %s: %w", fc.Host.Name, err)
	}
	d.fleet = &fleetSource{cli: cli, agent: agent, host: fc.Host, firstFromDisk: fromDisk, firstRevision: snap.Revision}
	d.fleetRevoked = fleetRevocations(snap, d.log)
	files, err := snap.Files(fc.Host)
	if err != nil {
		return nil, "", nil, snap, err
	}
	rs, warnings, check, err := policy.ParseFilesForHost(files)
	if err != nil {
		return nil, "", nil, snap, err
	}
	for _, w := range warnings {
		d.log.Warn("policy", "warning", w.String())
	}
	go logHostWarnings(d.log, check)
	return rs, policy.Hash(files), dropinPaths(files), snap, nil
}

// runFleet follows etcd until ctx ends.
func (d *Daemon) runFleet(ctx context.Context, wg *sync.WaitGroup, first fleet.Snapshot) {
	st := d.current()
	d.fleet.agent.Applied(first, fleet.Outcome{Generation: st.gen, PolicySHA256: st.policyHash, FromDisk: st.fleetFromDisk})
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer d.fleet.cli.Close()
		d.fleet.agent.Run(ctx)
	}()
}

// fleetUpdates are the snapshots to apply; nil (never ready) with the
// policy file.
func (d *Daemon) fleetUpdates() <-chan fleet.Snapshot {
	if d.fleet == nil {
		return nil
	}
	return d.fleet.agent.Updates()
}

// applyFleet makes a snapshot's merged policy and fleet-wide revocations
// the generation in force, or refuses it whole and keeps the one in force;
// either way the agent reports it. Reconciler only.
func (d *Daemon) applyFleet(snap fleet.Snapshot) {
	f := d.fleet
	files, err := snap.Files(f.host)
	var rs *ruleset.Ruleset
	var hash string
	if err == nil {
		hash = policy.Hash(files)
	}
	revoked := fleetRevocations(snap, d.log)
	inForce := func(s *State) { s.lastErr, s.fleetFromDisk, s.fleetRevision = "", false, snap.Revision }
	if cur := d.current(); err == nil && hash == cur.policyHash {
		// Another host's document, the same bytes as on disk, or only
		// the revocations changed: the policy in force is this
		// revision's.
		if !revoked.same(d.fleetRevoked) {
			err = d.applyFleetRevocations(revoked, snap.Revision)
		}
		if err == nil {
			st := d.publish(inForce)
			f.agent.Applied(snap, fleet.Outcome{Generation: st.gen, PolicySHA256: st.policyHash})
			return
		}
	}
	if err == nil {
		// As a reload of the file does: the parse and Apply hold two
		// generations at once.
		defer lowerGC()()
		var warnings []policy.Warning
		var check policy.HostCheck
		rs, warnings, check, err = policy.ParseFilesForHost(files)
		for _, w := range warnings {
			d.log.Warn("policy", "warning", w.String())
		}
		if check != nil {
			go logHostWarnings(d.log, check)
		}
	}
	if err == nil {
		saved := d.fleetRevoked
		d.fleetRevoked = revoked
		if err = d.install(rs, hash, dropinPaths(files)); err != nil {
			d.fleetRevoked = saved
		}
	}
	if err != nil {
		st := d.publish(func(s *State) { s.lastErr = fmt.Sprintf("revision %d: %v", snap.Revision, err) })
		d.log.Error("policy rejected; the previous generation stays in force", "revision", snap.Revision, "generation", st.gen, "err", err)
		f.agent.Applied(snap, fleet.Outcome{Generation: st.gen, PolicySHA256: st.policyHash, Err: err})
		return
	}
	st := d.publish(inForce)
	d.log.Info("policy loaded", "revision", snap.Revision, "overlays", len(files)-1, "generation", st.gen, "apps", len(rs.Apps), "internal", len(rs.Internal), "sockets_ended", st.ended)
	f.agent.Applied(snap, fleet.Outcome{Generation: st.gen, PolicySHA256: st.policyHash})
}

// applyFleetRevocations puts the fleet-wide revocations of revision rev in
// force over the policy in force, ending the live sockets of what they
// withdraw, as a local revoke does. Reconciler only.
func (d *Daemon) applyFleetRevocations(revoked *revocations, rev int64) error {
	saved := d.fleetRevoked
	d.fleetRevoked = revoked
	cur := d.current()
	gen, err := d.applyEffective(withRoutes(d.withRevoked(cur.policy), cur.routes), nil)
	if err != nil {
		d.fleetRevoked = saved
		return fmt.Errorf("fleet-wide revocations: %w", err)
	}
	d.log.Info("fleet-wide revocations applied", "revision", rev, "apps", len(revoked.Apps)+len(revoked.Grants), "generation", gen, "sockets_ended", d.current().ended)
	return nil
}

// fleetRevocations are a snapshot's fleet-wide revocations as the daemon
// keeps revocations; a value that does not read is logged (and revokes
// its app whole: fleet.Snapshot.Revocations).
func fleetRevocations(snap fleet.Snapshot, log *slog.Logger) *revocations {
	revs, problems := snap.Revocations()
	for _, p := range problems {
		log.Error("fleet-wide revocation", "revision", snap.Revision, "err", p)
	}
	r := &revocations{Apps: map[string]bool{}, Grants: map[string][]int{}}
	for app, rv := range revs {
		if rv.All {
			r.Apps[app] = true
		} else {
			r.Grants[app] = rv.Grants
		}
	}
	return r
}

// fleetStatus is the source's part of the daemon's status in st.
func (d *Daemon) fleetStatus(st *State) *api.FleetSource {
	if d.fleet == nil {
		return nil
	}
	as, connected, etcdErr := d.fleet.agent.State()
	source := fleet.SourceEtcd
	if st.fleetFromDisk {
		source = fleet.SourceLastGood
	}
	return &api.FleetSource{
		Host: d.fleet.host.Name, Labels: as.Labels, Endpoints: d.cfg.Fleet.Etcd.Endpoints,
		Revision: st.fleetRevision, Source: source, Connected: connected, EtcdError: etcdErr,
	}
}
