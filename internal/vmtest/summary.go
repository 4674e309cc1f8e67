// Package vmtest runs procgate's kernel tests on other kernels than the
// host's: Debian's kernel packages booted under qemu (TCG), with a static
// init that prepares a test host, runs the test binaries and reports what
// passed, failed or was not on that kernel. The host side (fetching
// kernels, building the initramfs, booting, the matrix) and the guest side
// (the init's plan and summary) share this package; cmd/kernels and
// cmd/guestinit are their programs. Nothing here is part of procgate.
package vmtest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"strings"
)

// The guest prints its summary on the console between these lines, as one
// line of JSON, so that kernel messages or test output around it do not
// matter.
const (
	SummaryBegin = "=== VMTEST SUMMARY BEGIN ==="
	SummaryEnd   = "=== VMTEST SUMMARY END ==="
)

// Result of one test.
type Result string

const (
	Pass Result = "pass"
	Fail Result = "fail"
	Skip Result = "skip"
)

// Test is one test or subtest of a suite, by its full name (TestX/sub).
type Test struct {
	Name   string `json:"name"`
	Result Result `json:"result"`
	// Why is the last line the test logged before it skipped or failed.
	Why string `json:"why,omitempty"`
}

// Suite is one test binary's run.
type Suite struct {
	Name  string `json:"name"`
	Tests []Test `json:"tests"`
	// Err says why the binary failed as a whole (exit status, timeout,
	// panic), "" when it exited 0.
	Err string `json:"err,omitempty"`
	// Gaps are the attack suite's known gaps as it reported them: open
	// here, or closed by a guard active here.
	Gaps []Gap `json:"gaps,omitempty"`
}

// Gap is a line of attack/known-gaps.txt as one run found it.
type Gap struct {
	Technique string `json:"technique"`
	Role      string `json:"role"`
	// ClosedBy is the guard that closed it here; "" for a gap that is
	// open (its technique reached).
	ClosedBy string `json:"closed_by,omitempty"`
}

// name is how the matrix names a gap: "technique as role".
func (g Gap) name() string { return g.Technique + " as " + g.Role }

// Guard is one of procgate's guards as the kernel gives it (bpf.Guards,
// launch.TraceGuard).
type Guard struct {
	Name   string `json:"name"`
	Active bool   `json:"active"`
	Why    string `json:"why,omitempty"`
}

// Summary is what one boot found.
type Summary struct {
	Kernel string  `json:"kernel"` // uname -r
	LSM    string  `json:"lsm"`    // /sys/kernel/security/lsm
	Guards []Guard `json:"guards"`
	// GuardsErr says why the guards could not be read (bpf.Open failed).
	GuardsErr string  `json:"guards_err,omitempty"`
	Suites    []Suite `json:"suites"`
	// Setup lists what the init could not prepare (a module, a mount).
	Setup []string `json:"setup,omitempty"`
}

// WriteSummary prints s between the markers.
func WriteSummary(w io.Writer, s Summary) error {
	b, err := json.Marshal(s)
	if err != nil {
		return fmt.Errorf("encode summary: %w", err)
	}
	_, err = fmt.Fprintf(w, "\n%s\n%s\n%s\n", SummaryBegin, b, SummaryEnd)
	return err
}

// ReadSummary finds the summary in a console log. Lines between the markers
// that are not JSON (a kernel message) are ignored.
func ReadSummary(r io.Reader) (Summary, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 1<<20), 16<<20)
	in, found := false, false
	var s Summary
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		switch {
		case line == SummaryBegin:
			in = true
		case line == SummaryEnd:
			in = false
		case in && strings.HasPrefix(line, "{"):
			if err := json.Unmarshal([]byte(line), &s); err != nil {
				return s, fmt.Errorf("decode summary: %w", err)
			}
			found = true
		}
	}
	if err := sc.Err(); err != nil {
		return s, fmt.Errorf("read console log: %w", err)
	}
	if !found {
		return s, fmt.Errorf("no summary between %q and %q in the console log", SummaryBegin, SummaryEnd)
	}
	return s, nil
}

// testLine matches go test -v's verdict lines, indented by four spaces per
// subtest level.
var testLine = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): (\S+) \(`)

// startLine matches the lines after which output belongs to a test.
var startLine = regexp.MustCompile(`^=== (?:RUN|CONT|NAME|PAUSE)\s+(\S+)`)

// logLine matches a t.Log line: "    file_test.go:12: message".
var logLine = regexp.MustCompile(`^\s+\S+\.go:\d+: (.*)$`)

// The attack suite's lines for a known gap that reached, and one a guard
// closed (attack/attack_test.go).
var (
	openGapLine   = regexp.MustCompile(`KNOWN GAP: (\S+) as (\S+) (?:reached|bound) `)
	closedGapLine = regexp.MustCompile(`KNOWN GAP closed here by guard (\S+): (\S+) as (\S+) did not reach`)
)

// ParseGaps reads the known gaps the attack suite reported in its output.
func ParseGaps(r io.Reader) ([]Gap, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 1<<20), 16<<20)
	var gaps []Gap
	for sc.Scan() {
		line := sc.Text()
		if m := openGapLine.FindStringSubmatch(line); m != nil {
			gaps = append(gaps, Gap{Technique: m[1], Role: m[2]})
		} else if m := closedGapLine.FindStringSubmatch(line); m != nil {
			gaps = append(gaps, Gap{Technique: m[2], Role: m[3], ClosedBy: m[1]})
		}
	}
	return gaps, sc.Err()
}

// ParseTestOutput reads the output of a test binary run with -test.v and
// returns its tests in the order they ended. A skipped or failed test's Why
// is the last line it logged.
func ParseTestOutput(r io.Reader) ([]Test, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 1<<20), 16<<20)
	var tests []Test
	last := map[string]string{}
	current := ""
	for sc.Scan() {
		line := sc.Text()
		if m := startLine.FindStringSubmatch(line); m != nil {
			current = m[1]
			continue
		}
		if m := testLine.FindStringSubmatch(line); m != nil {
			t := Test{Name: m[2], Result: map[string]Result{"PASS": Pass, "FAIL": Fail, "SKIP": Skip}[m[1]]}
			if t.Result != Pass {
				t.Why = last[t.Name]
			}
			tests = append(tests, t)
			// Lines after a verdict belong to the test again (a skip's
			// reason printed after it in non-streaming output).
			current = t.Name
			continue
		}
		if m := logLine.FindStringSubmatch(line); m != nil && current != "" {
			last[current] = m[1]
		}
	}
	return tests, sc.Err()
}
