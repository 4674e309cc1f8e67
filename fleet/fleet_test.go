package fleet

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/procgate/procgate/internal/etcdtest"
	"github.com/procgate/procgate/policy"
)

const fleetDoc = `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: web
    allow:
      - to: 10.1.0.0/16
`

func overlay(app, to string) string {
	return fmt.Sprintf("version: 1\napps:\n  - name: %s\n    allow:\n      - to: %s\n", app, to)
}

func TestHostKeys(t *testing.T) {
	labels, err := ParseLabels("site=paris, role=db")
	if err != nil {
		t.Fatal(err)
	}
	got := Host{Name: "db-1", Labels: labels}.Keys()
	want := []string{
		"/procgate/policy/fleet",
		"/procgate/policy/groups/role=db", // label keys in order: role < site
		"/procgate/policy/groups/site=paris",
		"/procgate/policy/hosts/db-1",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("keys %q, want %q", got, want)
	}
	if StatusKey("db-1") != "/procgate/hosts/db-1/status" {
		t.Fatal(StatusKey("db-1"))
	}
}

func TestParseLabels(t *testing.T) {
	for _, tc := range []struct {
		in, err string
		n       int
	}{
		{"", "", 0},
		{"a=b", "", 1},
		{"a=b,c=d,", "", 2},
		{"a", "want key=value", 0},
		{"a/b=c", "want key=value", 0},
		{"a=b/c", "want key=value", 0},
		{"a=b,a=c", "given twice", 0},
	} {
		got, err := ParseLabels(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: err %v, want %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || len(got) != tc.n {
			t.Errorf("%q: %v, %v", tc.in, got, err)
		}
	}
	if CheckHostName("a/b") == nil || CheckHostName("web-1.example") != nil {
		t.Error("CheckHostName")
	}
}

func TestMerge(t *testing.T) {
	site, _ := ParseLabel("site=paris")
	snap := Snapshot{Docs: map[string][]byte{
		FleetKey:                              []byte(fleetDoc),
		GroupKey(site):                        []byte(overlay("web", "10.2.0.0/16")),
		"/procgate/policy/groups/site=london": []byte(overlay("london", "10.3.0.0/16")),
		HostKey("web-1"):                      []byte(overlay("web", "10.4.0.0/16")),
		HostKey("web-2"):                      []byte(overlay("other", "10.5.0.0/16")),
	}}
	rs, files, err := snap.Merge(Host{Name: "web-1", Labels: []Label{site}})
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, f := range files {
		paths = append(paths, f.Path)
	}
	if want := []string{FleetKey, GroupKey(site), HostKey("web-1")}; !slices.Equal(paths, want) {
		t.Fatalf("merged %q, want %q", paths, want)
	}
	var grants []string
	for _, g := range rs.App("web").Grants {
		grants = append(grants, g.Prefix.String())
	}
	// fleet < group < host, each overlay's grants after the ones before.
	if want := []string{"10.1.0.0/16", "10.2.0.0/16", "10.4.0.0/16"}; !slices.Equal(grants, want) {
		t.Fatalf("web grants %q, want %q", grants, want)
	}
	if len(rs.Apps) != 1 {
		t.Fatalf("apps %v: another group's or host's overlay was merged", rs.Apps)
	}

	// Errors name the document's key and line.
	snap.Docs[GroupKey(site)] = []byte("version: 1\napps:\n  - name: web\n    allow:\n      - to: 10.2.0.0/33\n")
	_, _, err = snap.Merge(Host{Name: "web-1", Labels: []Label{site}})
	var perr *policy.Errors
	if !errors.As(err, &perr) || !strings.Contains(err.Error(), GroupKey(site)+":5") {
		t.Fatalf("err %v: want it to name %s:5", err, GroupKey(site))
	}
	delete(snap.Docs, FleetKey)
	if _, _, err := snap.Merge(Host{Name: "web-1"}); !errors.Is(err, ErrNoFleet) {
		t.Fatalf("no fleet document: %v", err)
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return c
}

func startAgent(t *testing.T, cli *clientv3.Client, h Host, dir string) (*Agent, context.CancelFunc) {
	a := NewAgent(AgentOptions{Client: cli, Host: h, StateDir: dir, Version: "test", LeaseTTL: 2 * time.Second, Heartbeat: time.Second})
	c, cancel := context.WithCancel(ctx(t))
	done := make(chan struct{})
	go func() { defer close(done); a.Run(c) }()
	t.Cleanup(func() { cancel(); <-done })
	return a, func() { cancel(); <-done }
}

func next(t *testing.T, a *Agent) Snapshot {
	t.Helper()
	select {
	case s := <-a.Updates():
		return s
	case <-time.After(10 * time.Second):
		t.Fatal("no snapshot within 10s")
	}
	return Snapshot{}
}

// Two documents written together in one transaction, again and again: each
// snapshot is one revision, so they always agree.
func TestAgentAppliesWholeRevisions(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	h := Host{Name: "web-1"}
	write := func(n int) {
		_, err := cli.Txn(ctx(t)).Then(
			clientv3.OpPut(FleetKey, fleetDoc+fmt.Sprintf("# n=%d\n", n)),
			clientv3.OpPut(HostKey("web-1"), overlay("web", fmt.Sprintf("10.9.%d.0/24", n))+fmt.Sprintf("# n=%d\n", n)),
		).Commit()
		if err != nil {
			t.Fatal(err)
		}
	}
	write(0)
	a, _ := startAgent(t, cli, h, t.TempDir())
	s := next(t, a)
	const last = 50
	go func() {
		for n := 1; n <= last; n++ {
			write(n)
		}
	}()
	seen := 0
	for {
		fleet, host := string(s.Docs[FleetKey]), string(s.Docs[HostKey("web-1")])
		n := fleet[strings.LastIndex(fleet, "n="):]
		if !strings.HasSuffix(host, n) {
			t.Fatalf("revision %d mixes two writes: fleet %q, host %q", s.Revision, n, host)
		}
		seen++
		if n == fmt.Sprintf("n=%d\n", last) {
			break
		}
		s = next(t, a)
	}
	t.Logf("%d snapshots for %d writes", seen, last+1)
}

// A watch that starts past a compaction re-lists: the change made before
// the compaction is not lost.
func TestAgentRelistsAfterCompaction(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	if _, err := cli.Put(ctx(t), FleetKey, fleetDoc); err != nil {
		t.Fatal(err)
	}
	a := NewAgent(AgentOptions{Client: cli, Host: Host{Name: "h"}, StateDir: t.TempDir()})
	compacted := false
	a.beforeWatch = func(rev int64) {
		if compacted {
			return
		}
		compacted = true
		r, err := cli.Put(context.Background(), HostKey("h"), overlay("late", "10.7.0.0/16"))
		if err != nil {
			t.Error(err)
			return
		}
		if _, err := cli.Put(context.Background(), "/procgate/other", "x"); err != nil {
			t.Error(err)
		}
		if _, err := cli.Compact(context.Background(), r.Header.Revision+1); err != nil {
			t.Error(err)
		}
	}
	c, cancel := context.WithCancel(ctx(t))
	done := make(chan struct{})
	go func() { defer close(done); a.Run(c) }()
	defer func() { cancel(); <-done }()
	first := next(t, a)
	if _, ok := first.Docs[HostKey("h")]; ok {
		t.Fatal("the first list already has the late overlay")
	}
	s := next(t, a)
	if _, ok := s.Docs[HostKey("h")]; !ok {
		t.Fatalf("after the compaction: %v, want the overlay written before it", s.Docs)
	}
}

func TestPushChecksAndRefusesStaleBase(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	c := ctx(t)
	if _, err := Push(c, cli, Target{Host: "web-1"}, []byte(overlay("web", "10.4.0.0/16")), 0); !errors.Is(err, ErrNoFleet) {
		t.Fatalf("overlay without a fleet document: %v", err)
	}
	rev, err := Push(c, cli, Target{}, []byte(fleetDoc), 0)
	if err != nil {
		t.Fatal(err)
	}
	bad := []byte("version: 1\napps:\n  - name: web\n    allow:\n      - to: 10.2.0.0/33\n")
	site, _ := ParseLabel("site=paris")
	_, err = Push(c, cli, Target{Group: &site}, bad, 0)
	if err == nil || !strings.Contains(err.Error(), GroupKey(site)+":5") {
		t.Fatalf("bad overlay: %v, want an error at %s:5", err, GroupKey(site))
	}
	if r, _ := cli.Get(c, GroupKey(site)); len(r.Kvs) != 0 {
		t.Fatal("a refused overlay was written")
	}
	// Someone else pushes after our diff at rev: our base is stale.
	if _, err := Push(c, cli, Target{}, []byte(fleetDoc+"# theirs\n"), rev); err != nil {
		t.Fatal(err)
	}
	_, err = Push(c, cli, Target{}, []byte(fleetDoc+"# ours\n"), rev)
	if !errors.Is(err, ErrStale) {
		t.Fatalf("stale base: %v", err)
	}
	if r, _ := cli.Get(c, FleetKey); !strings.Contains(string(r.Kvs[0].Value), "theirs") {
		t.Fatal("the stale push overwrote the newer document")
	}
	// A fleet document that breaks an overlay already in etcd is refused.
	dbApp := "  - name: db\n    users: [nobody]\n    allow:\n      - to: 10.4.0.0/16\n"
	if _, err := Push(c, cli, Target{Host: "web-1"}, []byte("version: 1\napps:\n"+dbApp), 0); err != nil {
		t.Fatal(err)
	}
	_, err = Push(c, cli, Target{}, []byte(fleetDoc+dbApp), 0)
	if err == nil || !strings.Contains(err.Error(), HostKey("web-1")) {
		t.Fatalf("fleet document breaking an overlay: %v", err)
	}
	d, _, err := DiffDocument(c, cli, Target{}, []byte(fleetDoc+"# next\n"))
	if err != nil || !strings.Contains(d, "-# theirs") || !strings.Contains(d, "+# next") {
		t.Fatalf("diff %q, %v", d, err)
	}
}

func TestStatusDriftAndLease(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	c := ctx(t)
	if _, err := Push(c, cli, Target{}, []byte(fleetDoc), 0); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	a, stop := startAgent(t, cli, Host{Name: "web-1"}, dir)
	s := next(t, a)
	a.Applied(s, Outcome{Generation: 7})
	waitFor(t, "status with the revision", func() bool {
		o, err := FleetStatus(c, cli)
		return err == nil && len(o.Hosts) == 1 && o.Hosts[0].Revision == s.Revision && o.Hosts[0].Generation == 7 && !o.Hosts[0].Behind
	})
	// Another group's overlay: not this host's, so it is not behind.
	london, _ := ParseLabel("site=london")
	if _, err := Push(c, cli, Target{Group: &london}, []byte(overlay("web", "10.8.0.0/16")), 0); err != nil {
		t.Fatal(err)
	}
	if o, err := FleetStatus(c, cli); err != nil || o.Hosts[0].Behind || o.Newest <= o.Hosts[0].Newest {
		t.Fatalf("after another group's push: %+v, %v", o, err)
	}
	if lg, err := LoadLastGood(dir); err != nil || lg.Revision != s.Revision || string(lg.Docs[FleetKey]) != fleetDoc {
		t.Fatalf("last good %+v, %v", lg, err)
	}
	// A new push the host has not applied: it is behind.
	if _, err := Push(c, cli, Target{}, []byte(fleetDoc+"# 2\n"), 0); err != nil {
		t.Fatal(err)
	}
	s2 := next(t, a)
	a.Applied(s2, Outcome{Generation: 8, Err: errors.New("refused")})
	waitFor(t, "drift and the error", func() bool {
		o, _ := FleetStatus(c, cli)
		return len(o.Hosts) == 1 && o.Hosts[0].Behind && o.Hosts[0].Error == "refused" && o.Hosts[0].Revision == s.Revision
	})
	// A host that stops disappears with its lease.
	stop()
	waitFor(t, "the stopped host to disappear", func() bool {
		o, _ := FleetStatus(c, cli)
		return len(o.Hosts) == 0
	})
}

func TestFirstFallsBackToLastGood(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	dir := t.TempDir()
	a := NewAgent(AgentOptions{Client: cli, Host: Host{Name: "h"}, StateDir: dir})
	if _, _, err := a.First(ctx(t), 3*time.Second); err == nil {
		t.Fatal("no fleet document and nothing on disk: a policy")
	}
	if _, err := cli.Put(ctx(t), FleetKey, fleetDoc); err != nil {
		t.Fatal(err)
	}
	s, disk, err := a.First(ctx(t), 3*time.Second)
	if err != nil || disk {
		t.Fatalf("first %v from disk %v", err, disk)
	}
	a.Applied(s, Outcome{Generation: 1})
	srv.Stop()
	got, disk, err := a.First(ctx(t), time.Second)
	if err != nil || !disk || got.Revision != s.Revision || string(got.Docs[FleetKey]) != fleetDoc {
		t.Fatalf("etcd away: %+v from disk %v, %v", got, disk, err)
	}
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within 15s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A daemon told to stop while etcd is away stops: nothing waits on etcd
// past its context.
func TestAgentStopsWhileEtcdIsAway(t *testing.T) {
	srv := etcdtest.Start(t)
	if _, err := srv.Client(t).Put(ctx(t), FleetKey, fleetDoc); err != nil {
		t.Fatal(err)
	}
	cli, err := Config{Endpoints: []string{srv.Endpoint}}.Client()
	if err != nil {
		t.Fatal(err)
	}
	a := NewAgent(AgentOptions{Client: cli, Host: Host{Name: "h"}, StateDir: t.TempDir(), LeaseTTL: 2 * time.Second})
	c, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); a.Run(c); cli.Close() }()
	next(t, a)
	srv.Stop()
	time.Sleep(3 * time.Second) // past the lease: the agent retries
	start := time.Now()
	cancel()
	select {
	case <-done:
		t.Logf("stopped in %v", time.Since(start))
	case <-time.After(5 * time.Second):
		t.Fatal("the agent and its client did not stop within 5s of the cancel")
	}
}
