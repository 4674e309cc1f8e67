package vmtest

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
)

func TestParseTestOutput(t *testing.T) {
	out := `=== RUN   TestA
--- PASS: TestA (0.00s)
=== RUN   TestB
=== RUN   TestB/one
    b_test.go:10: kernel feature missing: no lsm
=== RUN   TestB/two
    b_test.go:20: got 1
    b_test.go:21: want 2
=== NAME  TestB
    b_test.go:30: cleanup said something
--- FAIL: TestB (0.01s)
    --- SKIP: TestB/one (0.00s)
    --- FAIL: TestB/two (0.00s)
=== RUN   TestC
    c_test.go:5: no root
--- SKIP: TestC (0.00s)
FAIL
`
	got, err := ParseTestOutput(strings.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	want := []Test{
		{Name: "TestA", Result: Pass},
		{Name: "TestB", Result: Fail, Why: "cleanup said something"},
		{Name: "TestB/one", Result: Skip, Why: "kernel feature missing: no lsm"},
		{Name: "TestB/two", Result: Fail, Why: "want 2"},
		{Name: "TestC", Result: Skip, Why: "no root"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v\nwant %+v", got, want)
	}
}

func TestSummaryRoundTrip(t *testing.T) {
	s := Summary{Kernel: "6.1.0-57-cloud-amd64", LSM: "yama,bpf", Guards: []Guard{{Name: "packet-sockets", Active: true}},
		Suites: []Suite{{Name: "bpf", Tests: []Test{{Name: "TestA", Result: Pass}}}}}
	var console bytes.Buffer
	console.WriteString("[    1.0] some kernel line\n")
	if err := WriteSummary(&console, s); err != nil {
		t.Fatal(err)
	}
	console.WriteString("[    2.0] reboot: Power down\n")
	got, err := ReadSummary(&console)
	if err != nil || !reflect.DeepEqual(got, s) {
		t.Errorf("ReadSummary = %+v, %v; want %+v", got, err, s)
	}
	if _, err := ReadSummary(strings.NewReader("Kernel panic\n")); err == nil {
		t.Error("ReadSummary found a summary in a log without one")
	}
}

// TestClaims: a kernel with the feature must show the guard active and
// the test passed; one without must show neither; and a broken boot fails
// every claim.
func TestClaims(t *testing.T) {
	claim := Claim{What: "packet", Guard: "packet-sockets", Tests: []string{"TestP"}, Needs: hasBPFLSM, NeedsWhat: "bpf LSM"}
	col := func(lsm string, active bool, result Result) Column {
		return Column{Summary: Summary{LSM: lsm, Guards: []Guard{{Name: "packet-sockets", Active: active}},
			Suites: []Suite{{Name: "bpf", Tests: []Test{{Name: "TestP", Result: result}}}}}}
	}
	for _, tc := range []struct {
		name    string
		c       Column
		cell    string
		failure bool
	}{
		{"proven", col("yama,bpf", true, Pass), "active, passed", false},
		{"not on this kernel", col("yama", false, Skip), NotHere, false},
		{"guard off where the kernel has it", col("yama,bpf", false, Skip), "FAILED", true},
		{"test skipped where the kernel has it", col("yama,bpf", true, Skip), "FAILED", true},
		{"test failed", col("yama,bpf", true, Fail), "FAILED", true},
		{"guard on without the feature", col("yama", true, Pass), "FAILED", true},
		{"no summary", Column{Err: "no summary"}, "FAILED", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cell, bad := tc.c.claimCell(claim)
			if !strings.HasPrefix(cell, tc.cell) || bad != tc.failure {
				t.Errorf("claimCell = %q, %v; want %q..., %v", cell, bad, tc.cell, tc.failure)
			}
		})
	}
}

func TestKernelAtLeast(t *testing.T) {
	for release, want := range map[string]bool{"6.1.0-57-cloud-amd64": false, "6.5.0": true, "6.12.95+deb12-cloud-amd64": true, "5.10.0-46": false, "x": false} {
		if got := kernelAtLeast(release, 6, 5); got != want {
			t.Errorf("kernelAtLeast(%q, 6, 5) = %v", release, got)
		}
	}
}

func TestParseGaps(t *testing.T) {
	for _, tc := range []struct {
		name, line string
		want       []Gap
	}{
		{"open, reached", "    attack_test.go:796: KNOWN GAP: packet-raw-ipv4 as root-in-app reached 10.1.2.3:5353/udp (deny) — known-gaps.txt:54: AF_PACKET",
			[]Gap{{Technique: "packet-raw-ipv4", Role: "root-in-app"}}},
		{"open, bound", "    attack_test.go:801: KNOWN GAP: listen-without-bind as strict-listen bound a port listen: [7000] does not list",
			[]Gap{{Technique: "listen-without-bind", Role: "strict-listen"}}},
		{"closed", "    attack_test.go:770: KNOWN GAP closed here by guard tun-devices: tun-inject-forwarded as root-in-app did not reach (ioctl TUNSETIFF: operation not permitted) — known-gaps.txt:57",
			[]Gap{{Technique: "tun-inject-forwarded", Role: "root-in-app", ClosedBy: "tun-devices"}}},
		{"not exercised", "    attack_test.go:780: KNOWN GAP not exercised here: xdp-socket-tx as root-in-app is unavailable (no driver)", nil},
		{"other output", "--- PASS: TestAttackSuite/unbound (1.00s)", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseGaps(strings.NewReader(tc.line + "\n"))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}
