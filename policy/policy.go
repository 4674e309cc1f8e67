// Package policy reads procgate's YAML policy (version 1, see README.md,
// docs/policy.md and procgate.schema.json), checks it, and compiles it to a
// *ruleset.Ruleset.
//
// Parsing walks the YAML node tree by hand instead of decoding into structs:
// only the node tree knows the line and column of every value, and a walk can
// report every mistake in the file at once instead of stopping at the first.
package policy

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/procgate/procgate/ruleset"
)

// Version is the only policy format version this package reads.
const Version = 1

// Audit rate bounds: events per second per app that the kernel may emit.
const (
	DefaultAuditRate = 100
	MaxAuditRate     = 1000000
)

// The keys each mapping accepts. They are the single list the parser checks
// keys against, and the schema test compares procgate.schema.json to them, so
// the schema cannot drift from the parser.
var (
	topKeys      = []string{"version", "internal", "audit", "everyone", "apps"}
	everyoneKeys = []string{"allow"}
	internalKeys = []string{"prefixes", "interfaces"}
	auditKeys    = []string{"rate"}
	appKeys      = []string{"name", "exe", "users", "keep_caps", "traceable", "handover", "audit", "mode", "outside", "loopback", "listen", "allow", "inbound", "match"}
	inboundKeys  = []string{"dynamic"}
	dynamicKeys  = []string{"control", "ports", "proto", "lease"}
	exeKeys      = []string{"path", "sha256"}
	grantKeys    = []string{"to", "proto", "ports"}
)

// The words proto and an app's audit and mode take, also listed in the schema.
var (
	protoWords = map[string]ruleset.Proto{"tcp": ruleset.TCP, "udp": ruleset.UDP, "both": ruleset.Both}
	auditWords = map[string]bool{"deny": false, "all": true}      // value: AuditAllow
	modeWords  = map[string]bool{"enforce": false, "audit": true} // value: AuditOnly
	// handoverWords: may processes outside the app write to its TCP
	// connections (handed over by SCM_RIGHTS)? value: AllowHandover
	handoverWords = map[string]bool{"deny": false, "allow": true}
	// outside and loopback: value is OutsideDeny, LoopbackDeny
	denyWords = map[string]bool{"allow": false, "deny": true}
)

// Bounds of an inbound lease (whole seconds, as the gateway takes them).
const (
	MinLease = time.Second
	MaxLease = 24 * time.Hour
)

// Patterns shared with procgate.schema.json (the schema test checks they match).
const (
	namePattern = `^[a-z0-9][a-z0-9._-]{0,62}$`
	// A user (name or uid) or "@" and a group (name or gid). Directory
	// names have '@', '.' and capitals (bob@EXAMPLE.COM): a leading '@'
	// alone makes a group. Samba machine accounts end in '$'.
	userPattern = `^@?[A-Za-z0-9_][A-Za-z0-9_.@-]{0,255}\$?$`
)

var (
	nameRE = regexp.MustCompile(namePattern)
	userRE = regexp.MustCompile(userPattern)
)

// CheckAppName refuses what cannot be an app's name.
func CheckAppName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("invalid app name %q: want %s", name, namePattern)
	}
	return nil
}

// Error is one mistake in a policy file. Line and Col are 1-based; 0 means
// unknown. Field is the path of the value, such as apps[0].allow[1].ports[2].
type Error struct {
	File      string
	Line, Col int
	Field     string
	Msg       string
}

func (e Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		b.WriteString(":" + strconv.Itoa(e.Line))
		if e.Col > 0 {
			b.WriteString(":" + strconv.Itoa(e.Col))
		}
	}
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field + ": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every mistake found in one policy file, in file order.
type Errors struct {
	List []Error
}

// Error prints one mistake per line.
func (e *Errors) Error() string {
	lines := make([]string, len(e.List))
	for i, err := range e.List {
		lines[i] = err.Error()
	}
	return strings.Join(lines, "\n")
}

// Warning is something legal that is probably not what the author meant.
// Line and Col are 1-based; Col 0 means unknown.
type Warning struct {
	File      string
	Line, Col int
	Field     string
	Msg       string
}

func (w Warning) String() string {
	at := w.File + ":" + strconv.Itoa(w.Line)
	if w.Col > 0 {
		at += ":" + strconv.Itoa(w.Col)
	}
	return at + ": " + w.Field + ": " + w.Msg
}

// LoadFile reads and compiles the policy file at path alone, without its
// drop-ins (Load reads both).
func LoadFile(path string) (*ruleset.Ruleset, []Warning, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read policy %s: %w", path, err)
	}
	return Parse(path, data)
}

// Parse compiles policy text; file names it in errors, warnings and sources.
// On failure the error is an *Errors holding every mistake found, and the
// warnings found so far are still returned.
func Parse(file string, data []byte) (*ruleset.Ruleset, []Warning, error) {
	return ParseFiles([]File{{Path: file, Data: data}})
}

type parser struct {
	file  string
	errs  []Error
	warns []Warning
	// refs are the users, groups and binaries the policy names, for
	// HostCheck.
	refs []hostRef
	// matches are the units, globs and uids apps matched so far, and
	// globParents counts globs per parent directory.
	matches     seen
	globParents map[string]int
	// dropin is set while a drop-in is read: internal is optional there,
	// and the main file's scalars are refused.
	dropin bool
	// appNames is where each app name was first defined, in any file.
	appNames map[string]ruleset.Source
	// mainInternal is the main file's internal section, for the warning
	// about a policy that makes nothing internal; internalBad is set when
	// an internal section of any file has errors (the internal set is not
	// known, so neither is what lies outside it).
	mainInternal *yaml.Node
	internalBad  bool
	// stream: long lists are read in chunks (stream.go); lazy are their
	// nodes, and reparse is set when one cannot be, and the file must be
	// read again whole.
	stream  bool
	lazy    map[*yaml.Node]*run
	reparse bool
	// cover is the cover of the internal prefixes read so far, in every
	// file: whether a prefix overlaps them is all the parser asks.
	cover ruleset.Cover
	// portLists are the port lists read so far, by their ranges
	// (portsKey): the grants of a list share one array, read-only like
	// all of a Ruleset, where each grant held its own (1,000,000 grants
	// name a few lists). scratch is where portList reads a list.
	portLists map[string][]ruleset.PortRange
	scratch   []ruleset.PortRange
}

func (p *parser) errorf(n *yaml.Node, field, format string, args ...any) {
	e := Error{File: p.file, Field: field, Msg: fmt.Sprintf(format, args...)}
	if n != nil {
		e.Line, e.Col = n.Line, n.Column
	}
	p.errs = append(p.errs, e)
}

func (p *parser) warnf(n *yaml.Node, field, format string, args ...any) {
	p.warns = append(p.warns, Warning{File: p.file, Line: n.Line, Col: n.Column, Field: field, Msg: fmt.Sprintf(format, args...)})
}

var yamlLineRE = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// document decodes the one YAML document of a policy and returns its root
// node, or nil after recording why it cannot.
func (p *parser) document(data []byte) *yaml.Node {
	docs, err := decode(data)
	if err != nil {
		p.yamlError(data, err)
		return nil
	}
	if len(docs) == 0 || len(docs[0].Content) != 1 {
		p.errorf(nil, "", "empty policy; want at least \"version: %d\"", Version)
		return nil
	}
	if len(docs) > 1 {
		// Reported, and the first document still checked: a stray "---"
		// should not hide the other mistakes.
		p.errorf(docs[1], "", "more than one YAML document; a policy is one document")
	}
	return docs[0].Content[0]
}

// decode returns the first two documents of data (two are enough to know
// that there are too many).
func decode(data []byte) (docs []*yaml.Node, err error) {
	return decodeFrom(bytes.NewReader(data))
}

// decodeHook, when set, is called on every parse. Tests count parses with
// it: the cost of a lookup in parses does not flake under load, as a time
// would.
var decodeHook func()

func decodeFrom(r io.Reader) (docs []*yaml.Node, err error) {
	if decodeHook != nil {
		decodeHook()
	}
	// yaml.v3 is third-party code fed with untrusted text: a panic in it must
	// become an error in the file, not a crash of the daemon reloading it.
	defer func() {
		if r := recover(); r != nil {
			docs, err = nil, fmt.Errorf("yaml: parser failed: %v", r)
		}
	}()
	dec := yaml.NewDecoder(r)
	for len(docs) < 2 {
		var doc yaml.Node
		if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, err
		}
		docs = append(docs, &doc)
	}
	return docs, nil
}

// splitYAMLError returns the line a yaml.v3 syntax error names (0 if none)
// and its message.
func splitYAMLError(err error) (int, string) {
	msg := err.Error()
	if m := yamlLineRE.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		return line, m[2]
	}
	return 0, strings.TrimPrefix(msg, "yaml: ")
}

func (p *parser) yamlError(data []byte, err error) {
	line, msg := splitYAMLError(err)
	if line > 0 {
		line = problemLine(data, msg)
	}
	p.errs = append(p.errs, Error{File: p.file, Line: line, Msg: "invalid YAML: " + msg})
}

// problemLine finds the line of a YAML syntax error. For parser errors
// yaml.v3 names the line before the enclosing construct (a 0-based line of
// where the construct starts), not the line of the problem, so that an
// indentation mistake deep in a mapping would be reported at the top of the
// file. The problem is on the first line whose addition makes a prefix of
// the file fail with the same message.
func problemLine(data []byte, msg string) int {
	// ends[k] is the length of the first k lines.
	ends := []int{0}
	for i, c := range data {
		if c == '\n' {
			ends = append(ends, i+1)
		}
	}
	if ends[len(ends)-1] < len(data) {
		ends = append(ends, len(data))
	}
	fails := func(k int) bool {
		_, err := decode(data[:ends[k]])
		if err == nil {
			return false
		}
		_, m := splitYAMLError(err)
		return m == msg
	}
	// yaml.v3 reads its input only as it scans: handed one byte per read,
	// it has read, when it fails, up to the problem and at most a little
	// lookahead past it. The line of that last byte is where to start.
	r := &byteReader{data: data}
	_, _ = decodeFrom(r)
	read, _ := slices.BinarySearch(ends, r.n)
	return firstFailing(min(read, len(ends)-1), len(ends)-1, fails)
}

// firstFailing returns the first k with fails(k), for a fails that is
// false at 0, true at last and monotonic, starting from the guess start.
// It walks back from start, one parse a line: the problem is usually on
// that line or just before it, so a whole file costs a few parses, not the
// log(lines) a bisection from the start would (10 s for a 10 MB file).
// Past a few steps, or when start is short of the problem, it bisects.
func firstFailing(start, last int, fails func(int) bool) int {
	const walk = 8
	ok, bad := 0, last
	if start < last && !fails(start) {
		ok = start
	} else {
		bad = start
		for k := bad - 1; k > 0 && start-k <= walk; k-- {
			if !fails(k) {
				return bad
			}
			bad = k
		}
	}
	for bad-ok > 1 {
		mid := ok + (bad-ok)/2
		if fails(mid) {
			bad = mid
		} else {
			ok = mid
		}
	}
	return bad
}

// byteReader hands its data out one byte per Read and counts what it gave.
type byteReader struct {
	data []byte
	n    int
}

func (r *byteReader) Read(p []byte) (int, error) {
	if r.n >= len(r.data) {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	p[0] = r.data[r.n]
	r.n++
	return 1, nil
}

func join(field, key string) string {
	if field == "" {
		return key
	}
	return field + "." + key
}

func index(field string, i int) string { return field + "[" + strconv.Itoa(i) + "]" }

// describe names a node's kind for "want X, not Y" messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.AliasNode:
		return "an alias"
	}
	if n.ShortTag() == "!!null" {
		return "null"
	}
	return strconv.Quote(n.Value)
}

// fields checks that n is a mapping whose keys are all in keys, each once, and
// returns the value node of each key present. ok is false when n is not a
// mapping at all, so that callers do not pile "missing" errors on top.
func (p *parser) fields(n *yaml.Node, field string, keys []string) (vals map[string]*yaml.Node, ok bool) {
	if n.Kind != yaml.MappingNode {
		p.errorf(n, field, "want a mapping with keys %s, not %s", strings.Join(keys, ", "), describe(n))
		return nil, false
	}
	vals = make(map[string]*yaml.Node, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			p.errorf(k, field, "keys must be plain names, not %s", describe(k))
			continue
		}
		name := k.Value
		switch first := firstKey(n.Content[:i], name, keys); {
		case first != nil:
			p.errorf(k, join(field, name), "duplicate field (first at %s)", position(first, k))
		case !slices.Contains(keys, name):
			p.errorf(k, join(field, name), "unknown field; want one of %s", strings.Join(keys, ", "))
		default:
			vals[name] = v
		}
	}
	return vals, true
}

// position says where the earlier node first is, seen from the later node
// at: its line, or on the same line (a one-line `{...}` item) its column.
func position(first, at *yaml.Node) string {
	if first.Line == at.Line {
		return fmt.Sprintf("column %d of this line", first.Column)
	}
	return fmt.Sprintf("line %d", first.Line)
}

// firstKey is the first key node of the mapping content before that is
// name, one of keys; nil if none. A mapping has a few keys: a walk back
// costs less than a second map for each (a grant's), 1,000,000 times.
func firstKey(before []*yaml.Node, name string, keys []string) *yaml.Node {
	for i := 0; i+1 < len(before); i += 2 {
		if k := before[i]; k.Kind == yaml.ScalarNode && k.Value == name && slices.Contains(keys, name) {
			return k
		}
	}
	return nil
}

// require records a missing required key, located at its mapping.
func (p *parser) require(vals map[string]*yaml.Node, n *yaml.Node, field, key string) bool {
	if _, ok := vals[key]; !ok {
		p.errorf(n, join(field, key), "missing (required)")
		return false
	}
	return true
}

// list returns the items of a sequence node (items reads a long one
// without holding all of its items).
func (p *parser) list(n *yaml.Node, field string) ([]*yaml.Node, bool) {
	if n.Kind != yaml.SequenceNode {
		p.errorf(n, field, "want a list, not %s", describe(n))
		return nil, false
	}
	if p.lazy[n] != nil {
		var out []*yaml.Node
		for _, item := range p.items(n, field) {
			out = append(out, item)
		}
		return out, true
	}
	return n.Content, true
}

// str returns a scalar's text as written. Any plain scalar is taken as text
// (an app may be called 2024 or yes), but null and custom tags are refused:
// they are almost always a mistake in a security policy.
func (p *parser) str(n *yaml.Node, field string) (string, bool) {
	if n.Kind != yaml.ScalarNode {
		p.errorf(n, field, "want a string, not %s", describe(n))
		return "", false
	}
	switch n.ShortTag() {
	case "!!str", "!!int", "!!float", "!!bool", "!!timestamp":
		return n.Value, true
	case "!!null":
		p.errorf(n, field, "want a string, not null")
	default:
		p.errorf(n, field, "unsupported YAML tag %s", n.Tag)
	}
	return "", false
}

// integer returns an !!int scalar's value.
func (p *parser) integer(n *yaml.Node, field string) (int64, bool) {
	// Plain decimal digits, a port's, are what yaml.v3 would make of
	// them, without a decoder made for each.
	if n.Kind == yaml.ScalarNode && n.Tag == "!!int" && digits(n.Value) && (n.Value == "0" || n.Value[0] != '0') {
		if v, err := strconv.ParseInt(n.Value, 10, 64); err == nil {
			return v, true
		}
	}
	var v int64
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" || n.Decode(&v) != nil {
		p.errorf(n, field, "want an integer, not %s", describe(n))
		return 0, false
	}
	return v, true
}

// boolean returns a !!bool scalar's value.
func (p *parser) boolean(n *yaml.Node, field string) (bool, bool) {
	var v bool
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!bool" || n.Decode(&v) != nil {
		p.errorf(n, field, "want true or false, not %s", describe(n))
		return false, false
	}
	return v, true
}

// word reads one of a fixed set of words; want lists them for the error.
func word[T any](p *parser, n *yaml.Node, field, what string, words map[string]T, want string) (T, bool) {
	var zero T
	s, ok := p.str(n, field)
	if !ok {
		return zero, false
	}
	v, known := words[s]
	if !known {
		p.errorf(n, field, "invalid %s %q: want %s", what, s, want)
		return zero, false
	}
	return v, true
}

// seen remembers where each value of a list (or of a set across a policy's
// files, such as matches) first occurred, to report repeats with both places.
type seen map[string]ruleset.Source

func (p *parser) once(s seen, n *yaml.Node, field, what, key string) bool {
	if first, dup := s[key]; dup {
		p.errorf(n, field, "duplicate %s %s (first at %s)", what, key, p.place(first))
		return false
	}
	s[key] = ruleset.Source{File: p.file, Line: n.Line}
	return true
}

func (p *parser) source(n *yaml.Node) ruleset.Source {
	return ruleset.Source{File: p.file, Line: n.Line}
}

// grantCheck is a grant kept for the pass after the whole file is read, when
// the internal prefixes are known wherever they were written.
type grantCheck struct {
	file string
	// line and col are where the grant's to: is: its position alone (a
	// node is 160 bytes, 160 MiB for 1,000,000 grants).
	line, col int32
	field     string
	prefix    netip.Prefix
	name      string // a name grant's name: no prefix to check
	// everyone: an everyone grant, which sandboxed apps may need outside
	// internal prefixes; sandboxed: a grant of an outside: deny app.
	everyone, sandboxed bool
	// app names the grant's app: a drop-in's extension of a sandbox is
	// known to be one only once every file is read.
	app string
}

// at is a node of the grant's to: position, for errors and warnings.
func (c grantCheck) at() *yaml.Node { return &yaml.Node{Line: int(c.line), Column: int(c.col)} }

// policy reads one file's policy (the main file's or a drop-in's) and the
// grants to check once every file is read.
func (p *parser) policy(root *yaml.Node) (*ruleset.Ruleset, []grantCheck) {
	vals, ok := p.fields(root, "", topKeys)
	if !ok {
		return nil, nil
	}
	rs := &ruleset.Ruleset{AuditRate: DefaultAuditRate}
	if p.require(vals, root, "", "version") {
		if v, ok := p.integer(vals["version"], "version"); ok && v != Version {
			p.errorf(vals["version"], "version", "unsupported version %d; want %d", v, Version)
		}
	}
	if p.dropin {
		p.mainOnly(root, vals)
	}
	if n, ok := vals["internal"]; ok || (!p.dropin && p.require(vals, root, "", "internal")) {
		before := len(p.errs)
		rs.Internal, rs.Interfaces = p.internal(n, "internal")
		if len(p.errs) != before {
			p.internalBad = true
		} else if !p.dropin {
			p.mainInternal = n
		}
	}
	if n, ok := vals["audit"]; ok {
		rs.AuditRate = p.audit(n, "audit")
	}
	var checks []grantCheck
	if n, ok := vals["everyone"]; ok {
		rs.Everyone, checks = p.everyone(n, "everyone")
		for i := range checks {
			checks[i].everyone = true
			if c := checks[i]; c.name != "" {
				// Whose DNS answers would stand for everyone's? A name
				// grant is learned from one app's own queries.
				p.file = c.file
				p.errorf(c.at(), c.field, "DNS name %q in an everyone grant: name grants are for apps (they stand for the answers the app itself got); write the resolver's or service's address", c.name)
			}
		}
	}
	if n, ok := vals["apps"]; ok {
		var c []grantCheck
		rs.Apps, c = p.apps(n, "apps")
		checks = append(checks, c...)
	}
	return rs, checks
}

// everyone reads `everyone: {allow: [grants]}`: grants every process holds,
// app or not, on top of its app's own.
func (p *parser) everyone(n *yaml.Node, field string) ([]ruleset.Grant, []grantCheck) {
	vals, ok := p.fields(n, field, everyoneKeys)
	if !ok {
		return nil, nil
	}
	an, ok := vals["allow"]
	if !ok {
		return nil, nil
	}
	return p.grants(an, join(field, "allow"))
}

// grants reads a list of grants, numbered in list order. A grant whose
// prefix overlaps an internal prefix read so far needs no check once
// every file is read (warnOutside): drop-ins only add internal prefixes.
// So most grants of a large policy keep none (each is 100 bytes).
func (p *parser) grants(n *yaml.Node, field string) (out []ruleset.Grant, checks []grantCheck) {
	if c := p.count(n); c > 0 {
		out = make([]ruleset.Grant, 0, c)
	}
	var f ruleset.Finger
	for i, item := range p.items(n, field) {
		g, c, ok := p.grant(item, index(field, i))
		if ok {
			g.Index = int32(i)
			out = append(out, g)
			if c.name != "" || !p.cover.OverlapsFrom(&f, c.prefix) {
				checks = append(checks, c)
			}
		}
	}
	return out, checks
}

// count is how many items the sequence n has, to size what is read from
// it (0 for a node that is no list).
func (p *parser) count(n *yaml.Node) int {
	if r := p.lazy[n]; r != nil {
		return len(r.items)
	}
	if n.Kind == yaml.SequenceNode {
		return len(n.Content)
	}
	return 0
}

// addKnown adds the sorted prefixes of one internal section to those
// known: a prefix inside the cover adds nothing to it.
func (p *parser) addKnown(sorted []netip.Prefix) {
	if len(p.cover) > 0 {
		sorted = ruleset.SortPrefixes(append(slices.Clone(p.cover), sorted...))
	}
	p.cover = ruleset.CoverOf(sorted)
}

// warnOutside flags grants that overlap no internal prefix: they are legal but
// change nothing, because non-internal destinations are allowed to everyone.
// It runs once every file is read: a drop-in's grant may be internal by the
// main file's prefixes.
func (p *parser) warnOutside(rs *ruleset.Ruleset, checks []grantCheck) {
	if len(checks) == 0 {
		return
	}
	// Every file's internal prefixes, as merged into rs.
	overlaps := p.cover.Overlaps
	sandboxes := slices.ContainsFunc(rs.Apps, func(a ruleset.App) bool { return a.OutsideDeny })
	for _, c := range checks {
		// A sandbox reaches only its grants, outside included; everyone's
		// grants outside are for sandboxes.
		if c.app != "" && !c.sandboxed {
			a := rs.App(c.app)
			c.sandboxed = a != nil && a.OutsideDeny
		}
		// A name's addresses are unknown until answered.
		if c.name != "" || c.sandboxed || (c.everyone && sandboxes) || overlaps(c.prefix) {
			continue
		}
		p.file = c.file
		if len(rs.Interfaces) > 0 {
			p.warnf(c.at(), c.field, "%s is outside every internal prefix; it has an effect only where routes via %s make it internal",
				c.prefix, strings.Join(rs.Interfaces, ", "))
		} else {
			p.warnf(c.at(), c.field, "%s is outside every internal prefix, so the grant has no effect (destinations outside are allowed anyway)", c.prefix)
		}
	}
}

func (p *parser) internal(n *yaml.Node, field string) (prefixes []ruleset.InternalPrefix, ifaces []string) {
	vals, ok := p.fields(n, field, internalKeys)
	if !ok {
		return nil, nil
	}
	if n, ok := vals["prefixes"]; ok {
		f := join(field, "prefixes")
		var at []itemAt
		if c := p.count(n); c > 0 {
			prefixes, at = make([]ruleset.InternalPrefix, 0, c), make([]itemAt, 0, c)
		}
		for i, item := range p.items(n, f) {
			if pf, ok := p.prefix(item, index(f, i)); ok {
				prefixes = append(prefixes, ruleset.InternalPrefix{Prefix: pf, Source: p.source(item)})
				at = append(at, itemAt{line: int32(item.Line), col: int32(item.Column), index: int32(i)})
			}
		}
		prefixes = p.dropRepeats(prefixes, at, f)
	}
	if n, ok := vals["interfaces"]; ok {
		items, _ := p.list(n, join(field, "interfaces"))
		dups := seen{}
		for i, item := range items {
			f := index(join(field, "interfaces"), i)
			name, ok := p.str(item, f)
			if !ok {
				continue
			}
			if msg := checkInterface(name); msg != "" {
				p.errorf(item, f, "%s", msg)
			} else if p.once(dups, item, f, "interface", name) {
				ifaces = append(ifaces, name)
			}
		}
	}
	return prefixes, ifaces
}

// itemAt is where a list's item was: its position and index.
type itemAt struct{ line, col, index int32 }

// dropRepeats reports each prefix of list (read from the items at, of
// the list field) that repeats an earlier one, and returns list without
// them; the prefixes left, sorted, are known from then on (addKnown). It
// sorts where a map of the prefixes seen took 370 MB and a hash each for
// 1,000,000.
func (p *parser) dropRepeats(list []ruleset.InternalPrefix, at []itemAt, field string) []ruleset.InternalPrefix {
	order := make([]int32, len(list))
	for i := range order {
		order[i] = int32(i)
	}
	slices.SortFunc(order, func(a, b int32) int {
		if c := list[a].Prefix.Compare(list[b].Prefix); c != 0 {
			return c
		}
		return cmp.Compare(a, b)
	})
	sorted := make([]netip.Prefix, 0, len(list))
	var repeats []bool
	first := int32(-1)
	for _, i := range order {
		if first < 0 || list[i].Prefix != list[first].Prefix {
			first = i
			sorted = append(sorted, list[i].Prefix)
			continue
		}
		if repeats == nil {
			repeats = make([]bool, len(list))
		}
		repeats[i] = true
		p.errorf(&yaml.Node{Line: int(at[i].line), Column: int(at[i].col)}, index(field, int(at[i].index)),
			"duplicate prefix %s (first at %s)", list[i].Prefix, p.place(list[first].Source))
	}
	p.addKnown(sorted)
	if repeats == nil {
		return list
	}
	kept := list[:0]
	for i, in := range list {
		if !repeats[i] {
			kept = append(kept, in)
		}
	}
	return kept
}

// checkInterface applies the kernel's rules for a link name (dev_valid_name):
// 1 to 15 bytes, not "." or "..", no '/', ':' or whitespace.
func checkInterface(name string) string {
	bad := len(name) == 0 || len(name) > 15 || name == "." || name == ".." ||
		strings.ContainsAny(name, "/: \t\n\v\f\r")
	if bad {
		return fmt.Sprintf("invalid interface name %q: want 1-15 characters, no '/', ':' or whitespace", name)
	}
	return ""
}

func (p *parser) audit(n *yaml.Node, field string) uint32 {
	vals, ok := p.fields(n, field, auditKeys)
	if !ok {
		return DefaultAuditRate
	}
	if n, ok := vals["rate"]; ok {
		f := join(field, "rate")
		if v, ok := p.integer(n, f); ok {
			if v < 1 || v > MaxAuditRate {
				p.errorf(n, f, "rate %d out of range 1-%d", v, MaxAuditRate)
			} else {
				return uint32(v)
			}
		}
	}
	return DefaultAuditRate
}

func (p *parser) apps(n *yaml.Node, field string) (apps []ruleset.App, checks []grantCheck) {
	items, _ := p.list(n, field)
	for i, item := range items {
		f := index(field, i)
		app, c, ok := p.app(item, f)
		if ok {
			apps = append(apps, app)
		}
		checks = append(checks, c...)
	}
	return apps, checks
}

func (p *parser) app(n *yaml.Node, field string) (ruleset.App, []grantCheck, bool) {
	app := ruleset.App{Source: p.source(n)}
	vals, ok := p.fields(n, field, appKeys)
	if !ok {
		return app, nil, false
	}
	if p.require(vals, n, field, "name") {
		f := join(field, "name")
		if name, ok := p.str(vals["name"], f); ok {
			if !nameRE.MatchString(name) {
				p.errorf(vals["name"], f, "invalid app name %q: want %s", name, namePattern)
			} else if first, dup := p.appNames[name]; dup && p.extends(first, vals) {
				// A drop-in adding grants to an app of an earlier file:
				// merge joins them (an extension has only name and allow).
				app.Name = name
			} else if dup {
				hint := ""
				if p.dropin && first.File != p.file {
					hint = "; a drop-in adds grants to it with an entry of only name and allow"
				}
				p.errorf(vals["name"], f, "duplicate app %q (first at %s)%s", name, p.place(first), hint)
			} else {
				p.appNames[name] = ruleset.Source{File: p.file, Line: vals["name"].Line}
				app.Name = name
			}
		}
	}
	if n, ok := vals["exe"]; ok {
		app.Exe = p.exes(n, join(field, "exe"))
	}
	if n, ok := vals["users"]; ok {
		app.Users = p.users(n, join(field, "users"))
	}
	if n, ok := vals["keep_caps"]; ok {
		app.KeepCaps = p.keepCaps(n, join(field, "keep_caps"))
	}
	if n, ok := vals["traceable"]; ok {
		app.Traceable, _ = p.boolean(n, join(field, "traceable"))
	}
	if n, ok := vals["handover"]; ok {
		app.AllowHandover, _ = word(p, n, join(field, "handover"), "handover mode", handoverWords, "deny or allow")
	}
	if n, ok := vals["audit"]; ok {
		app.AuditAllow, _ = word(p, n, join(field, "audit"), "audit setting", auditWords, "deny or all")
	}
	if n, ok := vals["mode"]; ok {
		app.AuditOnly, _ = word(p, n, join(field, "mode"), "mode", modeWords, "enforce or audit")
	}
	if n, ok := vals["outside"]; ok {
		app.OutsideDeny, _ = word(p, n, join(field, "outside"), "outside mode", denyWords, "allow or deny")
	}
	if n, ok := vals["loopback"]; ok {
		app.LoopbackDeny, _ = word(p, n, join(field, "loopback"), "loopback mode", denyWords, "allow or deny")
		if app.LoopbackDeny && !app.OutsideDeny {
			p.warnf(n, join(field, "loopback"), "loopback: deny has no effect without outside: deny (loopback is external, and external is allowed)")
		}
	}
	var checks []grantCheck
	if n, ok := vals["allow"]; ok {
		app.Grants, checks = p.grants(n, join(field, "allow"))
		for i := range checks {
			checks[i].sandboxed, checks[i].app = app.OutsideDeny, app.Name
		}
	}
	if app.LoopbackDeny && app.OutsideDeny && app.HasNames() {
		p.warnf(vals["loopback"], join(field, "loopback"), "loopback: deny cuts the app's name grants off: its DNS queries go to the daemon's proxy on loopback, which it may not reach; use loopback: allow")
	}
	if n, ok := vals["listen"]; ok {
		app.Listen = &ruleset.Listen{Ports: p.listenPorts(n, join(field, "listen")), Source: p.source(n)}
	}
	if n, ok := vals["inbound"]; ok {
		app.Inbound = p.inbound(n, join(field, "inbound"))
	}
	if n, ok := vals["match"]; ok {
		app.Match = p.match(n, join(field, "match"))
		if app.Match != nil && len(app.Users) > 0 {
			p.warnf(vals["users"], join(field, "users"), "an app with match: is not started by `procgate run`, so users: (who may run it) has no effect")
		}
	}
	return app, checks, true
}

// extends reports whether an app entry naming an app first defined at first
// adds grants to it: in a drop-in, for an app of an earlier file, with no
// field but name and allow (anything else would set the app twice), and
// allow present.
func (p *parser) extends(first ruleset.Source, vals map[string]*yaml.Node) bool {
	if _, ok := vals["allow"]; !ok || !p.dropin || first.File == p.file {
		return false
	}
	for k := range vals {
		if k != "name" && k != "allow" {
			return false
		}
	}
	return true
}

// inbound reads `inbound: {dynamic: {control, ports, proto, lease}}`.
func (p *parser) inbound(n *yaml.Node, field string) *ruleset.Inbound {
	vals, ok := p.fields(n, field, inboundKeys)
	if !ok || !p.require(vals, n, field, "dynamic") {
		return nil
	}
	dn, f := vals["dynamic"], join(field, "dynamic")
	dv, ok := p.fields(dn, f, dynamicKeys)
	if !ok {
		return nil
	}
	before := len(p.errs)
	in := &ruleset.Inbound{Proto: ruleset.Both, Source: p.source(dn)}
	if n, ok := dv["control"]; ok {
		in.Control = p.servicePorts(n, join(f, "control"))
	}
	if p.require(dv, dn, f, "ports") {
		in.Ports = p.servicePorts(dv["ports"], join(f, "ports"))
	}
	if n, ok := dv["proto"]; ok {
		if proto, ok := word(p, n, join(f, "proto"), "proto", protoWords, "tcp, udp or both (omit for both)"); ok {
			in.Proto = proto
		}
	}
	if n, ok := dv["lease"]; ok {
		in.Lease = p.lease(n, join(f, "lease"))
	}
	// A control port that is also an auxiliary port would give every peer
	// of the service a hole to it: certainly not what was meant.
	for _, c := range in.Control {
		for _, a := range in.Ports {
			if in.Proto&ruleset.TCP != 0 && c.Lo <= a.Hi && a.Lo <= c.Hi {
				p.errorf(dv["control"], join(f, "control"), "control ports %s overlap auxiliary ports %s", c, a)
			}
		}
	}
	if len(p.errs) != before {
		return nil
	}
	return in
}

// servicePorts reads a non-empty list of ports and ranges a service binds:
// port 0 (any port) is no port.
func (p *parser) servicePorts(n *yaml.Node, field string) []ruleset.PortRange {
	return p.portList(n, field, "empty port list; want at least one port",
		func(item *yaml.Node, f string, r ruleset.PortRange) bool {
			if r.Lo == 0 {
				p.errorf(item, f, "port 0 is not a port a service binds; want 1-65535")
				return false
			}
			return true
		})
}

// listenPorts reads listen:, the ports an app may bind: ports and ranges,
// 0 for an ephemeral port (bind to port 0), or an empty list for none.
func (p *parser) listenPorts(n *yaml.Node, field string) []ruleset.PortRange {
	if out := p.portList(n, field, "", nil); out != nil {
		return out
	}
	return []ruleset.PortRange{}
}

// lease reads a duration in whole seconds ("30s", "2m").
func (p *parser) lease(n *yaml.Node, field string) time.Duration {
	s, ok := p.str(n, field)
	if !ok {
		return 0
	}
	d, err := time.ParseDuration(s)
	switch {
	case err != nil:
		p.errorf(n, field, "invalid lease %q: want a duration such as 30s or 2m", s)
	case d%time.Second != 0:
		p.errorf(n, field, "lease %s is not a whole number of seconds", s)
	case d < MinLease || d > MaxLease:
		p.errorf(n, field, "lease %s out of range %s-%s", s, MinLease, MaxLease)
	default:
		return d
	}
	return 0
}

func (p *parser) exes(n *yaml.Node, field string) []ruleset.Exe {
	items, _ := p.list(n, field)
	var exes []ruleset.Exe
	dups := seen{}
	for i, item := range items {
		f := index(field, i)
		exe, ok := p.exe(item, f)
		key := exe.Path
		if exe.SHA256 != "" {
			key += " sha256 " + exe.SHA256
		}
		if ok && p.once(dups, item, f, "exe", key) {
			exes = append(exes, exe)
		}
	}
	return exes
}

// exe reads an exe item: a path, or {path, sha256}.
func (p *parser) exe(n *yaml.Node, field string) (ruleset.Exe, bool) {
	pathNode, pathField := n, field
	var exe ruleset.Exe
	ok := true
	switch n.Kind {
	case yaml.ScalarNode:
	case yaml.MappingNode:
		vals, _ := p.fields(n, field, exeKeys)
		if !p.require(vals, n, field, "path") {
			return exe, false
		}
		pathNode, pathField = vals["path"], join(field, "path")
		if h, present := vals["sha256"]; present {
			exe.SHA256, ok = p.sha256(h, join(field, "sha256"))
		}
	default:
		p.errorf(n, field, "want a path or {path: PATH, sha256: HASH}, not %s", describe(n))
		return exe, false
	}
	s, strOK := p.str(pathNode, pathField)
	if !strOK {
		return exe, false
	}
	switch {
	case !path.IsAbs(s) || strings.ContainsRune(s, 0):
		p.errorf(pathNode, pathField, "exe path %q must be absolute", s)
		return exe, false
	case path.Clean(s) != s:
		p.errorf(pathNode, pathField, "exe path %q is not clean; did you mean %s?", s, path.Clean(s))
		return exe, false
	}
	exe.Path = s
	p.ref(refExe, s, pathNode, pathField)
	return exe, ok
}

func (p *parser) sha256(n *yaml.Node, field string) (string, bool) {
	s, ok := p.str(n, field)
	if !ok {
		return "", false
	}
	h := strings.ToLower(s)
	if len(h) != 64 || strings.Trim(h, "0123456789abcdef") != "" {
		p.errorf(n, field, "invalid sha256 %q: want 64 hex digits", s)
		return "", false
	}
	return h, true
}

func (p *parser) users(n *yaml.Node, field string) []string {
	out := p.distinct(n, field, "user", func(u string) string {
		if !userRE.MatchString(u) {
			return fmt.Sprintf("invalid user %q: want a user name or uid, or @ and a group name or gid (letters, digits, _ . @ -)", u)
		}
		return ""
	})
	if n.Kind == yaml.SequenceNode {
		for i, item := range n.Content {
			if item.Kind == yaml.ScalarNode && slices.Contains(out, item.Value) {
				p.ref(refUser, item.Value, item, index(field, i))
			}
		}
	}
	return out
}

// keepCaps reads keep_caps: names of ruleset.LauncherDrops, as in
// ruleset.LauncherDrops (lower case, no cap_ prefix).
func (p *parser) keepCaps(n *yaml.Node, field string) []string {
	return p.distinct(n, field, "capability", func(c string) string {
		if short := strings.TrimPrefix(strings.ToLower(c), "cap_"); short != c && slices.Contains(ruleset.LauncherDrops, short) {
			return fmt.Sprintf("invalid capability %q: write it %s", c, short)
		}
		if !slices.Contains(ruleset.LauncherDrops, c) {
			return fmt.Sprintf("invalid capability %q: the launcher drops only %s, so only these can be kept", c, strings.Join(ruleset.LauncherDrops, ", "))
		}
		return ""
	})
}

// distinct reads a list of strings that invalid (the reason, or "") accepts,
// each once; what names one in the duplicate error.
func (p *parser) distinct(n *yaml.Node, field, what string, invalid func(string) string) []string {
	items, _ := p.list(n, field)
	var out []string
	dups := seen{}
	for i, item := range items {
		f := index(field, i)
		v, ok := p.str(item, f)
		if !ok {
			continue
		}
		if why := invalid(v); why != "" {
			p.errorf(item, f, "%s", why)
		} else if p.once(dups, item, f, what, v) {
			out = append(out, v)
		}
	}
	return out
}

func (p *parser) grant(n *yaml.Node, field string) (ruleset.Grant, grantCheck, bool) {
	g := ruleset.Grant{Proto: ruleset.Both, Ports: p.shared([]ruleset.PortRange{ruleset.AllPorts}), Source: p.source(n)}
	var c grantCheck
	vals, ok := p.fields(n, field, grantKeys)
	if !ok {
		return g, c, false
	}
	before := len(p.errs)
	if p.require(vals, n, field, "to") {
		to := vals["to"]
		c = grantCheck{file: p.file, line: int32(to.Line), col: int32(to.Column), field: join(field, "to")}
		c.prefix, c.name, _ = p.destination(vals["to"], c.field)
		g.Prefix, g.Name = c.prefix, c.name
	}
	if n, ok := vals["proto"]; ok {
		if proto, ok := word(p, n, join(field, "proto"), "proto", protoWords, "tcp, udp or both (omit for both)"); ok {
			g.Proto = proto
		}
	}
	if n, ok := vals["ports"]; ok {
		g.Ports = p.ports(n, join(field, "ports"))
	}
	return g, c, len(p.errs) == before
}

func (p *parser) ports(n *yaml.Node, field string) []ruleset.PortRange {
	return p.portList(n, field, "empty port list; omit ports for all ports", nil)
}

// portList reads a list of ports and ranges, sorted. empty, unless "", is
// the error for an empty list; keep, unless nil, may reject a port it has
// reported.
func (p *parser) portList(n *yaml.Node, field, empty string, keep func(item *yaml.Node, f string, r ruleset.PortRange) bool) []ruleset.PortRange {
	items, ok := p.list(n, field)
	if ok && len(items) == 0 && empty != "" {
		p.errorf(n, field, "%s", empty)
	}
	out := p.scratch[:0]
	for i, item := range items {
		f := index(field, i)
		if r, ok := p.portRange(item, f); ok && (keep == nil || keep(item, f, r)) {
			out = append(out, r)
		}
	}
	p.scratch = out
	return p.shared(sortedPorts(out))
}

// shared is the port list equal to ports that the parser holds
// (portLists), made from ports when it holds none; nil for none.
func (p *parser) shared(ports []ruleset.PortRange) []ruleset.PortRange {
	if len(ports) == 0 {
		return nil
	}
	if len(ports) > maxSharedPorts {
		return slices.Clone(ports)
	}
	var buf [4 * maxSharedPorts]byte
	key := portsKey(buf[:0], ports)
	if s, ok := p.portLists[string(key)]; ok {
		return s
	}
	if p.portLists == nil {
		p.portLists = map[string][]ruleset.PortRange{}
	}
	s := slices.Clone(ports)
	p.portLists[string(key)] = s
	return s
}

// maxSharedPorts is the longest port list shared: longer ones are rare,
// and each is kept as read.
const maxSharedPorts = 16

// portsKey appends the ranges of ports to b, 4 bytes each.
func portsKey(b []byte, ports []ruleset.PortRange) []byte {
	for _, r := range ports {
		b = binary.BigEndian.AppendUint16(b, r.Lo)
		b = binary.BigEndian.AppendUint16(b, r.Hi)
	}
	return b
}

// sortedPorts is ports exact as written: sorted and deduplicated, never
// merged or widened.
func sortedPorts(out []ruleset.PortRange) []ruleset.PortRange {
	slices.SortFunc(out, func(a, b ruleset.PortRange) int {
		if a.Lo != b.Lo {
			return int(a.Lo) - int(b.Lo)
		}
		return int(a.Hi) - int(b.Hi)
	})
	return slices.Compact(out)
}

// portRange reads a port (an integer, or its digits as a string) or a range
// "lo-hi".
func (p *parser) portRange(n *yaml.Node, field string) (ruleset.PortRange, bool) {
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!int" {
		v, ok := p.integer(n, field)
		if !ok {
			return ruleset.PortRange{}, false
		}
		if v < 0 || v > 65535 {
			p.errorf(n, field, "port %s out of range 0-65535", n.Value)
			return ruleset.PortRange{}, false
		}
		if msg := decimalPort(n.Value, v); msg != "" {
			p.errorf(n, field, "%s", msg)
			return ruleset.PortRange{}, false
		}
		return ruleset.PortRange{Lo: uint16(v), Hi: uint16(v)}, true
	}
	if n.Kind != yaml.ScalarNode {
		p.errorf(n, field, "want a port or a range \"lo-hi\", not %s", describe(n))
		return ruleset.PortRange{}, false
	}
	s, ok := p.str(n, field)
	if !ok {
		return ruleset.PortRange{}, false
	}
	loText, hiText, isRange := strings.Cut(s, "-")
	if !isRange {
		hiText = loText
	}
	if !digits(loText) || !digits(hiText) {
		p.errorf(n, field, "invalid port %q: want a number 0-65535 or a range \"lo-hi\"", s)
		return ruleset.PortRange{}, false
	}
	var bounds [2]uint16
	for i, t := range []string{loText, hiText} {
		v, err := strconv.ParseUint(t, 10, 16)
		if err != nil {
			p.errorf(n, field, "port %s out of range 0-65535", t)
			return ruleset.PortRange{}, false
		}
		bounds[i] = uint16(v)
	}
	if lo, hi := bounds[0], bounds[1]; lo <= hi {
		return ruleset.PortRange{Lo: lo, Hi: hi}, true
	}
	p.errorf(n, field, "port range %s is reversed; did you mean %d-%d?", s, bounds[1], bounds[0])
	return ruleset.PortRange{}, false
}

// decimalPort refuses a port integer written other than in plain decimal
// digits: YAML 1.1, which yaml.v3 follows for integers, reads 0022 as octal
// 18, and 0x16, 0o26, +22 and 2_2 as 22, so `ports: [0022]` would grant a
// port nobody meant. value is what YAML made of text.
func decimalPort(text string, value int64) string {
	if digits(text) && (text == "0" || text[0] != '0') {
		return ""
	}
	if digits(text) {
		return fmt.Sprintf("port %s is not decimal: YAML reads a leading 0 as octal (%d); write %s", text, value, strings.TrimLeft(text, "0"))
	}
	return fmt.Sprintf("port %s is not decimal; write %d", text, value)
}

func digits(s string) bool { return s != "" && strings.Trim(s, "0123456789") == "" }

// prefix reads a prefix or a bare address (a full-length prefix). IPv4-mapped
// IPv6 prefixes of /96 or longer become IPv4, as the kernel hooks decide
// mapped addresses as IPv4. Host bits must be clear: 10.1.2.3/24 is more often
// a typo for a host than a deliberate network.
func (p *parser) prefix(n *yaml.Node, field string) (netip.Prefix, bool) {
	s, ok := p.str(n, field)
	if !ok {
		return netip.Prefix{}, false
	}
	pf, msg := parsePrefix(s)
	if msg != "" {
		p.errorf(n, field, "%s", msg)
		return netip.Prefix{}, false
	}
	return pf, true
}

// destination reads a grant's to: a prefix or address (as prefix reads
// it), or a DNS name or *.domain (name, lower case, without the trailing
// dot of a fully qualified name).
func (p *parser) destination(n *yaml.Node, field string) (netip.Prefix, string, bool) {
	s, ok := p.str(n, field)
	if !ok {
		return netip.Prefix{}, "", false
	}
	if looksLikeAddress(s) {
		pf, msg := parsePrefix(s)
		if msg != "" {
			p.errorf(n, field, "%s", msg)
			return netip.Prefix{}, "", false
		}
		return pf, "", true
	}
	name, msg := parseName(s)
	if msg != "" {
		p.errorf(n, field, "%s", msg)
		return netip.Prefix{}, "", false
	}
	return netip.Prefix{}, name, true
}

// looksLikeAddress: is s meant as an address or prefix rather than a
// name? Addresses have a ':' (IPv6) or a '/', or are digits and dots
// only; a name's last label is never all digits (parseName).
func looksLikeAddress(s string) bool {
	return strings.ContainsAny(s, ":/") || strings.Trim(s, "0123456789.") == ""
}

// MaxNameLen is the longest DNS name, in its dotted form (RFC 1035 2.3.4).
const MaxNameLen = 253

// parseName checks a DNS name grant's name: labels of letters, digits and
// inner hyphens, 1-63 characters each, at least two labels (a single label
// would be completed by search domains the daemon does not know), the last
// not all digits (so that a mistyped address is never taken for a name),
// optionally after "*." (every name below the domain) and before a final
// dot. Names are matched case-insensitively, so they are kept lower case.
func parseName(s string) (string, string) {
	bad := func(why string) (string, string) {
		return "", fmt.Sprintf("invalid destination %q: %s; want ADDRESS, ADDRESS/BITS, a DNS name (db.corp.example) or *.DOMAIN (*.corp.example)", s, why)
	}
	name := strings.ToLower(strings.TrimSuffix(s, "."))
	rest, wild := strings.CutPrefix(name, "*.")
	if len(name) > MaxNameLen {
		return bad(fmt.Sprintf("longer than %d characters", MaxNameLen))
	}
	labels := strings.Split(rest, ".")
	if len(labels) < 2 {
		return bad("a name needs a domain (two labels or more)")
	}
	for _, l := range labels {
		if msg := checkLabel(l); msg != "" {
			return bad(msg)
		}
	}
	if digits(labels[len(labels)-1]) {
		return bad("the last label is all digits (a mistyped address?)")
	}
	if wild {
		return "*." + rest, ""
	}
	return rest, ""
}

func checkLabel(l string) string {
	switch {
	case l == "":
		return "empty label"
	case len(l) > 63:
		return fmt.Sprintf("label %q longer than 63 characters", l)
	case l == "*" || strings.Contains(l, "*"):
		return "'*' only as the whole first label (*.corp.example)"
	case l[0] == '-' || l[len(l)-1] == '-':
		return fmt.Sprintf("label %q starts or ends with '-'", l)
	}
	for _, c := range l {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Sprintf("character %q not allowed in a name (letters, digits, '-')", c)
		}
	}
	return ""
}

func parsePrefix(s string) (netip.Prefix, string) {
	var pf netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if pf, err = netip.ParsePrefix(s); err != nil {
			return pf, fmt.Sprintf("invalid prefix %q: want ADDRESS/BITS or an address", s)
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return pf, fmt.Sprintf("invalid address %q: want ADDRESS/BITS or an address", s)
		}
		if a.Zone() != "" {
			return pf, fmt.Sprintf("invalid address %q: zones are not allowed", s)
		}
		pf = netip.PrefixFrom(a, a.BitLen())
	}
	if pf.Addr().Is4In6() && pf.Bits() >= 96 {
		pf = netip.PrefixFrom(pf.Addr().Unmap(), pf.Bits()-96)
	}
	if m := pf.Masked(); m != pf {
		return pf, fmt.Sprintf("host bits set in %s; did you mean %s?", s, m)
	}
	return pf, ""
}
