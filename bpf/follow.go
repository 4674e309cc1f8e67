package bpf

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/ruleset"
)

// cgroupFollower binds cgroups that unit and cgroup apps match when they
// are made (migrate.c, follow_mkdir) and forgets them when removed:
// tp_btf programs attached to the whole host, optional like the migration
// guard; without them a restarted unit's new cgroup is bound only at the
// next Apply, and Guards says so.
type cgroupFollower struct {
	FollowMkdir   *ebpf.Program `ebpf:"follow_mkdir"`
	ForgetRmdir   *ebpf.Program `ebpf:"forget_rmdir"`
	ExactPatterns *ebpf.Map     `ebpf:"cgroup_exact_patterns"`
	GlobPatterns  *ebpf.Map     `ebpf:"cgroup_glob_patterns"`
}

// Layout constants of migrate.c, read from its generated types.
const (
	cgroupPathLen  = len(migrateCgroupPathKey{}.Path) // CGROUP_PATH_LEN
	globPartLen    = len(migrateCgroupGlob{}.Prefix)  // GLOB_PART_LEN
	globsPerParent = len(migrateCgroupGlobs{}.Globs)  // GLOBS_PER_PARENT
)

// cgroupPattern is a unit or cgroup app's match, below the cgroup2 mount.
type cgroupPattern struct {
	app   string
	info  procgateAppInfo
	dir   string // exact: the cgroup's path; glob: its parent's ("/a/b", "" for the mount)
	glob  bool
	pre   string // glob: the last component before and after its '*'
	suf   string
	level int // the matched cgroups' level (bpf_get_current_ancestor_cgroup_id's)
}

// matches reports whether the cgroup at p (below the mount, "/a/b") is one
// of the pattern's.
func (c cgroupPattern) matches(p string) bool {
	if !c.glob {
		return p == c.dir
	}
	dir, name := path.Split(p)
	return path.Clean(dir) == cleanRoot(c.dir) && len(name) >= len(c.pre)+len(c.suf) &&
		strings.HasPrefix(name, c.pre) && strings.HasSuffix(name, c.suf)
}

func cleanRoot(dir string) string {
	if dir == "" {
		return "/"
	}
	return dir
}

// patternsOf turns the unit and cgroup apps of g into patterns below the
// mount: exact paths first, then globs, each in policy order, which is the
// order in which they claim a cgroup (ruleset.AppOfCgroup).
func patternsOf(g *Generation, appFlags func(*ruleset.App) uint32) ([]cgroupPattern, error) {
	var exact, globs []cgroupPattern
	for i := range g.Rules.Apps {
		app := &g.Rules.Apps[i]
		m := app.Match
		if m == nil || m.Path == "" || (m.Kind != ruleset.MatchUnit && m.Kind != ruleset.MatchCgroup && m.Kind != ruleset.MatchContainer) {
			continue // a container the runtimes did not know has no path
		}
		full := g.cgroupRoot + "/" + m.Path
		if len(full) >= cgroupPathLen {
			return nil, fmt.Errorf("app %q: cgroup path %s is longer than the kernel's %d bytes", app.Name, full, cgroupPathLen-1)
		}
		c := cgroupPattern{app: app.Name, info: procgateAppInfo{AppId: g.AppIDs[app.Name], Flags: appFlags(app)},
			dir: full, level: g.cgroupRootLevel + strings.Count(m.Path, "/") + 1}
		if c.level >= maxCgroupLevel {
			return nil, fmt.Errorf("app %q: cgroup %s is %d levels deep, the kernel walks %d", app.Name, full, c.level, maxCgroupLevel)
		}
		if star := strings.IndexByte(full, '*'); star >= 0 {
			dir, name := path.Split(full)
			pre, suf, _ := strings.Cut(name, "*")
			if len(pre) > globPartLen || len(suf) > globPartLen {
				return nil, fmt.Errorf("app %q: glob %s: the kernel matches at most %d bytes before and after '*'", app.Name, m.Path, globPartLen)
			}
			c.glob, c.dir, c.pre, c.suf = true, strings.TrimSuffix(dir, "/"), pre, suf
			globs = append(globs, c)
			continue
		}
		exact = append(exact, c)
	}
	return append(exact, globs...), nil
}

// pathKey is a cgroup_path_key of slot for a path below the mount.
func pathKey(slot uint32, p string) migrateCgroupPathKey {
	k := migrateCgroupPathKey{Slot: slot}
	for i := 0; i < len(p) && i < cgroupPathLen-1; i++ {
		k.Path[i] = int8(p[i])
	}
	return k
}

func putString(dst []int8, s string) {
	for i := 0; i < len(s) && i < len(dst); i++ {
		dst[i] = int8(s[i])
	}
}

// encodePatterns fills the pattern maps' entries of slot.
func (t *tables) encodePatterns(slot uint32) error {
	t.exactPatterns = map[migrateCgroupPathKey]migrateAppInfo{}
	t.globPatterns = map[migrateCgroupPathKey]migrateCgroupGlobs{}
	used := map[migrateCgroupPathKey]int{}
	for _, c := range t.patterns {
		info := migrateAppInfo{AppId: c.info.AppId, Flags: c.info.Flags}
		k := pathKey(slot, c.dir)
		if !c.glob {
			t.exactPatterns[k] = info
			continue
		}
		n := used[k]
		if n == globsPerParent {
			return fmt.Errorf("app %q: more than %d cgroup globs in %s", c.app, globsPerParent, cleanRoot(c.dir))
		}
		gs := t.globPatterns[k]
		g := &gs.Globs[n]
		g.App, g.PrefixLen, g.SuffixLen = info, uint32(len(c.pre)), uint32(len(c.suf))
		putString(g.Prefix[:], c.pre)
		putString(g.Suffix[:], c.suf)
		t.globPatterns[k] = gs
		used[k] = n + 1
	}
	return nil
}

// scanPatterns binds the existing cgroups the patterns match, in slot:
// the kernel binds those made from the moment the slot's patterns are
// written, so the scan comes after that. A cgroup already bound (a
// launched app's, an earlier pattern's) keeps its app. Returns how many
// cgroups each app took.
func (e *Enforcer) scanPatterns(t *tables, slot uint32) (map[procgateAppKey]procgateAppInfo, map[string]int, error) {
	bound := map[procgateAppKey]procgateAppInfo{}
	counts := map[string]int{}
	bind := func(c cgroupPattern, dir string) error {
		id, err := cgroups.ID(dir)
		if errors.Is(err, os.ErrNotExist) {
			return nil // removed under the scan
		}
		if err != nil {
			return fmt.Errorf("app %q: %w", c.app, err)
		}
		k := procgateAppKey{CgroupId: id, Slot: slot}
		if _, dup := t.apps[k]; dup {
			return nil
		}
		if _, dup := bound[k]; dup {
			return nil
		}
		bound[k] = c.info
		counts[c.app]++
		return nil
	}
	for _, c := range t.patterns {
		if !c.glob {
			if err := bind(c, filepath.Join(e.mount, c.dir)); err != nil {
				return nil, nil, err
			}
			continue
		}
		parent := filepath.Join(e.mount, c.dir)
		ents, err := os.ReadDir(parent)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("app %q: list %s: %w", c.app, parent, err)
		}
		for _, ent := range ents {
			if ent.IsDir() && c.matches(c.dir+"/"+ent.Name()) {
				if err := bind(c, filepath.Join(parent, ent.Name())); err != nil {
					return nil, nil, err
				}
			}
		}
	}
	return bound, counts, nil
}

// followLoaded: the follower's maps are loaded. Not followErr, which
// Attach writes when the programs do not attach while an Apply's
// background clear reads the maps (the maps are there either way).
func (e *Enforcer) followLoaded() bool { return e.follow.ExactPatterns != nil }

// writePatterns writes slot's pattern entries, when the follower loaded.
func (e *Enforcer) writePatterns(t *tables) error {
	if !e.followLoaded() {
		return nil
	}
	ek, ev := splitKV(t.exactPatterns)
	if err := putBatch(e.follow.ExactPatterns, ek, ev); err != nil {
		return fmt.Errorf("write %d cgroup paths: %w", len(ek), err)
	}
	gk, gv := splitKV(t.globPatterns)
	if err := putBatch(e.follow.GlobPatterns, gk, gv); err != nil {
		return fmt.Errorf("write %d cgroup globs: %w", len(gk), err)
	}
	return nil
}

// clearPatterns deletes slot's pattern entries, before its cgroup
// bindings, so that the kernel binds no more cgroups in the slot.
func (e *Enforcer) clearPatterns(slot uint32, keys *slotKeys) error {
	if !e.followLoaded() {
		return nil
	}
	if err := deleteBatch(e.follow.ExactPatterns, keys.exactPatterns); err != nil {
		return fmt.Errorf("clear cgroup paths of slot %d: %w", slot, err)
	}
	if err := deleteBatch(e.follow.GlobPatterns, keys.globPatterns); err != nil {
		return fmt.Errorf("clear cgroup globs of slot %d: %w", slot, err)
	}
	return nil
}

// scanPatternKeys lists slot's pattern keys, for adopted state.
func (e *Enforcer) scanPatternKeys(slot uint32, keys *slotKeys) error {
	if !e.followLoaded() {
		return nil
	}
	var k migrateCgroupPathKey
	var v migrateAppInfo
	it := e.follow.ExactPatterns.Iterate()
	for it.Next(&k, &v) {
		if k.Slot == slot {
			keys.exactPatterns = append(keys.exactPatterns, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("walk cgroup paths: %w", err)
	}
	var gv migrateCgroupGlobs
	it = e.follow.GlobPatterns.Iterate()
	for it.Next(&k, &gv) {
		if k.Slot == slot {
			keys.globPatterns = append(keys.globPatterns, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("walk cgroup globs: %w", err)
	}
	keys.followed = len(keys.exactPatterns)+len(keys.globPatterns) > 0
	return nil
}

// rcuFence returns when every BPF program running when it was called has
// finished: an update of a map-of-maps returns after synchronize_rcu()
// (kernel/bpf/syscall.c, maybe_wait_bpf_programs), and tp_btf programs
// run under rcu_read_lock. The generation in force is written back as it
// is, which changes nothing a decision reads.
func (e *Enforcer) rcuFence() error {
	var inner *ebpf.Map
	if err := e.objs.PolicyCurrent.Lookup(uint32(0), &inner); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil // no generation: no pattern was ever in force
		}
		return fmt.Errorf("read policy_current: %w", err)
	}
	defer inner.Close()
	if err := e.objs.PolicyCurrent.Put(uint32(0), inner); err != nil {
		return fmt.Errorf("wait for running BPF programs: %w", err)
	}
	return nil
}

// clearFollowed deletes every cgroup binding of slot, the kernel's own
// (follow_mkdir) included, which no list of written keys holds.
func (e *Enforcer) clearFollowed(slot uint32) error {
	var ak procgateAppKey
	var av procgateAppInfo
	var del []procgateAppKey
	it := e.objs.AppByCgroup.Iterate()
	for it.Next(&ak, &av) {
		if ak.Slot == slot {
			del = append(del, ak)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("walk app bindings: %w", err)
	}
	if err := deleteBatch(e.objs.AppByCgroup, del); err != nil {
		return fmt.Errorf("clear app bindings of slot %d: %w", slot, err)
	}
	return nil
}

// Matched counts, per unit or cgroup app, the existing cgroups the last
// Apply's scan bound (the kernel binds those made since).
func (e *Enforcer) Matched() map[string]int {
	out := make(map[string]int, len(e.matched))
	for k, v := range e.matched {
		out[k] = v
	}
	return out
}
