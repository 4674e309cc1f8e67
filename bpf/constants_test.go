package bpf

import (
	"bufio"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"

	"github.com/procgate/procgate/ruleset"
)

// TestReasonsMatchKernel compares enum reason in the BTF of the committed
// procgate object with ruleset's reasons, which events carry as they are
// (Event.Reason): every kernel reason must be the ruleset's of that name.
func TestReasonsMatchKernel(t *testing.T) {
	spec, err := loadProcgate()
	if err != nil {
		t.Fatal(err)
	}
	var reason *btf.Enum
	if err := spec.Types.TypeByName("reason", &reason); err != nil {
		t.Fatalf("enum reason not in the object's BTF: %v", err)
	}
	want := map[string]ruleset.Reason{
		"REASON_NOT_INTERNAL": ruleset.ReasonNotInternal,
		"REASON_GRANTED":      ruleset.ReasonGranted,
		"REASON_UNBOUND":      ruleset.ReasonUnbound,
		"REASON_NO_GRANT":     ruleset.ReasonNoGrant,
		"REASON_PORT":         ruleset.ReasonPort,
		"REASON_NO_POLICY":    ruleset.ReasonNoPolicy,
		"REASON_RAW_SOCKET":   ruleset.ReasonRawSocket,
		"REASON_PROTO":        ruleset.ReasonProto,
		"REASON_EXE":          ruleset.ReasonExe,
		"REASON_HANDOVER":     ruleset.ReasonHandover,
		"REASON_EVERYONE":     ruleset.ReasonEveryone,
		"REASON_OUTSIDE":      ruleset.ReasonOutside,
		"REASON_LISTEN":       ruleset.ReasonListen,
		"REASON_LOOPBACK":     ruleset.ReasonLoopback,
		"REASON_NAME":         ruleset.ReasonName,
	}
	for _, v := range reason.Values {
		r, ok := want[v.Name]
		if !ok {
			t.Errorf("kernel reason %s = %d has no ruleset.Reason: add one (and here)", v.Name, v.Value)
			continue
		}
		if uint64(r) != v.Value {
			t.Errorf("%s is %d in the kernel, ruleset has %d (%s)", v.Name, v.Value, r, r)
		}
		delete(want, v.Name)
	}
	for name := range want {
		t.Errorf("%s is not in the kernel's enum reason", name)
	}
}

// TestDefinesMatchGo compares the flags and layout constants decision.h
// defines (#define, not in BTF) with the Go constants encode.go writes
// with: every APP_, GEN_, TAG_ and RULE_ flag must have its Go twin here.
func TestDefinesMatchGo(t *testing.T) {
	goValues := map[string]uint64{
		"APP_AUDIT_ALLOW":       appFlagAuditAllow,
		"APP_EXE_PINNED":        appFlagExePinned,
		"APP_HANDOVER_ALLOWED":  appFlagHandover,
		"APP_BY_USER":           appFlagByUser,
		"APP_OUTSIDE_DENY":      appFlagOutsideDeny,
		"APP_LOOPBACK_DENY":     appFlagLoopbackDeny,
		"APP_LISTEN":            appFlagListen,
		"APP_NAMES":             appFlagNames,
		"APP_AUDIT_ONLY":        appFlagAuditOnly,
		"GEN_NO_UDP_HANDOVER":   genNoUDPHandover,
		"GEN_EVERYONE":          genEveryone,
		"GEN_USER_APPS":         genUserApps,
		"GEN_SANDBOX":           genSandbox,
		"GEN_LISTEN":            genListen,
		"GEN_TRUST_TRACE_GUARD": genTrustTraceGuard,
		"GEN_UDP_MARKS":         genUDPMarks,
		"TAG_SLOT":              tagSlot,
		"TAG_V6":                tagV6,
		"TAG_LISTEN":            tagListen,
		"RULE_INSIDE_INTERNAL":  ruleInsideInternal,
		"PORTS_PER_SLOT":        portsPerSlot,
		"EVERYONE_APP_ID":       everyoneID,
		"MAX_CGROUP_LEVEL":      maxCgroupLevel,
		"NAME_PARTS":            NameParts,
		"PROTO_UDP":             protoUDP,
	}
	defines := readDefines(t, "decision.h")
	for name, v := range defines {
		want, ok := goValues[name]
		flag := strings.HasPrefix(name, "APP_") || strings.HasPrefix(name, "GEN_") || strings.HasPrefix(name, "TAG_") || strings.HasPrefix(name, "RULE_")
		switch {
		case !ok && flag:
			t.Errorf("decision.h defines %s = %#x, which no Go constant mirrors: add one to encode.go (and here)", name, v)
		case ok && v != want:
			t.Errorf("%s is %#x in decision.h, %#x in Go", name, v, want)
		}
	}
	for name := range goValues {
		if _, ok := defines[name]; !ok {
			t.Errorf("%s is not defined in decision.h (or not as a number)", name)
		}
	}
}

var (
	defineRE = regexp.MustCompile(`^#define ([A-Z0-9_]+) (.+?)\s*(//.*)?$`)
	// A number, or a bit: (1U << n), (1ULL << n).
	shiftRE = regexp.MustCompile(`^\(1U?L?L? << (\d+)\)$`)
)

// readDefines reads the numeric #defines of a header.
func readDefines(t *testing.T, path string) map[string]uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]uint64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		m := defineRE.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		text := strings.TrimRight(m[2], "ULul")
		if s := shiftRE.FindStringSubmatch(m[2]); s != nil {
			n, _ := strconv.Atoi(s[1])
			out[m[1]] = 1 << n
		} else if v, err := strconv.ParseUint(text, 0, 64); err == nil {
			out[m[1]] = v
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}
