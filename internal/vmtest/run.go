package vmtest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// Suites are the test binaries each guest runs: the tests whose outcome
// depends on the kernel, picked by -test.run so that the matrix stays
// within CI's time under TCG.
var Suites = []SuiteSpec{
	{Name: "bpf", Dir: "bpf", Timeout: "12m",
		Run: "^(TestBackstops|TestSweep|TestHandoverGuard|TestListenWithoutBind|TestMigrationMarks|TestAuditEventsDecode|TestExePinning|TestVerdictCachesFollowGenerations|TestUnitRestart)$"},
	// The pinhole agent's kernel programs (pinhole.c): what they observe
	// and hold, and the agent that follows sockets with them.
	{Name: "pinhole", Dir: "pinhole", Timeout: "6m",
		Run: "^(TestKernelObservesAndGuards|TestKernelHoldsTheAnswer|TestAgentHolesFollowSockets|TestAgentNeverOpensForAny|TestAgentRefusalAndRenewal)$"},
	// All of launch: fast, and its credentials and ptrace rules are the
	// kernel's.
	{Name: "launch", Dir: "launch", Timeout: "3m"},
	// The attack suite, focused: the roles and techniques whose outcome
	// depends on the kernel's guards (the BPF LSM packet, XDP, TUN and
	// listen guards, the UDP handover check), each known gap of theirs
	// open or closed by a guard active here (attack/known-gaps.txt).
	{Name: "attack", Dir: "attack", Timeout: "8m", Files: []string{"known-gaps.txt"},
		Run: "^TestAttackSuite$/^(unbound|root-in-app|strict-listen)$",
		Env: []string{"PROCGATE_ATTACK_ONLY=" + AttackTechniques}},
}

// AttackTechniques are the attack suite's techniques the guests run (a
// regexp, PROCGATE_ATTACK_ONLY), besides its controls.
const AttackTechniques = "^(packet-|xdp-|tun-|listen-|bind4-tcp$|scm-rights-udp-connected$|pidfd-getfd-udp-connected$)"

// Options of a matrix run.
type Options struct {
	BuildDir string
	Kernels  []string // names; nil: all
	Report   string   // Markdown file to write; "": none
	Refresh  bool
	Verbose  bool
	// Reread: build the matrix from the last run's console logs instead
	// of booting.
	Reread bool
	// Suites replaces the default suites (for a focused run).
	Suites []SuiteSpec
	// Guest sizes and the time one boot may take.
	MemoryMiB, CPUs int
	Timeout         time.Duration
	// Parallel is how many guests boot at once (< 1: one). Under TCG a
	// guest keeps about one host CPU busy whatever its -smp (its tests
	// are mostly serial), so on two CPUs two boots take the time of the
	// slower one, about 25% slower each than alone: the matrix takes
	// ~3.8 min instead of ~6.3 in CI.
	Parallel int
}

// hostPackages are the Debian packages of the programs a run needs on the
// host: qemu, and the tools copied into the guests.
var hostPackages = map[string]string{
	"qemu-system-x86_64": "qemu-system-x86",
	"dpkg-deb":           "dpkg",
	"nft":                "nftables",
	"ip":                 "iproute2",
	"nsenter":            "util-linux",
	"setpriv":            "util-linux",
}

// Run fetches the kernels, builds the guest, boots each kernel and reports
// the matrix; it fails on any failure of a supported kernel.
func Run(o Options) error {
	logf := func(format string, args ...any) { fmt.Printf("test-kernels: "+format+"\n", args...) }
	if err := installHostPackages(logf); err != nil {
		return err
	}
	var kernels []Kernel
	for _, k := range Kernels {
		if o.Kernels == nil || slices.Contains(o.Kernels, k.Name) {
			kernels = append(kernels, k)
		}
	}
	if len(kernels) == 0 {
		return fmt.Errorf("no kernel named %v", o.Kernels)
	}
	cache, err := filepath.Abs(o.BuildDir)
	if err != nil {
		return err
	}
	fetched, err := FetchKernels(cache, kernels, o.Refresh, logf)
	if err != nil {
		return err
	}
	if o.Suites != nil {
		Suites = o.Suites
	}
	var g Guest
	if !o.Reread {
		if g, err = buildGuest(cache, logf); err != nil {
			return err
		}
	}
	g.MemoryMiB, g.CPUs, g.Timeout = o.MemoryMiB, o.CPUs, o.Timeout
	m := Matrix{Focused: o.Suites != nil, Columns: make([]Column, len(fetched))}
	if o.Reread {
		for i, k := range fetched {
			m.Columns[i] = reread(cache, k)
		}
	} else {
		// A console copied to the terminal is readable only alone.
		parallel := o.Parallel
		if o.Verbose || parallel < 1 {
			parallel = 1
		}
		// Each kernel has a directory of its own (initramfs, console
		// log) and a column of its own: the boots share only g, which
		// they read.
		var wg sync.WaitGroup
		slots := make(chan struct{}, parallel)
		for i, k := range fetched {
			wg.Add(1)
			go func() {
				defer wg.Done()
				slots <- struct{}{}
				defer func() { <-slots }()
				m.Columns[i] = runKernel(cache, g, k, o.Verbose, logf)
			}()
		}
		wg.Wait()
	}
	var md bytes.Buffer
	m.Markdown(&md)
	fmt.Println()
	os.Stdout.Write(md.Bytes())
	if o.Report != "" {
		if err := writeReport(o.Report, md.Bytes()); err != nil {
			return err
		}
		logf("report written to %s", o.Report)
	}
	if f := m.Failures(); len(f) > 0 {
		return fmt.Errorf("%d failures:\n  %s", len(f), strings.Join(f, "\n  "))
	}
	return nil
}

func runKernel(cache string, g Guest, k Fetched, verbose bool, logf func(string, ...any)) Column {
	col := Column{Kernel: k}
	dir := filepath.Join(cache, "run", k.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		col.Err = err.Error()
		return col
	}
	initrd := filepath.Join(dir, "initrd.cpio")
	if k.Unsupported {
		// Below procgate's floor: only whether procgate starts, and its
		// guards if it does.
		g.Suites = nil
	}
	missing, err := BuildInitramfs(initrd, g, k)
	if err != nil {
		col.Err = err.Error()
		return col
	}
	col.Missing = missing
	logf("boot %s (%s) under qemu TCG", k.Name, k.Package)
	var live io.Writer
	if verbose {
		live = os.Stdout
	}
	start := time.Now()
	col.Summary, err = Boot(context.Background(), k.Vmlinuz, initrd, g, filepath.Join(dir, "console.log"), live)
	if err != nil {
		col.Err = err.Error()
	}
	logf("%s done in %v (console in %s)", k.Name, time.Since(start).Round(time.Second), filepath.Join(dir, "console.log"))
	return col
}

// reread is kernel k's column from its last console log.
func reread(cache string, k Fetched) Column {
	col := Column{Kernel: k}
	log := filepath.Join(cache, "run", k.Name, "console.log")
	f, err := os.Open(log)
	if err == nil {
		defer f.Close()
		col.Summary, err = ReadSummary(f)
	}
	if err != nil {
		col.Err = fmt.Sprintf("%s: %v", log, err)
	}
	return col
}

// buildGuest builds the static init and the suites' test binaries.
func buildGuest(cache string, logf func(string, ...any)) (Guest, error) {
	bin := filepath.Join(cache, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return Guest{}, err
	}
	g := Guest{Init: filepath.Join(bin, "init"), Tools: HostTools}
	logf("build the guest init and %d test binaries", len(Suites))
	if err := goCmd("build", "-trimpath", "-o", g.Init, "./internal/vmtest/cmd/guestinit"); err != nil {
		return g, err
	}
	for _, s := range Suites {
		s.Binary = filepath.Join(bin, s.Name+".test")
		if err := goCmd("test", "-c", "-trimpath", "-o", s.Binary, "./"+s.Dir); err != nil {
			return g, err
		}
		s.Dir, _ = filepath.Abs(s.Dir)
		g.Suites = append(g.Suites, s)
	}
	return g, nil
}

func goCmd(args ...string) error {
	cmd := exec.Command("go", args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

func installHostPackages(logf func(string, ...any)) error {
	var need []string
	for _, prog := range sortedKeys(hostPackages) {
		if _, err := exec.LookPath(prog); err != nil && !slices.Contains(need, hostPackages[prog]) {
			need = append(need, hostPackages[prog])
		}
	}
	if len(need) == 0 {
		return nil
	}
	logf("apt-get install %s", strings.Join(need, " "))
	install := func() error {
		cmd := exec.Command("apt-get", append([]string{"install", "-y", "-qq", "--no-install-recommends"}, need...)...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("apt-get install %s: %w\n%s", strings.Join(need, " "), err, out)
		}
		return nil
	}
	if install() == nil {
		return nil
	}
	if out, err := exec.Command("apt-get", "update", "-qq").CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get update: %w\n%s", err, out)
	}
	return install()
}

// writeReport puts the matrix into the report file between its markers,
// keeping the prose around it; a file without them gets the matrix alone.
func writeReport(path string, matrix []byte) error {
	const begin, end = "<!-- matrix: begin (make test-kernels writes this part) -->\n", "<!-- matrix: end -->\n"
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	s := string(old)
	i, j := strings.Index(s, begin), strings.Index(s, end)
	if i < 0 || j < i {
		s = begin + end
		i, j = 0, len(begin)
	}
	s = s[:i] + begin + string(matrix) + s[j:]
	return os.WriteFile(path, []byte(s), 0o644)
}
