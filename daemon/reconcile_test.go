package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/ruleset"
)

// fakeEnforcer stands in for bpf.Enforcer: it numbers generations as the
// kernel's policy_current would and remembers what it was given. Apply can
// be made to fail, or to wait until the test lets it go.
type fakeEnforcer struct {
	mu      sync.Mutex
	gen     uint32 // the generation in force (pinned, when adopted)
	applied []bpf.Generation
	fail    error
	// entered, when set, has a value once Apply began; Apply then waits
	// for release.
	entered, release chan struct{}
	// inApply counts Applies running at once: more than one is a bug of
	// the daemon (bpf.Enforcer.Apply is not safe for concurrent use).
	inApply, overlapped atomic.Int32
	sweeps              int
	// counted are the ids Counters was last asked about.
	counted []uint32
}

func (f *fakeEnforcer) Apply(g bpf.Generation) (uint32, error) {
	if f.inApply.Add(1) > 1 {
		f.overlapped.Add(1)
	}
	defer f.inApply.Add(-1)
	// Let any other goroutine in, as the kernel's map writes would: one
	// that applies too is then caught in the act.
	for range 10 {
		runtime.Gosched()
	}
	f.mu.Lock()
	entered, release, fail := f.entered, f.release, f.fail
	f.mu.Unlock()
	if entered != nil {
		entered <- struct{}{}
		<-release
	}
	if fail != nil {
		return 0, fail
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.gen++
	f.applied = append(f.applied, g)
	return f.gen, nil
}

func (f *fakeEnforcer) Matched() map[string]int { return map[string]int{} }

func (f *fakeEnforcer) Sweep(bpf.SweepOptions) (bpf.SweepResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sweeps++
	return bpf.SweepResult{}, nil
}

func (f *fakeEnforcer) Counters(ids []uint32) (map[uint32][bpf.NumCounts]uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.counted = slices.Clone(ids)
	out := map[uint32][bpf.NumCounts]uint64{}
	for _, id := range ids {
		var c [bpf.NumCounts]uint64
		c[bpf.CountAllow] = uint64(id) // to tell whose answer went where
		out[id] = c
	}
	return out, nil
}
func (f *fakeEnforcer) Attached() map[string]bool { return map[string]bool{} }
func (f *fakeEnforcer) Guards() []bpf.Guard       { return nil }
func (f *fakeEnforcer) Handover() (bpf.HandoverStats, bool, error) {
	return bpf.HandoverStats{}, false, nil
}
func (f *fakeEnforcer) Learned() []ruleset.Learned { return nil }
func (f *fakeEnforcer) KeepTracker(string) error   { return nil }
func (f *fakeEnforcer) Learn([]ruleset.Learned, int) (refused, evicted []ruleset.Learned, err error) {
	return nil, nil, nil
}
func (f *fakeEnforcer) ExpireLearned(time.Time) (int, error) { return 0, nil }
func (f *fakeEnforcer) RedirectOf(ruleset.Proto, netip.AddrPort, netip.AddrPort) (bpf.Redirected, error) {
	return bpf.Redirected{}, errors.New("no redirect")
}
func (f *fakeEnforcer) ServeDNS(uint16, uint64) error { return nil }
func (f *fakeEnforcer) ForgetDNSProxies() error       { return nil }

// appliedCount is how many generations the fake took.
func (f *fakeEnforcer) appliedCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.applied)
}

// block makes the next Applies wait; the returned channel has a value
// once one began, and unblock lets them all go.
func (f *fakeEnforcer) block() (entered <-chan struct{}, unblock func()) {
	e, r := make(chan struct{}), make(chan struct{})
	f.mu.Lock()
	f.entered, f.release = e, r
	f.mu.Unlock()
	var once sync.Once
	return e, func() {
		once.Do(func() {
			f.mu.Lock()
			f.entered, f.release = nil, nil
			f.mu.Unlock()
			close(r)
		})
	}
}

func (f *fakeEnforcer) setFail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = err
}

// testDaemon is a daemon over a fake enforcer, started as Run starts one
// (state dir, first policy, reconciler), without root: no cgroups, no
// bpffs, no socket.
type testDaemon struct {
	*Daemon
	t      *testing.T
	enf    *fakeEnforcer
	cancel context.CancelFunc
	done   chan struct{}
}

// startTestDaemon starts a daemon on dir's policy.yaml and state dir, as
// a restart over enf's pinned generation when enf.gen > 0; configure
// changes its Config.
func startTestDaemon(t *testing.T, dir string, enf *fakeEnforcer, configure ...func(*Config)) *testDaemon {
	t.Helper()
	cfg := Config{PolicyPath: filepath.Join(dir, "policy.yaml"), StateDir: filepath.Join(dir, "state"),
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	for _, c := range configure {
		c(&cfg)
	}
	if err := cfg.setDefaults(); err != nil {
		t.Fatal(err)
	}
	d := newDaemon(cfg)
	d.enf, d.adopted = enf, enf.gen > 0
	d.appDirs.Base = filepath.Join(dir, "cgroup", AppsDir)
	var next atomic.Uint64
	d.bindApp = func(app string) (bpf.Binding, error) {
		return bpf.Binding{App: app, CgroupID: 1000 + next.Add(1), Level: 2}, nil
	}
	if err := d.openStateDir(); err != nil {
		t.Fatal(err)
	}
	rs, hash, dropins, err := loadPolicy(cfg.PolicyPath, d.log)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.install(rs, hash, dropins); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	td := &testDaemon{Daemon: d, t: t, enf: enf, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(td.done)
		d.reconcile(ctx, inputs{})
	}()
	t.Cleanup(td.stop)
	return td
}

// stop ends the reconciler and waits for it.
func (td *testDaemon) stop() {
	td.cancel()
	<-td.done
}

func writePolicy(t *testing.T, dir, y string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "policy.yaml"), []byte(y), 0o644); err != nil {
		t.Fatal(err)
	}
}

// appsPolicy grants each app 10.1.2.0/24:5432 (grant #0) and
// 10.9.0.0/16:443 (grant #1).
func appsPolicy(apps ...string) string {
	y := "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n"
	for _, a := range apps {
		y += "  - name: " + a + "\n    allow:\n      - to: 10.1.2.0/24\n        ports: [5432]\n      - to: 10.9.0.0/16\n        ports: [443]\n"
	}
	return y
}

// startOnApps starts a test daemon, fresh, on appsPolicy(apps...).
func startOnApps(t *testing.T, apps ...string) (string, *fakeEnforcer, *testDaemon) {
	t.Helper()
	dir := t.TempDir()
	writePolicy(t, dir, appsPolicy(apps...))
	enf := &fakeEnforcer{}
	return dir, enf, startTestDaemon(t, dir, enf)
}

// grants lists the grant indexes app holds in st's effective ruleset.
func grants(st *State, app string) []int {
	a := st.effective().App(app)
	if a == nil {
		return nil
	}
	out := []int{}
	for _, g := range a.Grants {
		out = append(out, int(g.Index))
	}
	return out
}

func appNames(rs *ruleset.Ruleset) []string {
	var out []string
	for _, a := range rs.Apps {
		out = append(out, a.Name)
	}
	return out
}

// TestCountersFollowGenerations: the counters status and metrics read
// are those of the unbound principal and the apps of the policy in
// force, by the ids of its generation (a table made per generation), so
// an app added or removed by a reload comes or goes with it.
func TestCountersFollowGenerations(t *testing.T) {
	dir, enf, d := startOnApps(t, "a", "b")
	for _, apps := range [][]string{{"a", "b"}, {"a", "c"}, {"c"}} {
		writePolicy(t, dir, appsPolicy(apps...))
		if _, err := d.Reload(context.Background(), true); err != nil {
			t.Fatal(err)
		}
		st := d.current()
		got, err := d.counters(st)
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]uint32{"": 0}
		for _, a := range apps {
			want[a] = st.appIDs[a]
		}
		if len(got) != len(want) || len(enf.counted) != len(want) {
			t.Errorf("apps %v: counters %v, asked about ids %v; want %v", apps, got, enf.counted, want)
		}
		for name, id := range want {
			if c, ok := got[name]; !ok || c[bpf.CountAllow] != uint64(id) {
				t.Errorf("apps %v: counters of %q %v, want those of id %d", apps, name, c, id)
			}
		}
	}
}

// TestCallAfterStop: a change asked with a context of its own once the
// reconciler has returned fails and leaves the generation as it was,
// instead of waiting for a reconciler that will never take it.
func TestCallAfterStop(t *testing.T) {
	_, enf, d := startOnApps(t, "a")
	d.stop()
	gen, err := d.Reload(context.Background(), true)
	if !errors.Is(err, errReconcilerStopped) || gen != 1 {
		t.Fatalf("reload after stop: generation %d, %v; want 1, %v", gen, err, errReconcilerStopped)
	}
	if n := enf.appliedCount(); n != 1 {
		t.Fatalf("reload after stop applied (%d generations)", n)
	}
}

// TestReloadOrdering: reloads and revokes from many goroutines take turns
// on the reconciler; each Apply builds on the State the one before
// published, generations only grow, and what is published is what the
// enforcer took last.
func TestReloadOrdering(t *testing.T) {
	dir, enf, d := startOnApps(t, "a", "b")
	ctx := context.Background()
	if g := d.generation(); g != 1 {
		t.Fatalf("first generation %d, want 1", g)
	}

	// Unchanged bytes: nothing applied; force: applied again.
	if _, err := d.Reload(ctx, false); err != nil {
		t.Fatal(err)
	}
	if n := enf.appliedCount(); n != 1 {
		t.Fatalf("a reload of unchanged files applied (%d generations)", n)
	}
	if g, err := d.Reload(ctx, true); err != nil || g != 2 {
		t.Fatalf("forced reload: generation %d, %v; want 2", g, err)
	}

	writePolicy(t, dir, appsPolicy("a", "b", "c"))
	const workers = 8
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if i%2 == 0 {
				_, err = d.Reload(ctx, true)
			} else {
				_, err = d.revoke(ctx, api.Request{App: "b", Grant: ptr(1)})
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := enf.overlapped.Load(); n != 0 {
		t.Fatalf("%d Applies ran while another one did", n)
	}
	enf.mu.Lock()
	applied := slices.Clone(enf.applied)
	enf.mu.Unlock()
	st := d.current()
	if want := uint32(len(applied)); st.gen != want {
		t.Fatalf("published generation %d, the enforcer took %d", st.gen, want)
	}
	if last := applied[len(applied)-1].Rules; last != st.effective() {
		t.Fatal("the published effective ruleset (the audit annotation's index of the generation in force) is not the last one applied")
	}
	if got := appNames(st.policy); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("policy in force has apps %v", got)
	}
	// Every generation after the first revoke keeps it, reload or not.
	revokedSince := -1
	for i, g := range applied {
		holds := slices.ContainsFunc(g.Rules.App("b").Grants, func(gr ruleset.Grant) bool { return gr.Index == 1 })
		if !holds && revokedSince < 0 {
			revokedSince = i
		}
		if holds && revokedSince >= 0 {
			t.Fatalf("generation %d gives back b's revoked grant #1 (revoked since generation %d)", i+1, revokedSince+1)
		}
	}
	if got := grants(st, "b"); !slices.Equal(got, []int{0}) {
		t.Fatalf("b holds grants %v, want [0]", got)
	}
}

// TestInvalidInputKeepsState: a policy that does not parse, or a
// generation the enforcer refuses, leaves the State in force (generation,
// policy, its hash) and says why in status.
func TestInvalidInputKeepsState(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy string // written before the reload
		fail   error  // the enforcer's answer to Apply
		want   string // in the error and status' last error
	}{
		{name: "bad yaml", policy: "version: 1\napps: [\n", want: "policy.yaml:2: invalid YAML"},
		{name: "unknown field", policy: appsPolicy("a") + "bogus: 1\n", want: "bogus: unknown field"},
		{name: "duplicate app", policy: appsPolicy("a", "a"), want: `duplicate app "a"`},
		{name: "apply refused", policy: appsPolicy("a", "z"), fail: errors.New("map full"), want: "map full"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, enf, d := startOnApps(t, "a", "b")
			ctx := context.Background()
			before := d.current()
			writePolicy(t, dir, tc.policy)
			enf.setFail(tc.fail)
			gen, err := d.Reload(ctx, false)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("reload: %v, want an error naming %q", err, tc.want)
			}
			after := d.current()
			if gen != before.gen || after.gen != before.gen || after.policy != before.policy ||
				after.effective() != before.effective() || after.policyHash != before.policyHash {
				t.Fatalf("rejected input changed the state in force: generation %d -> %d (reload said %d), policy %v -> %v",
					before.gen, after.gen, gen, appNames(before.policy), appNames(after.policy))
			}
			st, err := d.status(after, false)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(st.LastError, tc.want) || st.Generation != before.gen {
				t.Fatalf("status: generation %d, last error %q; want %d and an error naming %q", st.Generation, st.LastError, before.gen, tc.want)
			}
			// The same bad bytes written again (a new stamp) are not
			// parsed and reported again, and good bytes bring the error
			// to an end.
			n := enf.appliedCount()
			enf.setFail(nil)
			if tc.fail == nil {
				writePolicy(t, dir, tc.policy)
				if _, err := d.Reload(ctx, false); err != nil {
					t.Fatalf("the same bad bytes were reported again: %v", err)
				}
			}
			writePolicy(t, dir, appsPolicy("a", "b", "c"))
			if _, err := d.Reload(ctx, false); err != nil {
				t.Fatal(err)
			}
			if enf.appliedCount() != n+1 || d.current().lastErr != "" {
				t.Fatalf("a good policy after a bad one: %d generations applied (want %d), last error %q", enf.appliedCount(), n+1, d.current().lastErr)
			}
		})
	}
}

// TestRevokeAcrossReloads: a revocation holds through reloads, changed
// policies and restarts, until it is restored.
func TestRevokeAcrossReloads(t *testing.T) {
	dir, enf, d := startOnApps(t, "a", "b")
	ctx := context.Background()

	if _, err := d.revoke(ctx, api.Request{App: "a", Grant: ptr(0)}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.revoke(ctx, api.Request{App: "b"}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.revoke(ctx, api.Request{App: "a", Grant: ptr(5)}); err == nil {
		t.Fatal("a revoke of a grant the app does not have was taken")
	}
	check := func(when string, a, b []int) {
		t.Helper()
		st := d.current()
		if got := grants(st, "a"); !slices.Equal(got, a) {
			t.Fatalf("%s: a holds grants %v, want %v", when, got, a)
		}
		if got := grants(st, "b"); !slices.Equal(got, b) {
			t.Fatalf("%s: b holds grants %v, want %v", when, got, b)
		}
		if p := st.policy.App("a"); len(p.Grants) != 2 {
			t.Fatalf("%s: the policy in force lost a's grants (%d): revocations belong to the effective ruleset only", when, len(p.Grants))
		}
	}
	check("revoked", []int{1}, []int{})

	if _, err := d.Reload(ctx, true); err != nil {
		t.Fatal(err)
	}
	check("forced reload", []int{1}, []int{})
	writePolicy(t, dir, appsPolicy("a", "b", "c"))
	if _, err := d.Reload(ctx, false); err != nil {
		t.Fatal(err)
	}
	check("changed policy", []int{1}, []int{})
	if got := grants(d.current(), "c"); !slices.Equal(got, []int{0, 1}) {
		t.Fatalf("new app c holds %v", got)
	}

	d.stop()
	enf2 := &fakeEnforcer{gen: enf.gen}
	d = startTestDaemon(t, dir, enf2)
	check("restart", []int{1}, []int{})
	st, err := d.status(d.current(), false)
	if err != nil {
		t.Fatal(err)
	}
	for _, as := range st.Apps {
		want := map[string][]string{"a": {"#0"}, "b": {"all"}}[as.Name]
		if !slices.Equal(as.Revoked, want) {
			t.Fatalf("status: app %s revoked %v, want %v", as.Name, as.Revoked, want)
		}
	}

	if _, err := d.revoke(ctx, api.Request{App: "a", Restore: true, Grant: ptr(0)}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.revoke(ctx, api.Request{App: "b", Restore: true}); err != nil {
		t.Fatal(err)
	}
	check("restored", []int{0, 1}, []int{0, 1})
}

// TestRestartAdoption: a daemon started over pinned enforcement goes on
// from its generation and keeps every app's id, so that the kernel's
// counters and the audit log stay with their app; a new app gets an id
// no other app had.
func TestRestartAdoption(t *testing.T) {
	dir, enf, d := startOnApps(t, "a", "b")
	first := d.current().appIDs
	for _, force := range []bool{true, true} {
		if _, err := d.Reload(context.Background(), force); err != nil {
			t.Fatal(err)
		}
	}
	pinned := enf.gen
	d.stop()

	writePolicy(t, dir, appsPolicy("c", "b"))
	enf2 := &fakeEnforcer{gen: pinned}
	d = startTestDaemon(t, dir, enf2)
	st := d.current()
	if st.gen != pinned+1 {
		t.Fatalf("first generation after the restart %d, want %d (the pinned one's next)", st.gen, pinned+1)
	}
	if st.appIDs["b"] != first["b"] || st.appIDs["a"] != first["a"] {
		t.Fatalf("app ids changed across the restart: %v, then %v", first, st.appIDs)
	}
	if id := st.appIDs["c"]; id == 0 || id == first["a"] || id == first["b"] {
		t.Fatalf("new app c got id %d (earlier ids %v)", id, first)
	}
	if got := enf2.applied[0].AppIDs; got["b"] != first["b"] || got["c"] != st.appIDs["c"] {
		t.Fatalf("the enforcer was given ids %v", got)
	}
	status, err := d.status(st, false)
	if err != nil {
		t.Fatal(err)
	}
	if !status.Adopted || status.Generation != pinned+1 {
		t.Fatalf("status: adopted %v, generation %d", status.Adopted, status.Generation)
	}
}

// TestReadersDuringApply: while the reconciler waits in Apply (as it does
// for seconds at a large policy), status, explain, app info, launches'
// policy look-up and the audit annotation answer from the State in force,
// and an event of the generation being applied is named from it.
func TestReadersDuringApply(t *testing.T) {
	dir, enf, d := startOnApps(t, "a")
	before := d.current()

	writePolicy(t, dir, appsPolicy("a", "late"))
	entered, unblock := enf.block()
	defer unblock()
	reloaded := make(chan error, 1)
	go func() {
		_, err := d.Reload(context.Background(), false)
		reloaded <- err
	}()
	<-entered
	var late uint32
	for id, name := range d.applying.Load().appNames {
		if name == "late" {
			late = id
		}
	}

	// Readers on their own goroutine: when one waited for the reload,
	// the test fails instead of hanging.
	read := make(chan error, 1)
	go func() {
		read <- func() error {
			st, err := d.status(d.current(), false)
			if err != nil {
				return err
			}
			if st.Generation != before.gen || len(st.Apps) != 1 {
				return fmt.Errorf("status during the apply: generation %d, %d apps; want %d and 1", st.Generation, len(st.Apps), before.gen)
			}
			ex, err := d.explain(api.Request{App: "a", Dest: "10.1.2.3:5432"})
			if err != nil || !ex.Allow {
				return fmt.Errorf("explain during the apply: %+v, %v", ex, err)
			}
			if _, err := d.appInfo("a"); err != nil {
				return fmt.Errorf("app info during the apply: %v", err)
			}
			if _, err := d.counterSource(); err != nil {
				return err
			}
			app, rule := d.annotate(bpf.Event{Generation: before.gen + 1, AppID: late,
				Dest: ruleset.Dest{Addr: netip.MustParseAddr("10.1.2.3"), Port: 5432, Proto: ruleset.TCP}})
			if app != "late" || !strings.Contains(rule, "10.1.2.0/24") {
				return fmt.Errorf("event of the generation being applied annotated as app %q rule %q", app, rule)
			}
			return nil
		}()
	}()
	select {
	case err := <-read:
		if err != nil {
			t.Fatal(err)
		}
	case err := <-reloaded:
		t.Fatalf("the reload ended while Apply was held: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("readers waited for the reload")
	}
	unblock()
	if err := <-reloaded; err != nil {
		t.Fatal(err)
	}
	if st := d.current(); st.gen != before.gen+1 || st.policy.App("late") == nil {
		t.Fatalf("after the apply: generation %d, apps %v", st.gen, appNames(st.policy))
	}
}

// TestRememberGen: the generations before the one in force stay for the
// audit reader up to 8 back, and fewer when they are large: never more
// than keptPrefixes prefixes and grants of them.
func TestRememberGen(t *testing.T) {
	sized := func(n int) *ruleset.Index {
		rs := &ruleset.Ruleset{}
		for i := range n {
			rs.Internal = append(rs.Internal, ruleset.InternalPrefix{Prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 32)})
		}
		return ruleset.NewIndex(rs)
	}
	small, large := sized(10), sized(keptPrefixes/2+1)
	for _, tc := range []struct {
		name string
		ix   *ruleset.Index
		gens int
		want []uint32
	}{
		{"small: eight back", small, 12, []uint32{4, 5, 6, 7, 8, 9, 10, 11, 12}},
		{"large: one back", large, 5, []uint32{4, 5}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var byGen map[uint32]*ruleset.Index
			for gen := uint32(1); gen <= uint32(tc.gens); gen++ {
				byGen = rememberGen(byGen, gen, tc.ix)
			}
			if got := slices.Sorted(maps.Keys(byGen)); !slices.Equal(got, tc.want) {
				t.Errorf("kept generations %v, want %v", got, tc.want)
			}
		})
	}
}
