package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/fleet"
	"github.com/procgate/procgate/internal/etcdtest"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/probe"
	"github.com/procgate/procgate/pki"
	"github.com/procgate/procgate/policy"
)

const fleetPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: db
    allow:
      - to: 10.1.2.0/24
        proto: tcp
        ports: [5432]
`

func dbOverlay(to string) string {
	return "version: 1\napps:\n  - name: db\n    allow:\n      - to: " + to + "\n"
}

// etcdUnderTest is the test's etcd: one member (etcdtest.Start) or a
// cluster (etcdtest.StartCluster).
type etcdUnderTest interface {
	Endpoints() []string
	Client(testing.TB) *clientv3.Client
}

// fleetCLI runs `procgate ARGS` with the etcd of the test in the
// environment, FILE arguments written from docs first.
func fleetCLI(t *testing.T, etcd etcdUnderTest, docs map[string]string, args ...string) (string, error) {
	t.Helper()
	return fleetCLIWith(t, etcd, nil, docs, args...)
}

// fleetCLIWith is fleetCLI with more environment (PROCGATE_ETCD_CERT...).
func fleetCLIWith(t *testing.T, etcd etcdUnderTest, env []string, docs map[string]string, args ...string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	for name, text := range docs {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, args...)
	cmd.Dir = dir
	cmd.Env = append(append(os.Environ(), envAsMain+"=1", "PROCGATE_ETCD_ENDPOINTS="+strings.Join(etcd.Endpoints(), ",")), env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func mustPush(t *testing.T, etcd etcdUnderTest, text string, args ...string) {
	t.Helper()
	out, err := fleetCLI(t, etcd, map[string]string{"doc.yaml": text}, append([]string{"policy", "push", "doc.yaml"}, args...)...)
	if err != nil {
		t.Fatalf("policy push %v: %v\n%s", args, err, out)
	}
}

// waitHost waits for web-1's status in etcd to satisfy ok.
func waitHost(t *testing.T, e *e2e, etcd etcdUnderTest, what string, ok func(fleet.HostState) bool) fleet.HostState {
	t.Helper()
	cli := etcd.Client(t)
	deadline := time.Now().Add(20 * time.Second)
	var last fleet.HostState
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		o, err := fleet.FleetStatus(ctx, cli)
		cancel()
		if err == nil {
			for _, h := range o.Hosts {
				if h.Host == "web-1" {
					if last = h; ok(h) {
						return h
					}
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("web-1's status in etcd: no %s within 20s; last %+v\n%s", what, last, e.daemonLog())
	return last
}

func TestFleetPolicyFromEtcd(t *testing.T) {
	nstest.RequireRoot(t)
	etcd := etcdtest.Start(t)
	mustPush(t, etcd, fleetPolicy)
	e := newE2EWith(t, basePolicy, false, "--policy-store", "etcd", "--etcd-endpoints", etcd.Endpoint,
		"--host-name", "web-1", "--host-labels", "site=paris,role=db", "--etcd-boot-timeout", "1s")
	db := e.prober("db")
	mustTry(t, db, "10.1.2.3:5432/tcp", probe.Allowed)
	mustTry(t, db, "10.1.2.3:5433/tcp", probe.Denied)
	mustTry(t, db, "10.3.0.1:80/tcp", probe.Denied)
	st := waitHost(t, e, etcd, "applied revision", func(h fleet.HostState) bool {
		return h.Revision > 0 && h.Source == fleet.SourceEtcd && !h.Behind
	})
	if gen := e.status().Generation; st.Generation != gen {
		t.Fatalf("status generation %d, daemon's %d", st.Generation, gen)
	}

	t.Run("group and host overlays", func(t *testing.T) {
		gen := e.status().Generation
		mustPush(t, etcd, dbOverlay("10.3.0.0/16"), "--group", "site=paris")
		e.waitGeneration(gen, "the site=paris overlay")
		mustTry(t, db, "10.3.0.1:80/tcp", probe.Allowed)
		mustPush(t, etcd, dbOverlay("10.5.0.0/16"), "--group", "site=london") // not this host's
		gen = e.status().Generation
		mustPush(t, etcd, dbOverlay("10.4.0.0/16"), "--host", "web-1")
		e.waitGeneration(gen, "the host overlay")
		mustTry(t, db, "10.4.0.1:80/tcp", probe.Allowed)
		mustTry(t, db, "10.5.0.1:80/tcp", probe.Denied)
		s := e.status()
		if want := []string{fleet.GroupPrefix + "site=paris", fleet.HostPrefix + "web-1"}; !slices.Equal(s.PolicyDropins, want) {
			t.Fatalf("merged %q, want %q", s.PolicyDropins, want)
		}
		waitHost(t, e, etcd, "the host overlay's generation", func(h fleet.HostState) bool {
			return h.Generation == s.Generation && !h.Behind
		})
	})

	t.Run("a bad document written around push is refused", func(t *testing.T) {
		cli := etcd.Client(t)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		gen := e.status().Generation
		if _, err := cli.Put(ctx, fleet.HostKey("web-1"), dbOverlay("10.4.0.0/33")); err != nil {
			t.Fatal(err)
		}
		h := waitHost(t, e, etcd, "error", func(h fleet.HostState) bool { return h.Error != "" })
		if !strings.Contains(h.Error, fleet.HostKey("web-1")+":5") || !h.Behind {
			t.Fatalf("status %+v: want the error at %s:5 and the host behind", h, fleet.HostKey("web-1"))
		}
		if s := e.status(); s.Generation != gen || !strings.Contains(s.LastError, "10.4.0.0/33") {
			t.Fatalf("generation %d (was %d), last error %q", s.Generation, gen, s.LastError)
		}
		mustTry(t, db, "10.4.0.1:80/tcp", probe.Allowed)
		out, err := fleetCLI(t, etcd, nil, "fleet", "status")
		if err == nil || !strings.Contains(out, "BEHIND") || !strings.Contains(out, "web-1") {
			t.Fatalf("fleet status with a host behind: %v\n%s", err, out)
		}
		mustPush(t, etcd, dbOverlay("10.4.0.0/16"), "--host", "web-1")
		waitHost(t, e, etcd, "recovery", func(h fleet.HostState) bool { return h.Error == "" && !h.Behind })
		out, err = fleetCLI(t, etcd, nil, "fleet", "status", "--json")
		var o fleet.Overview
		if err != nil || json.Unmarshal([]byte(out), &o) != nil || len(o.Hosts) != 1 || o.Hosts[0].Behind {
			t.Fatalf("fleet status --json: %v\n%s", err, out)
		}
	})

	t.Run("a stale base is refused", func(t *testing.T) {
		out, err := fleetCLI(t, etcd, map[string]string{"f.yaml": fleetPolicy + "# stale\n"}, "policy", "push", "f.yaml", "--base", "1")
		if err == nil || !strings.Contains(out, "stale base") {
			t.Fatalf("push on a stale base: %v\n%s", err, out)
		}
		out, err = fleetCLI(t, etcd, map[string]string{"f.yaml": fleetPolicy + "# next\n"}, "policy", "diff", "f.yaml")
		if err != nil || !strings.Contains(out, "+# next") {
			t.Fatalf("policy diff: %v\n%s", err, out)
		}
	})

	t.Run("a burst of revisions: each applied whole", func(t *testing.T) {
		cli := etcd.Client(t)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		statuses := cli.Watch(ctx, fleet.StatusKey("web-1"))
		// The fleet document and the host overlay change together, in one
		// transaction per step: a policy merged from two revisions would
		// hash to the documents of neither.
		const steps = 20
		var last int64
		for n := 1; n <= steps; n++ {
			port := strconv.Itoa(1000 + n)
			fleetDoc := fleetPolicy + "      - to: 10.7.0.0/16\n        ports: [" + port + "]\n"
			hostDoc := dbOverlay("10.4.0.0/16") + "      - to: 10.8.0.0/16\n        ports: [" + port + "]\n"
			r, err := cli.Txn(ctx).Then(clientv3.OpPut(fleet.FleetKey, fleetDoc), clientv3.OpPut(fleet.HostKey("web-1"), hostDoc)).Commit()
			if err != nil {
				t.Fatal(err)
			}
			last = r.Header.Revision
		}
		host := fleet.Host{Name: "web-1", Labels: []fleet.Label{{Key: "role", Value: "db"}, {Key: "site", Value: "paris"}}}
		genOf := map[int64]uint32{}
		var prevGen uint32
		for seen := int64(0); seen < last; {
			var wr clientv3.WatchResponse
			select {
			case wr = <-statuses:
			case <-ctx.Done():
				t.Fatalf("the daemon did not report revision %d:\n%s", last, e.daemonLog())
			}
			for _, ev := range wr.Events {
				var st fleet.Status
				if ev.Kv == nil || json.Unmarshal(ev.Kv.Value, &st) != nil {
					continue
				}
				if st.Error != "" {
					t.Fatalf("revision %d refused: %s", st.ErrorRevision, st.Error)
				}
				// Only the revisions of the burst: the documents at each.
				resp, err := cli.Txn(ctx).Then(
					clientv3.OpGet(fleet.FleetKey, clientv3.WithRev(st.Revision)),
					clientv3.OpGet(fleet.GroupKey(host.Labels[1]), clientv3.WithRev(st.Revision)),
					clientv3.OpGet(fleet.HostKey("web-1"), clientv3.WithRev(st.Revision)),
				).Commit()
				if err != nil {
					t.Fatal(err)
				}
				snap := fleet.Snapshot{Docs: map[string][]byte{}}
				for _, r := range resp.Responses {
					for _, kv := range r.GetResponseRange().GetKvs() {
						snap.Docs[string(kv.Key)] = kv.Value
					}
				}
				files, err := snap.Files(host)
				if err != nil {
					t.Fatal(err)
				}
				if want := policy.Hash(files); st.PolicySHA256 != want {
					t.Fatalf("generation %d reported at revision %d has policy %s; the documents of that revision hash to %s", st.Generation, st.Revision, st.PolicySHA256, want)
				}
				if g, ok := genOf[st.Revision]; ok && g != st.Generation {
					t.Fatalf("revision %d applied as generations %d and %d", st.Revision, g, st.Generation)
				}
				if st.Generation < prevGen {
					t.Fatalf("generation went back from %d to %d", prevGen, st.Generation)
				}
				genOf[st.Revision], prevGen = st.Generation, st.Generation
				seen = max(seen, st.Revision)
			}
		}
		t.Logf("%d writes applied as %d reported revisions", steps, len(genOf))
		mustTry(t, db, "10.7.0.1:1020/tcp", probe.Allowed)
		mustTry(t, db, "10.8.0.1:1020/tcp", probe.Allowed)
		mustTry(t, db, "10.7.0.1:1019/tcp", probe.Denied)
	})

	t.Run("etcd away: enforcing, and booting from the last good policy", func(t *testing.T) {
		etcd.Stop()
		mustTry(t, db, "10.4.0.1:80/tcp", probe.Allowed)
		mustTry(t, db, "10.6.0.1:80/tcp", probe.Denied)
		e.stopDaemon(syscall.SIGTERM)
		e.startDaemon()
		s := e.status()
		if s.Fleet == nil || s.Fleet.Source != fleet.SourceLastGood || s.Fleet.Connected {
			t.Fatalf("booted without etcd: fleet %+v, want source %s", s.Fleet, fleet.SourceLastGood)
		}
		if out, err := e.procgate("status"); err != nil || !strings.Contains(out, "revision "+strconv.FormatInt(s.Fleet.Revision, 10)+" STALE") || !strings.Contains(out, "ETCD UNREACHABLE") {
			t.Fatalf("status without etcd: %v\n%s", err, out)
		}
		mustTry(t, db, "10.4.0.1:80/tcp", probe.Allowed)
		mustTry(t, db, "10.3.0.1:80/tcp", probe.Allowed)
		mustTry(t, db, "10.6.0.1:80/tcp", probe.Denied)
		etcd.Restart()
		deadline := time.Now().Add(20 * time.Second)
		for s = e.status(); s.Fleet.Source != fleet.SourceEtcd || !s.Fleet.Connected; s = e.status() {
			if time.Now().After(deadline) {
				t.Fatalf("20s after etcd came back: %+v\n%s", s.Fleet, e.daemonLog())
			}
			time.Sleep(50 * time.Millisecond)
		}
		// The restarted daemon's report (not the stopped one's, whose
		// lease may still run).
		waitHost(t, e, etcd, "source etcd after etcd came back", func(h fleet.HostState) bool {
			return h.Source == fleet.SourceEtcd && !h.Behind && h.Generation == s.Generation
		})
	})
}

// A daemon behind a link to a 3-member cluster: cut off, it keeps the
// policy in force; restarted while cut off, it boots from the last good
// policy on disk; when the link comes back it applies what was pushed
// meanwhile.
func TestFleetClusterPartition(t *testing.T) {
	nstest.RequireRoot(t)
	cluster := etcdtest.StartCluster(t, 3)
	link := cluster.Link(t)
	mustPush(t, cluster, fleetPolicy)
	e := newE2EWith(t, basePolicy, false, "--policy-store", "etcd", "--etcd-endpoints", strings.Join(link.Endpoints(), ","),
		"--host-name", "web-1", "--etcd-boot-timeout", "1s")
	db := e.prober("db")
	first := waitHost(t, e, cluster, "applied revision", func(h fleet.HostState) bool { return h.Revision > 0 && !h.Behind })
	mustTry(t, db, "10.1.2.3:5432/tcp", probe.Allowed)
	mustTry(t, db, "10.9.0.1:80/tcp", probe.Denied)

	link.Cut()
	mustPush(t, cluster, fleetPolicy+"      - to: 10.9.0.0/16\n")
	waitFleet(t, e, "etcd unreachable", func(f *api.FleetSource) bool { return !f.Connected })
	mustTry(t, db, "10.1.2.3:5432/tcp", probe.Allowed)
	mustTry(t, db, "10.9.0.1:80/tcp", probe.Denied)
	if f := e.status().Fleet; f.Revision != first.Revision || f.Source != fleet.SourceEtcd {
		t.Fatalf("cut off: %+v, want revision %d from etcd", f, first.Revision)
	}

	e.stopDaemon(syscall.SIGTERM)
	e.startDaemon()
	if f := e.status().Fleet; f.Source != fleet.SourceLastGood || f.Connected || f.Revision != first.Revision {
		t.Fatalf("booted cut off: %+v, want revision %d from %s", f, first.Revision, fleet.SourceLastGood)
	}
	mustTry(t, db, "10.1.2.3:5432/tcp", probe.Allowed)
	mustTry(t, db, "10.9.0.1:80/tcp", probe.Denied)

	if err := link.Restore(); err != nil {
		t.Fatal(err)
	}
	waitFleet(t, e, "the push made while cut off", func(f *api.FleetSource) bool {
		return f.Connected && f.Source == fleet.SourceEtcd && f.Revision > first.Revision
	})
	mustTry(t, db, "10.9.0.1:80/tcp", probe.Allowed)
	waitHost(t, e, cluster, "the host caught up", func(h fleet.HostState) bool {
		return h.Revision > first.Revision && !h.Behind && h.Source == fleet.SourceEtcd
	})
}

// waitFleet waits until the daemon's fleet status satisfies ok.
func waitFleet(t *testing.T, e *e2e, what string, ok func(*api.FleetSource) bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		f := e.status().Fleet
		if f != nil && ok(f) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s within 30s: %+v\n%s", what, f, e.daemonLog())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// listenIn makes a link's sockets inside the network namespace ns, so
// that a daemon there reaches the test's etcd on 127.0.0.1.
func listenIn(t *testing.T, ns string) etcdtest.Listen {
	return func(addr string) (ln net.Listener, err error) {
		ierr := nstest.InNS(t, ns, func() error {
			ln, err = net.Listen("tcp", addr)
			return err
		})
		return ln, errors.Join(ierr, err)
	}
}

// fleetHost is a daemon of the revocation test: in its own namespace (the
// sweep of live sockets walks the daemon's), reaching etcd through a link.
type fleetHost struct {
	e       *e2e
	link    *etcdtest.Link
	db, oth *probe.Holder
	name    string
}

// revoked is what the daemon's status says is revoked from app.
func (h *fleetHost) revoked(app string) []string {
	for _, a := range h.e.status().Apps {
		if a.Name == app {
			return a.Revoked
		}
	}
	return nil
}

// waitRevoked waits until the daemon reports want revoked from db.
func (h *fleetHost) waitRevoked(t *testing.T, want []string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for got := h.revoked("db"); !slices.Equal(got, want); got = h.revoked("db") {
		if time.Now().After(deadline) {
			t.Fatalf("%s: db revoked %q, want %q within 30s\n%s", h.name, got, want, h.e.daemonLog())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A fleet-wide revoke reaches two daemons through etcd: each ends db's
// live sockets (and not another app's) and denies its new attempts; a host
// that boots cut off from etcd keeps the revocation from its last good
// policy; restore gives the grants back on every host.
func TestFleetRevoke(t *testing.T) {
	nstest.RequireRoot(t)
	etcd := etcdtest.Start(t)
	mustPush(t, etcd, basePolicy)
	var hosts []*fleetHost
	for i := range 2 {
		ns := nstest.NetNS(t)
		nstest.AnyIPLoopback(t, ns)
		link := etcdtest.NewLink(t, etcd.Endpoints(), listenIn(t, ns))
		h := &fleetHost{link: link, name: fmt.Sprintf("web-%d", i+1)}
		h.e = newE2EIn(t, basePolicy, ns, true, "--policy-store", "etcd", "--etcd-endpoints", strings.Join(link.Endpoints(), ","),
			"--host-name", h.name, "--etcd-boot-timeout", "1s", "--poll", "1h")
		holder := func(dir string) *probe.Holder {
			hd, err := probe.StartHolder(dir, ns)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { hd.Close() })
			return hd
		}
		servers := holder(nstest.ChildCgroup(t, h.e.cgroup, "servers"))
		for _, a := range []string{"0.0.0.0:5432", "0.0.0.0:53/udp"} {
			if _, err := servers.Listen("serve", a); err != nil {
				t.Fatal(err)
			}
		}
		h.db = holder(filepath.Join(h.e.cgroup, "procgate.apps", "db"))
		h.oth = holder(filepath.Join(h.e.cgroup, "procgate.apps", "other"))
		if err := h.db.Open("tcp4", "10.1.2.3:5432/tcp", probe.Connect, 2); err != nil {
			t.Fatal(err)
		}
		if err := h.oth.Open("udp4", "10.9.0.1:53/udp", probe.Connect, 1); err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, h)
	}

	out, err := fleetCLI(t, etcd, nil, "revoke", "--app", "db", "--fleet")
	if err != nil || !strings.Contains(out, "db: all grants revoked on every host") {
		t.Fatalf("revoke --fleet: %v\n%s", err, out)
	}
	for _, h := range hosts {
		h.waitRevoked(t, []string{"fleet:all"})
		if err := h.db.Expect("tcp4", 2, true); err != nil {
			t.Errorf("%s: %v", h.name, err)
		}
		if err := h.oth.Expect("udp4", 1, false); err != nil {
			t.Errorf("%s: %v", h.name, err)
		}
		mustTry(t, h.e.prober("db"), "10.1.2.3:5432/tcp", probe.Denied)
	}
	cli := etcd.Client(t)
	waitStatus := func(what string, ok func(fleet.Overview) bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			o, err := fleet.FleetStatus(ctx, cli)
			cancel()
			if err == nil && ok(o) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("fleet status: no %s within 30s: %+v, %v", what, o, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitStatus("both hosts at the revocation", func(o fleet.Overview) bool {
		return len(o.Hosts) == 2 && !o.Hosts[0].Behind && !o.Hosts[1].Behind && o.Hosts[0].Revision == o.Newest
	})

	// web-1 reboots cut off: the revocation holds from its last good
	// policy, and the restore reaches it when the link is back.
	cut := hosts[0]
	cut.link.Cut()
	cut.e.stopDaemon(syscall.SIGTERM)
	cut.e.startDaemon()
	if f := cut.e.status().Fleet; f.Source != fleet.SourceLastGood {
		t.Fatalf("booted cut off: %+v", f)
	}
	cut.waitRevoked(t, []string{"fleet:all"})
	mustTry(t, cut.e.prober("db"), "10.1.2.3:5432/tcp", probe.Denied)

	if out, err := fleetCLI(t, etcd, nil, "revoke", "--app", "db", "--fleet", "--restore"); err != nil {
		t.Fatalf("revoke --fleet --restore: %v\n%s", err, out)
	}
	hosts[1].waitRevoked(t, nil)
	mustTry(t, hosts[1].e.prober("db"), "10.1.2.3:5432/tcp", probe.Allowed)
	mustTry(t, cut.e.prober("db"), "10.1.2.3:5432/tcp", probe.Denied)
	if err := cut.link.Restore(); err != nil {
		t.Fatal(err)
	}
	cut.waitRevoked(t, nil)
	mustTry(t, cut.e.prober("db"), "10.1.2.3:5432/tcp", probe.Allowed)

	// A local revoke and the fleet's add up; a local restore gives back
	// only the local one.
	if out, err := hosts[1].e.procgate("revoke", "--app", "db", "--grant", "1"); err != nil {
		t.Fatalf("local revoke: %v\n%s", err, out)
	}
	if out, err := fleetCLI(t, etcd, nil, "revoke", "--app", "db", "--fleet", "--grant", "0"); err != nil {
		t.Fatalf("revoke --fleet --grant 0: %v\n%s", err, out)
	}
	hosts[1].waitRevoked(t, []string{"#1", "fleet:#0"})
	if out, err := hosts[1].e.procgate("revoke", "--app", "db", "--restore"); err != nil {
		t.Fatalf("local restore: %v\n%s", err, out)
	}
	hosts[1].waitRevoked(t, []string{"fleet:#0"})
	mustTry(t, hosts[1].e.prober("db"), "10.1.2.3:5432/tcp", probe.Denied)
}

// With etcd's authentication on and a user per host (set up by `procgate
// fleet rbac`), a host reads its own documents and no other host's, and
// its daemon works with its certificate's user: it applies its documents,
// reports its status and applies a fleet-wide revoke.
func TestFleetRBAC(t *testing.T) {
	nstest.RequireRoot(t)
	dir := t.TempDir()
	if _, err := pki.Init(dir, "etcd-ca", 0); err != nil {
		t.Fatal(err)
	}
	ca := filepath.Join(dir, pki.CACertFile)
	issue := func(name string, u pki.Usage, hosts ...string) (string, string) {
		t.Helper()
		cert, key, err := pki.IssueFiles(dir, pki.IssueRequest{Name: name, Usage: u, Hosts: hosts})
		if err != nil {
			t.Fatal(err)
		}
		return cert, key
	}
	srvCert, srvKey := issue("etcd", pki.Server, "127.0.0.1")
	etcd := etcdtest.StartTLS(t, etcdtest.TLSFiles{CA: ca, Cert: srvCert, Key: srvKey})
	certs := map[string][2]string{}
	client := func(user string) *clientv3.Client {
		t.Helper()
		cli, err := fleet.Config{Endpoints: etcd.Endpoints(), CA: ca, Cert: certs[user][0], Key: certs[user][1]}.Client()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cli.Close() })
		return cli
	}
	as := func(user string) []string {
		return []string{"PROCGATE_ETCD_CA=" + ca, "PROCGATE_ETCD_CERT=" + certs[user][0], "PROCGATE_ETCD_KEY=" + certs[user][1]}
	}
	for _, u := range []string{"root", "admin", "web-1", "web-2"} {
		cert, key := issue(u, pki.Client)
		certs[u] = [2]string{cert, key}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	root := client("root")
	if _, err := root.UserAddWithOptions(ctx, "root", "", &clientv3.UserAddOptions{NoPassword: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := root.UserGrantRole(ctx, "root", "root"); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"--admin", "admin"},
		{"--host", "web-1", "--host-labels", "site=paris"},
		{"--host", "web-2", "--host-labels", "site=london"},
		{"--host", "web-2", "--host-labels", "site=london"}, // again: nothing changes
	} {
		if out, err := fleetCLIWith(t, etcd, as("root"), nil, append([]string{"fleet", "rbac"}, args...)...); err != nil {
			t.Fatalf("fleet rbac %v: %v\n%s", args, err, out)
		}
	}
	out, err := fleetCLI(t, etcd, nil, "fleet", "rbac", "--host", "web-1", "--host-labels", "site=paris", "--print")
	if err != nil || !strings.Contains(out, "etcdctl role grant-permission procgate-host-web-1 read /procgate/policy/hosts/web-1\n") {
		t.Fatalf("fleet rbac --print: %v\n%s", err, out)
	}
	if _, err := root.AuthEnable(ctx); err != nil {
		t.Fatal(err)
	}

	admin := as("admin")
	for _, push := range []struct{ doc, target, value string }{
		{doc: fleetPolicy},
		{doc: dbOverlay("10.3.0.0/16"), target: "--group", value: "site=paris"},
		{doc: dbOverlay("10.5.0.0/16"), target: "--group", value: "site=london"},
		{doc: dbOverlay("10.4.0.0/16"), target: "--host", value: "web-1"},
		{doc: dbOverlay("10.6.0.0/16"), target: "--host", value: "web-2"},
	} {
		args := []string{"policy", "push", "doc.yaml"}
		if push.target != "" {
			args = append(args, push.target, push.value)
		}
		if out, err := fleetCLIWith(t, etcd, admin, map[string]string{"doc.yaml": push.doc}, args...); err != nil {
			t.Fatalf("push %v as admin: %v\n%s", args, err, out)
		}
	}
	if out, err := fleetCLIWith(t, etcd, as("web-1"), map[string]string{"doc.yaml": fleetPolicy}, "policy", "push", "doc.yaml"); err == nil {
		t.Fatalf("web-1 pushed the fleet document:\n%s", out)
	}

	web1 := client("web-1")
	for _, tc := range []struct {
		what string
		op   clientv3.Op
		ok   bool
	}{
		{"read its own overlay", clientv3.OpGet(fleet.HostKey("web-1")), true},
		{"read the fleet document", clientv3.OpGet(fleet.FleetKey), true},
		{"read its group's overlay", clientv3.OpGet(fleet.GroupPrefix + "site=paris"), true},
		{"read the revocations", clientv3.OpGet(fleet.RevokePrefix, clientv3.WithPrefix()), true},
		{"write its status", clientv3.OpPut(fleet.StatusKey("web-1"), "{}"), true},
		{"read web-2's overlay", clientv3.OpGet(fleet.HostKey("web-2")), false},
		{"read another group's overlay", clientv3.OpGet(fleet.GroupPrefix + "site=london"), false},
		{"list the policy documents", clientv3.OpGet(fleet.PolicyPrefix, clientv3.WithPrefix()), false},
		{"write its own overlay", clientv3.OpPut(fleet.HostKey("web-1"), dbOverlay("0.0.0.0/0")), false},
		{"write web-2's status", clientv3.OpPut(fleet.StatusKey("web-2"), "{}"), false},
		{"revoke fleet-wide", clientv3.OpPut(fleet.RevokeKey("db"), `{"all":true}`), false},
		{"read the perimeter's holes", clientv3.OpGet("/procgate/perimeter/", clientv3.WithPrefix()), false},
	} {
		_, err := web1.Do(ctx, tc.op)
		if denied := errors.Is(rpctypes.Error(err), rpctypes.ErrPermissionDenied); tc.ok != (err == nil) || (!tc.ok && !denied) {
			t.Errorf("web-1 may %s: %v, want allowed %v", tc.what, err, tc.ok)
		}
	}

	e := newE2EWith(t, basePolicy, false, "--policy-store", "etcd", "--etcd-endpoints", etcd.Endpoint,
		"--etcd-ca", ca, "--etcd-cert", certs["web-1"][0], "--etcd-key", certs["web-1"][1],
		"--host-name", "web-1", "--host-labels", "site=paris", "--etcd-boot-timeout", "10s")
	if f := e.status().Fleet; f.Source != fleet.SourceEtcd {
		t.Fatalf("web-1 booted from %s, not etcd:\n%s", f.Source, e.daemonLog())
	}
	db := e.prober("db")
	mustTry(t, db, "10.1.2.3:5432/tcp", probe.Allowed) // the fleet document
	mustTry(t, db, "10.3.0.1:80/tcp", probe.Allowed)   // its group
	mustTry(t, db, "10.4.0.1:80/tcp", probe.Allowed)   // its own
	mustTry(t, db, "10.5.0.1:80/tcp", probe.Denied)    // another group's
	mustTry(t, db, "10.6.0.1:80/tcp", probe.Denied)    // web-2's
	adminCli := client("admin")
	waitAs := func(what string, ok func(fleet.HostState) bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			o, err := fleet.FleetStatus(ctx, adminCli)
			if err == nil && len(o.Hosts) == 1 && ok(o.Hosts[0]) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("fleet status as admin: no %s within 30s: %+v, %v\n%s", what, o, err, e.daemonLog())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitAs("web-1's status", func(h fleet.HostState) bool { return h.Host == "web-1" && !h.Behind && h.Error == "" })
	if out, err := fleetCLIWith(t, etcd, admin, nil, "revoke", "--app", "db", "--fleet"); err != nil {
		t.Fatalf("revoke --fleet as admin: %v\n%s", err, out)
	}
	waitAs("web-1 at the revocation", func(h fleet.HostState) bool { return !h.Behind && h.Error == "" })
	mustTry(t, db, "10.4.0.1:80/tcp", probe.Denied)
}
