package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/procgate/procgate/daemon"
)

// The principals phase measures the TCP connect latency of a process of
// each principal kind that the real daemon tells apart, against the same
// granted internal destinations, interleaved with unenforced processes in
// the same run (measure's rounds and paired ratios):
//   - launched: a process in the daemon's cgroup of app0, as `procgate
//     run` places it;
//   - unit: `match: {unit: web.service}`, a process in
//     <root>/system.slice/web.service, laid out as systemd lays it out;
//   - user: `match: {user: UID}`, a process of that uid in a cgroup of no
//     app;
//   - everyone: a root process of no app, reaching the destinations
//     through the `everyone` grants;
//   - sandbox: a launched app with `outside: deny`.
//
// Every kind holds the same grants (app0's of the matrix policy, port
// 5432), so a row differs from the others only in how the kernel found
// the process's principal. Before the timing, each process must reach a
// marker destination granted to its own kind only and be refused the
// others' markers, so that a process that lost its principal (and fell
// back to the everyone grants, or out of enforcement) fails the phase
// instead of being timed as the wrong kind; the sandbox must be refused
// an external address that every other kind reaches.

const phasePrincipals = "principals"

// principalUID is the uid of the user principal's process: no other
// variant uses it.
const principalUID = firstAppUID + maxApps

// principalKind is one principal kind of the phase.
type principalKind struct {
	name string
	// policy is the app's entry in the policy, without its allow list
	// ("" for the everyone kind, whose grants are the policy's everyone).
	policy string
	// cgroup is the client's cgroup below the daemon's root.
	cgroup string
	uid    int
	// marker is the index of the matrix app whose first prefix is granted
	// to this kind only (-1: none).
	marker int
}

var principalKinds = []principalKind{
	{name: "launched", policy: "  - name: app0\n", cgroup: filepath.Join(daemon.AppsDir, "app0"), marker: 2},
	{name: "unit", policy: "  - name: web\n    match: {unit: web.service}\n", cgroup: "system.slice/web.service", marker: 3},
	{name: "user", policy: fmt.Sprintf("  - name: backup\n    match: {user: \"%d\"}\n", principalUID), cgroup: "user-noapp", uid: principalUID, marker: 4},
	{name: "sandbox", policy: "  - name: sandbox\n    outside: deny\n", cgroup: filepath.Join(daemon.AppsDir, "sandbox"), marker: 5},
	{name: "everyone", cgroup: "noapp", marker: -1},
}

// principalsPolicy is the phase's policy: the matrix policy's internal
// prefixes, app0's grants for every kind (for `everyone` too) and each
// app kind's marker.
func principalsPolicy(pol *benchPolicy) string {
	var s strings.Builder
	s.WriteString("version: 1\ninternal:\n  prefixes:\n")
	for _, p := range pol.internal {
		fmt.Fprintf(&s, "    - %s\n", p)
	}
	grants := func(indent string, extra ...netip.Prefix) {
		for _, p := range append(pol.grants[0], extra...) {
			fmt.Fprintf(&s, "%s- {to: %s, proto: tcp, ports: [%d]}\n", indent, p, servicePort)
		}
	}
	s.WriteString("audit:\n  rate: 100\napps:\n")
	for _, k := range principalKinds {
		if k.policy == "" {
			continue
		}
		s.WriteString(k.policy)
		s.WriteString("    allow:\n")
		grants("      ", pol.grants[k.marker][0])
	}
	s.WriteString("everyone:\n  allow:\n")
	grants("    ")
	return s.String()
}

func (b *bench) principalsPhase(ctx context.Context) error {
	bin, err := procgateBinary()
	if err != nil {
		return err
	}
	pol, err := newPolicy(b.cfg.MatrixSize)
	if err != nil {
		return err
	}
	w := &world{nsg: netnsGroup{h: b.host}}
	defer w.close()
	ns, err := w.nsg.localNS("principals")
	if err != nil {
		return err
	}
	srv, err := startServers(ns, true)
	if err != nil {
		return err
	}
	// The first lane takes srv, and the world closes it; until then, a
	// return closes it here (servers.close may not run twice: it closes
	// descriptors).
	handed := false
	defer func() {
		if !handed {
			srv.close()
		}
	}()
	dir, err := b.phaseDir("principals")
	if err != nil {
		return err
	}
	policyPath := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(policyPath, []byte(principalsPolicy(pol)), 0o600); err != nil {
		return err
	}
	// The unit's and the no-app processes' cgroups exist before the
	// daemon starts, as a running service's would.
	for _, k := range principalKinds {
		if strings.HasPrefix(k.cgroup, daemon.AppsDir) {
			continue
		}
		if _, err := b.host.mkCgroup(filepath.Join(phasePrincipals, k.cgroup)); err != nil {
			return err
		}
	}
	d, err := b.startDaemon(bin, dir, ns, policyPath, phasePrincipals)
	if err != nil {
		return err
	}
	defer d.stop()

	handed = true // to the baseline's lane, closed with the world
	if err := b.unenforcedLanes(w, ns, phasePrincipals, srv); err != nil {
		return err
	}
	for _, k := range principalKinds {
		l := &lane{v: &variant{Name: k.name}, topo: topoLoopback, clientNS: ns}
		w.lanes = append(w.lanes, l)
		if l.cl, err = startClient(phasePrincipals+"/"+k.name, filepath.Join(d.cgroupRoot, k.cgroup), ns, k.uid, false); err != nil {
			return err
		}
		if err := checkPrincipal(l.cl, k, pol); err != nil {
			return fmt.Errorf("principal %s: %w", k.name, err)
		}
	}
	res, err := b.measure(ctx, w, pol, phasePrincipals, []proto{tcp}, []class{classAllow})
	if err != nil {
		return err
	}
	b.res.Principals = res
	return errors.Join(d.stop(), w.close())
}

// unenforcedLanes adds the baseline's and its control's lanes to w, each
// client in a cgroup of its own outside the daemon's cgroup root, where
// nothing enforces; the first lane takes srv (nil: none), to close with
// the world.
func (b *bench) unenforcedLanes(w *world, ns, phase string, srv *servers) error {
	for i, v := range pickVariants(allVariants(), vBaseline, vControl) {
		l := &lane{v: v, topo: topoLoopback, clientNS: ns}
		if i == 0 {
			l.srv = srv // in the world before anything can fail
		}
		w.lanes = append(w.lanes, l)
		cg, err := b.host.mkCgroup(phase + "-" + v.Name)
		if err != nil {
			return err
		}
		if l.cl, err = startClient(phase+"/"+v.Name, cg, ns, 0, false); err != nil {
			return err
		}
	}
	return nil
}

// checkPrincipal checks that the client is enforced as kind k: it reaches
// its own marker, is refused the other kinds', and reaches an external
// address unless k is the sandbox.
func checkPrincipal(cl *client, k principalKind, pol *benchPolicy) error {
	external := netip.AddrPortFrom(pol.dests(classExternal)[0], servicePort)
	checks := []struct {
		dest  netip.AddrPort
		allow bool
	}{{external, k.name != "sandbox"}}
	for _, o := range principalKinds {
		if o.marker >= 0 {
			checks = append(checks, struct {
				dest  netip.AddrPort
				allow bool
			}{netip.AddrPortFrom(hostIn(pol.grants[o.marker][0]), servicePort), o.name == k.name})
		}
	}
	for _, c := range checks {
		resp, err := cl.do(request{Op: opLatency, Proto: tcp, Dests: []netip.AddrPort{c.dest}, N: 1, Allow: c.allow})
		if err != nil {
			return err
		}
		if resp.Wrong != 0 {
			return errors.New(resp.WrongDesc)
		}
	}
	return nil
}

// principalsSection writes the principals phase's table.
func (r *results) principalsSection(w func(string, ...any)) {
	if len(r.Principals) == 0 {
		return
	}
	w("## Connect cost per principal kind")
	w("")
	w("The real daemon (bin/procgate) in a namespace of its own; one TCP client per principal kind, each holding the same grants (app0's of the matrix policy, %d internal prefixes, port %d) and connecting to the same internal-allow destinations over loopback, interleaved with two unenforced clients (baseline and its control, outside the daemon's cgroup root) as in the latency phase. *launched*: the daemon's app0 cgroup, as `procgate run` places a process; *unit*: `match: {unit: web.service}`, a process in `<root>/system.slice/web.service`; *user*: `match: {user: %d}`, a process of that uid in a cgroup of no app; *everyone*: a root process of no app, allowed by the `everyone` grants; *sandbox*: a launched app with `outside: deny`. Before the timing each process reached a destination granted to its kind alone and was refused the other kinds' (the sandbox also an external address).", r.Config.MatrixSize, servicePort, principalUID)
	w("")
	w("| principal | p50 µs | p99 µs | added p50 µs | p50 ratio | p99 ratio | spread | n | wrong |")
	w("|---|---|---|---|---|---|---|---|---|")
	for _, l := range r.Principals {
		w("| %s | %.2f | %.2f | %+.3f | %s | %s | %.1f%% | %d | %d |", l.Variant, l.P50, l.P99, l.AddedP50, pct(l.P50Ratio), pct(l.P99Ratio), l.Spread*100, l.N, l.Wrong)
	}
	w("")
}
