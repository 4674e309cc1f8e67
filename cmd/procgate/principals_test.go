package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/probe"
)

// TestUserPrincipalEndToEnd: a match.user app through the daemon: a
// process of the uid in no app cgroup holds the grants, one of another uid
// does not; explain --pid names the principal, status its kind, and
// procgate run refuses the app.
func TestUserPrincipalEndToEnd(t *testing.T) {
	nstest.RequireRoot(t)
	e := newE2E(t, `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: backup
    match: {user: 64001}
    allow:
      - to: 10.1.0.0/16
        proto: tcp
`)
	as := func(uid int) *probe.Prober {
		dir := nstest.ChildCgroup(t, e.cgroup, fmt.Sprintf("unbound-%d", time.Now().UnixNano()))
		p, err := probe.Start(dir, e.netns, nil)
		if uid != 0 {
			p, err = probe.StartExe(e.bin, dir, e.netns, nil, fmt.Sprintf("%s=%d", probe.EnvUID, uid))
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		return p
	}
	for _, tc := range []struct {
		name    string
		uid     int
		want    probe.Verdict
		explain string
	}{
		{"the user's process", 64001, probe.Allowed, "app backup (user 64001) -> 10.1.2.3:22/tcp: allow (granted)"},
		{"another uid's process", 64002, probe.Denied, "(unbound) -> 10.1.2.3:22/tcp: deny (unbound)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := as(tc.uid)
			mustTry(t, p, "10.1.2.3:22/tcp", tc.want)
			out, err := e.procgate("explain", "--pid", fmt.Sprint(p.Pid()), "10.1.2.3:22/tcp")
			if err != nil || !strings.Contains(out, tc.explain) {
				t.Fatalf("explain --pid: %v, want %q in:\n%s", err, tc.explain, out)
			}
		})
	}
	st := e.status()
	if len(st.Apps) != 1 || st.Apps[0].Principal != "user 64001" || st.Apps[0].Cgroup != "" {
		t.Fatalf("status apps: %+v, want backup as principal user 64001 without a cgroup", st.Apps)
	}
	if _, err := os.Stat(filepath.Join(e.cgroup, "procgate.apps", "backup")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a user app got a launch cgroup (stat: %v)", err)
	}
	out, err := e.procgate("run", "--app", "backup", "--", "/bin/true")
	if err == nil || !strings.Contains(out, "not launched: procgate run cannot start it") {
		t.Fatalf("run --app backup: %v, want a refusal naming the match, got:\n%s", err, out)
	}
}

// TestUnitPrincipalEndToEnd: a match.unit app through the daemon, on a
// cgroup tree laid out as systemd's below the daemon's --cgroup-root: the
// unit's processes hold its grants from the cgroup's making on, explain
// --pid says so, status counts the cgroup after a reload.
func TestUnitPrincipalEndToEnd(t *testing.T) {
	nstest.RequireRoot(t)
	e := newE2E(t, `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: web
    match: {unit: nginx.service}
    allow:
      - to: 10.1.0.0/16
        proto: tcp
`)
	slice := nstest.ChildCgroup(t, e.cgroup, "system.slice")
	unit := nstest.ChildCgroup(t, slice, "nginx.service")
	p, err := probe.Start(unit, e.netns, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	mustTry(t, p, "10.1.2.3:22/tcp", probe.Allowed)
	out, err := e.procgate("explain", "--pid", fmt.Sprint(p.Pid()), "10.1.2.3:22/tcp")
	if want := "app web (unit nginx.service) -> 10.1.2.3:22/tcp: allow (granted)"; err != nil || !strings.Contains(out, want) {
		t.Fatalf("explain --pid: %v, want %q in:\n%s", err, want, out)
	}
	if out, err := e.procgate("reload"); err != nil {
		t.Fatalf("reload: %v\n%s", err, out)
	}
	st := e.status()
	if len(st.Apps) != 1 || st.Apps[0].Principal != "unit nginx.service" || st.Apps[0].Cgroups != 1 || st.Apps[0].Cgroup != unit {
		t.Fatalf("status apps: %+v, want web as unit nginx.service with 1 cgroup, %s", st.Apps, unit)
	}
	if out, err := e.procgate("status"); err != nil || !strings.Contains(out, "unit nginx.service") {
		t.Fatalf("status: %v, want the principal in:\n%s", err, out)
	}
}

// TestContainerPrincipalEndToEnd: a match.container app through the
// daemon, with a fake container runtime API: a running container's cgroup
// is read from its init's pid, a stopped one's is the scope its runtime
// will make, and a container that appears later is followed at the next
// poll.
func TestContainerPrincipalEndToEnd(t *testing.T) {
	nstest.RequireRoot(t)
	var mu sync.Mutex
	known := map[string]string{}
	sockDir, err := os.MkdirTemp("", "procgate-runtime-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "docker.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /containers/{name}/json", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		body, ok := known[r.PathValue("name")]
		mu.Unlock()
		if !ok {
			http.Error(w, `{"message":"No such container"}`, http.StatusNotFound)
			return
		}
		fmt.Fprint(w, body)
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	set := func(name, body string) {
		mu.Lock()
		known[name] = body
		mu.Unlock()
	}
	set("stopped", `{"Id":"feed","State":{"Running":false,"Pid":0}}`)

	e := newE2EWith(t, `version: 1
internal:
  prefixes: [10.0.0.0/8]
apps:
  - name: web
    match: {container: web}
    allow:
      - to: 10.1.0.0/16
        proto: tcp
  - name: later
    match: {container: stopped}
    allow:
      - to: 10.2.0.0/16
        proto: tcp
`, false, "--container-socket", sock)
	slice := nstest.ChildCgroup(t, e.cgroup, "system.slice")

	// A container started after the daemon: its scope, where the runtime
	// said it would be, is the app's from its mkdir.
	p := startIn(t, e, nstest.ChildCgroup(t, slice, "docker-feed.scope"))
	mustTry(t, p, "10.2.2.3:22/tcp", probe.Allowed)
	mustTry(t, p, "10.1.2.3:22/tcp", probe.Denied)

	// A container the runtime did not know when the daemon started: found
	// at the next poll, by its init's cgroup.
	web := startIn(t, e, nstest.ChildCgroup(t, e.cgroup, "elsewhere"))
	mustTry(t, web, "10.1.2.3:22/tcp", probe.Denied)
	before := e.status().Generation
	set("web", fmt.Sprintf(`{"Id":"abc","State":{"Running":true,"Pid":%d}}`, web.Pid()))
	e.waitGeneration(before, "a container appearing")
	mustTry(t, web, "10.1.2.3:22/tcp", probe.Allowed)
	out, err := e.procgate("explain", "--pid", fmt.Sprint(web.Pid()), "10.1.2.3:22/tcp")
	if want := "app web (container web) -> 10.1.2.3:22/tcp: allow (granted)"; err != nil || !strings.Contains(out, want) {
		t.Fatalf("explain --pid: %v, want %q in:\n%s", err, want, out)
	}
}

// startIn starts a prober in dir, in the test's network namespace.
func startIn(t *testing.T, e *e2e, dir string) *probe.Prober {
	t.Helper()
	p, err := probe.Start(dir, e.netns, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}
