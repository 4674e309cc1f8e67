package policy

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"gopkg.in/yaml.v3"

	"github.com/procgate/procgate/ruleset"
	"github.com/procgate/procgate/users"
)

// A hostRef is a user, group or binary a policy names, where it names it.
type hostRef struct {
	kind      refKind
	value     string
	file      string
	field     string
	line, col int
}

type refKind int

const (
	refUser refKind = iota // a users: entry: a user, or "@" and a group
	refExe                 // an exe: path
)

func (p *parser) ref(kind refKind, value string, n *yaml.Node, field string) {
	p.refs = append(p.refs, hostRef{kind: kind, value: value, file: p.file, field: field, line: n.Line, col: n.Column})
}

// HostCheck checks what a policy names against this host, and warns about
// what procgate run would refuse or not find there: users and groups the
// user database (files and NSS) lacks, exe: binaries that are missing, not
// executable, not owned by root, or writable by group or others (or in a
// directory that is). It may take as long as the user database takes to
// answer (a directory server): run it apart from anything waiting on the
// policy. Numeric uids and gids are not looked up: a number is meant.
type HostCheck func() []Warning

// ParseForHost is Parse, and the check of the parsed policy against this
// host (nil when the policy has errors).
func ParseForHost(file string, data []byte) (*ruleset.Ruleset, []Warning, HostCheck, error) {
	return ParseFilesForHost([]File{{Path: file, Data: data}})
}

// ParseFilesForHost is ParseFiles, and the check of the parsed policy
// against this host (nil when the policy has errors).
func ParseFilesForHost(files []File) (*ruleset.Ruleset, []Warning, HostCheck, error) {
	rs, warns, p, err := parseFiles(files, false)
	if err != nil {
		return nil, warns, nil, err
	}
	refs := p.refs
	return rs, warns, func() []Warning { return hostWarnings(refs) }, nil
}

// LoadForHost is Load (the file and its drop-ins), and the check of the
// policy against this host.
func LoadForHost(path string) (*ruleset.Ruleset, []Warning, HostCheck, error) {
	files, err := ReadFiles(path)
	if err != nil {
		return nil, nil, nil, err
	}
	return ParseFilesForHost(files)
}

// hostWarnings checks refs, in the order of their files, each file's in
// line order.
func hostWarnings(refs []hostRef) []Warning {
	var out []Warning
	for _, r := range refs {
		var msg string
		switch r.kind {
		case refUser:
			msg = checkAccount(r.value)
		case refExe:
			msg = checkBinary(r.value)
		}
		if msg != "" {
			out = append(out, Warning{File: r.file, Line: r.line, Col: r.col, Field: r.field, Msg: msg})
		}
	}
	order := map[string]int{}
	for _, r := range refs {
		if _, ok := order[r.file]; !ok {
			order[r.file] = len(order)
		}
	}
	slices.SortStableFunc(out, func(a, b Warning) int {
		if a.File != b.File {
			return order[a.File] - order[b.File]
		}
		if a.Line != b.Line {
			return a.Line - b.Line
		}
		return a.Col - b.Col
	})
	return out
}

// checkAccount says what is wrong with a users: entry on this host, or "".
func checkAccount(entry string) string {
	name, group := strings.CutPrefix(entry, "@")
	if strings.Trim(name, "0123456789") == "" {
		return ""
	}
	var err error
	what := "user"
	if group {
		what = "group"
		_, err = users.LookupGroup(name)
	} else {
		_, err = users.LookupName(name)
	}
	switch {
	case errors.Is(err, users.ErrUnknown) && group:
		return fmt.Sprintf("unknown group %q on this host (files and NSS): it admits no one", name)
	case errors.Is(err, users.ErrUnknown):
		return fmt.Sprintf("unknown user %q on this host (files and NSS): procgate run refuses it until it exists", name)
	case err != nil:
		return fmt.Sprintf("cannot look up %s %q: %v", what, name, err)
	}
	return ""
}

// checkBinary says why procgate run would refuse the pinned binary path on
// this host (as launch.CheckExe decides), or "".
func checkBinary(path string) string {
	resolved, err := filepath.EvalSymlinks(path)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Sprintf("binary %s does not exist on this host: procgate run refuses the app's binaries until it does", path)
	}
	if err != nil {
		return fmt.Sprintf("binary %s: %v", path, err)
	}
	st, err := os.Stat(resolved)
	switch {
	case err != nil:
		return fmt.Sprintf("binary %s: %v", path, err)
	case !st.Mode().IsRegular():
		return fmt.Sprintf("binary %s is not a regular file (%s)", resolved, st.Mode().Type())
	case st.Mode().Perm()&0o111 == 0:
		return fmt.Sprintf("binary %s is not executable", resolved)
	}
	if why := notRootOnly(st, resolved); why != "" {
		return fmt.Sprintf("binary %s: %s: procgate run refuses it, as its users could change it", resolved, why)
	}
	for dir := filepath.Dir(resolved); ; dir = filepath.Dir(dir) {
		if dst, err := os.Stat(dir); err == nil {
			if why := notRootOnly(dst, dir); why != "" {
				return fmt.Sprintf("binary %s: directory %s: %s: procgate run refuses it, as others could replace it", resolved, dir, why)
			}
		}
		if dir == "/" {
			return ""
		}
	}
}

// notRootOnly says how someone other than root could change fi, or "".
func notRootOnly(fi os.FileInfo, path string) string {
	sys, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !ok:
		return "no owner information"
	case sys.Uid != 0:
		return fmt.Sprintf("owned by uid %d, not root", sys.Uid)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Sprintf("writable by group or others (mode %04o)", fi.Mode().Perm())
	}
	return ""
}
