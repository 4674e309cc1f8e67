package launch

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/procgate/procgate/ruleset"
)

// CheckExe decides whether the binary at path may run as app for the user
// uid, and returns it with every symlink resolved: the path to execute, so
// that a link the caller controls cannot be switched after the check.
//
// Every app needs a regular, executable file. An app that pins binaries
// (app.Exe) also needs:
//   - the resolved path to be the resolved path of one of app.Exe;
//   - the file owned by root, not writable by group or others, and so not
//     writable by uid, and every directory above it owned by root and not
//     writable by group or others, so that the caller can neither change the
//     binary nor put another in its place between this check and the exec;
//   - its SHA-256 to match, where the policy gives one.
//
// An app without pinned binaries gives its grants to any code its processes
// run (a shell can exec anything), so ownership checks there would refuse
// users' own tools without protecting anything.
//
// uid is the user the binary will run as. It appears in errors only: a file
// and directories that only root can write are not writable by any other
// uid, and root may change its own binaries anyway.
func CheckExe(app ruleset.App, path string, uid uint32) (string, error) {
	resolved, err := filepath.EvalSymlinks(path)
	if err == nil {
		resolved, err = filepath.Abs(resolved)
	}
	if err != nil {
		return "", fmt.Errorf("app %s: resolve binary %s: %w", app.Name, path, err)
	}
	st, err := os.Stat(resolved)
	if err != nil {
		return "", fmt.Errorf("app %s: binary %s: %w", app.Name, resolved, err)
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("app %s: binary %s is not a regular file (%s)", app.Name, resolved, st.Mode().Type())
	}
	if st.Mode().Perm()&0o111 == 0 {
		return "", fmt.Errorf("app %s: binary %s is not executable", app.Name, resolved)
	}
	if len(app.Exe) == 0 {
		return resolved, nil
	}

	var sums []string
	pinned := false
	var want []string
	for _, e := range app.Exe {
		p, err := filepath.EvalSymlinks(e.Path)
		if err != nil {
			want = append(want, e.Path+" (unresolvable: "+err.Error()+")")
			continue
		}
		want = append(want, p)
		if p != resolved {
			continue
		}
		pinned = true
		if e.SHA256 == "" {
			sums = nil // one entry without a hash admits the file as it is
			break
		}
		sums = append(sums, strings.ToLower(e.SHA256))
	}
	if !pinned {
		return "", fmt.Errorf("app %s: binary %s (resolved from %s) is not one of the app's binaries %v", app.Name, resolved, path, want)
	}
	if err := rootOwned(st, resolved); err != nil {
		return "", fmt.Errorf("app %s: binary %s could be changed by uid %d: %w", app.Name, resolved, uid, err)
	}
	for dir := filepath.Dir(resolved); ; dir = filepath.Dir(dir) {
		dst, err := os.Stat(dir)
		if err != nil {
			return "", fmt.Errorf("app %s: directory %s above binary %s: %w", app.Name, dir, resolved, err)
		}
		if err := rootOwned(dst, dir); err != nil {
			return "", fmt.Errorf("app %s: binary %s could be replaced by uid %d: %w", app.Name, resolved, uid, err)
		}
		if dir == "/" {
			break
		}
	}
	if sums != nil {
		got, err := fileSHA256(resolved)
		if err != nil {
			return "", fmt.Errorf("app %s: hash binary %s: %w", app.Name, resolved, err)
		}
		for _, s := range sums {
			if s == got {
				return resolved, nil
			}
		}
		return "", fmt.Errorf("app %s: binary %s has sha256 %s, the policy wants %s", app.Name, resolved, got, strings.Join(sums, " or "))
	}
	return resolved, nil
}

// rootOwned refuses a file that anyone but root could change. With POSIX
// ACLs the group bits are the ACL mask, so a named user or group with write
// access shows up as group-writable.
func rootOwned(fi os.FileInfo, path string) error {
	sys, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("%s: no owner information", path)
	}
	if sys.Uid != 0 {
		return fmt.Errorf("%s is owned by uid %d, not root", path, sys.Uid)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("%s is writable by group or others (mode %04o)", path, fi.Mode().Perm())
	}
	return nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
