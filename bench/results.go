package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
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
	BPFCost    []bpfCost         `json:"bpf_cost"`
	Targets    []targetResult    `json:"targets"`
	Notes      []string          `json:"notes"`
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
