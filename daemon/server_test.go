package daemon

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/internal/pinholetest"
)

// slowEnforcer is a fakeEnforcer whose Counters waits until the test
// lets it go.
type slowEnforcer struct {
	*fakeEnforcer
	entered, release chan struct{}
	returned         atomic.Bool
}

func (c *slowEnforcer) Counters(ids []uint32) (map[uint32][bpf.NumCounts]uint64, error) {
	c.entered <- struct{}{}
	<-c.release
	defer c.returned.Store(true)
	return c.fakeEnforcer.Counters(ids)
}

// logSignal closes seen when a log line holds want.
type logSignal struct {
	want string
	once sync.Once
	seen chan struct{}
}

func (l *logSignal) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte(l.want)) {
		l.once.Do(func() { close(l.seen) })
	}
	return len(p), nil
}

// TestStopWaitsForRequests: the API's stop, which Run calls before it
// closes the enforcer, returns only once the requests in flight are done
// with it, and a client that sends nothing does not hold it for ever.
func TestStopWaitsForRequests(t *testing.T) {
	for _, tc := range []struct {
		name string
		// send is what the client sends; nil: nothing.
		send *api.Request
	}{
		{name: "status in the enforcer", send: &api.Request{Op: api.OpStatus}},
		{name: "silent client"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, fake, d := startOnApps(t, "a")
			enf := &slowEnforcer{fakeEnforcer: fake, entered: make(chan struct{}), release: make(chan struct{})}
			d.Daemon.enf = enf
			waiting := &logSignal{want: "waiting for the API requests in flight", seen: make(chan struct{})}
			d.log = slog.New(slog.NewTextHandler(waiting, nil))

			sock := filepath.Join(t.TempDir(), "api.sock")
			ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			stop := d.serveAPI(context.Background(), ln)
			conn, err := net.Dial("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if tc.send != nil {
				if err := api.WriteLine(conn, tc.send); err != nil {
					t.Fatal(err)
				}
				<-enf.entered
			} else {
				// The handler is in flight once the server took the
				// connection: a request after it is answered only then.
				probe, err := net.Dial("unix", sock)
				if err != nil {
					t.Fatal(err)
				}
				if err := api.WriteLine(probe, api.Request{Op: api.OpExplain, App: "a", Dest: "10.1.2.3:5432/tcp"}); err != nil {
					t.Fatal(err)
				}
				if _, err := api.ReadResponse(bufio.NewReader(probe)); err != nil {
					t.Fatal(err)
				}
				probe.Close()
			}

			stopped := make(chan struct{})
			var early atomic.Bool
			go func() {
				stop()
				// Where Run's deferred enf.Close comes.
				early.Store(tc.send != nil && !enf.returned.Load())
				close(stopped)
			}()
			select {
			case <-stopped:
				t.Fatal("stop returned while a request was in flight")
			case <-waiting.seen:
			}
			if tc.send != nil {
				close(enf.release)
			}
			<-stopped
			if early.Load() {
				t.Fatal("stop returned while a request was in the enforcer")
			}
			if tc.send != nil {
				resp, err := api.ReadResponse(bufio.NewReader(conn))
				if err != nil || resp.Status == nil {
					t.Fatalf("status answered %+v, %v; want a status", resp, err)
				}
			}
		})
	}
}

// TestMetricsStopWaitsForScrapes: the metrics server's stop, which Run
// calls before it closes the enforcer, returns only once the scrapes in
// flight are done with its counters.
func TestMetricsStopWaitsForScrapes(t *testing.T) {
	_, fake, d := startOnApps(t, "a")
	enf := &slowEnforcer{fakeEnforcer: fake, entered: make(chan struct{}), release: make(chan struct{})}
	d.Daemon.enf = enf
	var logged pinholetest.SyncBuffer
	waiting := &logSignal{want: "waiting for the metrics scrapes in flight", seen: make(chan struct{})}
	d.log = slog.New(slog.NewTextHandler(io.MultiWriter(&logged, waiting), nil))
	stop, err := d.serveMetrics("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`addr=(\S+)`).FindStringSubmatch(logged.String())
	if m == nil {
		t.Fatalf("no metrics address in the log:\n%s", logged.String())
	}
	scraped := make(chan error, 1)
	go func() {
		resp, err := http.Get("http://" + m[1] + "/metrics")
		if err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		scraped <- err
	}()
	<-enf.entered
	stopped := make(chan struct{})
	var early atomic.Bool
	go func() {
		stop()
		early.Store(!enf.returned.Load()) // where Run's enf.Close comes
		close(stopped)
	}()
	select {
	case <-stopped:
		t.Fatal("stop returned while a scrape was in flight")
	case <-waiting.seen:
	}
	close(enf.release)
	<-stopped
	if early.Load() {
		t.Fatal("stop returned while a scrape was in the enforcer")
	}
	if err := <-scraped; err != nil {
		t.Errorf("the scrape in flight at stop: %v, want its answer", err)
	}
}
