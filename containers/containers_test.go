package containers

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
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

// TestEvents: the event stream of a runtime is read as the Engine API
// writes it (one JSON object after another), only container events are
// reported, and the end of the stream is an error the caller retries on.
func TestEvents(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "runtime.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var gotPath string
	mux := http.NewServeMux()
	mux.HandleFunc("GET /events", func(w http.ResponseWriter, r *http.Request) {
		gotPath = r.URL.RequestURI()
		fmt.Fprintln(w, `{"Type":"container","Action":"create","Actor":{"ID":"def","Attributes":{"name":"web","image":"nginx"}}}`)
		fmt.Fprintln(w, `{"Type":"network","Action":"connect","Actor":{"ID":"n1","Attributes":{"name":"bridge"}}}`)
		fmt.Fprint(w, `{"Type":"container","Action":"exec_start: sh","Actor":{"ID":"def","Attributes":{"name":"web"}}}`)
		fmt.Fprint(w, `{"Type":"container","Action":"start","Actor":{"ID":"def","Attributes":{"name":"web"}}}`)
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	subscribed := false
	var got []Event
	err = Events(context.Background(), sock, func() { subscribed = true }, func(e Event) { got = append(got, e) })
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("Events at the stream's end: %v, want io.ErrUnexpectedEOF", err)
	}
	if gotPath != eventsPath {
		t.Errorf("asked %s, want %s (container events only)", gotPath, eventsPath)
	}
	want := []Event{{"create", "def", "web"}, {"exec_start: sh", "def", "web"}, {"start", "def", "web"}}
	if !subscribed || !slices.Equal(got, want) {
		t.Fatalf("subscribed %v, events %+v; want true, %+v", subscribed, got, want)
	}
	for i, wantMoves := range []bool{true, false, true} {
		if got[i].Moves() != wantMoves {
			t.Errorf("%+v.Moves() = %v, want %v", got[i], !wantMoves, wantMoves)
		}
	}
	if err := Events(context.Background(), filepath.Join(t.TempDir(), "missing.sock"), func() { t.Error("subscribed to a missing socket") }, func(Event) {}); err == nil {
		t.Error("Events on a missing socket: no error")
	}
}
