package policy

import (
	"bytes"

	"gopkg.in/yaml.v3"
)

// A long list's chunk is built here, without yaml.v3, when every item is
// one line of the forms that make up nearly all of a large policy:
//
//	- 10.0.0.0/29
//	- {to: 10.0.0.0/29, proto: tcp, ports: [5432, 8000-8100]}
//
// yaml.v3 took 2.5 µs and 1 KiB of garbage for such a grant (5 s of CPU
// for 1,000,000 prefixes and 1,000,000 grants); this takes a tenth. The
// nodes are those yaml.v3 makes of the same lines, with the same lines,
// columns, tags and styles (FuzzFastItems compares the two), so that the
// parser reads them, and reports their mistakes, as it would. Anything
// else on a line (quotes, comments, anchors, tags, a scalar whose type
// is not plain to tell, a tab, a CR) and the chunk goes to yaml.v3.

// nodeArena hands out nodes and content slices from blocks: a chunk's
// nodes take a few allocations, not one each.
type nodeArena struct {
	nodes []yaml.Node
	ptrs  []*yaml.Node
}

const arenaBlock = 1024

func (a *nodeArena) node(kind yaml.Kind, style yaml.Style, tag, value string, line, col int) *yaml.Node {
	if len(a.nodes) == cap(a.nodes) {
		a.nodes = make([]yaml.Node, 0, arenaBlock)
	}
	a.nodes = append(a.nodes, yaml.Node{Kind: kind, Style: style, Tag: tag, Value: value, Line: line, Column: col})
	return &a.nodes[len(a.nodes)-1]
}

// content copies nodes into a slice of the arena's.
func (a *nodeArena) content(nodes []*yaml.Node) []*yaml.Node {
	if len(nodes) == 0 {
		return nil
	}
	if cap(a.ptrs)-len(a.ptrs) < len(nodes) {
		a.ptrs = make([]*yaml.Node, 0, max(arenaBlock, len(nodes)))
	}
	start := len(a.ptrs)
	a.ptrs = append(a.ptrs, nodes...)
	return a.ptrs[start:len(a.ptrs):len(a.ptrs)]
}

// lineParser reads one item line.
type lineParser struct {
	arena *nodeArena
	// strs shares the text of repeated scalars (ports, protocols) within
	// a chunk.
	strs map[string]string
	// stack holds the content of the collections being read.
	stack []*yaml.Node
	text  []byte
	pos   int
	line  int
}

func (lp *lineParser) str(b []byte) string {
	if s, ok := lp.strs[string(b)]; ok {
		return s
	}
	s := string(b)
	if len(lp.strs) < 1024 {
		lp.strs[s] = s
	}
	return s
}

func (lp *lineParser) spaces() {
	for lp.pos < len(lp.text) && lp.text[lp.pos] == ' ' {
		lp.pos++
	}
}

// item reads the line text, an item whose "- " is at col-1, as the item
// node on line.
func (lp *lineParser) item(text []byte, col, line int) (*yaml.Node, bool) {
	lp.text, lp.pos, lp.line = text, col+1, line
	lp.spaces()
	var n *yaml.Node
	var ok bool
	if lp.pos < len(text) && text[lp.pos] == '{' {
		n, ok = lp.mapping()
	} else {
		n, ok = lp.scalar(false)
	}
	if !ok {
		return nil, false
	}
	lp.spaces()
	return n, lp.pos == len(text)
}

// scalar reads a plain scalar; flow: inside a flow collection, where ','
// ']' and '}' end it.
func (lp *lineParser) scalar(flow bool) (*yaml.Node, bool) {
	start := lp.pos
	for lp.pos < len(lp.text) {
		c := lp.text[lp.pos]
		if c == ' ' || flow && (c == ',' || c == ']' || c == '}') {
			break
		}
		if !scalarByte(c) {
			return nil, false
		}
		lp.pos++
	}
	s := lp.text[start:lp.pos]
	tag, ok := plainTag(s)
	if !ok {
		return nil, false
	}
	return lp.arena.node(yaml.ScalarNode, 0, tag, lp.str(s), lp.line, start+1), true
}

// mapping reads a flow mapping of plain keys whose values are plain
// scalars or flow sequences of them.
func (lp *lineParser) mapping() (*yaml.Node, bool) {
	n := lp.arena.node(yaml.MappingNode, yaml.FlowStyle, "!!map", "", lp.line, lp.pos+1)
	return n, lp.collection(n, '}', func() bool {
		k, ok := lp.key()
		if !ok {
			return false
		}
		var v *yaml.Node
		if lp.pos < len(lp.text) && lp.text[lp.pos] == '[' {
			v, ok = lp.sequence()
		} else {
			v, ok = lp.scalar(true)
		}
		lp.stack = append(lp.stack, k, v)
		return ok
	})
}

// collection reads the items of a flow collection, from its opening
// character to end, each by item (which puts its nodes on the stack),
// with ", " between; the items' nodes become n's content.
func (lp *lineParser) collection(n *yaml.Node, end byte, item func() bool) bool {
	lp.pos++ // '{' or '['
	base := len(lp.stack)
	defer func() { lp.stack = lp.stack[:base] }()
	lp.spaces()
	for first := true; ; first = false {
		if first && lp.pos < len(lp.text) && lp.text[lp.pos] == end {
			break
		}
		if !item() {
			return false
		}
		lp.spaces()
		if lp.pos < len(lp.text) && lp.text[lp.pos] == end {
			break
		}
		if lp.pos == len(lp.text) || lp.text[lp.pos] != ',' {
			return false
		}
		lp.pos++
		lp.spaces()
	}
	lp.pos++ // end
	n.Content = lp.arena.content(lp.stack[base:])
	return true
}

// key reads a plain key of letters, digits and '_', its ':' and the
// spaces after it.
func (lp *lineParser) key() (*yaml.Node, bool) {
	start := lp.pos
	for lp.pos < len(lp.text) && (lp.text[lp.pos] >= 'a' && lp.text[lp.pos] <= 'z' || lp.text[lp.pos] == '_' ||
		lp.pos > start && lp.text[lp.pos] >= '0' && lp.text[lp.pos] <= '9') {
		lp.pos++
	}
	s := lp.text[start:lp.pos]
	// yaml.v3 refuses a key of over 1024 characters (a simple key); a
	// field's name is short.
	if len(s) == 0 || len(s) > 64 || s[0] == '_' || lp.pos+1 >= len(lp.text) || lp.text[lp.pos] != ':' || lp.text[lp.pos+1] != ' ' {
		return nil, false
	}
	tag, ok := plainTag(s)
	if !ok {
		return nil, false
	}
	lp.pos++
	lp.spaces()
	return lp.arena.node(yaml.ScalarNode, 0, tag, lp.str(s), lp.line, start+1), true
}

// sequence reads a flow sequence of plain scalars.
func (lp *lineParser) sequence() (*yaml.Node, bool) {
	n := lp.arena.node(yaml.SequenceNode, yaml.FlowStyle, "!!seq", "", lp.line, lp.pos+1)
	return n, lp.collection(n, ']', func() bool {
		v, ok := lp.scalar(true)
		lp.stack = append(lp.stack, v)
		return ok
	})
}

// scalarByte: may c be in a scalar read here? Letters, digits and
// . / : - (addresses, prefixes, ports, words); not '_' (yaml.v3 drops it
// from numbers) and no indicator or quote.
func scalarByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '/' || c == ':' || c == '-'
}

// plainTag is the tag yaml.v3 resolves the plain scalar s to (its resolve
// in resolve.go), for the scalars whose tag is plain to tell: ok is false
// for the others. s holds only scalarBytes.
func plainTag(s []byte) (tag string, ok bool) {
	if len(s) == 0 || s[len(s)-1] == ':' {
		return "", false // null; a key
	}
	c := s[0]
	switch {
	case c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z':
		// A word: a string unless it is one of resolve's words (only
		// letters that start one are looked up).
		if bytes.IndexByte([]byte("yYnNtTfFoO"), c) >= 0 {
			switch string(s) {
			case "true", "True", "TRUE", "false", "False", "FALSE", "null", "Null", "NULL":
				return "", false
			}
		}
		return "!!str", true
	case c >= '0' && c <= '9':
	default:
		return "", false // '.' floats, '-' signs, ':'
	}
	var digits, dots, dashes, other int
	for _, b := range s {
		switch {
		case b >= '0' && b <= '9':
			digits++
		case b == '.':
			dots++
		case b == '-':
			dashes++
		default:
			other++ // '/', ':', letters
		}
	}
	switch {
	case digits == len(s):
		// A decimal integer; a leading 0 is octal to yaml.v3, and long
		// ones may not fit.
		if (c != '0' || len(s) == 1) && len(s) <= 18 {
			return "!!int", true
		}
	case dashes == 0 && (other > 0 && bytes.ContainsAny(s, "/:") || other == 0 && dots >= 2):
		// A prefix, an IPv6 address or an IPv4 address: neither a
		// number (an int has no '.', '/' or ':', a float one '.' at
		// most) nor a timestamp (YYYY-...).
		return "!!str", true
	case dashes == 1 && dots == 0 && other == 0 && s[len(s)-1] != '-':
		// A port range: a timestamp needs two '-', a number none inside.
		return "!!str", true
	}
	return "", false
}

// fastChunk builds the items [from, to) of r as decodeChunk would, when
// each is one line of the forms above, with nothing but blank lines
// between; ok is false otherwise.
func (r *run) fastChunk(from, to int) (items []*yaml.Node, ok bool) {
	lp := lineParser{arena: &nodeArena{}, strs: map[string]string{}}
	items = make([]*yaml.Node, 0, to-from)
	for i := from; i < to; i++ {
		start, end := int(r.items[i]), len(r.data)
		if i+1 < len(r.items) {
			end = int(r.items[i+1])
		}
		text := r.data[start:end]
		nl := bytes.IndexByte(text, '\n')
		if nl < 0 {
			nl = len(text)
		}
		// Blank lines only after the item: a comment would be the
		// next node's (yaml.v3 keeps comments).
		for _, c := range text[nl:] {
			if c != '\n' && c != ' ' {
				return nil, false
			}
		}
		n, ok := lp.item(text[:nl], r.col, r.line+int(r.lines[i]))
		if !ok {
			return nil, false
		}
		items = append(items, n)
	}
	return items, true
}
