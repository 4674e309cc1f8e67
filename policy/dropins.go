package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/procgate/procgate/ruleset"
)

// DropinDir is the directory of drop-ins beside the policy file: DIR/policy.d
// for DIR/policy.yaml. Its files *.yaml are read in name order.
const DropinDir = "policy.d"

// mainOnlyKeys are the top-level sections a drop-in may not have: they hold
// scalars, which two files could set differently. A drop-in adds to the
// list-valued sections instead (merge).
var mainOnlyKeys = []string{"audit"}

// File is one file of a policy, as read.
type File struct {
	Path string
	Data []byte
}

// Dropins lists the drop-ins of the policy file at path, in the order they
// are merged: DIR/policy.d/*.yaml by name. Hidden files (editors' lock
// files, a Kubernetes volume's ..data) and anything that is not a regular
// file, after symlinks, are not drop-ins. No policy.d: none.
func Dropins(path string) ([]string, error) {
	dir := filepath.Join(filepath.Dir(path), DropinDir)
	entries, err := os.ReadDir(dir) // sorted by name
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read drop-ins: %w", err)
	}
	var out []string
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".yaml") {
			continue
		}
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() {
			continue
		}
		out = append(out, p)
	}
	return out, nil
}

// ReadFiles reads the policy file at path and its drop-ins.
func ReadFiles(path string) ([]File, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read policy %s: %w", path, err)
	}
	files := []File{{Path: path, Data: data}}
	dropins, err := Dropins(path)
	if err != nil {
		return nil, err
	}
	for _, p := range dropins {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("read drop-in %s: %w", p, err)
		}
		files = append(files, File{Path: p, Data: data})
	}
	return files, nil
}

// Load reads and compiles the policy file at path with its drop-ins.
func Load(path string) (*ruleset.Ruleset, []Warning, error) {
	files, err := ReadFiles(path)
	if err != nil {
		return nil, nil, err
	}
	return ParseFiles(files)
}

// Hash identifies a policy's text: the SHA-256 of the file's bytes when it
// has no drop-ins (what sha256sum prints), else of every file's name, size
// and bytes in order.
func Hash(files []File) string {
	if len(files) == 1 {
		sum := sha256.Sum256(files[0].Data)
		return hex.EncodeToString(sum[:])
	}
	h := sha256.New()
	for _, f := range files {
		h.Write([]byte(f.Path + "\x00" + strconv.Itoa(len(f.Data)) + "\x00"))
		h.Write(f.Data)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// ParseFiles compiles a policy file (files[0]) and its drop-ins into one
// ruleset. On failure the error is an *Errors holding every mistake in
// every file, each naming its file.
func ParseFiles(files []File) (*ruleset.Ruleset, []Warning, error) {
	rs, warns, _, err := parseFiles(files, false)
	return rs, warns, err
}

// ParseDropin checks one drop-in on its own, by the rules of drop-ins; what
// needs the whole policy (an app defined in another file, grants outside
// every internal prefix) is not checked.
// The HostCheck is as ParseFilesForHost's.
func ParseDropin(file string, data []byte) (*ruleset.Ruleset, []Warning, HostCheck, error) {
	rs, warns, p, err := parseFiles([]File{{Path: file, Data: data}}, true)
	if err != nil {
		return nil, warns, nil, err
	}
	refs := p.refs
	return rs, warns, func() []Warning { return hostWarnings(refs) }, nil
}

func parseFiles(files []File, dropin bool) (*ruleset.Ruleset, []Warning, *parser, error) {
	rs, warns, p, err := parseFilesWith(files, dropin, true)
	if p.reparse {
		// A long list could not be read apart (stream.go): read the
		// files again whole.
		return parseFilesWith(files, dropin, false)
	}
	return rs, warns, p, err
}

func parseFilesWith(files []File, dropin, stream bool) (*ruleset.Ruleset, []Warning, *parser, error) {
	p := &parser{appNames: map[string]ruleset.Source{}, matches: seen{}, globParents: map[string]int{}, stream: stream, lazy: map[*yaml.Node]*run{}}
	var rs *ruleset.Ruleset
	var checks []grantCheck
	for i, f := range files {
		p.file, p.dropin = f.Path, dropin || i > 0
		before := len(p.errs)
		var part *ruleset.Ruleset
		var c []grantCheck
		data, runs := f.Data, []run(nil)
		if stream {
			data, runs = splitRuns(f.Data)
		}
		root := p.document(data)
		if len(runs) > 0 && (root == nil || !p.graft(root, runs)) {
			p.reparse = true
			return nil, nil, p, nil
		}
		if root != nil {
			part, c = p.policy(root)
		}
		if p.reparse || !decodesAll(runs) {
			p.reparse = true
			return nil, nil, p, nil
		}
		// Every mistake of a file in line order, files in merge order.
		slices.SortStableFunc(p.errs[before:], func(a, b Error) int {
			if a.Line != b.Line {
				return a.Line - b.Line
			}
			return a.Col - b.Col
		})
		checks = append(checks, c...)
		switch {
		case part == nil:
		case rs == nil:
			rs = part
		default:
			merge(rs, part)
		}
	}
	if rs != nil && !p.internalBad {
		if p.mainInternal != nil && len(rs.Internal) == 0 && len(rs.Interfaces) == 0 {
			p.file = files[0].Path
			p.warnf(p.mainInternal, "internal", "no prefixes and no interfaces: nothing is internal, so the policy denies nothing")
		}
		if !dropin {
			p.warnOutside(rs, checks)
		}
	}
	if len(p.errs) > 0 {
		return nil, p.warns, p, &Errors{List: p.errs}
	}
	return rs, p.warns, p, nil
}

// merge adds a drop-in's policy to the policy read so far. It is the one
// place that says how each section of a drop-in joins: a new list-valued
// section is one line here (and its key stays out of mainOnlyKeys).
func merge(into, part *ruleset.Ruleset) {
	into.Internal = union(into.Internal, part.Internal, func(p ruleset.InternalPrefix) netip.Prefix { return p.Prefix })
	into.Interfaces = union(into.Interfaces, part.Interfaces, func(s string) string { return s })
	// Numbered on from the grants before, so that each has its own.
	into.Everyone = append(into.Everyone, renumber(part.Everyone, len(into.Everyone))...)
	// An app named again is a drop-in's extension (parser.extends): its
	// grants are numbered on from the app's. Other names are new apps.
	at := make(map[string]int, len(into.Apps))
	for i, a := range into.Apps {
		at[a.Name] = i
	}
	for _, a := range part.Apps {
		if i, ok := at[a.Name]; ok {
			have := &into.Apps[i]
			have.Grants = append(have.Grants, renumber(a.Grants, len(have.Grants))...)
			continue
		}
		at[a.Name] = len(into.Apps)
		into.Apps = append(into.Apps, a)
	}
}

// renumber returns grants numbered from first on, in order.
func renumber(grants []ruleset.Grant, first int) []ruleset.Grant {
	out := slices.Clone(grants)
	for i := range out {
		out[i].Index = int32(first + i)
	}
	return out
}

// union appends the items of add whose key is not in list yet: the first
// file to name a prefix or an interface is its source.
func union[T any, K comparable](list, add []T, key func(T) K) []T {
	have := make(map[K]bool, len(list))
	for _, v := range list {
		have[key(v)] = true
	}
	for _, v := range add {
		if k := key(v); !have[k] {
			have[k] = true
			list = append(list, v)
		}
	}
	return list
}

// mainOnly refuses, in a drop-in, the sections only the main file may set.
func (p *parser) mainOnly(root *yaml.Node, vals map[string]*yaml.Node) {
	for _, key := range mainOnlyKeys {
		if _, ok := vals[key]; !ok {
			continue
		}
		at := vals[key]
		for i := 0; i+1 < len(root.Content); i += 2 {
			if root.Content[i].Value == key {
				at = root.Content[i]
			}
		}
		p.errorf(at, key, "only the main policy file may set %s; a drop-in adds apps, internal prefixes and interfaces", key)
		delete(vals, key)
	}
}

// place names where a value was defined for an error in another place:
// the line alone in the same file.
func (p *parser) place(s ruleset.Source) string {
	if s.File == p.file {
		return "line " + strconv.Itoa(s.Line)
	}
	return s.File + ":" + strconv.Itoa(s.Line)
}
