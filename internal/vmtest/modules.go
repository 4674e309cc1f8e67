package vmtest

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/ulikunitz/xz"
)

// NeededModules are the kernel modules the suites use, where a kernel
// builds them as modules: veth pairs (nstest.Veth), TUN (the attack
// suite), sock_diag (the netlink sweep: inet_diag and its TCP and UDP
// parts; the launcher's peer lookup: unix_diag), and nftables with
// conntrack (the sweep test tracks connections; the sweep deletes their
// entries through ctnetlink). The guest has no modprobe, so what the
// kernel would request on demand is loaded up front.
var NeededModules = []string{
	"veth", "tun",
	"inet_diag", "tcp_diag", "udp_diag", "unix_diag",
	"nf_tables", "nft_ct", "nf_conntrack", "nf_conntrack_netlink",
}

// moduleName is the name the kernel knows a module file by.
func moduleName(path string) string {
	base := filepath.Base(path)
	base = base[:strings.Index(base, ".ko")]
	return strings.ReplaceAll(base, "-", "_")
}

// ResolveModules finds the named modules and their dependencies in an
// unpacked kernel package's lib/modules/<version>, and returns their files
// in load order (dependencies first). A module built into the kernel
// (modules.builtin) needs no file; one that is neither is reported in
// missing.
func ResolveModules(root, version string, names []string) (files, missing []string, err error) {
	dir := filepath.Join(root, "lib", "modules", version)
	index := map[string]string{}
	err = filepath.WalkDir(filepath.Join(dir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.Contains(d.Name(), ".ko") {
			index[moduleName(p)] = p
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("index modules in %s: %w", dir, err)
	}
	builtin := map[string]bool{}
	if f, err := os.Open(filepath.Join(dir, "modules.builtin")); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			builtin[moduleName(sc.Text())] = true
		}
		f.Close()
	}
	done := map[string]bool{}
	var visit func(name string) error
	visit = func(name string) error {
		name = strings.ReplaceAll(name, "-", "_")
		if done[name] {
			return nil
		}
		done[name] = true
		p, ok := index[name]
		if !ok {
			if !builtin[name] {
				missing = append(missing, name)
			}
			return nil
		}
		deps, err := moduleDepends(p)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		files = append(files, p)
		return nil
	}
	for _, n := range names {
		if err := visit(n); err != nil {
			return nil, nil, err
		}
	}
	return files, missing, nil
}

// moduleDepends reads the depends= field of a module's .modinfo section.
func moduleDepends(path string) ([]string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if strings.HasSuffix(path, ".xz") {
		r, err := xz.NewReader(bytes.NewReader(raw))
		if err != nil {
			return nil, fmt.Errorf("decompress %s: %w", path, err)
		}
		if raw, err = io.ReadAll(r); err != nil {
			return nil, fmt.Errorf("decompress %s: %w", path, err)
		}
	}
	f, err := elf.NewFile(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", path, err)
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("module %s has no .modinfo", path)
	}
	info, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", path, err)
	}
	for _, kv := range bytes.Split(info, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			if len(v) == 0 {
				return nil, nil
			}
			return strings.Split(string(v), ","), nil
		}
	}
	return nil, nil
}
