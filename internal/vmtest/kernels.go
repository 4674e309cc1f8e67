package vmtest

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// Kernel is one of Debian's kernel packages to boot: the cloud flavour,
// which has every driver a qemu guest needs built in, and the newest
// version of a series, as the flavour's meta-package in a suite names it.
type Kernel struct {
	Name   string // the matrix column: "6.1"
	Debian string // where it comes from, for the report: "Debian 12"
	Suite  string // the apt suite whose linux-image-cloud-amd64 picks the version
	// Security: the suite is on the security archive's mirror.
	Security bool
	// Unsupported: procgate does not claim to run on this kernel (below
	// README's floor); its column is informational and never fails the run.
	Unsupported bool
}

// Kernels is the matrix's kernel list.
var Kernels = []Kernel{
	{Name: "5.10", Debian: "Debian 11 (bullseye-security)", Suite: "bullseye-security", Security: true, Unsupported: true},
	{Name: "6.1", Debian: "Debian 12 (bookworm-security)", Suite: "bookworm-security", Security: true},
	{Name: "6.12", Debian: "Debian 12 (bookworm-backports)", Suite: "bookworm-backports"},
}

// metaPackage names the newest cloud kernel of a suite.
const metaPackage = "linux-image-cloud-amd64"

// Fetched is a kernel package unpacked in the cache.
type Fetched struct {
	Kernel
	Package string // linux-image-6.1.0-48-cloud-amd64
	Version string // 6.1.0-48-cloud-amd64, the modules directory's name
	Root    string // the unpacked package
	Vmlinuz string
}

// apt runs apt-get and apt-cache with a configuration of their own under
// dir: the suites the kernels come from, on the mirrors this machine's apt
// already uses, without touching the machine's package lists.
type apt struct {
	dir  string
	opts []string
}

func newApt(dir string) (*apt, error) {
	debian, security, err := hostMirrors()
	if err != nil {
		return nil, err
	}
	var list strings.Builder
	for _, k := range Kernels {
		m := debian
		if k.Security {
			m = security
		}
		fmt.Fprintf(&list, "deb %s %s main\n", m, k.Suite)
	}
	for _, d := range []string{"lists/partial", "cache/archives/partial", "parts"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, fmt.Errorf("apt dir: %w", err)
		}
	}
	sources := filepath.Join(dir, "sources.list")
	if err := os.WriteFile(sources, []byte(list.String()), 0o644); err != nil {
		return nil, fmt.Errorf("apt sources: %w", err)
	}
	return &apt{dir: dir, opts: []string{
		"-o", "Dir::Etc::SourceList=" + sources,
		"-o", "Dir::Etc::SourceParts=" + filepath.Join(dir, "parts"),
		"-o", "Dir::State::Lists=" + filepath.Join(dir, "lists"),
		"-o", "Dir::Cache=" + filepath.Join(dir, "cache"),
		"-o", "Acquire::Languages=none",
		// Downloads land in a root-owned cache that apt's _apt user cannot
		// write to.
		"-o", "APT::Sandbox::User=root",
	}}, nil
}

// hostMirrors finds the Debian and Debian security mirrors in this
// machine's apt sources (one-line and deb822 formats).
func hostMirrors() (debian, security string, err error) {
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	lists, _ := filepath.Glob("/etc/apt/sources.list.d/*.list")
	files = append(append(files, "/etc/apt/sources.list"), lists...)
	for _, f := range files {
		for _, s := range readSources(f) {
			switch {
			case strings.HasSuffix(s.suite, "-security") && security == "":
				security = s.uri
			case (s.suite == "bookworm" || s.suite == "bullseye" || s.suite == "trixie") && debian == "":
				debian = s.uri
			}
		}
	}
	if debian == "" || security == "" {
		return "", "", fmt.Errorf("no Debian mirror (%q) or Debian security mirror (%q) in /etc/apt/sources.list*: kernels come from the machine's Debian mirrors", debian, security)
	}
	return debian, security, nil
}

type source struct{ uri, suite string }

func readSources(path string) []source {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []source
	var uris, suites []string
	flush := func() {
		for _, u := range uris {
			for _, s := range suites {
				out = append(out, source{strings.TrimRight(u, "/"), s})
			}
		}
		uris, suites = nil, nil
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		fields := strings.Fields(line)
		switch {
		case line == "":
			flush()
		case strings.HasPrefix(line, "#"):
		case fields[0] == "deb" && len(fields) >= 3:
			i := 1
			if strings.HasPrefix(fields[1], "[") {
				for i < len(fields) && !strings.HasSuffix(fields[i], "]") {
					i++
				}
				i++
			}
			if i+1 < len(fields) {
				out = append(out, source{strings.TrimRight(fields[i], "/"), fields[i+1]})
			}
		case strings.EqualFold(fields[0], "URIs:"):
			uris = fields[1:]
		case strings.EqualFold(fields[0], "Suites:"):
			suites = fields[1:]
		}
	}
	flush()
	return out
}

func (a *apt) run(dir, tool string, args ...string) (string, error) {
	cmd := exec.Command(tool, append(append([]string{}, a.opts...), args...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", tool, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// resolve names the kernel package the suite's meta-package depends on.
func (a *apt) resolve(k Kernel) (string, error) {
	out, err := a.run(a.dir, "apt-cache", "depends", metaPackage+"/"+k.Suite)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
			return f[1], nil
		}
	}
	return "", fmt.Errorf("%s in %s depends on no linux-image package:\n%s", metaPackage, k.Suite, out)
}

// FetchKernels resolves, downloads and unpacks each kernel into cache,
// reusing what is there: the package lists are fetched once (refresh asks
// for new ones), a package once.
func FetchKernels(cache string, kernels []Kernel, refresh bool, logf func(string, ...any)) ([]Fetched, error) {
	a, err := newApt(filepath.Join(cache, "apt"))
	if err != nil {
		return nil, err
	}
	lists, _ := filepath.Glob(filepath.Join(a.dir, "lists", "*_Packages*"))
	if refresh || len(lists) < len(Kernels) {
		logf("apt-get update (kernel suites, lists in %s)", a.dir)
		if _, err := a.run(a.dir, "apt-get", "update", "-qq"); err != nil {
			return nil, err
		}
	}
	var out []Fetched
	for _, k := range kernels {
		pkg, err := a.resolve(k)
		if err != nil {
			return nil, fmt.Errorf("kernel %s: %w", k.Name, err)
		}
		f, err := unpack(a, cache, k, pkg, logf)
		if err != nil {
			return nil, fmt.Errorf("kernel %s: %w", k.Name, err)
		}
		out = append(out, f)
	}
	return out, nil
}

func unpack(a *apt, cache string, k Kernel, pkg string, logf func(string, ...any)) (Fetched, error) {
	f := Fetched{Kernel: k, Package: pkg, Root: filepath.Join(cache, "root", pkg)}
	if _, err := os.Stat(f.Root); errors.Is(err, os.ErrNotExist) {
		debs := filepath.Join(cache, "debs")
		if err := os.MkdirAll(debs, 0o755); err != nil {
			return f, err
		}
		old, _ := filepath.Glob(filepath.Join(debs, pkg+"_*.deb"))
		if len(old) == 0 {
			logf("apt-get download %s", pkg)
			if _, err := a.run(debs, "apt-get", "download", "-qq", pkg); err != nil {
				return f, err
			}
		}
		deb, _ := filepath.Glob(filepath.Join(debs, pkg+"_*.deb"))
		if len(deb) == 0 {
			return f, fmt.Errorf("apt-get download %s left no .deb in %s", pkg, debs)
		}
		tmp := f.Root + ".tmp"
		os.RemoveAll(tmp)
		if err := os.MkdirAll(filepath.Dir(tmp), 0o755); err != nil {
			return f, err
		}
		logf("dpkg-deb -x %s", filepath.Base(deb[0]))
		if out, err := exec.Command("dpkg-deb", "-x", deb[0], tmp).CombinedOutput(); err != nil {
			return f, fmt.Errorf("dpkg-deb -x %s: %w\n%s", deb[0], err, out)
		}
		if err := os.Rename(tmp, f.Root); err != nil {
			return f, err
		}
	} else if err != nil {
		return f, err
	}
	vm, _ := filepath.Glob(filepath.Join(f.Root, "boot", "vmlinuz-*"))
	mods, _ := filepath.Glob(filepath.Join(f.Root, "lib", "modules", "*"))
	if len(vm) != 1 || len(mods) != 1 {
		return f, fmt.Errorf("%s: want one boot/vmlinuz-* and one lib/modules/*, found %v and %v", f.Root, vm, mods)
	}
	f.Vmlinuz, f.Version = vm[0], filepath.Base(mods[0])
	return f, nil
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
