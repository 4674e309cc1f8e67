package vmtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"time"
)

// PlanPath is where the initramfs holds the guest's plan.
const PlanPath = "/vmtest/plan.json"

// Plan is what the guest init does: load modules, then run suites.
type Plan struct {
	// Modules are paths of kernel modules in the initramfs, in load order
	// (dependencies first).
	Modules []string    `json:"modules"`
	Suites  []SuiteSpec `json:"suites"`
}

// SuiteSpec is one test binary to run.
type SuiteSpec struct {
	Name   string `json:"name"`   // the package, as the matrix names it: bpf, launch
	Binary string `json:"binary"` // path of the go test -c binary
	Dir    string `json:"dir"`    // working directory (the package's testdata is below it)
	// Run is the -test.run pattern: the tests that depend on the kernel.
	Run string `json:"run"`
	// Timeout bounds the whole binary (-test.timeout), as a time.Duration.
	Timeout string `json:"timeout"`
	// Env is added to the binary's environment (NAME=VALUE).
	Env []string `json:"env,omitempty"`
	// Files are files of the package's directory its tests read, besides
	// testdata.
	Files []string `json:"files,omitempty"`
}

// ReadPlan reads the plan at path.
func ReadPlan(path string) (Plan, error) {
	var p Plan
	b, err := os.ReadFile(path)
	if err != nil {
		return p, fmt.Errorf("read plan: %w", err)
	}
	if err := json.Unmarshal(b, &p); err != nil {
		return p, fmt.Errorf("decode plan %s: %w", path, err)
	}
	return p, nil
}

// RunSuite runs one test binary with -test.v and env, its output copied to
// out as it comes, and returns what its tests did. A binary that does not
// exit 0 (a failed test, a panic, its timeout) has Err set.
func RunSuite(s SuiteSpec, env []string, out io.Writer) Suite {
	res := Suite{Name: s.Name}
	timeout, err := time.ParseDuration(s.Timeout)
	if err != nil {
		res.Err = fmt.Sprintf("suite %s: timeout %q: %v", s.Name, s.Timeout, err)
		return res
	}
	// The binary's own -test.timeout panics with the stacks of every
	// goroutine; the context is the backstop for a binary that hangs in
	// cleanup after it.
	ctx, cancel := context.WithTimeout(context.Background(), timeout+time.Minute)
	defer cancel()
	args := []string{"-test.v", "-test.count=1", "-test.timeout=" + timeout.String()}
	if s.Run != "" {
		args = append(args, "-test.run="+s.Run)
	}
	cmd := exec.CommandContext(ctx, s.Binary, args...)
	cmd.Dir = s.Dir
	cmd.Env = append(slices.Clone(env), s.Env...)
	var buf bytes.Buffer
	cmd.Stdout = io.MultiWriter(out, &buf)
	cmd.Stderr = cmd.Stdout
	fmt.Fprintf(out, "vmtest: run %s %v in %s\n", s.Binary, args, s.Dir)
	runErr := cmd.Run()
	output := buf.Bytes()
	res.Tests, err = ParseTestOutput(bytes.NewReader(output))
	if err == nil {
		res.Gaps, err = ParseGaps(bytes.NewReader(output))
	}
	switch {
	case err != nil:
		res.Err = fmt.Sprintf("parse the output of %s: %v", filepath.Base(s.Binary), err)
	case runErr != nil:
		var exit *exec.ExitError
		if errors.As(runErr, &exit) {
			res.Err = fmt.Sprintf("%s exited: %v", filepath.Base(s.Binary), exit)
		} else {
			res.Err = fmt.Sprintf("run %s: %v", s.Binary, runErr)
		}
	case len(res.Tests) == 0:
		res.Err = fmt.Sprintf("%s ran no test (pattern %q)", filepath.Base(s.Binary), s.Run)
	}
	return res
}
