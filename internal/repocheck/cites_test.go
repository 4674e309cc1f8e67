package repocheck

import (
	"bytes"
	"errors"
	"fmt"
	"go/scanner"
	"go/token"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// citeAllowed lists paths that are cited on purpose although they are not
// in the tree, each with the reason. Keep it short: a stale citation is
// fixed, not listed.
var citeAllowed = map[string]string{
	"file_test.go": "internal/vmtest/summary.go: the shape of a t.Log line",
}

// citePattern finds what looks like a file name: path components, a base
// name and one of the extensions this tree's files have. A match preceded
// by a path character (a URL, a host path such as /etc/procgate/x.yaml, a
// glob such as *_bpfel.go) is not a citation of the tree, nor is one
// followed by a path character (checked after matching: Go's regexp has no
// lookahead).
var citePattern = regexp.MustCompile(`(?:^|[^A-Za-z0-9_./~*$%@\\-])((?:\.\.?/)*(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)*[A-Za-z0-9_][A-Za-z0-9_.-]*\.(?:go|c|h|md|yaml|json|txt|svg|service|conf|example))`)

// TestCitedFilesExist fails for every file a comment (in .go, .c and .h
// files) or a document (README.md, ARCHITECTURE.md, SECURITY.md, docs/)
// cites that is not in the tree: renamed, removed, never written, or
// outside the repository. A citation with a directory counts when its
// first directory is a top-level one of the tree or a subdirectory of the
// citing file's, and must exist from the root or from the citing file's
// directory; a bare file name counts when it names a Go, C or Markdown
// file, and must be the name of some file of the tree.
func TestCitedFilesExist(t *testing.T) {
	root := moduleRoot(t)
	tracked := trackedFiles(t, root)
	tree := newTree(tracked)
	for _, file := range tracked {
		lines, err := citingLines(root, file)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range lines {
			for _, cited := range citations(l.text) {
				reason := tree.missing(file, cited)
				if _, allowed := citeAllowed[cited]; reason != "" && !allowed {
					t.Errorf("%s:%d: cites %s, %s", file, l.line, cited, reason)
				}
			}
		}
	}
	for cited := range citeAllowed {
		if tree.missing("", cited) == "" {
			t.Errorf("citeAllowed lists %s, which is in the tree now: remove it", cited)
		}
	}
}

// TestCitations pins what counts as a citation, so that the scan neither
// misses paths nor reads URLs and host paths as files of the tree.
func TestCitations(t *testing.T) {
	tests := []struct {
		text string
		want []string
	}{
		{"see bpf/decision.h and daemon/daemon.go.", []string{"bpf/decision.h", "daemon/daemon.go"}},
		{"(`launch/guard.go`, `caller.go`)", []string{"launch/guard.go", "caller.go"}},
		{"[policy](docs/policy.md), [up](../README.md)", []string{"docs/policy.md", "../README.md"}},
		{"https://github.com/cilium/ebpf/blob/main/link/cgroup.go", nil},
		{"/etc/procgate/policy.yaml and /sys/fs/cgroup/x.conf", nil},
		{"the objects *_bpfel.go, bpf/*.c", nil},
		{"decision.gob is not Go", nil},
		{"x := y.go", []string{"y.go"}},
		{"testdata/valid/minimal.yaml.", []string{"testdata/valid/minimal.yaml"}},
		{"no file here, e.g. i.e. v1.2.3", nil},
	}
	for _, tt := range tests {
		if got := citations(tt.text); !slices.Equal(got, tt.want) {
			t.Errorf("citations(%q) = %q, want %q", tt.text, got, tt.want)
		}
	}
}

// TestMissing pins how a citation is resolved against the tree.
func TestMissing(t *testing.T) {
	tree := newTree([]string{
		"README.md", "bpf/decision.h", "bpf/enforcer.go", "daemon/daemon.go",
		"docs/policy.md", "policy/testdata/valid/minimal.yaml",
	})
	tests := []struct {
		from, cited string
		missing     bool
	}{
		{"daemon/daemon.go", "bpf/decision.h", false},
		{"daemon/daemon.go", "bpf/decisions.h", true},
		{"daemon/daemon.go", "enforcer.go", false}, // elsewhere in the tree
		{"daemon/daemon.go", "reconciler.go", true},
		{"docs/policy.md", "../README.md", false},
		{"docs/policy.md", "../ARCHITECTURE.md", true},
		{"policy/policy.go", "testdata/valid/minimal.yaml", false},
		{"policy/policy.go", "testdata/valid/maximal.yaml", true},
		{"daemon/daemon.go", "net/core/filter.c", false}, // not this tree's
		{"daemon/daemon.go", "DESIGN.md", true},
		{"daemon/daemon.go", "app.yaml", false}, // an example, not a citation
		{"bpf/names.go", "127.a.b.c", false},    // an address, not a file
	}
	for _, tt := range tests {
		if got := tree.missing(tt.from, tt.cited) != ""; got != tt.missing {
			t.Errorf("missing(%s, %s) = %v, want %v", tt.from, tt.cited, got, tt.missing)
		}
	}
}

// bareCitation is a file name without a directory that is taken for a
// citation: a Go, C or Markdown file with no other dot in its name.
var bareCitation = regexp.MustCompile(`^[A-Za-z0-9_-]+\.(?:go|c|h|md)$`)

func citations(text string) []string {
	var out []string
	for _, m := range citePattern.FindAllStringSubmatchIndex(text, -1) {
		start, end := m[2], m[3]
		if end < len(text) {
			if c := text[end]; c == '/' || c == '_' || c == '-' || isAlnum(c) {
				continue
			}
		}
		out = append(out, text[start:end])
	}
	return out
}

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

type tree struct {
	files     map[string]bool
	dirs      map[string]bool
	basenames map[string]bool
}

func newTree(files []string) *tree {
	tr := &tree{files: map[string]bool{}, dirs: map[string]bool{".": true}, basenames: map[string]bool{}}
	for _, f := range files {
		tr.files[f] = true
		tr.basenames[path.Base(f)] = true
		for d := path.Dir(f); d != "."; d = path.Dir(d) {
			tr.dirs[d] = true
		}
	}
	return tr
}

func (tr *tree) exists(p string) bool { return tr.files[p] || tr.dirs[p] }

// missing says why cited, cited by the file from, is not in the tree, or
// "" when it is, or when it is not a citation of this tree at all.
func (tr *tree) missing(from, cited string) string {
	dir := path.Dir(from)
	if strings.HasPrefix(cited, "./") || strings.HasPrefix(cited, "../") {
		p := path.Join(dir, cited)
		if strings.HasPrefix(p, "../") || tr.exists(p) {
			return ""
		}
		return fmt.Sprintf("but %s is not in the tree", p)
	}
	first, _, hasDir := strings.Cut(cited, "/")
	if !hasDir {
		if !bareCitation.MatchString(cited) {
			return "" // app.yaml, 127.a.b.c: examples, not citations
		}
		if tr.basenames[cited] {
			return ""
		}
		return "but no file of the tree has that name"
	}
	if tr.exists(cited) || tr.exists(path.Join(dir, cited)) {
		return ""
	}
	if tr.dirs[first] || tr.dirs[path.Join(dir, first)] {
		return "but it is not in the tree"
	}
	return "" // another project's path (net/core/filter.c, cilium's link/cgroup.go)
}

// citingLines returns the lines of file that may cite files: the comments
// of Go and C sources, every line of the project's Markdown documents.
func citingLines(root, file string) ([]line, error) {
	var scan func([]byte) ([]line, error)
	switch {
	case strings.HasSuffix(file, ".go"):
		scan = goComments
	case strings.HasSuffix(file, ".c"), strings.HasSuffix(file, ".h"):
		scan = cComments
	case isDocument(file):
		scan = allLines
	default:
		return nil, nil
	}
	src, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(file)))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil // deleted in the worktree, not yet in git's index
	}
	if err != nil {
		return nil, err
	}
	lines, err := scan(src)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return lines, nil
}

func isDocument(file string) bool {
	switch file {
	case "README.md", "ARCHITECTURE.md", "SECURITY.md":
		return true
	}
	return path.Dir(file) == "docs" && path.Ext(file) == ".md"
}

type line struct {
	line int
	text string
}

func allLines(src []byte) ([]line, error) {
	var out []line
	for i, l := range strings.Split(string(src), "\n") {
		out = append(out, line{i + 1, l})
	}
	return out, nil
}

func goComments(src []byte) ([]line, error) {
	fset := token.NewFileSet()
	file := fset.AddFile("", fset.Base(), len(src))
	var errs scanner.ErrorList
	var s scanner.Scanner
	s.Init(file, src, func(pos token.Position, msg string) { errs.Add(pos, msg) }, scanner.ScanComments)
	var out []line
	for {
		pos, tok, lit := s.Scan()
		if tok == token.EOF {
			break
		}
		if tok != token.COMMENT {
			continue
		}
		first := fset.Position(pos).Line
		for i, l := range strings.Split(lit, "\n") {
			out = append(out, line{first + i, l})
		}
	}
	return out, errs.Err()
}

// cComments returns the text of the // and /* */ comments of C source,
// line by line; string and character literals are skipped.
func cComments(src []byte) ([]line, error) {
	var out []line
	var cur bytes.Buffer
	n := 1
	flush := func() {
		if cur.Len() > 0 {
			out = append(out, line{n, cur.String()})
			cur.Reset()
		}
	}
	const (
		code = iota
		lineComment
		blockComment
		literal
	)
	state, quote := code, byte(0)
	for i := 0; i < len(src); i++ {
		c := src[i]
		if c == '\n' {
			flush()
			n++
			if state == lineComment {
				state = code
			}
			continue
		}
		switch state {
		case code:
			switch {
			case c == '/' && i+1 < len(src) && src[i+1] == '/':
				state = lineComment
				i++
			case c == '/' && i+1 < len(src) && src[i+1] == '*':
				state = blockComment
				i++
			case c == '"' || c == '\'':
				state, quote = literal, c
			}
		case lineComment:
			cur.WriteByte(c)
		case blockComment:
			if c == '*' && i+1 < len(src) && src[i+1] == '/' {
				state = code
				i++
				cur.WriteByte(' ')
				continue
			}
			cur.WriteByte(c)
		case literal:
			if c == '\\' {
				i++
			} else if c == quote {
				state = code
			}
		}
	}
	flush()
	if state == blockComment {
		return out, errors.New("unterminated comment")
	}
	return out, nil
}

func moduleRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's directory")
		}
		dir = parent
	}
}

// trackedFiles lists the files git tracks, slash-separated and relative to
// root; outside a git checkout (a source tarball), every file below root
// but hidden directories and bin/.
func trackedFiles(t *testing.T, root string) []string {
	t.Helper()
	out, err := exec.Command("git", "-C", root, "ls-files", "-z").Output()
	if err == nil {
		return strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00")
	}
	t.Logf("git ls-files: %v; reading the directory tree instead", err)
	var files []string
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			if rel != "." && (strings.HasPrefix(d.Name(), ".") || rel == "bin") {
				return filepath.SkipDir
			}
			return nil
		}
		files = append(files, rel)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}
