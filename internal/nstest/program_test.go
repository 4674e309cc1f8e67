package nstest

import (
	"fmt"
	"strings"
	"testing"
)

// fatalTB records what Program tells its test.
type fatalTB struct {
	testing.TB
	msg     string
	skipped bool
}

func (f *fatalTB) Helper()                          {}
func (f *fatalTB) Fatalf(format string, a ...any)   { f.msg = fmt.Sprintf(format, a...) }
func (f *fatalTB) Skipf(format string, args ...any) { f.skipped = true }

func TestProgram(t *testing.T) {
	saved := sbinDirs
	t.Cleanup(func() { sbinDirs = saved })
	tests := []struct {
		name, program, path string
		wantFail            string // "" = found
	}{
		{"found in PATH", "sh", "/usr/bin:/bin", ""},
		{"found in sbin beside PATH", "sh", t.TempDir(), ""},
		{"missing names its package", "nft", t.TempDir(), "install the Debian package nftables"},
		{"missing and unknown", "procgate-no-such-program", t.TempDir(), "add it to nstest's debianPackage"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("PATH", tt.path)
			sbinDirs = []string{t.TempDir(), "/usr/bin", "/bin"}
			if tt.wantFail != "" {
				sbinDirs = []string{t.TempDir()}
			}
			f := &fatalTB{}
			got := Program(f, tt.program)
			if f.skipped {
				t.Fatal("Program skipped")
			}
			if tt.wantFail == "" {
				if f.msg != "" || !strings.HasSuffix(got, "/"+tt.program) {
					t.Fatalf("Program(%q) = %q, failure %q; want a path", tt.program, got, f.msg)
				}
				return
			}
			if !strings.Contains(f.msg, tt.wantFail) || !strings.Contains(f.msg, tt.program) {
				t.Fatalf("failure %q, want it to name %q and %q", f.msg, tt.program, tt.wantFail)
			}
		})
	}
}
