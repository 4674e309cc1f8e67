package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/procgate/procgate/ruleset"
)

const mainPolicy = `version: 1
internal:
  prefixes: [10.0.0.0/8]
everyone:
  allow:
    - to: 10.0.0.53
      proto: udp
      ports: [53]
apps:
  - name: db
    allow:
      - to: 10.1.0.0/16
`

// writePolicyDir writes the main policy and drop-ins (name -> text) into a
// new directory and returns the main file's path.
func writePolicyDir(t *testing.T, main string, dropins map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(path, []byte(main), 0o644); err != nil {
		t.Fatal(err)
	}
	if len(dropins) > 0 {
		if err := os.Mkdir(filepath.Join(dir, DropinDir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, y := range dropins {
		if err := os.WriteFile(filepath.Join(dir, DropinDir, name), []byte(y), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

func TestDropinsMerge(t *testing.T) {
	path := writePolicyDir(t, mainPolicy, map[string]string{
		// Read in name order: 10 before 20, whatever the map's order.
		"20-vpn.yaml": `version: 1
internal:
  prefixes: [100.64.0.0/10, 10.0.0.0/8]
  interfaces: [wg0]
everyone:
  allow:
    - to: 100.64.0.1
      ports: [443]
apps:
  - name: vpn
    allow:
      - to: 100.64.0.0/10
`,
		"10-web.yaml": `version: 1
apps:
  - name: web
    allow:
      - to: 10.2.0.0/16
        ports: [443]
`,
		"30-empty.yaml": "version: 1\n",
		"notes.txt":     "not a drop-in",
		".#20-vpn.yaml": "an editor's lock file",
	})
	dir := filepath.Dir(path)
	rs, warns, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(warns) != 0 {
		t.Errorf("warnings: %v", warns)
	}
	var apps []string
	for _, a := range rs.Apps {
		apps = append(apps, a.Name+"@"+filepath.Base(a.Source.File))
	}
	if want := []string{"db@policy.yaml", "web@10-web.yaml", "vpn@20-vpn.yaml"}; !slices.Equal(apps, want) {
		t.Errorf("apps %v, want %v", apps, want)
	}
	var internal []string
	for _, p := range rs.Internal {
		internal = append(internal, p.Prefix.String()+"@"+p.Source.String())
	}
	want := []string{"10.0.0.0/8@" + path + ":3", "100.64.0.0/10@" + filepath.Join(dir, DropinDir, "20-vpn.yaml") + ":3"}
	if !slices.Equal(internal, want) {
		t.Errorf("internal %v, want %v (a union, each from the first file that names it)", internal, want)
	}
	if !slices.Equal(rs.Interfaces, []string{"wg0"}) {
		t.Errorf("interfaces %v", rs.Interfaces)
	}
	if len(rs.Everyone) != 2 || rs.Everyone[0].Index != 0 || rs.Everyone[1].Index != 1 ||
		filepath.Base(rs.Everyone[1].Source.File) != "20-vpn.yaml" {
		t.Errorf("everyone %+v: want the main file's grant #0, then the drop-in's #1", rs.Everyone)
	}
	if rs.AuditRate != DefaultAuditRate {
		t.Errorf("audit rate %d", rs.AuditRate)
	}

	single, _, err := LoadFile(path)
	if err != nil || len(single.Apps) != 1 {
		t.Errorf("LoadFile read drop-ins: %d apps, %v", len(single.Apps), err)
	}
}

// TestDropinErrors: every mistake of every file at once, each naming its
// file, line, column and field.
func TestDropinErrors(t *testing.T) {
	for _, tc := range []struct {
		name    string
		main    string
		dropins map[string]string
		want    []string // substrings, one per error, in order; FILE is the drop-in
	}{
		{
			name:    "app defined twice",
			dropins: map[string]string{"10-a.yaml": "version: 1\napps:\n  - name: web\n  - name: db\n"},
			want:    []string{`10-a.yaml:4:11: apps[1].name: duplicate app "db" (first at MAIN:10)`},
		},
		{
			name: "app defined twice in two drop-ins",
			dropins: map[string]string{
				"10-a.yaml": "version: 1\napps:\n  - name: web\n",
				"20-b.yaml": "version: 1\napps:\n  - name: web\n",
			},
			want: []string{`20-b.yaml:3:11: apps[0].name: duplicate app "web" (first at DIR/10-a.yaml:3)`},
		},
		{
			name: "a cgroup matched in two files",
			main: mainPolicy + "  - name: web\n    match: {cgroup: system.slice/web.service}\n",
			dropins: map[string]string{
				"10-a.yaml": "version: 1\napps:\n  - name: web2\n    match: {cgroup: system.slice/web.service}\n",
			},
			want: []string{`10-a.yaml:4:21: apps[0].match.cgroup: duplicate match of cgroup system.slice/web.service (first at MAIN:14)`},
		},
		{
			name:    "scalar in a drop-in",
			dropins: map[string]string{"10-a.yaml": "version: 1\naudit:\n  rate: 5\n"},
			want:    []string{"10-a.yaml:2:1: audit: only the main policy file may set audit"},
		},
		{
			name:    "no version",
			dropins: map[string]string{"10-a.yaml": "apps: []\n"},
			want:    []string{"10-a.yaml:1:1: version: missing (required)"},
		},
		{
			name:    "other version",
			dropins: map[string]string{"10-a.yaml": "version: 2\n"},
			want:    []string{"10-a.yaml:1:10: version: unsupported version 2; want 1"},
		},
		{
			name: "mistakes in the main file and in two drop-ins",
			main: strings.Replace(mainPolicy, "10.1.0.0/16", "10.1.0.0/33", 1),
			dropins: map[string]string{
				"10-a.yaml": "version: 1\ninternal:\n  prefixes: [10.0.0.0/8, 10.0.0.0/8]\n",
				"20-b.yaml": "version: 1\napps:\n  - name: x\n    allow:\n      - to: 10.0.0.1\n        ports: [0x16]\n",
			},
			want: []string{
				"policy.yaml:12:13: apps[0].allow[0].to: invalid prefix",
				"10-a.yaml:3:26: internal.prefixes[1]: duplicate prefix 10.0.0.0/8 (first at line 3)",
				"20-b.yaml:6:17: apps[0].allow[0].ports[0]:",
			},
		},
		{
			name:    "broken YAML",
			dropins: map[string]string{"10-a.yaml": "version: 1\napps: [\n"},
			want:    []string{"10-a.yaml:2: invalid YAML"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			main := tc.main
			if main == "" {
				main = mainPolicy
			}
			path := writePolicyDir(t, main, tc.dropins)
			_, _, err := Load(path)
			var errs *Errors
			if !errors.As(err, &errs) {
				t.Fatalf("error %v, want *Errors", err)
			}
			if len(errs.List) != len(tc.want) {
				t.Fatalf("%d errors, want %d:\n%v", len(errs.List), len(tc.want), err)
			}
			dir := filepath.Join(filepath.Dir(path), DropinDir)
			for i, w := range tc.want {
				w = strings.NewReplacer("MAIN", path, "DIR", dir).Replace(w)
				if got := errs.List[i].Error(); !strings.Contains(got, w) {
					t.Errorf("error %d: %q, want it to contain %q", i, got, w)
				}
				if errs.List[i].Field == "" && !strings.Contains(w, "YAML") {
					t.Errorf("error %d names no field: %v", i, errs.List[i])
				}
			}
		})
	}
}

// TestDropinWarnings: a drop-in's grant is inside the main file's internal
// prefixes, and the other way round; the warnings name the drop-in.
func TestDropinWarnings(t *testing.T) {
	path := writePolicyDir(t, "version: 1\ninternal:\n  prefixes: []\n", map[string]string{
		"10-a.yaml": "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: a\n    allow:\n      - to: 10.1.0.0/16\n      - to: 192.0.2.0/24\n",
	})
	_, warns, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(warns) != 1 || !strings.Contains(warns[0].String(), "10-a.yaml:8:13: apps[0].allow[1].to: 192.0.2.0/24 is outside") {
		t.Errorf("warnings %v: want one, for the drop-in's grant outside every prefix (and none about an empty internal section)", warns)
	}
}

// TestDropinAlone: a drop-in checked on its own follows the drop-in rules.
func TestDropinAlone(t *testing.T) {
	if _, _, _, err := ParseDropin("10-a.yaml", []byte("version: 1\napps:\n  - name: web\n")); err != nil {
		t.Errorf("a drop-in without internal: %v", err)
	}
	if _, _, _, err := ParseDropin("10-a.yaml", []byte("version: 1\naudit: {rate: 5}\n")); err == nil || !strings.Contains(err.Error(), "only the main policy file") {
		t.Errorf("audit in a drop-in alone: %v", err)
	}
	if _, _, err := Parse("policy.yaml", []byte("version: 1\napps: []\n")); err == nil || !strings.Contains(err.Error(), "internal: missing") {
		t.Errorf("a main file without internal: %v", err)
	}
}

func TestDropinsList(t *testing.T) {
	path := writePolicyDir(t, mainPolicy, map[string]string{"b.yaml": "version: 1\n", "a.yaml": "version: 1\n", "c.yml": "", ".d.yaml": ""})
	dir := filepath.Join(filepath.Dir(path), DropinDir)
	if err := os.Mkdir(filepath.Join(dir, "e.yaml"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("a.yaml", filepath.Join(dir, "f.yaml")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("missing", filepath.Join(dir, "g.yaml")); err != nil {
		t.Fatal(err)
	}
	got, err := Dropins(path)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{filepath.Join(dir, "a.yaml"), filepath.Join(dir, "b.yaml"), filepath.Join(dir, "f.yaml")}
	if !slices.Equal(got, want) {
		t.Errorf("drop-ins %v, want %v", got, want)
	}
	if got, err := Dropins(filepath.Join(t.TempDir(), "policy.yaml")); got != nil || err != nil {
		t.Errorf("no policy.d: %v, %v", got, err)
	}
}

func TestHash(t *testing.T) {
	one := []File{{Path: "p.yaml", Data: []byte("version: 1\n")}}
	sum := sha256.Sum256(one[0].Data)
	if got := Hash(one); got != hex.EncodeToString(sum[:]) {
		t.Errorf("one file: %s, want its sha256sum", got)
	}
	two := append(one, File{Path: "policy.d/a.yaml", Data: []byte("x")})
	moved := append(slices.Clone(one), File{Path: "policy.d/b.yaml", Data: []byte("x")})
	if Hash(two) == Hash(one) || Hash(two) == Hash(moved) {
		t.Error("a drop-in, or its name, does not change the hash")
	}
}

// TestDropinExtends: a drop-in entry of only name and allow adds grants to
// an app of an earlier file, numbered on from its own; any other field
// makes it a second definition, an error.
func TestDropinExtends(t *testing.T) {
	path := writePolicyDir(t, mainPolicy+"  - name: box\n    outside: deny\n", map[string]string{
		"50-learned.yaml": "version: 1\napps:\n  - name: db\n    allow:\n      - to: 10.9.9.9/32\n        proto: tcp\n        ports: [5432]\n  - name: box\n    allow:\n      - to: 192.0.2.7/32\n        ports: [443]\n",
	})
	rs, warns, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(warns) != 0 {
		t.Errorf("warnings %v: want none (box is a sandbox, its grant outside counts)", warns)
	}
	if len(rs.Apps) != 2 {
		t.Fatalf("%d apps, want db and box only", len(rs.Apps))
	}
	db := rs.App("db")
	if len(db.Grants) != 2 || db.Grants[1].Index != 1 || filepath.Base(db.Grants[1].Source.File) != "50-learned.yaml" ||
		db.Grants[1].Prefix.String() != "10.9.9.9/32" || filepath.Base(db.Source.File) != "policy.yaml" {
		t.Errorf("db %+v: want the main file's grant #0 and the drop-in's #1", db)
	}
	if dec := rs.Decide("db", mustDest(t, "10.9.9.9:5432/tcp")); !dec.Allow {
		t.Errorf("the drop-in's grant does not allow: %v", dec)
	}

	path = writePolicyDir(t, mainPolicy, map[string]string{
		"50-x.yaml": "version: 1\napps:\n  - name: db\n    outside: deny\n    allow:\n      - to: 10.9.9.9\n",
	})
	_, _, err = Load(path)
	if err == nil || !strings.Contains(err.Error(), `50-x.yaml:3:11: apps[0].name: duplicate app "db"`) {
		t.Errorf("error %v: want a duplicate app (an extension has only name and allow)", err)
	}
}

func mustDest(t *testing.T, s string) ruleset.Dest {
	t.Helper()
	d, err := ruleset.ParseDest(s)
	if err != nil {
		t.Fatal(err)
	}
	return d
}
