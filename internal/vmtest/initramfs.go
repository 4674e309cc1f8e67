package vmtest

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/cavaliergopher/cpio"
)

// HostTools are the host's programs the suites run, copied into the guest
// at their host paths with the shared libraries they load. Real binaries,
// not busybox applets: the exe-pinning tests need /bin/true and /bin/false
// to be different files.
var HostTools = []string{
	"sh", "true", "false", "env", "sleep", "cat", "grep", "readlink", "id",
	"nsenter", "setpriv", "ip", "nft", "ps",
}

// Archive writes an initramfs (newc cpio) whose paths mirror the host's:
// every directory and symlink on the way to a file is recreated, so merged
// /usr (/bin -> usr/bin) looks as on the host.
type Archive struct {
	w    *cpio.Writer
	seen map[string]bool
}

// NewArchive starts an archive on w; Close finishes it.
func NewArchive(w io.Writer) (*Archive, error) {
	a := &Archive{w: cpio.NewWriter(w), seen: map[string]bool{}}
	// The root directory as on a host: not writable by others (the
	// launcher refuses binaries below a world-writable directory).
	return a, a.w.WriteHeader(&cpio.Header{Name: ".", Mode: cpio.TypeDir | 0o755, Links: 2})
}

// Close writes the trailer.
func (a *Archive) Close() error { return a.w.Close() }

// Dir adds a directory and its parents.
func (a *Archive) Dir(p string) error {
	p = filepath.Clean(p)
	if p == "/" || a.seen[p] {
		return nil
	}
	if err := a.Dir(filepath.Dir(p)); err != nil {
		return err
	}
	a.seen[p] = true
	return a.w.WriteHeader(&cpio.Header{Name: strings.TrimPrefix(p, "/"), Mode: cpio.TypeDir | 0o755, Links: 2})
}

// File adds a file with data and mode at p, its directories first.
func (a *Archive) File(p string, data []byte, mode os.FileMode) error {
	p = filepath.Clean(p)
	if err := a.Dir(filepath.Dir(p)); err != nil {
		return err
	}
	a.seen[p] = true
	h := &cpio.Header{Name: strings.TrimPrefix(p, "/"), Mode: cpio.TypeReg | cpio.FileMode(mode.Perm()), Size: int64(len(data))}
	if err := a.w.WriteHeader(h); err != nil {
		return err
	}
	_, err := a.w.Write(data)
	return err
}

// CopyFile adds the host file src at dst.
func (a *Archive) CopyFile(dst, src string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	fi, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	return a.File(dst, b, fi.Mode())
}

// CopyTree adds the host directory src at dst, files and directories.
func (a *Archive) CopyTree(dst, src string) error {
	return filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if fi.IsDir() {
			return a.Dir(filepath.Join(dst, rel))
		}
		if fi.Mode().IsRegular() {
			return a.CopyFile(filepath.Join(dst, rel), p)
		}
		return nil
	})
}

// Host adds the host path p as it is on the host: the symlinks on the way
// as symlinks (and their targets), the file itself with its content.
func (a *Archive) Host(p string) error {
	p = filepath.Clean(p)
	if p == "/" || a.seen[p] {
		return nil
	}
	// Parents first, each as it is on the host.
	if err := a.Host(filepath.Dir(p)); err != nil {
		return err
	}
	fi, err := os.Lstat(p)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		target, err := os.Readlink(p)
		if err != nil {
			return fmt.Errorf("initramfs: %w", err)
		}
		a.seen[p] = true
		h := &cpio.Header{Name: strings.TrimPrefix(p, "/"), Mode: cpio.TypeSymlink | 0o777, Size: int64(len(target))}
		if err := a.w.WriteHeader(h); err != nil {
			return err
		}
		if _, err := a.w.Write([]byte(target)); err != nil {
			return err
		}
		if !filepath.IsAbs(target) {
			target = filepath.Join(filepath.Dir(p), target)
		}
		return a.Host(target)
	case fi.IsDir():
		a.seen[p] = true
		return a.w.WriteHeader(&cpio.Header{Name: strings.TrimPrefix(p, "/"), Mode: cpio.TypeDir | cpio.FileMode(fi.Mode().Perm()), Links: 2})
	case fi.Mode().IsRegular():
		return a.CopyFile(p, p)
	}
	return fmt.Errorf("initramfs: %s is not a file, directory or symlink", p)
}

// HostProgram adds the host program name (found on PATH) with the shared
// libraries and the loader ldd lists for it.
func (a *Archive) HostProgram(name string) error {
	p, err := exec.LookPath(name)
	if err != nil {
		return fmt.Errorf("initramfs: host program %s: %w (install it, or `make test-kernels` cannot run the suites that use it)", name, err)
	}
	if err := a.Host(p); err != nil {
		return err
	}
	libs, err := sharedLibraries(p)
	if err != nil {
		return err
	}
	for _, l := range libs {
		if err := a.Host(l); err != nil {
			return err
		}
	}
	return nil
}

// sharedLibraries lists what ldd says path loads (none for a static one).
func sharedLibraries(path string) ([]string, error) {
	out, err := exec.Command("ldd", path).Output()
	if err != nil {
		// ldd exits 1 for a static binary ("not a dynamic executable").
		if strings.Contains(string(out), "not a dynamic") || len(out) == 0 {
			return nil, nil
		}
		return nil, fmt.Errorf("ldd %s: %w", path, err)
	}
	var libs []string
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0]) // the loader
		}
	}
	return libs, nil
}
