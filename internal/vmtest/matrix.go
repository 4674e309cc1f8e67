package vmtest

import (
	"fmt"
	"io"
	"regexp"
	"strings"
)

// Claim is one line of the matrix that a kernel must prove: a guard that
// Guards reports and the test that shows it working. Where the kernel
// gives the feature (Needs says how that is known), the guard must be
// active and the test must pass; elsewhere the guard must say it is not
// active and the test must skip, not fail.
type Claim struct {
	What  string // the claim, as the report words it
	Guard string // bpf.Guards name; "" for a test-only claim
	// Tests all prove it (full names, subtests with _ for spaces).
	Tests []string
	// Needs says whether kernel k (its summary) has the feature.
	Needs func(Summary) bool
	// NeedsWhat names the feature for the report.
	NeedsWhat string
}

// hasBPFLSM: the bpf LSM is in the kernel's active list (and lsm_cgroup
// programs need 6.0+, which every kernel with a bpf LSM in the matrix
// has).
func hasBPFLSM(s Summary) bool {
	for _, l := range strings.Split(s.LSM, ",") {
		if l == "bpf" {
			return true
		}
	}
	return false
}

// Claims are the matrix's proven lines.
var Claims = []Claim{
	{What: "AF_PACKET refused inside apps (LSM socket guard)", Guard: "packet-sockets",
		Tests: []string{"TestBackstops/packet_socket_inside_an_app_cgroup"}, Needs: hasBPFLSM, NeedsWhat: "bpf in the active LSM list"},
	{What: "AF_XDP refused inside apps (LSM socket guard)", Guard: "packet-sockets",
		Tests: []string{"TestBackstops/XDP_socket_inside_an_app_cgroup"}, Needs: hasBPFLSM, NeedsWhat: "bpf in the active LSM list"},
	{What: "AF_PACKET and AF_XDP allowed outside apps",
		Tests: []string{"TestBackstops/packet_socket_outside_app_cgroups", "TestBackstops/XDP_socket_outside_app_cgroups"}},
	{What: "TUN devices refused inside apps (LSM TUN guard)", Guard: "tun-devices",
		Tests: []string{"TestBackstops/TUN_device_inside_an_app_cgroup"}, Needs: hasBPFLSM, NeedsWhat: "bpf in the active LSM list"},
	{What: "TUN devices allowed outside apps", Tests: []string{"TestBackstops/TUN_device_outside_app_cgroups"}},
	{What: "listen() on a never-bound socket follows listen: (port 0; LSM socket_listen)", Guard: "listen-autobind",
		Tests: []string{"TestListenWithoutBind/0_not_listed", "TestListenWithoutBind/listen:_[]"},
		Needs: hasBPFLSM, NeedsWhat: "bpf in the active LSM list"},
	{What: "a connected UDP socket of an app refuses other processes' datagrams (UDP handover)", Guard: "udp-handover",
		Tests: []string{"TestHandoverGuard//unbound/connect/10.1.2.3:5353/udp", "TestHandoverGuard//other_app/connect/10.1.2.3:5353/udp"}},
	{What: "processes moved into an app from another app hold no grants (tp_btf marks)", Guard: "cgroup-migration",
		Tests: []string{"TestMigrationMarks"}},
	{What: "attack suite, focused (" + attackFocus + "): nothing reaches but this kernel's open known gaps", Tests: []string{"TestAttackSuite"}},
	{What: "revocation by sock_diag SOCK_DESTROY", Tests: []string{"TestSweep/netlink"}},
	{What: "revocation by socket iterators and bpf_sock_destroy", Tests: []string{"TestSweep/iterator"},
		Needs: func(s Summary) bool { return kernelAtLeast(s.Kernel, 6, 5) }, NeedsWhat: "Linux 6.5+"},
	{What: "revocation picks sock_diag where the iterators are missing", Tests: []string{"TestSweep/auto"}},
}

// attackFocus says which part of the attack suite the guests run.
const attackFocus = "roles unbound, root-in-app, strict-listen; packet, XDP, TUN, listen, bind and connected-UDP handover techniques"

// kernelAtLeast compares a uname release with major.minor.
func kernelAtLeast(release string, major, minor int) bool {
	var ma, mi int
	if _, err := fmt.Sscanf(release, "%d.%d", &ma, &mi); err != nil {
		return false
	}
	return ma > major || (ma == major && mi >= minor)
}

// Cell states.
const (
	Active   = "active"
	Passed   = "passed"
	Failed   = "FAILED"
	NotHere  = "not on this kernel"
	NotRun   = "not run"
	Inactive = "not active"
	// Unsupported: a kernel below procgate's floor, in the matrix for the
	// record; its suites do not run.
	Unsupported = "below procgate's floor (Linux 6.1)"
)

// Column is one kernel's results.
type Column struct {
	Kernel  Fetched
	focused bool // Matrix.Focused
	Summary Summary
	// Err says why the boot gave no summary.
	Err string
	// Missing lists needed modules the kernel has neither as file nor
	// built in.
	Missing []string
}

// Matrix is every kernel's results.
type Matrix struct {
	Columns []Column
	// Focused: the suites ran a -run pattern of their own; a claim whose
	// tests did not run is not a failure then.
	Focused bool
}

func (c Column) test(name string) (Test, bool) {
	for _, s := range c.Summary.Suites {
		for _, t := range s.Tests {
			if t.Name == name {
				return t, true
			}
		}
	}
	return Test{}, false
}

func (c Column) guard(name string) (Guard, bool) {
	for _, g := range c.Summary.Guards {
		if g.Name == name {
			return g, true
		}
	}
	return Guard{}, false
}

// claimCell says what kernel c shows of claim cl, and whether that is a
// failure.
func (c Column) claimCell(cl Claim) (string, bool) {
	switch {
	case c.Kernel.Unsupported:
		return Unsupported, false
	case c.Err != "":
		return Failed, true
	}
	has := cl.Needs == nil || cl.Needs(c.Summary)
	if cl.Guard != "" {
		g, ok := c.guard(cl.Guard)
		switch {
		case !ok:
			return Failed + " (guard " + cl.Guard + " not reported)", true
		case has && !g.Active:
			return Failed + " (guard not active: " + g.Why + ")", true
		case !has && g.Active:
			return Failed + " (guard active without " + cl.NeedsWhat + ")", true
		}
	}
	for _, name := range cl.Tests {
		t, ok := c.test(name)
		switch {
		case !ok && c.focused:
			return NotRun, false
		case !ok:
			return Failed + " (" + name + " " + NotRun + ")", true
		case t.Result == Fail:
			return Failed + " (" + name + ")", true
		case t.Result == Skip && has:
			return Failed + " (" + name + " skipped: " + t.Why + ")", true
		case t.Result == Pass && !has:
			return Failed + " (" + name + " passed without " + cl.NeedsWhat + ")", true
		}
	}
	if !has {
		return NotHere, false
	}
	if cl.Guard != "" {
		return Active + ", " + Passed, false
	}
	return Passed, false
}

// columns are m's columns, each knowing whether the run was focused.
func (m Matrix) columns() []Column {
	out := make([]Column, len(m.Columns))
	for i, c := range m.Columns {
		c.focused = m.Focused
		out[i] = c
	}
	return out
}

// Failures lists every failure of the matrix; an unsupported kernel's do
// not count.
func (m Matrix) Failures() []string {
	var out []string
	for _, c := range m.columns() {
		if c.Kernel.Unsupported {
			continue
		}
		name := c.Kernel.Name
		if c.Err != "" {
			out = append(out, name+": "+c.Err)
			continue
		}
		for _, s := range c.Summary.Setup {
			out = append(out, name+": setup: "+s)
		}
		for _, mod := range c.Missing {
			out = append(out, name+": module "+mod+" neither built in nor in the package")
		}
		if c.Summary.GuardsErr != "" {
			out = append(out, name+": guards: "+c.Summary.GuardsErr)
		}
		for _, s := range c.Summary.Suites {
			if s.Err != "" {
				out = append(out, name+": "+s.Name+": "+s.Err)
			}
			for _, t := range s.Tests {
				if t.Result == Fail {
					out = append(out, name+": "+s.Name+": "+t.Name+" failed")
				}
			}
		}
		for _, cl := range Claims {
			if cell, bad := c.claimCell(cl); bad {
				out = append(out, name+": "+cl.What+": "+cell)
			}
		}
	}
	return out
}

// Markdown writes the matrix: the claims, the guards, then every test.
func (m Matrix) Markdown(w io.Writer) {
	head := "|"
	rule := "|---|"
	for _, c := range m.Columns {
		head += " " + c.Kernel.Name + " |"
		rule += "---|"
	}
	fmt.Fprintf(w, "| kernel |%s\n%s\n", strings.TrimPrefix(head, "|"), rule)
	row := func(name string, cell func(Column) string) {
		fmt.Fprintf(w, "| %s |", name)
		for _, c := range m.columns() {
			fmt.Fprintf(w, " %s |", escape(cell(c)))
		}
		fmt.Fprintln(w)
	}
	row("package", func(c Column) string { return c.Kernel.Package })
	row("from", func(c Column) string { return c.Kernel.Debian })
	row("LSMs", func(c Column) string { return c.Summary.LSM })
	row("procgate loads", func(c Column) string {
		switch {
		case c.Err != "":
			return Failed + ": " + c.Err
		case c.Summary.GuardsErr != "":
			return "no: " + c.Summary.GuardsErr
		}
		return "yes"
	})
	fmt.Fprintf(w, "\n**Claims** (guard active and its test passed, or not on this kernel):\n\n%s\n%s\n", "| claim |"+strings.TrimPrefix(head, "|"), rule)
	for _, cl := range Claims {
		row(cl.What, func(c Column) string { cell, _ := c.claimCell(cl); return cell })
	}
	fmt.Fprintf(w, "\n**Guards** (bpf.Guards on each kernel):\n\n%s\n%s\n", "| guard |"+strings.TrimPrefix(head, "|"), rule)
	for _, name := range m.guardNames() {
		row(name, func(c Column) string {
			g, ok := c.guard(name)
			switch {
			case c.Kernel.Unsupported && c.Err == "" && c.Summary.GuardsErr != "":
				return "-"
			case c.Err != "" || c.Summary.GuardsErr != "":
				return Failed + ": " + c.Err + c.Summary.GuardsErr
			case !ok:
				return NotRun
			case g.Active:
				return Active
			}
			return Inactive + ": " + g.Why
		})
	}
	if gaps := m.gapNames(); len(gaps) > 0 {
		fmt.Fprintf(w, "\n**Known gaps** (attack/known-gaps.txt lines the focused attack suite met: open, or closed by a guard active here):\n\n%s\n%s\n", "| technique as role |"+strings.TrimPrefix(head, "|"), rule)
		for _, name := range gaps {
			row(name, func(c Column) string {
				switch {
				case c.Kernel.Unsupported:
					return "-"
				case c.Err != "":
					return Failed
				}
				for _, s := range c.Summary.Suites {
					for _, g := range s.Gaps {
						switch {
						case g.name() != name:
						case g.ClosedBy != "":
							return "closed (" + g.ClosedBy + ")"
						default:
							return "open"
						}
					}
				}
				return NotRun
			})
		}
	}
	fmt.Fprintf(w, "\n**Tests** (top-level tests, and the subtests that did not pass everywhere; for a skip, the test's own reason):\n\n%s\n%s\n", "| test |"+strings.TrimPrefix(head, "|"), rule)
	for _, name := range m.testNames() {
		row(name, func(c Column) string {
			t, ok := c.test(name)
			switch {
			case c.Kernel.Unsupported:
				return "-"
			case c.Err != "":
				return Failed
			case !ok:
				return NotRun
			case t.Result == Pass:
				return Passed
			case t.Result == Skip:
				return NotHere + ": " + t.Why
			}
			return Failed + ": " + t.Why
		})
	}
}

// loaderNoise is what cilium/ebpf puts before the kernel's reason.
var loaderNoise = regexp.MustCompile(`assign values: field \w+: |program \w+: load program: `)

func escape(s string) string {
	s = loaderNoise.ReplaceAllString(s, "")
	s = strings.ReplaceAll(s, "|", `\|`)
	if len(s) > 200 {
		s = s[:197] + "..."
	}
	return s
}

// gapNames lists the known gaps ("technique as role") any kernel met.
func (m Matrix) gapNames() []string {
	seen := map[string]bool{}
	var out []string
	for _, c := range m.Columns {
		for _, s := range c.Summary.Suites {
			for _, g := range s.Gaps {
				if name := g.name(); !seen[name] {
					seen[name] = true
					out = append(out, name)
				}
			}
		}
	}
	return out
}

func (m Matrix) guardNames() []string {
	seen := map[string]bool{}
	var out []string
	for _, c := range m.Columns {
		for _, g := range c.Summary.Guards {
			if !seen[g.Name] {
				seen[g.Name] = true
				out = append(out, g.Name)
			}
		}
	}
	return out
}

// testNames lists the top-level tests, and the subtests that did not pass
// on some kernel, in the order they ran.
func (m Matrix) testNames() []string {
	seen := map[string]bool{}
	var out []string
	for _, c := range m.Columns {
		for _, s := range c.Summary.Suites {
			for _, t := range s.Tests {
				if seen[t.Name] || (strings.Contains(t.Name, "/") && !m.notPassed(t.Name)) {
					continue
				}
				seen[t.Name] = true
				out = append(out, t.Name)
			}
		}
	}
	return out
}

func (m Matrix) notPassed(name string) bool {
	for _, c := range m.Columns {
		if t, ok := c.test(name); ok && t.Result != Pass {
			return true
		}
	}
	return false
}
