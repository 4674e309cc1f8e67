package nstest

import (
	"os/exec"
	"path/filepath"
	"testing"
)

// debianPackage names the Debian package of each program the tests run,
// the same names .ci/deps installs.
var debianPackage = map[string]string{
	"nft":     "nftables",
	"vsftpd":  "vsftpd",
	"curl":    "curl",
	"ip":      "iproute2",
	"nsenter": "util-linux",
	"setpriv": "util-linux",
	"bash":    "bash",
	"tmux":    "tmux",
}

// sbinDirs are searched after $PATH: vsftpd and nft live in /usr/sbin,
// which a user's PATH may lack.
var sbinDirs = []string{"/usr/local/sbin", "/usr/sbin", "/sbin"}

// Program returns the path of the program name and fails t, naming the
// Debian package to install, when it is missing: a test that needs a
// program never passes by skipping.
func Program(t testing.TB, name string) string {
	t.Helper()
	path, err := lookProgram(name)
	if err != nil {
		pkg := debianPackage[name]
		if pkg == "" {
			pkg = "(unknown: add it to nstest's debianPackage and .ci/deps)"
		}
		t.Fatalf("%s not found in $PATH or %v: install the Debian package %s (`make deps` as root)", name, sbinDirs, pkg)
		return ""
	}
	return path
}

func lookProgram(name string) (string, error) {
	path, err := exec.LookPath(name)
	if err == nil {
		return path, nil
	}
	for _, dir := range sbinDirs {
		if p, err2 := exec.LookPath(filepath.Join(dir, name)); err2 == nil {
			return p, nil
		}
	}
	return "", err
}
