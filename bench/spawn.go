package main

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// The daemon's host-wide programs (tp_btf: fork, exit, cgroup attach,
// cgroup mkdir and rmdir) run for every process of the host, in apps or
// not. spawnResult is what they cost a process of no app (the bench
// process, outside the enforced cgroup) that forks, execs a trivial binary
// and waits for its exit: wall-clock before the enforcer attaches them and
// after, in the same run (they cannot be detached while the enforcer holds
// them, so the two blocks are not interleaved), and their BPF run time per
// spawn during the second block, which bounds what they add.
type spawnResult struct {
	N        int     `json:"spawns_per_block"`
	BeforeUs float64 `json:"before_median_us"`
	AfterUs  float64 `json:"after_median_us"`
	Ratio    float64 `json:"ratio"`
	// BPFNs is the host-wide programs' run time per spawn.
	BPFNs float64 `json:"bpf_ns_per_spawn"`
}

// spawnBinary is the trivial binary: /bin/true.
const spawnBinary = "/bin/true"

// spawnMedian runs n spawns of spawnBinary and returns the median wall
// time of one, in microseconds.
func spawnMedian(n int) (float64, error) {
	ds := make([]float64, 0, n)
	for range n {
		t0 := time.Now()
		if err := exec.Command(spawnBinary).Run(); err != nil {
			return 0, fmt.Errorf("run %s: %w", spawnBinary, err)
		}
		ds = append(ds, float64(time.Since(t0).Nanoseconds())/1e3)
	}
	slices.Sort(ds)
	return ds[len(ds)/2], nil
}

// tracingPrograms opens the programs of the enforcer's pinned tracing
// links (link_migrate_*, link_follow_*), by link name.
func tracingPrograms(dir string) (map[string]*ebpf.Program, error) {
	progs := map[string]*ebpf.Program{}
	for _, pattern := range []string{"link_migrate_*", "link_follow_*"} {
		pins, err := filepath.Glob(filepath.Join(dir, pattern))
		if err != nil {
			return nil, err
		}
		for _, pin := range pins {
			l, err := link.LoadPinnedLink(pin, nil)
			if err != nil {
				closeProgs(progs)
				return nil, fmt.Errorf("load pinned link %s: %w", pin, err)
			}
			info, err := l.Info()
			l.Close()
			if err != nil {
				closeProgs(progs)
				return nil, fmt.Errorf("info of %s: %w", pin, err)
			}
			p, err := ebpf.NewProgramFromID(info.Program)
			if err != nil {
				closeProgs(progs)
				return nil, fmt.Errorf("program of %s: %w", pin, err)
			}
			progs[filepath.Base(pin)[len("link_"):]] = p
		}
	}
	return progs, nil
}

// spawnBefore measures the first block, before Attach.
func (b *bench) spawnBefore() error {
	n := b.cfg.Spawns
	if n == 0 {
		return nil
	}
	before, err := spawnMedian(n)
	if err != nil {
		return err
	}
	b.res.Spawn = &spawnResult{N: n, BeforeUs: round3(before)}
	return nil
}

// spawnAfter measures the second block, after Attach, with the BPF
// statistics of the host-wide programs.
func (b *bench) spawnAfter() error {
	s := b.res.Spawn
	if s == nil {
		return nil
	}
	progs, err := tracingPrograms(filepath.Join(b.host.bpffs, "procgate"))
	if err != nil {
		return err
	}
	defer closeProgs(progs)
	if len(progs) == 0 {
		b.res.Notes = append(b.res.Notes, "fork+exec+exit: the enforcer attached no host-wide program on this kernel")
	}
	var after float64
	cost, err := measureBPF(progs, phaseSpawn, "fork+exec+exit of "+spawnBinary, 0, "spawn", func() (float64, error) {
		var err error
		after, err = spawnMedian(s.N)
		return float64(s.N), err
	})
	if err != nil {
		return err
	}
	b.res.BPFCost = append(b.res.BPFCost, *cost)
	s.AfterUs, s.BPFNs = round3(after), cost.Total
	s.Ratio = round3(after / s.BeforeUs)
	return nil
}

// phaseSpawn names the spawn blocks' BPF cost (they run in setup).
const phaseSpawn = "spawn"

func (r *results) spawnTarget() targetResult {
	tr := targetResult{Name: "processes of no app: fork+exec+exit", Target: "≤ 1% slower with the daemon's host-wide programs on"}
	s := r.Spawn
	if s == nil || s.BeforeUs == 0 {
		return tr
	}
	bound := s.BPFNs / (s.AfterUs * 1e3)
	tr.Value = fmt.Sprintf("%.1f µs before the programs were attached, %.1f µs after (%s, blocks of %d, not interleaved); the programs ran %.0f ns per spawn: %.3f%%",
		s.BeforeUs, s.AfterUs, pct(s.Ratio), s.N, s.BPFNs, bound*100)
	tr.Met = boolp(bound <= 0.01)
	if !*tr.Met {
		tr.Gap = fmt.Sprintf("the programs' run time is %.2f%% of a spawn", bound*100)
	}
	tr.Why = "the wall-clock blocks run one after the other on a shared machine; the kernel's BPF run-time account of the host-wide programs per spawn bounds what they add"
	return tr
}
