package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/procgate/procgate/internal/etcdtest"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/probe"
)

func TestMain(m *testing.M) {
	etcdtest.MaybeServe()
	maybeClient()
	probe.MaybeServe()
	os.Exit(m.Run())
}

// TestSmoke runs every phase with a smoke test's counts and checks that the
// run measured every variant, saw no wrong verdict, wrote its files and
// left nothing behind.
func TestSmoke(t *testing.T) {
	nstest.RequireRoot(t)
	out := t.TempDir()
	// The pinhole phase runs procgate daemon with its agent (bind → live).
	pg := filepath.Join(t.TempDir(), "procgate")
	build := exec.Command("go", "build", "-o", pg, "github.com/procgate/procgate/cmd/procgate")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build procgate: %v\n%s", err, b)
	}
	t.Setenv("PROCGATE_BIN", pg)
	if err := run(options{tiny: true, out: out, phases: allPhases}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var r results
	if err := json.Unmarshal(data, &r); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, l := range r.Latency {
		seen[l.Phase+"/"+l.Variant] = true
		seen[l.Phase+"/"+string(l.Topo)+"/"+l.Variant] = true
		if l.Wrong != 0 {
			t.Errorf("%+v: %d wrong verdicts, first: %s", l.latKey, l.Wrong, l.WrongAt)
		}
		if l.N == 0 || l.P50 <= 0 || l.P99 < l.P50 {
			t.Errorf("%+v: implausible summary %+v", l.latKey, l.summary)
		}
	}
	for _, v := range allVariants() {
		for _, p := range []string{phaseLatency, phaseScaling} {
			if !seen[p+"/"+v.Name] && !((v.control || v.latencyOnly) && p == phaseScaling) {
				t.Errorf("no %s results for %s", p, v.Name)
			}
		}
	}
	// The veth targets are judged against the floor measured over veth.
	if !seen[phaseLatency+"/"+string(topoVeth)+"/"+vEmpty] {
		t.Errorf("no veth latency results for %s: the veth targets would have no floor", vEmpty)
	}
	if r.Reload == nil || r.Reload.Wrong != 0 || r.Reload.Reloads < 20 || r.Reload.FlipAllowed == 0 || r.Reload.FlipDenied == 0 {
		t.Errorf("reload phase: %+v", r.Reload)
	}
	tunnel := 0
	for _, tp := range r.Throughput {
		if tp.Median <= 0 {
			t.Errorf("throughput %+v: nothing measured", tp)
		}
		if tp.Topo == topoTunnel {
			tunnel++
		}
	}
	if tunnel != 2*len(tunnelVariants) {
		t.Errorf("%d tunnel throughput results, want %d", tunnel, 2*len(tunnelVariants))
	}
	if p := r.Pinhole; p == nil || p.OpenLatency.N == 0 || p.BindLatency.N == 0 || p.OpenLive != p.OpenChecked || len(p.Updates) < 3 ||
		p.Transfer == nil || len(p.Transfer.Pinhole) == 0 || p.Transfer.HolePackets == 0 || p.Transfer.Dropped == 0 {
		t.Errorf("pinhole phase: %+v", r.Pinhole)
	} else {
		for _, u := range p.Updates {
			if u.Updates == 0 || u.PerSec <= 0 {
				t.Errorf("pinhole update rate %+v: nothing measured", u)
			}
		}
	}
	if rv := r.Revocation; rv == nil || len(rv.Revokes) == 0 || len(rv.Sweeps) == 0 {
		t.Errorf("revocation phase: %+v", rv)
	} else {
		for _, s := range rv.Sweeps {
			if s.Ended < s.Sockets || s.Alive != 0 {
				t.Errorf("sweep %+v: not every revoked socket ended", s)
			}
		}
		for _, rt := range rv.Revokes {
			if rt.LastAllowedMs > rt.ApplyMs {
				t.Errorf("revocation %+v: an attempt begun after Apply returned was allowed", rt)
			}
		}
	}
	if d := r.Daemon; d == nil || len(d.CLIRevokes) == 0 || d.Loaded.RSS == 0 || d.IdleSeconds == 0 || len(d.Reloads) == 0 || len(d.MapMemory) == 0 {
		t.Errorf("daemon phase: %+v", d)
	} else {
		for _, rv := range d.CLIRevokes {
			if rv.LastAllowedMs > rv.CommandMs || rv.FirstDenialMs <= 0 {
				t.Errorf("revocation through the CLI %+v: an attempt begun after `revoke` returned was allowed, or no denial", rv)
			}
		}
	}
	if rt := r.Routes; rt == nil || len(rt.AddMs) != rt.Routes || len(rt.DelMs) != rt.Routes || rt.Routes == 0 || rt.Add.P50 <= 0 || rt.Del.P50 <= 0 {
		t.Errorf("routes phase: %+v", rt)
	}
	seenKind := map[string]bool{}
	for _, l := range r.Principals {
		seenKind[l.Variant] = true
		if l.Wrong != 0 || l.N == 0 || l.P50 <= 0 || l.P99 < l.P50 {
			t.Errorf("principals %+v: %+v, %d wrong", l.latKey, l.summary, l.Wrong)
		}
		if l.Variant != vBaseline && l.P50Ratio <= 0 {
			t.Errorf("principals %s: no ratio to the baseline", l.Variant)
		}
	}
	for _, k := range principalKinds {
		if !seenKind[k.name] {
			t.Errorf("no principals result for %s", k.name)
		}
	}
	for _, v := range []string{vRun, vPlaced} {
		for _, c := range outsiderClasses {
			what := costWhat(v, topoLoopback, tcp, c)
			if cost, ok := r.cost(phaseOutsider, what); !ok || !slices.ContainsFunc(cost.Progs, func(p progCost) bool { return p.Program == "egress" && p.RunsPer > 0 }) {
				t.Errorf("outsider phase: no BPF statistics of the egress backstop for %s: %+v", what, cost)
			}
		}
	}
	if dr := r.DNS; dr == nil || dr.Answers == 0 || len(dr.AnswerMs) != dr.Answers || dr.Answer.P50 <= 0 {
		t.Errorf("dns phase: %+v", dr)
	}
	if f := r.Fleet; f == nil || len(f.Pushes) != r.Config.FleetPushes || len(f.HoleWrites) == 0 || len(f.FailoverMs) == 0 || f.KeptHoles != f.OpenedHoles || len(f.MemberRSSMiB) != 3 {
		t.Errorf("fleet phase: %+v", f)
	} else {
		for _, p := range f.Pushes {
			if p.Applied != f.Hosts {
				t.Errorf("fleet push %+v: %d of %d hosts applied it", p, p.Applied, f.Hosts)
			}
		}
	}
	// Measuring one phase again and merging it keeps the others' results.
	if err := run(options{tiny: true, out: out, phases: []string{phaseDaemon}, merge: true}); err != nil {
		t.Fatal(err)
	}
	data, err = os.ReadFile(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var merged results
	if err := json.Unmarshal(data, &merged); err != nil {
		t.Fatal(err)
	}
	if len(merged.Latency) != len(r.Latency) || merged.Reload == nil || merged.Pinhole == nil || merged.Daemon == nil ||
		len(merged.Meta.Merged) != 1 || merged.Meta.Merged[0].Phases[0] != phaseDaemon {
		t.Errorf("merged results lost or mislabel phases: %d latency results (had %d), meta %+v", len(merged.Latency), len(r.Latency), merged.Meta)
	}
	report, err := os.ReadFile(filepath.Join(out, "REPORT.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"## Targets", "## Revocation", "## Pinholes", "### The daemon at", "`revoke` returned ms", "## Routes of internal.interfaces", "## Connect cost per principal kind", "## An outsider's harness", "### Where the daemon's time goes under an outsider's harness", "## DNS answer to grant", "## Fleet on etcd", "measured again", "scaling-p50.svg", "throughput.svg"} {
		if !strings.Contains(string(report), want) {
			t.Errorf("REPORT.md lacks %q", want)
		}
	}
	for _, svg := range []string{"latency-loopback-tcp.svg", "scaling-p50.svg", "load-time.svg", "throughput.svg"} {
		b, err := os.ReadFile(filepath.Join(out, svg))
		if err != nil || !strings.Contains(string(b), "<svg") {
			t.Errorf("plot %s: %v", svg, err)
		}
	}
	// This process' own (newHost names them by pid): another bench may be
	// running beside the test.
	pid := strconv.Itoa(os.Getpid())
	left, _ := filepath.Glob(filepath.Join(runDir, pid))
	mount, _ := filepath.Glob("/sys/fs/cgroup/*/procgate-bench-" + pid)
	if len(left)+len(mount) > 0 {
		t.Errorf("left behind: %v %v", left, mount)
	}
}
