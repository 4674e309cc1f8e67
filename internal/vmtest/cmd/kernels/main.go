// Command kernels runs procgate's kernel tests on Debian's kernels under
// qemu and reports the matrix (`make test-kernels`).
//
//	go run ./internal/vmtest/cmd/kernels                 # every kernel, report in docs/kernels.md
//	go run ./internal/vmtest/cmd/kernels -kernels 6.1 -v # one kernel, console on the terminal
//	go run ./internal/vmtest/cmd/kernels -run 'bpf=^TestSweep$' # focused: no report written
package main

import (
	"flag"
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/procgate/procgate/internal/vmtest"
)

func main() {
	var o vmtest.Options
	flag.StringVar(&o.BuildDir, "build", "build/kernels", "cache and work directory (kernel packages, binaries, initramfs, console logs)")
	kernels := flag.String("kernels", "", "comma-separated kernel names to run (default: all of "+names()+")")
	flag.StringVar(&o.Report, "report", "docs/kernels.md", "where to write the matrix as Markdown (\"\": nowhere)")
	flag.BoolVar(&o.Refresh, "refresh", false, "fetch the kernel suites' package lists again (newer kernels)")
	flag.BoolVar(&o.Verbose, "v", false, "copy each guest's console to the terminal as it comes")
	flag.BoolVar(&o.Reread, "reread", false, "build the matrix from the last run's console logs, without booting")
	flag.IntVar(&o.MemoryMiB, "m", 2048, "guest memory in MiB")
	flag.IntVar(&o.CPUs, "smp", 2, "guest CPUs")
	flag.DurationVar(&o.Timeout, "timeout", 25*time.Minute, "time one guest may take, boot to power-off")
	flag.IntVar(&o.Parallel, "parallel", runtime.NumCPU(), "guests booted at once (each keeps about one host CPU busy; -v boots one at a time)")
	run := flag.String("run", "", "run only the tests matching this -test.run pattern, of suite `NAME=PATTERN` (for a focused run)")
	flag.Parse()
	if *run != "" {
		name, pattern, _ := strings.Cut(*run, "=")
		for _, s := range vmtest.Suites {
			if s.Name == name {
				s.Run = pattern
				o.Suites = append(o.Suites, s)
			}
		}
		if o.Suites == nil {
			fmt.Fprintf(os.Stderr, "test-kernels: -run: no suite %q\n", name)
			os.Exit(2)
		}
		// A focused run's matrix is partial: not over the committed one,
		// unless asked.
		explicit := false
		flag.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "report" })
		if !explicit {
			o.Report = ""
		}
	}
	if *kernels != "" {
		o.Kernels = strings.Split(*kernels, ",")
	}
	if err := vmtest.Run(o); err != nil {
		fmt.Fprintf(os.Stderr, "test-kernels: %v\n", err)
		os.Exit(1)
	}
}

func names() string {
	var n []string
	for _, k := range vmtest.Kernels {
		n = append(n, k.Name)
	}
	return strings.Join(n, ",")
}
