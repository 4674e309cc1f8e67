package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestContainerWatchOnlyWhileWanted: the daemon follows a runtime's
// events while the policy has match.container apps, closes the stream
// when it no longer has, and follows again when it has them again.
func TestContainerWatchOnlyWhileWanted(t *testing.T) {
	opened, closed := make(chan struct{}, 4), make(chan struct{}, 4)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /events", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		opened <- struct{}{}
		<-r.Context().Done()
		closed <- struct{}{}
	})
	sock := serveRuntime(t, mux)

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	// Retried once an hour: what happens here is the wants' doing.
	cw := watchContainers(ctx, &wg, []string{sock}, time.Hour, slog.New(slog.NewTextHandler(io.Discard, nil)))
	step := func(what string, c <-chan struct{}) {
		t.Helper()
		select {
		case <-c:
		case <-time.After(time.Minute):
			t.Fatalf("no %s within a minute", what)
		}
	}
	cw.want(true)
	step("stream once container apps are wanted", opened)
	cw.want(false)
	step("end of the stream once they are not", closed)
	cw.want(true)
	step("stream again once they are wanted again", opened)
}

// TestContainerRefreshAsksOnce: a refresh asks the runtime once about
// each match.container app, and what it answered is what goes in: a
// container made again under its name (a new id) has its new scope in a
// new generation, an unchanged one makes none.
func TestContainerRefreshAsksOnce(t *testing.T) {
	var asked atomic.Int32
	var id atomic.Pointer[string]
	mux := http.NewServeMux()
	mux.HandleFunc("GET /containers/web/json", func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		fmt.Fprintf(w, `{"Id":%q,"State":{"Running":false}}`, *id.Load())
	})
	sock := serveRuntime(t, mux)

	first := "aaa"
	id.Store(&first)
	dir := t.TempDir()
	writePolicy(t, dir, "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: web\n    match: {container: web}\n    allow:\n      - to: 10.1.0.0/16\n")
	enf := &fakeEnforcer{}
	td := startTestDaemon(t, dir, enf, func(c *Config) { c.ContainerSockets = []string{sock} })
	for _, tc := range []struct {
		name, id string
		gens     int
	}{
		{"unchanged", "aaa", 1},
		{"made again", "bbb", 2},
		{"unchanged since", "bbb", 2},
	} {
		id.Store(&tc.id)
		asked.Store(0)
		if err := td.call(context.Background(), td.refreshContainers); err != nil {
			t.Fatal(err)
		}
		if n := asked.Load(); n != 1 {
			t.Errorf("%s: the refresh asked the runtime %d times, want once", tc.name, n)
		}
		if got, want := td.current().effective().App("web").Match.Path, "system.slice/docker-"+tc.id+".scope"; got != want {
			t.Errorf("%s: web matches %s, want %s", tc.name, got, want)
		}
		if n := enf.appliedCount(); n != tc.gens {
			t.Errorf("%s: %d generations applied, want %d", tc.name, n, tc.gens)
		}
	}
}

// serveRuntime serves mux as a container runtime's API on a unix socket
// of the test, and returns the socket's path.
func serveRuntime(t *testing.T, mux *http.ServeMux) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "runtime.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}
