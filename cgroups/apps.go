package cgroups

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// AppDirs manages one cgroup per application below Base (conventionally
// <cgroup-root>/procgate.apps). A process holds an app's grants because it is
// in that app's cgroup, so the cgroups must be joinable only by root: the
// directories and the files that delegate a cgroup (cgroup.procs,
// cgroup.threads, cgroup.subtree_control) stay root-owned and not writable by
// anyone else. Moving a process into a cgroup needs write access to
// cgroup.procs of the destination and of the common ancestor, so an
// unprivileged process can neither join an app nor leave one for another.
type AppDirs struct {
	Base string
}

// delegationFiles are the files whose ownership hands a cgroup to a user
// (Documentation/admin-guide/cgroup-v2.rst, "Delegation").
var delegationFiles = []string{"cgroup.procs", "cgroup.threads", "cgroup.subtree_control"}

// Dir returns the cgroup directory of app without creating it.
func (a AppDirs) Dir(app string) (string, error) {
	if err := checkName(app); err != nil {
		return "", err
	}
	return filepath.Join(a.Base, app), nil
}

// checkName refuses names that would leave Base or collide with the files
// the kernel puts in every cgroup.
func checkName(app string) error {
	switch {
	case app == "", app == ".", app == "..":
		return fmt.Errorf("app name %q is not a usable cgroup name", app)
	case strings.ContainsAny(app, "/\n\x00"):
		return fmt.Errorf("app name %q: must not contain '/', newline or NUL", app)
	case strings.HasPrefix(app, "cgroup."):
		return fmt.Errorf("app name %q: the prefix cgroup. is reserved by the kernel", app)
	}
	return nil
}

// Ensure creates the cgroup of app (and Base) if missing and returns it. It is
// idempotent, and it also takes back directories someone delegated: owner
// root:root, mode 0755, delegation files root-owned 0644.
func (a AppDirs) Ensure(app string) (string, error) {
	dir, err := a.Dir(app)
	if err != nil {
		return "", err
	}
	for _, d := range []string{a.Base, dir} {
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("create cgroup %s: %w", d, err)
		}
		if err := rootOnly(d, 0o755); err != nil {
			return "", fmt.Errorf("create cgroup %s: %w", d, err)
		}
		for _, f := range delegationFiles {
			if err := rootOnly(filepath.Join(d, f), 0o644); err != nil {
				return "", fmt.Errorf("create cgroup %s: %w", d, err)
			}
		}
	}
	return dir, nil
}

func rootOnly(path string, mode os.FileMode) error {
	if err := os.Lchown(path, 0, 0); err != nil {
		return err
	}
	return os.Chmod(path, mode)
}

// Remove removes the cgroup of app and its descendants. It fails, naming the
// processes, if any are still inside. An app without a cgroup is not an error.
func (a AppDirs) Remove(app string) error {
	dir, err := a.Dir(app)
	if err != nil {
		return err
	}
	return RemoveTree(dir)
}

// List returns the names of the apps that have a cgroup, sorted. A missing
// Base means no apps.
func (a AppDirs) List() ([]string, error) {
	ents, err := os.ReadDir(a.Base)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list app cgroups in %s: %w", a.Base, err)
	}
	var apps []string
	for _, e := range ents {
		if e.IsDir() {
			apps = append(apps, e.Name())
		}
	}
	return apps, nil
}
