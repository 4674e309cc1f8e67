package daemon

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// TestContainerWatchOnlyWhileWanted: the daemon follows a runtime's
// events while the policy has match.container apps, closes the stream
// when it no longer has, and follows again when it has them again.
func TestContainerWatchOnlyWhileWanted(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "runtime.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	opened, closed := make(chan struct{}, 4), make(chan struct{}, 4)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /events", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		opened <- struct{}{}
		<-r.Context().Done()
		closed <- struct{}{}
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

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
