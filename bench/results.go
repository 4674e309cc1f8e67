package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"time"
)

// results is everything a run measured; results.json is this, and
// REPORT.md is written from it.
type results struct {
	Meta       meta              `json:"meta"`
	Config     config            `json:"config"`
	Variants   []variantInfo     `json:"variants"`
	Latency    []latResult       `json:"latency"`
	Loads      []loadResult      `json:"loads"`
	Reload     *reloadResult     `json:"reload,omitempty"`
	Throughput []tputResult      `json:"throughput"`
	Pinhole    *pinholeResult    `json:"pinhole,omitempty"`
	Revocation *revocationResult `json:"revocation,omitempty"`
	Daemon     *daemonResult     `json:"daemon,omitempty"`
	Scale      *scaleResult      `json:"scale,omitempty"`
	Routes     *routesResult     `json:"routes,omitempty"`
	// Principals is the principals phase's latency, one row per principal
	// kind (Variant) and the unenforced baseline and control.
	Principals []latResult `json:"principals,omitempty"`
	// Outsider is the outsider phase's latency: a `procgate run` app
	// against the baseline.
	Outsider []latResult    `json:"outsider,omitempty"`
	DNS      *dnsResult     `json:"dns,omitempty"`
	Fleet    *fleetResult   `json:"fleet,omitempty"`
	Spawn    *spawnResult   `json:"spawn,omitempty"`
	BPFCost  []bpfCost      `json:"bpf_cost"`
	Targets  []targetResult `json:"targets"`
	Notes    []string       `json:"notes"`
}

type meta struct {
	Date           string             `json:"date"`
	Kernel         string             `json:"kernel"`
	CPU            string             `json:"cpu"`
	CPUs           int                `json:"cpus"`
	Go             string             `json:"go"`
	Commit         string             `json:"commit"`
	ProcgateGuards []string           `json:"procgate_guards"`
	PhaseSeconds   map[string]float64 `json:"phase_seconds"`
	TotalSeconds   float64            `json:"total_seconds"`
	// LoadAvg is /proc/loadavg at the start and at the end of the run.
	LoadAvg []string `json:"loadavg,omitempty"`
	// Merged are later runs of some phases whose results replaced this
	// run's (bench -merge).
	Merged []mergedRun `json:"merged,omitempty"`
}

// mergedRun is a run of some phases merged into an earlier run's results.
type mergedRun struct {
	Phases  []string `json:"phases"`
	Date    string   `json:"date"`
	Commit  string   `json:"commit"`
	LoadAvg []string `json:"loadavg"`
	Seconds float64  `json:"seconds"`
}

func loadAvg() string {
	f := strings.Fields(readFirst("/proc/loadavg"))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

type variantInfo struct {
	Name    string `json:"name"`
	Desc    string `json:"description"`
	MaxSize int    `json:"max_prefixes,omitempty"`
}

func newResults(cfg config, vs []*variant) *results {
	r := &results{Config: cfg, Meta: meta{
		Date:         time.Now().UTC().Format(time.RFC3339),
		Kernel:       strings.TrimSpace(readFirst("/proc/sys/kernel/osrelease")),
		CPU:          cpuModel(),
		CPUs:         runtime.NumCPU(),
		Go:           runtime.Version(),
		Commit:       gitCommit(),
		PhaseSeconds: map[string]float64{},
		LoadAvg:      []string{loadAvg()},
	}}
	for _, v := range vs {
		r.Variants = append(r.Variants, variantInfo{Name: v.Name, Desc: v.Desc, MaxSize: v.MaxSize})
	}
	return r
}

func readFirst(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "unknown"
	}
	return string(b)
}

func cpuModel() string {
	for line := range strings.Lines(readFirst("/proc/cpuinfo")) {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func gitCommit() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

// write stores results.json, the plots and REPORT.md in dir.
func (r *results) write(dir string) error {
	r.Targets = r.evaluate()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(data, '\n'), 0o644); err != nil {
		return err
	}
	plots, err := r.plots()
	if err != nil {
		return err
	}
	for name, svg := range plots {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(svg), 0o644); err != nil {
			return err
		}
	}
	return os.WriteFile(filepath.Join(dir, "REPORT.md"), []byte(r.markdown(plots)), 0o644)
}

// merge replaces, in the results.json in dir, the results of phases with
// r's and writes everything again: a phase can be re-measured (or a new
// one added) without a full run. The runs must have the same settings,
// apart from those of the merged phases that the earlier run lacked.
func (r *results) merge(dir string, phases []string) error {
	path := filepath.Join(dir, "results.json")
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	var old results
	if err := json.Unmarshal(data, &old); err != nil {
		return fmt.Errorf("merge: %s: %w", path, err)
	}
	cfg := old.Config
	if slices.Contains(phases, phaseDaemon) {
		cfg.CLIRevokes, cfg.DaemonSize, cfg.DaemonIdle, cfg.DaemonReloads = r.Config.CLIRevokes, r.Config.DaemonSize, r.Config.DaemonIdle, r.Config.DaemonReloads
	}
	if slices.Contains(phases, phaseScale) || cfg.ScaleSize == 0 {
		cfg.ScaleSize, cfg.ScaleReloads = r.Config.ScaleSize, r.Config.ScaleReloads
	}
	// Results from before the routes phase existed have no count of it.
	if slices.Contains(phases, phaseRoutes) || cfg.RouteAdds == 0 {
		cfg.RouteAdds = r.Config.RouteAdds
	}
	if slices.Contains(phases, phaseDNS) || cfg.DNSAnswers == 0 {
		cfg.DNSAnswers = r.Config.DNSAnswers
	}
	if slices.Contains(phases, phaseFleet) || cfg.FleetHosts == 0 {
		cfg.FleetHosts, cfg.FleetPushes, cfg.FleetHoles, cfg.FleetFailovers = r.Config.FleetHosts, r.Config.FleetPushes, r.Config.FleetHoles, r.Config.FleetFailovers
	}
	if !reflect.DeepEqual(cfg, r.Config) {
		return fmt.Errorf("merge: this run's settings differ from those of %s (%+v, not %+v): run in full instead", path, r.Config, old.Config)
	}
	old.Config = cfg
	keep := func(phase string, in []latResult) []latResult {
		return slices.DeleteFunc(in, func(l latResult) bool { return l.Phase == phase })
	}
	keepCost := func(phase string, in []bpfCost) []bpfCost {
		return slices.DeleteFunc(in, func(c bpfCost) bool { return c.Phase == phase })
	}
	for _, p := range phases {
		// A phase's extra batches under the BPF statistics (the spawn
		// blocks' run in setup: they stay).
		old.BPFCost = append(keepCost(p, old.BPFCost), slices.DeleteFunc(slices.Clone(r.BPFCost), func(c bpfCost) bool { return c.Phase != p })...)
		switch p {
		case phaseLatency, phaseScaling, phaseThroughput:
			old.Latency = append(keep(p, old.Latency), slices.DeleteFunc(slices.Clone(r.Latency), func(l latResult) bool { return l.Phase != p })...)
			switch p {
			case phaseScaling:
				old.Loads = r.Loads
			case phaseThroughput:
				old.Throughput = r.Throughput
			}
		case phaseReload:
			old.Reload = r.Reload
		case phaseRevocation:
			old.Revocation = r.Revocation
		case phasePinhole:
			old.Pinhole = r.Pinhole
		case phaseDaemon:
			old.Daemon = r.Daemon
		case phaseScale:
			old.Scale = r.Scale
		case phaseRoutes:
			old.Routes = r.Routes
		case phasePrincipals:
			old.Principals = r.Principals
		case phaseOutsider:
			old.Outsider = r.Outsider
		case phaseDNS:
			old.DNS = r.DNS
		case phaseFleet:
			old.Fleet = r.Fleet
		}
		old.Meta.TotalSeconds = round3(old.Meta.TotalSeconds - old.Meta.PhaseSeconds[p] + r.Meta.PhaseSeconds[p])
		old.Meta.PhaseSeconds[p] = r.Meta.PhaseSeconds[p]
	}
	for _, n := range r.Notes {
		if !slices.Contains(old.Notes, n) {
			old.Notes = append(old.Notes, n)
		}
	}
	old.Meta.Merged = append(old.Meta.Merged, mergedRun{Phases: phases, Date: r.Meta.Date, Commit: r.Meta.Commit, LoadAvg: r.Meta.LoadAvg, Seconds: r.Meta.TotalSeconds})
	return old.write(dir)
}

// rewrite writes the report and plots of an earlier run's results.json
// into dir again (after a change of the report, not of what is measured).
func rewrite(from, dir string) error {
	data, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	var r results
	if err := json.Unmarshal(data, &r); err != nil {
		return fmt.Errorf("%s: %w", from, err)
	}
	return r.write(dir)
}
