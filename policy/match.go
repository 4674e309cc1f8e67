package policy

import (
	"fmt"
	"path"
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/procgate/procgate/ruleset"
	"github.com/procgate/procgate/users"
)

// matchKeys are the keys of an app's match:, exactly one of them.
var matchKeys = []string{"unit", "cgroup", "user", "container"}

// containerRE is the names docker and podman give containers.
var containerRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$`)

// unitTypes are the systemd unit types that own a cgroup.
var unitTypes = []string{".service", ".scope", ".slice", ".socket", ".mount", ".swap"}

// MaxMatchDepth bounds a unit's or a cgroup glob's depth below the cgroup
// root, so that it stays within the levels the kernel's ancestor walk
// probes (MAX_CGROUP_LEVEL in bpf/decision.h) with room for the root.
const MaxMatchDepth = 24

// LookupUser resolves a user name to its uid through the host's user
// database, NSS included (users.LookupName; getent bounds a directory that
// does not answer). A variable so that tests can name users the machine
// lacks.
var LookupUser = func(name string) (uint32, error) {
	u, err := users.LookupName(name)
	if err != nil {
		return 0, err
	}
	return u.UID, nil
}

// match reads `match: {unit: NAME | cgroup: GLOB | user: NAME-or-UID}`.
// Two apps matching the same unit, glob or uid are refused: the kernel
// could give the processes to only one of them.
func (p *parser) match(n *yaml.Node, field string) *ruleset.Match {
	before := len(p.errs)
	vals, ok := p.fields(n, field, matchKeys)
	if !ok || len(p.errs) > before {
		return nil
	}
	if len(vals) != 1 {
		p.errorf(n, field, "want exactly one of %s, not %d of them", strings.Join(matchKeys, ", "), len(vals))
		return nil
	}
	for _, kind := range matchKeys {
		vn, ok := vals[kind]
		if !ok {
			continue
		}
		f := join(field, kind)
		v, ok := p.str(vn, f)
		if !ok {
			return nil
		}
		m := &ruleset.Match{Value: v}
		var why string
		switch kind {
		case "unit":
			m.Kind = ruleset.MatchUnit
			m.Path, why = UnitCgroup(v)
			if why == "" {
				why = checkUnitPath(v, m.Path)
			}
		case "cgroup":
			m.Kind = ruleset.MatchCgroup
			m.Path, why = v, checkGlob(v)
		case "user":
			m.Kind = ruleset.MatchUser
			m.UID, why = resolveUser(v)
		case "container":
			// Resolved by the daemon, which asks the runtimes.
			m.Kind = ruleset.MatchContainer
			if !containerRE.MatchString(v) {
				why = fmt.Sprintf("invalid container name %q: want letters, digits, '_', '.' and '-', starting with a letter or digit", v)
			}
		}
		if why != "" {
			p.errorf(vn, f, "%s", why)
			return nil
		}
		// A unit and a glob naming the same cgroup are the same match.
		key := "cgroup " + m.Path
		switch m.Kind {
		case ruleset.MatchUser:
			key = "uid " + strconv.FormatUint(uint64(m.UID), 10)
		case ruleset.MatchContainer:
			key = "container " + m.Value
		}
		if !p.once(p.matches, vn, f, "match of", key) {
			return nil
		}
		if m.Kind == ruleset.MatchCgroup && strings.Contains(m.Path, "*") {
			parent := path.Dir(m.Path)
			if p.globParents[parent]++; p.globParents[parent] > MaxGlobsPerParent {
				p.errorf(vn, f, "more than %d globs in %s: the kernel matches at most %d per parent directory", MaxGlobsPerParent, parent, MaxGlobsPerParent)
				return nil
			}
		}
		return m
	}
	return nil
}

// UnitCgroup is the cgroup path, below the cgroup root, that systemd's
// system manager gives a unit by default (src/core/unit.c,
// unit_set_default_slice; src/basic/unit-name.c, slice paths):
//   - a slice a-b-c.slice nests in its parents: a.slice/a-b.slice/a-b-c.slice;
//   - an instance of a template (getty@tty1.service) sits in the template's
//     slice below system.slice: system.slice/system-getty.slice/getty@tty1.service,
//     a '-' in the template's name written \x2d;
//   - any other unit sits in system.slice: system.slice/nginx.service.
//
// A unit file's Slice= (user@.service in user-%i.slice, logind's session
// scopes) moves a unit elsewhere: name such a cgroup with match.cgroup.
// why says what is wrong with name ("" when it is fine).
func UnitCgroup(name string) (cgroupPath, why string) {
	typ := ""
	for _, t := range unitTypes {
		if strings.HasSuffix(name, t) {
			typ = t
		}
	}
	stem := strings.TrimSuffix(name, typ)
	switch {
	case typ == "":
		return "", fmt.Sprintf("invalid unit %q: want a unit name ending in one of %s", name, strings.Join(unitTypes, ", "))
	case stem == "" || strings.ContainsAny(name, "/\n\x00 "):
		return "", fmt.Sprintf("invalid unit %q: want a unit name such as nginx.service or foo.slice (no '/', no spaces)", name)
	case name == "-.slice":
		return "", `invalid unit "-.slice": the root slice is every process; write no match or a narrower unit`
	case len(name) > 255:
		return "", fmt.Sprintf("invalid unit %q: longer than 255 bytes", name)
	}
	if typ == ".slice" {
		if strings.HasPrefix(stem, "-") || strings.HasSuffix(stem, "-") || strings.Contains(stem, "--") || strings.Contains(stem, "@") {
			return "", fmt.Sprintf("invalid slice %q: dashes separate parent slices, so none may lead, trail or double, and a slice has no instance (@)", name)
		}
		parts := strings.Split(stem, "-")
		dirs := make([]string, len(parts))
		for i := range parts {
			dirs[i] = cgEscape(strings.Join(parts[:i+1], "-") + ".slice")
		}
		if len(dirs) > MaxMatchDepth {
			return "", fmt.Sprintf("invalid slice %q: nested %d deep, more than %d", name, len(dirs), MaxMatchDepth)
		}
		return path.Join(dirs...), ""
	}
	if template, _, ok := strings.Cut(stem, "@"); ok {
		if template == "" {
			return "", fmt.Sprintf("invalid unit %q: an instance needs a template name before '@'", name)
		}
		return path.Join("system.slice", "system-"+strings.ReplaceAll(template, "-", `\x2d`)+".slice", cgEscape(name)), ""
	}
	return path.Join("system.slice", cgEscape(name)), ""
}

// checkUnitPath refuses a unit whose cgroup path the kernel's key cannot hold.
func checkUnitPath(name, cgroupPath string) string {
	if len(cgroupPath) > MaxMatchPath {
		return fmt.Sprintf("invalid unit %q: its cgroup path %s is longer than %d bytes", name, cgroupPath, MaxMatchPath)
	}
	return ""
}

// cgEscape is systemd's cg_escape (src/basic/cgroup-util.c): a name that
// starts with '_' or '.', or with "cgroup.", gets a leading '_', so that it
// never collides with the kernel's files.
func cgEscape(name string) string {
	if strings.HasPrefix(name, "_") || strings.HasPrefix(name, ".") || strings.HasPrefix(name, "cgroup.") {
		return "_" + name
	}
	return name
}

// checkGlob accepts a cgroup path below the cgroup root whose last
// component may hold one '*' (any run of characters, '/' excepted): the
// form the kernel matches by itself when the cgroup is made
// (bpf/migrate.c, follow_mkdir), so that no process of a new cgroup runs
// before it is the app's. Other components are exact.
func checkGlob(g string) string {
	if g == "" || strings.HasPrefix(g, "/") || strings.HasSuffix(g, "/") {
		return fmt.Sprintf("invalid cgroup %q: want a path below the cgroup root, without a leading or trailing '/', such as system.slice/docker-*.scope", g)
	}
	parts := strings.Split(g, "/")
	if len(parts) > MaxMatchDepth {
		return fmt.Sprintf("invalid cgroup %q: %d levels deep, more than %d", g, len(parts), MaxMatchDepth)
	}
	if len(g) > MaxMatchPath {
		return fmt.Sprintf("invalid cgroup %q: longer than %d bytes", g, MaxMatchPath)
	}
	for i, c := range parts {
		switch {
		case c == "" || c == "." || c == "..":
			return fmt.Sprintf("invalid cgroup %q: component %q is not a cgroup name", g, c)
		case strings.ContainsAny(c, "?[]\\\n\x00"):
			return fmt.Sprintf("invalid cgroup %q: only '*' is a wildcard ('?', '[', '\\' are not supported)", g)
		case strings.Contains(c, "*") && i < len(parts)-1:
			return fmt.Sprintf("invalid cgroup %q: '*' only in the last component (the kernel matches a new cgroup by its exact parent)", g)
		case strings.Count(c, "*") > 1:
			return fmt.Sprintf("invalid cgroup %q: at most one '*'", g)
		case c == "*":
			return fmt.Sprintf("invalid cgroup %q: a last component of only '*' would take every child; name a prefix or suffix, or match the parent", g)
		}
		if pre, suf, ok := strings.Cut(c, "*"); ok && (len(pre) > MaxGlobPart || len(suf) > MaxGlobPart) {
			return fmt.Sprintf("invalid cgroup %q: at most %d bytes before and after '*'", g, MaxGlobPart)
		}
	}
	return ""
}

// The kernel's limits on globs (bpf/migrate.c, follow_mkdir): bytes before
// and after the '*', and globs with the same parent directory.
const (
	MaxGlobPart       = 64
	MaxGlobsPerParent = 4
)

// MaxMatchPath bounds a cgroup glob's (and a unit's path's) length; with
// the cgroup root's own path it must fit the kernel's key (bpf/migrate.c).
const MaxMatchPath = 200

// resolveUser turns a user name or number into a uid.
func resolveUser(v string) (uint32, string) {
	if digits(v) {
		uid, err := strconv.ParseUint(v, 10, 32)
		if err != nil || uid == 0xffffffff {
			return 0, fmt.Sprintf("invalid uid %s: want 0..4294967294", v)
		}
		return uint32(uid), ""
	}
	if !userRE.MatchString(v) || strings.HasPrefix(v, "@") {
		return 0, fmt.Sprintf("invalid user %q: want a user name or a uid", v)
	}
	uid, err := LookupUser(v)
	if err != nil {
		return 0, fmt.Sprintf("user %q: %v; write the uid if the user is made later", v, err)
	}
	return uid, ""
}
