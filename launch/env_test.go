package launch_test

import (
	"slices"
	"testing"

	"github.com/procgate/procgate/launch"
)

func TestScrubEnv(t *testing.T) {
	tests := []struct {
		name     string
		in, want []string
	}{
		{"nothing to drop", []string{"PATH=/bin", "HOME=/root", "TMPDIR=/tmp/x"}, []string{"PATH=/bin", "HOME=/root", "TMPDIR=/tmp/x"}},
		{"loader", []string{"LD_PRELOAD=/x.so", "A=1", "LD_LIBRARY_PATH=/x", "LD_AUDIT=/a.so", "LD_BIND_NOW=1", "LD_FUTURE_THING=1"}, []string{"A=1"}},
		{"glibc list", []string{
			"GCONV_PATH=/x", "GETCONF_DIR=/x", "GLIBC_TUNABLES=glibc.malloc.check=3", "HOSTALIASES=/x",
			"LOCALDOMAIN=x", "LOCPATH=/x", "NIS_PATH=x", "NLSPATH=/x", "RESOLV_HOST_CONF=/x",
			"RES_OPTIONS=x", "TZDIR=/x", "TZ=UTC",
		}, []string{"TZ=UTC"}},
		{"malloc", []string{"MALLOC_TRACE=/x", "MALLOC_CHECK_=3", "MALLOC_ARENA_MAX=1", "MALLOCX=1"}, []string{"MALLOCX=1"}},
		{"lookalikes kept", []string{"XLD_PRELOAD=1", "ld_preload=1", "OLDPWD=/"}, []string{"XLD_PRELOAD=1", "ld_preload=1", "OLDPWD=/"}},
		{"malformed dropped", []string{"NOEQUALS", "=x", "A="}, []string{"A="}},
		{"empty", nil, []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := launch.ScrubEnv(tt.in); !slices.Equal(got, tt.want) {
				t.Errorf("ScrubEnv(%q) = %q, want %q", tt.in, got, tt.want)
			}
		})
	}
}
