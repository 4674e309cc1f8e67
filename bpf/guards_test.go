package bpf

import (
	"os"
	"strings"
	"testing"
)

func TestTracingWhy(t *testing.T) {
	for _, tc := range []struct {
		scope string
		err   error
		want  string
	}{
		{"", os.ErrNotExist, "no Yama here"},
		{"0", nil, "ptrace_scope is 0"},
		{"1", nil, "ptrace_scope 1 stops"},
		{"3", nil, "ptrace_scope 3 stops"},
	} {
		if got := tracingWhy(tc.scope, tc.err); !strings.Contains(got, tc.want) || !strings.Contains(got, "CAP_SYS_PTRACE") {
			t.Errorf("tracingWhy(%q, %v) = %q, want it to say %q", tc.scope, tc.err, got, tc.want)
		}
	}
}
