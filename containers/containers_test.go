package containers

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"testing"
)

// fakeRuntime serves GET /containers/NAME/json on a unix socket, as the
// Docker Engine API (and podman's compatibility API) does.
func fakeRuntime(t *testing.T, server string, known map[string]string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "runtime.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /containers/{name}/json", func(w http.ResponseWriter, r *http.Request) {
		body, ok := known[r.PathValue("name")]
		if !ok {
			http.Error(w, `{"message":"No such container"}`, http.StatusNotFound)
			return
		}
		w.Header().Set("Server", server)
		fmt.Fprint(w, body)
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func TestLookup(t *testing.T) {
	docker := fakeRuntime(t, "Docker/27.0 (linux)", map[string]string{
		"web":     `{"Id":"abc123","State":{"Running":true,"Pid":4242}}`,
		"stopped": `{"Id":"def456","State":{"Running":false,"Pid":0}}`,
	})
	podman := fakeRuntime(t, "Libpod/5.0 (linux)", map[string]string{
		"db": `{"Id":"0f0f","State":{"Running":false,"Pid":77}}`,
	})
	r := Resolver{Sockets: []string{filepath.Join(t.TempDir(), "missing.sock"), docker, podman}}
	for _, tt := range []struct {
		name  string
		want  Container
		scope string
	}{
		{"web", Container{ID: "abc123", Pid: 4242, Runtime: "docker"}, "system.slice/docker-abc123.scope"},
		{"stopped", Container{ID: "def456", Runtime: "docker"}, "system.slice/docker-def456.scope"},
		{"db", Container{ID: "0f0f", Runtime: "podman"}, "machine.slice/libpod-0f0f.scope"},
	} {
		got, err := r.Lookup(context.Background(), tt.name)
		if err != nil || got != tt.want || got.ScopeName() != tt.scope {
			t.Errorf("Lookup(%s) = %+v (%s), %v; want %+v (%s)", tt.name, got, got.ScopeName(), err, tt.want, tt.scope)
		}
	}
	if _, err := r.Lookup(context.Background(), "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Lookup(nope): %v, want ErrNotFound", err)
	}
	if _, err := (Resolver{}).Lookup(context.Background(), "web"); !errors.Is(err, ErrNotFound) {
		t.Errorf("no sockets: %v, want ErrNotFound", err)
	}
}
