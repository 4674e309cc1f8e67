package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
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
// will make, and the runtime's events, not a poll (an hour here), have the
// daemon follow a container that starts later or is made again.
func TestContainerPrincipalEndToEnd(t *testing.T) {
	nstest.RequireRoot(t)
	rt := newFakeRuntime(t)
	rt.set("stopped", `{"Id":"feed","State":{"Running":false,"Pid":0}}`)

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
`, false, "--container-socket", rt.sock, "--poll", "1h")
	slice := nstest.ChildCgroup(t, e.cgroup, "system.slice")
	rt.waitSubscribed(t, e)

	// A container started after the daemon: its scope, where the runtime
	// said it would be, is the app's from its mkdir.
	p := startIn(t, e, nstest.ChildCgroup(t, slice, "docker-feed.scope"))
	mustTry(t, p, "10.2.2.3:22/tcp", probe.Allowed)
	mustTry(t, p, "10.1.2.3:22/tcp", probe.Denied)

	// A container the runtime did not know when the daemon started, in a
	// cgroup no scope name foretells (the cgroupfs driver's): found at its
	// start event, by its init's cgroup.
	web := startIn(t, e, nstest.ChildCgroup(t, e.cgroup, "elsewhere"))
	mustTry(t, web, "10.1.2.3:22/tcp", probe.Denied)
	before := e.status().Generation
	rt.set("web", fmt.Sprintf(`{"Id":"abc","State":{"Running":true,"Pid":%d}}`, web.Pid()))
	rt.emit("start", "abc", "web")
	e.waitGeneration(before, "a container's start event")
	mustTry(t, web, "10.1.2.3:22/tcp", probe.Allowed)
	out, err := e.procgate("explain", "--pid", fmt.Sprint(web.Pid()), "10.1.2.3:22/tcp")
	if want := "app web (container web) -> 10.1.2.3:22/tcp: allow (granted)"; err != nil || !strings.Contains(out, want) {
		t.Fatalf("explain --pid: %v, want %q in:\n%s", err, want, out)
	}

	// The container made again under its name (docker rm -f; docker run
	// --name web): a new id, so a new scope. Its create event comes before
	// its start makes the scope, as a runtime orders them; the daemon's
	// answer to it is the only wait, and the first connect from the new
	// scope, at once, holds the grants.
	before = e.status().Generation
	rt.set("web", `{"Id":"f00d","State":{"Running":false,"Pid":0}}`)
	rt.emit("destroy", "abc", "web")
	rt.emit("create", "f00d", "web")
	e.waitGeneration(before, "a container's create event")
	again := startIn(t, e, nstest.ChildCgroup(t, slice, "docker-f00d.scope"))
	mustTry(t, again, "10.1.2.3:22/tcp", probe.Allowed)
	mustTry(t, web, "10.1.2.3:22/tcp", probe.Denied)
}

// fakeRuntime serves the part of the Docker Engine API that procgate
// asks (GET /containers/NAME/json, GET /events) on a unix socket.
type fakeRuntime struct {
	sock string

	mu         sync.Mutex
	known      map[string]string
	streams    []chan string
	subscribed chan struct{}
}

func newFakeRuntime(t *testing.T) *fakeRuntime {
	t.Helper()
	sockDir, err := os.MkdirTemp("", "procgate-runtime-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	rt := &fakeRuntime{sock: filepath.Join(sockDir, "docker.sock"), known: map[string]string{}, subscribed: make(chan struct{}, 1)}
	ln, err := net.Listen("unix", rt.sock)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /containers/{name}/json", func(w http.ResponseWriter, r *http.Request) {
		rt.mu.Lock()
		body, ok := rt.known[r.PathValue("name")]
		rt.mu.Unlock()
		if !ok {
			http.Error(w, `{"message":"No such container"}`, http.StatusNotFound)
			return
		}
		fmt.Fprint(w, body)
	})
	mux.HandleFunc("GET /events", func(w http.ResponseWriter, r *http.Request) {
		events := make(chan string, 16)
		rt.mu.Lock()
		rt.streams = append(rt.streams, events)
		rt.mu.Unlock()
		defer func() {
			rt.mu.Lock()
			rt.streams = slices.DeleteFunc(rt.streams, func(c chan string) bool { return c == events })
			rt.mu.Unlock()
		}()
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		select {
		case rt.subscribed <- struct{}{}:
		default:
		}
		for {
			select {
			case <-r.Context().Done():
				return
			case ev := <-events:
				fmt.Fprintln(w, ev)
				w.(http.Flusher).Flush()
			}
		}
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return rt
}

func (rt *fakeRuntime) set(name, body string) {
	rt.mu.Lock()
	rt.known[name] = body
	rt.mu.Unlock()
}

// emit sends a container event to every event stream open.
func (rt *fakeRuntime) emit(action, id, name string) {
	ev := fmt.Sprintf(`{"Type":"container","Action":%q,"Actor":{"ID":%q,"Attributes":{"name":%q}}}`, action, id, name)
	rt.mu.Lock()
	defer rt.mu.Unlock()
	for _, s := range rt.streams {
		s <- ev
	}
}

// waitSubscribed waits for the daemon to follow the events: one emitted
// before would be lost (as with a real runtime), and the poll is far off.
func (rt *fakeRuntime) waitSubscribed(t *testing.T, e *e2e) {
	t.Helper()
	select {
	case <-rt.subscribed:
	case <-time.After(30 * time.Second):
		t.Fatalf("the daemon did not follow the runtime's events:\n%s", e.daemonLog())
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
