// Command bench measures what procgate's enforcement costs against no
// enforcement, nftables and policy routing enforcing the same policy, in
// namespaces and cgroups of its own, and writes JSON, a Markdown report and
// SVG plots. `make bench` runs it in full, `make bench-quick` in under two
// minutes. It needs root.
package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/procgate/procgate/internal/etcdtest"
	"github.com/procgate/procgate/internal/probe"
)

func main() {
	etcdtest.MaybeServe() // the fleet phase's etcd members
	maybeClient()
	probe.MaybeServe() // the revocation phase's socket holders
	var o options
	flag.BoolVar(&o.quick, "quick", false, "short run (under 2 minutes): fewer attempts, rounds and sizes")
	flag.StringVar(&o.out, "out", "bench/results", "directory for results.json, REPORT.md and the plots")
	phases := flag.String("phases", strings.Join(allPhases, ","), "phases to run, comma-separated")
	sizes := flag.String("sizes", "", "policy sizes of the scaling phase, comma-separated (default: the mode's)")
	flag.StringVar(&o.from, "from", "", "measure nothing: write the report and plots again from this results.json")
	flag.BoolVar(&o.merge, "merge", false, "merge the results of -phases into the results.json in -out (same mode), keeping the other phases' results, and write the report again")
	flag.BoolVar(&o.verbose, "v", false, "log progress in detail")
	flag.Parse()
	o.phases = strings.Split(*phases, ",")
	for _, f := range strings.FieldsFunc(*sizes, func(r rune) bool { return r == ',' }) {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: -sizes: %v\n", err)
			os.Exit(2)
		}
		o.sizes = append(o.sizes, n)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}
