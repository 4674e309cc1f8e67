package policy

import (
	"bytes"
	"iter"
	"math"
	"regexp"
	"runtime"
	"unicode/utf8"

	"gopkg.in/yaml.v3"
)

// Long lists are read a chunk at a time. yaml.v3 builds a node tree of the
// whole document first, about 1 KiB per one-line grant: a policy of
// 1,000,000 internal prefixes and 1,000,000 grants made 3.4 GiB of nodes and
// took 11 s. A block sequence of at least streamMin one-line items, the
// value of a plain key, is cut out of the document: the rest of the file
// (the skeleton, with the list's lines left blank, so that every line keeps
// its number) is decoded as before, and the list's items are decoded
// streamChunk at a time when the parser walks them, each chunk a YAML
// document of its own with the file's own lines and columns.
//
// A chunk decodes as the same lines in the whole file would: its items sit
// at the same column, and nothing of the file reaches into them or out of
// them. Where that cannot be told from the lines alone (a quoted scalar
// running on past the list, an anchor or alias across it) a chunk or the
// skeleton fails to decode, or a list finds no key to hang on; then the
// whole file is parsed again as one document, as before, and its errors and
// values are the parser's own.

var (
	// streamMin is the fewest items a list needs to be read in chunks:
	// shorter lists cost little as nodes. A variable for tests.
	streamMin = 512
	// streamChunk is how many items one chunk decodes.
	streamChunk = 4096
)

// keyLineRE is a line holding a plain key and nothing else, the line a
// block sequence's items follow.
var keyLineRE = regexp.MustCompile(`^( *)([A-Za-z_][A-Za-z0-9_]*):[ \t]*\r?$`)

// run is a long list cut out of a file.
type run struct {
	key     string // the key it is the value of
	keyLine int    // line of the key, from 1
	keyCol  int    // column of the key, from 1
	line    int    // line of the first item, from 1
	col     int    // column of the first item's "-", from 1
	// start is the offset of the list in the file, data its lines as in
	// the file, items the offsets in data at which each item starts and
	// lines their lines, counted from line. Offsets and lines are 32-bit
	// (scanRun takes no file of 2 GiB or more): the runs of 1,000,000
	// prefixes and 1,000,000 grants held 25 MB while the parse ran, two
	// thirds of it offsets as ints.
	start int
	data  []byte
	items []int32
	lines []int32
	// read is set once the parser has read every item.
	read bool
}

// lineInfo classifies one line of a file.
type lineInfo struct {
	start, end int // offsets of the line, end at its '\n' (or the data's end)
	indent     int // leading spaces
	blank      bool
	comment    bool // only a comment after the indent
	item       bool // "- " and more after the indent
}

// lineAt classifies the line that starts at pos and returns where the next
// one starts.
func lineAt(data []byte, pos int) (lineInfo, int) {
	end := bytes.IndexByte(data[pos:], '\n')
	next := pos + end + 1
	if end < 0 {
		end, next = len(data)-pos, len(data)
	}
	l := lineInfo{start: pos, end: pos + end}
	i := pos
	for i < l.end && data[i] == ' ' {
		i++
	}
	l.indent = i - pos
	rest := bytes.TrimRight(data[i:l.end], " \t\r")
	switch {
	case len(rest) == 0:
		l.blank = true
	case rest[0] == '#':
		l.comment = true
	case len(rest) >= 2 && rest[0] == '-' && rest[1] == ' ':
		l.item = true
	}
	return l, next
}

// splitRuns finds the long lists of data and returns data without them
// (their lines blank) and the lists; data itself when there are none.
func splitRuns(data []byte) ([]byte, []run) {
	// yaml.v3 refuses a file with a character it does not allow (not
	// UTF-8, a control character) anywhere in it, and reads UTF-16 after a
	// BOM; cut apart, the skeleton could decode without the list holding
	// such a character and report other errors. Such a file is parsed
	// whole, and the error is the parser's. So is a file with a line
	// break other than LF and CRLF: lines here are counted by LF.
	if !yamlText(data) {
		return data, nil
	}
	var runs []run
	// key is keyLineRE's match of the last line that was neither blank
	// nor a comment, at line keyLine; nil when that was no key line.
	var key []int
	keyLine, line := 0, 0
	for pos := 0; pos < len(data); {
		l, next := lineAt(data, pos)
		line++
		// A list right below its key (a blank line between is rare, and
		// the list is then read as before).
		if l.item && key != nil && keyLine == line-1 && key[3]-key[2] <= l.indent {
			if r, lines, ok := scanRun(data, l, key[3]-key[2]); ok {
				r.key, r.keyLine, r.keyCol = string(data[key[4]:key[5]]), keyLine, key[3]-key[2]+1
				r.line = line
				runs = append(runs, r)
				line += lines - 1
				pos, key = r.start+len(r.data), nil
				continue
			}
		}
		if !l.blank && !l.comment {
			keyLine, key = line, keyLineRE.FindSubmatchIndex(data[l.start:l.end])
			for i := range key {
				key[i] += l.start
			}
		}
		pos = next
	}
	if len(runs) == 0 {
		return data, nil
	}
	var skel bytes.Buffer
	at := 0
	for _, r := range runs {
		skel.Write(data[at:r.start])
		skel.Write(bytes.Repeat([]byte{'\n'}, bytes.Count(r.data, []byte{'\n'})))
		at = r.start + len(r.data)
	}
	skel.Write(data[at:])
	return skel.Bytes(), runs
}

// scanRun reads the list whose first item is on line first, the value of
// a key indented by keyIndent: one-line items at first's column, with
// blank lines and comments between. ok is false for a list too short, one
// whose items run over several lines, or one that a line indented more
// than its key ends: no YAML takes such a line (the whole file's parse
// says why), yet left in the skeleton it could hang on the key as its
// value (a lone `!` tag or `&anchor`) and the file would decode.
// lines counts the list's lines.
func scanRun(data []byte, first lineInfo, keyIndent int) (r run, lines int, ok bool) {
	if len(data) > math.MaxInt32 {
		return run{}, 0, false
	}
	r = run{start: first.start, col: first.indent + 1, items: []int32{0}, lines: []int32{0}}
	end, lines := first.end, 1
	for pos, n := first.end+1, 1; pos < len(data); {
		l, next := lineAt(data, pos)
		n++
		switch {
		case l.item && l.indent == first.indent:
			r.items = append(r.items, int32(l.start-first.start))
			r.lines = append(r.lines, int32(n-1))
			end, lines = l.end, n
		case l.blank || l.comment:
		case l.indent > first.indent:
			return run{}, 0, false // a multi-line item
		case l.indent > keyIndent:
			return run{}, 0, false // not the next key: a mistake
		default:
			pos = len(data) // the list ended
			continue
		}
		pos = next
	}
	if len(r.items) < streamMin {
		return run{}, 0, false
	}
	r.data = data[first.start:min(end+1, len(data))]
	return r, lines, true
}

// graft hangs each run on its key in the skeleton's tree: the key's value,
// null in the skeleton, becomes an empty sequence node that the parser
// reads through items. It reports false when a run found no key (the list
// was not where the lines said), and the file must be parsed whole.
func (p *parser) graft(root *yaml.Node, runs []run) bool {
	at := make(map[int]*run, len(runs))
	for i := range runs {
		at[runs[i].keyLine] = &runs[i]
	}
	grafted := 0
	var walk func(n *yaml.Node)
	walk = func(n *yaml.Node) {
		if n.Kind == yaml.MappingNode {
			for i := 0; i+1 < len(n.Content); i += 2 {
				k, v := n.Content[i], n.Content[i+1]
				r := at[k.Line]
				if r == nil || k.Kind != yaml.ScalarNode || k.Value != r.key || k.Column != r.keyCol || k.Style != 0 ||
					v.Kind != yaml.ScalarNode || v.Tag != "!!null" || v.Value != "" {
					continue
				}
				delete(at, k.Line)
				*v = yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", Line: r.line, Column: r.col}
				p.lazy[v] = r
				grafted++
			}
		}
		for _, c := range n.Content {
			walk(c)
		}
	}
	walk(root)
	return grafted == len(runs)
}

// chunk is one decoded chunk of a run: its items, or failed.
type chunk struct {
	items  []*yaml.Node
	failed bool
}

// decodeChunk decodes the items [from, to) of r, with the file's lines.
func (r *run) decodeChunk(from, to int) chunk {
	if items, ok := r.fastChunk(from, to); ok {
		return chunk{items: items}
	}
	end := len(r.data)
	if to < len(r.items) {
		end = int(r.items[to])
	}
	docs, err := decode(r.data[r.items[from]:end])
	if err != nil || len(docs) != 1 || len(docs[0].Content) != 1 {
		return chunk{failed: true}
	}
	seq := docs[0].Content[0]
	if seq.Kind != yaml.SequenceNode || len(seq.Content) != to-from {
		return chunk{failed: true}
	}
	// The chunk's first line is the file's line of its first item.
	shift := r.line - 1 + int(r.lines[from])
	ok := true
	var fix func(n *yaml.Node)
	fix = func(n *yaml.Node) {
		n.Line += shift
		if n.Anchor != "" || n.Kind == yaml.AliasNode {
			ok = false // anchors and aliases reach across the file
		}
		for _, c := range n.Content {
			fix(c)
		}
	}
	fix(seq)
	if !ok {
		return chunk{failed: true}
	}
	return chunk{items: seq.Content}
}

// items yields the items of the sequence n, as list returns them, a chunk
// at a time for a run: the next chunk decodes while the parser reads one.
// A chunk that fails to decode ends the items and marks the parse for a
// second pass over the whole file.
func (p *parser) items(n *yaml.Node, field string) iter.Seq2[int, *yaml.Node] {
	return func(yield func(int, *yaml.Node) bool) {
		r := p.lazy[n]
		if r == nil {
			items, _ := p.list(n, field) // reports a node that is no list
			for i, item := range items {
				if !yield(i, item) {
					return
				}
			}
			return
		}
		// Chunks decode on every CPU, a few ahead of the reader, and are
		// read in order.
		workers := runtime.GOMAXPROCS(0)
		chunks := make(chan chan chunk, workers)
		done := make(chan struct{})
		defer close(done)
		go func() {
			defer close(chunks)
			busy := make(chan struct{}, workers)
			for from := 0; from < len(r.items); from += streamChunk {
				c := make(chan chunk, 1)
				select {
				case chunks <- c:
				case <-done:
					return
				}
				busy <- struct{}{}
				go func() {
					c <- r.decodeChunk(from, min(from+streamChunk, len(r.items)))
					<-busy
				}()
			}
		}()
		i := 0
		for next := range chunks {
			c := <-next
			if c.failed {
				p.reparse = true
				return
			}
			for _, item := range c.items {
				if !yield(i, item) {
					return
				}
				i++
			}
		}
		r.read = true
	}
}

// decodesAll reports whether every run the parser did not read decodes:
// the value of a key the parser refuses (unknown, a drop-in's audit) is
// not read, and whole, its YAML error would be the file's only one.
func decodesAll(runs []run) bool {
	for i := range runs {
		r := &runs[i]
		for from := 0; from < len(r.items) && !r.read; from += streamChunk {
			if r.decodeChunk(from, min(from+streamChunk, len(r.items))).failed {
				return false
			}
		}
	}
	return true
}

// yamlText reports whether data is UTF-8 of only the characters yaml.v3's
// reader accepts (its check in yaml_parser_update_buffer), and breaks its
// lines only with LF or CRLF. yaml.v3 also breaks a line at a CR alone,
// NEL, LS and PS (is_break): in a blank or comment line between a list's
// items they would make every line after them one more than
// splitRuns counts, and so the lines of errors.
func yamlText(data []byte) bool {
	for len(data) > 0 {
		if b := data[0]; b < utf8.RuneSelf {
			// ASCII, nearly all of a policy: no rune to decode.
			if b < 0x20 && b != 0x09 && b != 0x0A && b != 0x0D || b == 0x7F ||
				b == 0x0D && (len(data) == 1 || data[1] != 0x0A) {
				return false
			}
			data = data[1:]
			continue
		}
		r, size := utf8.DecodeRune(data)
		if r == utf8.RuneError && size <= 1 {
			return false
		}
		switch {
		case r == 0x2028, r == 0x2029: // LS, PS
			return false
		case r >= 0xA0 && r <= 0xD7FF, r >= 0xE000 && r <= 0xFFFD, r >= 0x10000 && r <= 0x10FFFF:
		default:
			return false
		}
		data = data[size:]
	}
	return true
}
