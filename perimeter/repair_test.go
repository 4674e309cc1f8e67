package perimeter

import (
	"context"
	"log/slog"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/procgate/procgate/internal/nstest"
)

// repairRig is a controller over a real table in a fresh namespace, with
// two holes open, and nft to play the administrator who edits the table.
type repairRig struct {
	ns   string
	tab  *Table
	c    *Controller
	log  *syncBuffer
	nft  string
	want []string
}

func newRepairRig(t *testing.T) *repairRig {
	t.Helper()
	nstest.RequireRoot(t)
	r := &repairRig{ns: nstest.NetNS(t), log: &syncBuffer{}, nft: nstest.Program(t, "nft")}
	r.tab = openTestTable(t, r.ns)
	rules := mustRules(t, "host srv1 10.9.0.5,fd09::5\nallow srv1 * * * * self *\nservice srv1 tcp 22\n")
	if err := r.tab.UpdateServices(rules.Services, nil, nil); err != nil {
		t.Fatal(err)
	}
	var err error
	r.c, err = NewController(ControllerConfig{Rules: rules, Table: r.tab, Protect: testProtect, Lease: time.Hour,
		Log: slog.New(slog.NewJSONHandler(r.log, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []string{"tcp 198.51.100.7 10.9.0.5 40000", "udp 2001:db8::7 fd09::5 5004"} {
		if _, err := r.c.Open("srv1", req("alice", h)); err != nil {
			t.Fatal(err)
		}
		r.want = append(r.want, key(h).String())
	}
	slices.Sort(r.want)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("controller log:\n%s", r.log)
		}
	})
	return r
}

func (r *repairRig) edit(t *testing.T, cmd string) {
	t.Helper()
	out, err := exec.Command("nsenter", "--net="+r.ns, r.nft, cmd).CombinedOutput()
	if err != nil {
		t.Fatalf("nft %s: %v\n%s", cmd, err, out)
	}
}

// check fails t unless the table is whole and holds exactly the holes, each
// with its owner and about its lease.
func (r *repairRig) check(t *testing.T, when string) {
	t.Helper()
	if why, err := r.tab.Drift(); err != nil || why != "" {
		t.Errorf("%s: drift %q, %v", when, why, err)
	}
	got := elementsByKey(t, r.tab)
	if !slices.Equal(sortedKeys(got), r.want) {
		t.Errorf("%s: kernel holds %v, want %v", when, sortedKeys(got), r.want)
	}
	for k, e := range got {
		if d, u, ok := parseComment(e.Comment); !ok || d != "srv1" || u != "alice" || e.Expires < 59*time.Minute || e.Expires > time.Hour {
			t.Errorf("%s: hole %s: comment %q expires in %v", when, k, e.Comment, e.Expires)
		}
	}
}

// serviceHandle is the handle of the service's rule.
func (r *repairRig) serviceHandle(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("nsenter", "--net="+r.ns, r.nft, "-a", "list", "chain", tname, chainName).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list chain: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if _, h, ok := strings.Cut(line, "comment \"service "); ok {
			if _, n, ok := strings.Cut(h, "# handle "); ok {
				return strings.TrimSpace(n)
			}
		}
	}
	t.Fatalf("no service rule in:\n%s", out)
	return ""
}

const (
	holeA = "198.51.100.7 . tcp . 10.9.0.5 . 40000"
	tname = "inet " + DefaultTableName
)

func TestRepair(t *testing.T) {
	r := newRepairRig(t)
	r.check(t, "before any edit")
	for _, tc := range []struct {
		name, nft string
		want      Repairs
	}{
		{"nothing changed", "", Repairs{}},
		{"table deleted", "delete table " + tname, Repairs{Table: 1}},
		{"element deleted", "delete element " + tname + " holes4 { " + holeA + " }", Repairs{Missing: 1}},
		{"foreign element", "add element " + tname + " holes4 { 198.51.100.9 . tcp . 10.9.0.5 . 22 timeout 1h }", Repairs{Foreign: 1}},
		{"lease lengthened", "add element " + tname + " holes4 { " + holeA + " timeout 1d }", Repairs{Changed: 1}},
		{"owner changed", "delete element " + tname + " holes4 { " + holeA + " } && add element " + tname +
			" holes4 { " + holeA + ` timeout 1h comment "delegate=srv2 user=bob" }`, Repairs{Changed: 1}},
		{"rule inserted", "insert rule " + tname + " forward accept", Repairs{Table: 1}},
		{"chain flushed", "flush chain " + tname + " forward", Repairs{Table: 1}},
		{"service rule deleted", "delete rule " + tname + " forward handle SERVICE", Repairs{Table: 1}},
		{"policy changed", "chain " + tname + " forward { type filter hook forward priority filter; policy drop ; }", Repairs{Table: 1}},
		{"set deleted", "flush chain " + tname + " forward && delete set " + tname + " holes4", Repairs{Table: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := r.c.Repaired()
			if tc.nft != "" {
				for _, cmd := range strings.Split(tc.nft, " && ") {
					if strings.Contains(cmd, "SERVICE") {
						cmd = strings.Replace(cmd, "SERVICE", r.serviceHandle(t), 1)
					}
					r.edit(t, cmd)
				}
				if why, _ := r.tab.Drift(); why == "" && tc.want.Table > 0 {
					t.Fatalf("Drift saw nothing after %q", tc.nft)
				}
			}
			if err := r.c.Repair(); err != nil {
				t.Fatal(err)
			}
			after := r.c.Repaired()
			got := Repairs{after.Table - before.Table, after.Missing - before.Missing, after.Foreign - before.Foreign, after.Changed - before.Changed}
			if got != tc.want {
				t.Errorf("repairs %+v, want %+v", got, tc.want)
			}
			r.check(t, "after repair")
			if tc.nft != "" && !strings.Contains(r.log.String(), "repaired") {
				t.Error("repair not logged")
			}
		})
	}
}

// TestRepairPeriodic is the loop: a deleted table is back within one
// interval, without anyone calling Repair.
func TestRepairPeriodic(t *testing.T) {
	r := newRepairRig(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	const interval = 300 * time.Millisecond
	go func() { r.c.RunRepair(ctx, interval); close(done) }()
	defer func() { cancel(); <-done }()
	for round := range 2 {
		r.edit(t, "delete table "+tname)
		start := time.Now()
		for r.c.Repaired().Table <= uint64(round) {
			// An interval and the repair's own time, with room for a slow
			// machine: the bound catches a loop that does not run.
			if time.Since(start) > 3*interval+2*time.Second {
				t.Fatalf("round %d: table not repaired within %v", round, time.Since(start))
			}
			time.Sleep(20 * time.Millisecond)
		}
		r.check(t, "after the periodic repair")
	}
}

// TestRepairLeavesExpiringHoles: a hole whose lease is about to end is the
// kernel's to close; its absence is no drift.
func TestRepairLeavesExpiringHoles(t *testing.T) {
	c := newTestController(t, controllerRules)
	if _, err := c.Open("srv1", Request{Target: req("alice", "tcp 198.51.100.7 10.9.0.5 40000").Target, User: "alice", LeaseSeconds: 1}); err != nil {
		t.Fatal(err)
	}
	c.table.els = map[Key]fakeElement{}
	if err := c.Repair(); err != nil {
		t.Fatal(err)
	}
	if r := c.Repaired(); r != (Repairs{}) || len(c.table.els) != 0 {
		t.Errorf("repaired a hole about to expire: %+v, table %v", r, c.table.keys())
	}
}

// TestGatewayRepairs: a running gateway repairs its table by itself, and
// its metrics count the repair.
func TestGatewayRepairs(t *testing.T) {
	e := startE2E(t)
	if err := e.gw.Close(); err != nil {
		t.Fatal(err)
	}
	e.cfg.Reconcile = 300 * time.Millisecond
	e.start(t)
	out, err := exec.Command("nsenter", "--net="+e.top.router, nstest.Program(t, "nft"), "delete", "table", tname).CombinedOutput()
	if err != nil {
		t.Fatalf("nft delete table: %v\n%s", err, out)
	}
	for start := time.Now(); e.gw.Controller().Repaired().Table == 0; time.Sleep(20 * time.Millisecond) {
		if time.Since(start) > 3*e.cfg.Reconcile+2*time.Second {
			t.Fatal("the gateway did not repair its deleted table")
		}
	}
	want := `
# HELP procgate_perimeter_repairs_total What the gateway's periodic reconcile put right in its nftables table: table (rebuilt whole), missing (hole put back), foreign (element removed), changed (element rewritten).
# TYPE procgate_perimeter_repairs_total counter
procgate_perimeter_repairs_total{kind="changed"} 0
procgate_perimeter_repairs_total{kind="foreign"} 0
procgate_perimeter_repairs_total{kind="missing"} 0
procgate_perimeter_repairs_total{kind="table"} 1
`
	if err := testutil.CollectAndCompare(Metrics{e.gw.Controller()}, strings.NewReader(want), "procgate_perimeter_repairs_total"); err != nil {
		t.Error(err)
	}
}
