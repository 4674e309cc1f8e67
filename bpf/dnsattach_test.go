package bpf

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// TestDNSRedirectOnlyWithNameGrants: the DNS redirect's programs run on
// every connect, sendmsg and recvmsg below the cgroup, so they are
// attached only while the generation in force has name grants, after the
// authorize programs (a query is decided for the resolver the app asked,
// then rewritten), and a restarted daemon keeps or detaches an earlier
// one's by its first generation.
func TestDNSRedirectOnlyWithNameGrants(t *testing.T) {
	w := newWorld(t, "web", "box", "other")
	plain := mustPolicy(t, "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: web\n    allow:\n      - to: 10.1.0.0/16\n")
	named := mustPolicy(t, namesPolicy)
	dir := w.e.opts.BPFDir
	cg, err := os.Open(w.root)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	// connect4 lists the programs of the cgroup's connect4 hook in the
	// order they run.
	connect4 := func() []string {
		t.Helper()
		q, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: ebpf.AttachCGroupInet4Connect})
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, p := range q.Programs {
			prog, err := ebpf.NewProgramFromID(p.ID)
			if err != nil {
				t.Fatal(err)
			}
			info, err := prog.Info()
			prog.Close()
			if err != nil {
				t.Fatal(err)
			}
			names = append(names, info.Name)
		}
		return names
	}
	check := func(step string, want bool) {
		t.Helper()
		got := connect4()
		wantProgs := []string{"authorize_connect4"}
		if want {
			wantProgs = append(wantProgs, "dns_connect4")
		}
		if !slices.Equal(got, wantProgs) {
			t.Errorf("%s: connect4 runs %v, want %v", step, got, wantProgs)
		}
		for _, h := range hooks {
			if !h.names {
				continue
			}
			_, err := os.Stat(filepath.Join(dir, "link_"+h.name))
			if pinned := err == nil; pinned != want {
				t.Errorf("%s: link_%s pinned: %v, want %v", step, h.name, pinned, want)
			}
		}
	}

	w.apply(plain)
	if err := w.e.Attach(); err != nil {
		t.Fatal(err)
	}
	check("attached without name grants", false)
	w.apply(named)
	check("a generation with name grants", true)
	w.apply(named)
	check("another one", true)
	w.apply(plain)
	check("a generation without", false)
	w.apply(named)
	check("with name grants again", true)

	for _, tc := range []struct {
		name  string
		names bool
	}{
		{"restart with name grants", true},
		{"restart without", false},
	} {
		w.e.Close()
		w.e, err = Open(Options{BPFDir: dir, CgroupDir: w.root, Log: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		rs := plain
		if tc.names {
			rs = named
		}
		w.apply(rs)
		if err := w.e.Attach(); err != nil {
			t.Fatal(err)
		}
		check(tc.name, tc.names)
	}
	w.apply(named)
	check("with name grants after a restart without", true)
}
