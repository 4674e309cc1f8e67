package bpf

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// hooks are the attach points, named as their programs and pinned links.
var hooks = []struct {
	name   string
	attach ebpf.AttachType
	prog   func(*objects) *ebpf.Program
}{
	{"connect4", ebpf.AttachCGroupInet4Connect, func(o *objects) *ebpf.Program { return o.AuthorizeConnect4 }},
	{"connect6", ebpf.AttachCGroupInet6Connect, func(o *objects) *ebpf.Program { return o.AuthorizeConnect6 }},
	{"sendmsg4", ebpf.AttachCGroupUDP4Sendmsg, func(o *objects) *ebpf.Program { return o.AuthorizeSendmsg4 }},
	{"sendmsg6", ebpf.AttachCGroupUDP6Sendmsg, func(o *objects) *ebpf.Program { return o.AuthorizeSendmsg6 }},
}

// objects is what the daemon loads: programs and the pinned maps. The
// *_inner templates of procgate.c are left out, so they are never created.
type objects struct {
	AuthorizeConnect4 *ebpf.Program `ebpf:"authorize_connect4"`
	AuthorizeConnect6 *ebpf.Program `ebpf:"authorize_connect6"`
	AuthorizeSendmsg4 *ebpf.Program `ebpf:"authorize_sendmsg4"`
	AuthorizeSendmsg6 *ebpf.Program `ebpf:"authorize_sendmsg6"`

	InternalV4      *ebpf.Map `ebpf:"internal_v4"`
	InternalV6      *ebpf.Map `ebpf:"internal_v6"`
	GrantV4         *ebpf.Map `ebpf:"grant_v4"`
	GrantV6         *ebpf.Map `ebpf:"grant_v6"`
	PortRanges      *ebpf.Map `ebpf:"port_ranges"`
	AppByCgroup     *ebpf.Map `ebpf:"app_by_cgroup"`
	PolicyInfo      *ebpf.Map `ebpf:"policy_info"`
	PolicyActive    *ebpf.Map `ebpf:"policy_active"`
	VerdictCounters *ebpf.Map `ebpf:"verdict_counters"`
	AuditBudgets    *ebpf.Map `ebpf:"audit_budgets"`
	AuditEvents     *ebpf.Map `ebpf:"audit_events"`
}

func (o *objects) close() {
	for _, c := range []interface{ Close() error }{
		o.AuthorizeConnect4, o.AuthorizeConnect6, o.AuthorizeSendmsg4, o.AuthorizeSendmsg6,
		o.InternalV4, o.InternalV6, o.GrantV4, o.GrantV6, o.PortRanges, o.AppByCgroup,
		o.PolicyInfo, o.PolicyActive, o.VerdictCounters, o.AuditBudgets, o.AuditEvents,
	} {
		if c != nil {
			c.Close()
		}
	}
}

// Options says where the enforcer lives.
type Options struct {
	// BPFDir is a directory on a bpffs where programs' maps and links are
	// pinned; it is created if missing.
	BPFDir string
	// CgroupDir is the cgroup2 directory whose subtree is enforced.
	CgroupDir string
	Log       *slog.Logger
}

// Enforcer is the eBPF backend: pinned maps and links that enforce a
// generation even when no process holds them open.
type Enforcer struct {
	opts  Options
	objs  objects
	specs *ebpf.CollectionSpec
	links []link.Link
	// Adopted is true when the enforcer took over pinned state left by an
	// earlier daemon; the generation in force then was kept.
	Adopted bool
}

// Open loads the programs and pinned maps, and makes sure each hook's link is
// attached to opts.CgroupDir and runs this build's program. A pinned link from
// an earlier run is updated in place (BPF_LINK_UPDATE), so there is no moment
// without enforcement. A fresh install starts at generation 0, which the
// programs treat as "no policy": every connection below the cgroup is denied
// until Apply installs the first generation. Call Apply before Attach to
// avoid that window.
func Open(opts Options) (*Enforcer, error) {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if err := checkBPFFS(opts.BPFDir); err != nil {
		return nil, err
	}
	specs, err := loadProcgate()
	if err != nil {
		return nil, fmt.Errorf("load embedded BPF objects: %w", err)
	}
	e := &Enforcer{opts: opts, specs: specs}
	_, statErr := os.Stat(filepath.Join(opts.BPFDir, "policy_active"))
	e.Adopted = statErr == nil
	err = specs.LoadAndAssign(&e.objs, &ebpf.CollectionOptions{
		Maps: ebpf.MapOptions{PinPath: opts.BPFDir},
	})
	if err != nil {
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("pinned maps in %s come from an incompatible procgate version (run `procgate uninstall --bpf-dir %s` first): %w", opts.BPFDir, opts.BPFDir, err)
		}
		return nil, fmt.Errorf("load BPF programs and maps (pinned in %s): %w", opts.BPFDir, err)
	}
	return e, nil
}

// Attach attaches (or adopts and updates) the four hooks' links on the cgroup.
func (e *Enforcer) Attach() error {
	cg, err := os.Open(e.opts.CgroupDir)
	if err != nil {
		return fmt.Errorf("open cgroup %s: %w", e.opts.CgroupDir, err)
	}
	defer cg.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(cg.Fd()), &st); err != nil {
		return fmt.Errorf("stat cgroup %s: %w", e.opts.CgroupDir, err)
	}
	for _, h := range hooks {
		pin := filepath.Join(e.opts.BPFDir, "link_"+h.name)
		prog := h.prog(&e.objs)
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			info, err := l.Info()
			if err == nil && info.Cgroup() != nil && info.Cgroup().CgroupId != st.Ino {
				l.Close()
				return fmt.Errorf("pinned link %s is attached to cgroup id %d, not %s (id %d): uninstall first or use the same --cgroup-root",
					pin, info.Cgroup().CgroupId, e.opts.CgroupDir, st.Ino)
			}
			if err := l.Update(prog); err != nil {
				l.Close()
				return fmt.Errorf("update pinned link %s to the new %s program: %w", pin, h.name, err)
			}
			e.links = append(e.links, l)
			continue
		} else if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("load pinned link %s: %w", pin, err)
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: e.opts.CgroupDir, Attach: h.attach, Program: prog})
		if err != nil {
			return fmt.Errorf("attach %s to %s: %w", h.name, e.opts.CgroupDir, err)
		}
		if err := l.Pin(pin); err != nil {
			l.Close()
			return fmt.Errorf("pin %s link at %s: %w", h.name, pin, err)
		}
		e.links = append(e.links, l)
	}
	return nil
}

// Close releases this process' handles. Pinned links and maps stay, so
// enforcement holds after the daemon exits (fail closed).
func (e *Enforcer) Close() error {
	for _, l := range e.links {
		l.Close()
	}
	e.links = nil
	e.objs.close()
	return nil
}

// Generation returns the generation in force (0: none yet).
func (e *Enforcer) Generation() (uint32, error) {
	var gen uint32
	if err := e.objs.PolicyActive.Lookup(uint32(0), &gen); err != nil {
		return 0, fmt.Errorf("read policy_active: %w", err)
	}
	return gen, nil
}

// Apply installs g as the next generation and switches to it in one step.
// When Apply returns, no decision uses the previous generation any more.
// Apply is not safe for concurrent use; the daemon serializes reloads.
func (e *Enforcer) Apply(g Generation) (uint32, error) {
	t, err := encode(g)
	if err != nil {
		return 0, fmt.Errorf("encode policy: %w", err)
	}
	cur, err := e.Generation()
	if err != nil {
		return 0, err
	}
	next := cur + 1
	if next == 0 {
		next = 2 // 0 means "no policy"; keep the slot parity alternating
	}
	slot := next & 1
	t.info.Generation = next

	inner, err := e.buildInner(t)
	if err != nil {
		return 0, err
	}
	defer func() {
		for _, m := range inner {
			m.Close() // the outer map holds its own reference
		}
	}()
	// The idle slot is not read by any decision (policy_active points at
	// the other one and the last Apply waited for readers to finish), so
	// filling it in any order is safe.
	outers := e.outers()
	for i, o := range outers {
		if err := o.Put(slot, inner[i]); err != nil {
			return 0, fmt.Errorf("install generation %d map %d into slot %d: %w", next, i, slot, err)
		}
	}
	if err := e.objs.PolicyActive.Put(uint32(0), next); err != nil {
		return 0, fmt.Errorf("switch to generation %d: %w", next, err)
	}
	// Any update of a map-of-maps makes the kernel wait for running
	// programs (synchronize_rcu in maybe_wait_bpf_programs). Re-putting the
	// same inner map is such an update: after it, no decision is still
	// reading the old slot, so the next Apply may overwrite it.
	if err := outers[len(outers)-1].Put(slot, inner[len(inner)-1]); err != nil {
		return 0, fmt.Errorf("wait for readers of generation %d: %w", cur, err)
	}
	return next, nil
}

// outers lists the map-of-maps in the order buildInner returns inner maps.
func (e *Enforcer) outers() []*ebpf.Map {
	return []*ebpf.Map{e.objs.InternalV4, e.objs.InternalV6, e.objs.GrantV4, e.objs.GrantV6,
		e.objs.PortRanges, e.objs.AppByCgroup, e.objs.PolicyInfo}
}

func (e *Enforcer) buildInner(t *tables) (maps []*ebpf.Map, err error) {
	defer func() {
		if err != nil {
			for _, m := range maps {
				m.Close()
			}
			maps = nil
		}
	}()
	type fill struct {
		name    string
		n       int
		keys    any
		values  any
		outName string
	}
	v4k, v4v := sortedKV(t.grantV4)
	v6k, v6v := sortedKV(t.grantV6)
	appK, appV := sortedKV(t.apps)
	portIdx := make([]uint32, len(t.ports))
	for i := range portIdx {
		portIdx[i] = uint32(i)
	}
	ones := func(n int) []uint32 { return slices.Repeat([]uint32{1}, n) }
	fills := []fill{
		{"internal_v4", len(t.internalV4), t.internalV4, ones(len(t.internalV4)), "internal_v4"},
		{"internal_v6", len(t.internalV6), t.internalV6, ones(len(t.internalV6)), "internal_v6"},
		{"grant_v4", len(v4k), v4k, v4v, "grant_v4"},
		{"grant_v6", len(v6k), v6k, v6v, "grant_v6"},
		{"port_ranges", len(t.ports), portIdx, t.ports, "port_ranges"},
		{"app_by_cgroup", len(appK), appK, appV, "app_by_cgroup"},
		{"policy_info", 1, []uint32{0}, []procgateGenerationInfo{t.info}, "policy_info"},
	}
	for _, f := range fills {
		spec := e.specs.Maps[f.outName].InnerMap.Copy()
		spec.Name = f.name
		if spec.Type != ebpf.Array || f.name == "port_ranges" {
			spec.MaxEntries = uint32(max(f.n, 1))
		}
		m, err := ebpf.NewMap(spec)
		if err != nil {
			return maps, fmt.Errorf("create %s map for %d entries: %w", f.name, f.n, err)
		}
		maps = append(maps, m)
		if f.n == 0 {
			continue
		}
		if err := putAll(m, f.keys, f.values, f.n); err != nil {
			return maps, fmt.Errorf("fill %s map (%d entries): %w", f.name, f.n, err)
		}
	}
	return maps, nil
}

// putAll writes entries with BPF_MAP_UPDATE_BATCH where the map type has it
// (one syscall per chunk), and one by one where it does not (LPM tries).
func putAll(m *ebpf.Map, keys, values any, n int) error {
	if _, err := m.BatchUpdate(keys, values, nil); err == nil {
		return nil
	} else if !errors.Is(err, ebpf.ErrNotSupported) {
		return err
	}
	return putEach(m, keys, values, n)
}

func putEach(m *ebpf.Map, keys, values any, n int) error {
	switch ks := keys.(type) {
	case []procgateLpmV4Key:
		for i := range n {
			if err := m.Put(&ks[i], values.([]uint32)[i]); err != nil {
				return err
			}
		}
	case []procgateLpmV6Key:
		for i := range n {
			if err := m.Put(&ks[i], values.([]uint32)[i]); err != nil {
				return err
			}
		}
	case []procgateGrantV4Key:
		for i := range n {
			if err := m.Put(&ks[i], &values.([]procgateGrantValue)[i]); err != nil {
				return err
			}
		}
	case []procgateGrantV6Key:
		for i := range n {
			if err := m.Put(&ks[i], &values.([]procgateGrantValue)[i]); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("no element-wise writer for %T", keys)
	}
	return nil
}

func sortedKV[K comparable, V any](m map[K]V) ([]K, []V) {
	ks := make([]K, 0, len(m))
	vs := make([]V, 0, len(m))
	for k, v := range m {
		ks = append(ks, k)
		vs = append(vs, v)
	}
	return ks, vs
}

// Counters returns the kernel's per-app counters, summed over CPUs: for each
// app id, [CountAllow, CountDeny, CountExternal, CountAuditDrop].
func (e *Enforcer) Counters(ids []uint32) (map[uint32][counterSlots]uint64, error) {
	out := make(map[uint32][counterSlots]uint64, len(ids))
	per := make([]uint64, runtime.NumCPU())
	for _, id := range ids {
		var c [counterSlots]uint64
		for s := range counterSlots {
			if err := e.objs.VerdictCounters.Lookup(id*counterSlots+uint32(s), &per); err != nil {
				return nil, fmt.Errorf("read counters of app id %d: %w", id, err)
			}
			for _, v := range per {
				c[s] += v
			}
		}
		out[id] = c
	}
	return out, nil
}

// Events opens a reader of the audit ring buffer.
func (e *Enforcer) Events() (*ringbuf.Reader, error) {
	r, err := ringbuf.NewReader(e.objs.AuditEvents)
	if err != nil {
		return nil, fmt.Errorf("open audit ring buffer: %w", err)
	}
	return r, nil
}

// Attached reports, per hook, whether its pinned link exists.
func (e *Enforcer) Attached() map[string]bool {
	out := map[string]bool{}
	for _, h := range hooks {
		_, err := os.Stat(filepath.Join(e.opts.BPFDir, "link_"+h.name))
		out[h.name] = err == nil
	}
	return out
}

// Uninstall detaches and removes everything a daemon pinned in bpfDir:
// unpinning a link drops the last reference and detaches its program.
func Uninstall(bpfDir string) (removed []string, err error) {
	if err := checkBPFFS(bpfDir); err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(bpfDir)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", bpfDir, err)
	}
	var errs []error
	for _, ent := range ents {
		p := filepath.Join(bpfDir, ent.Name())
		if err := os.Remove(p); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", p, err))
			continue
		}
		removed = append(removed, ent.Name())
	}
	if err := os.Remove(bpfDir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", bpfDir, err))
	}
	return removed, errors.Join(errs...)
}

// checkBPFFS makes dir (if needed) and refuses anything not on a bpffs, where
// pins would silently fail or land in the wrong place.
func checkBPFFS(dir string) error {
	if dir == "" {
		return errors.New("no BPF pin directory given")
	}
	parent := dir
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		parent = filepath.Dir(dir)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(parent, &fs); err != nil {
		return fmt.Errorf("statfs %s: %w", parent, err)
	}
	if fs.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("%s is not on a bpf filesystem (mount one with `mount -t bpf bpf %s`)", parent, parent)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create BPF pin directory %s: %w", dir, err)
	}
	return nil
}
