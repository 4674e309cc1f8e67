package perimeter

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/pki"
)

// apiFixture is a controller over a fake table behind a real mTLS server,
// and a client per delegate.
type apiFixture struct {
	*testController
	url     string
	clients map[string]*Client
	ca      *pki.CA
}

func newAPIFixture(t *testing.T) *apiFixture {
	t.Helper()
	c := newTestController(t, controllerRules)
	ca, err := pki.NewCA("test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer((&Server{C: c.Controller, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}).Handler())
	srv.TLS = pki.ServerTLS(issuePair(t, ca, "gateway", pki.Server, "127.0.0.1"), ca.Pool())
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // handshake failures are the point of some tests
	srv.StartTLS()
	t.Cleanup(srv.Close)
	f := &apiFixture{testController: c, url: srv.URL, clients: map[string]*Client{}, ca: ca}
	for _, name := range []string{"srv1", "srv2"} {
		f.clients[name] = NewClient(srv.URL, pki.ClientTLS(issuePair(t, ca, name, pki.Client), ca.Pool()))
	}
	return f
}

// issuePair issues a certificate of ca for a tls.Config.
func issuePair(t testing.TB, ca *pki.CA, name string, u pki.Usage, hosts ...string) tls.Certificate {
	t.Helper()
	is, err := ca.Issue(pki.IssueRequest{Name: name, Usage: u, Hosts: hosts, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	p, err := is.Pair()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAPI(t *testing.T) {
	f := newAPIFixture(t)
	ctx := context.Background()
	srv1, srv2 := f.clients["srv1"], f.clients["srv2"]
	a := req("alice", "tcp 203.0.113.9 10.9.0.5 40000")
	h, err := srv1.Open(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if h.Delegate != "srv1" || h.User != "alice" || h.Rule != "site.rules:3" || h.Key != key("tcp 203.0.113.9 10.9.0.5 40000") {
		t.Errorf("opened %+v", h)
	}
	errs := []struct {
		name   string
		call   func() error
		status int
		field  string
		rule   string
	}{
		{"refused by a deny rule", func() error {
			_, err := srv1.Open(ctx, req("mallory", "tcp 203.0.113.9 10.9.0.5 40001"))
			return err
		}, 403, "", "site.rules:4"},
		{"no allow rule", func() error {
			_, err := srv1.Open(ctx, req("alice", "tcp 203.0.113.9 10.9.0.6 40001"))
			return err
		}, 403, "", ""},
		{"another delegate's hole", func() error {
			_, err := srv2.Open(ctx, req("bob", "tcp 203.0.113.9 10.9.0.5 40000"))
			return err
		}, 409, "", ""},
		{"bad peer", func() error {
			_, err := srv1.Open(ctx, req("alice", "tcp 203.0.113.300 10.9.0.5 40001"))
			return err
		}, 400, "peer", ""},
		{"bad target in a batch", func() error {
			_, err := srv1.Close(ctx, []Target{a.Target, {Proto: "tcp", Peer: "203.0.113.9", Host: "10.9.0.5", Port: 99999}})
			return err
		}, 400, "holes[1].port", ""},
	}
	for _, e := range errs {
		t.Run(e.name, func(t *testing.T) {
			var apiErr *APIError
			if err := e.call(); !errors.As(err, &apiErr) || apiErr.Status != e.status || apiErr.Field != e.field || apiErr.Rule != e.rule {
				t.Fatalf("got %v (%+v), want status %d field %q rule %q", err, apiErr, e.status, e.field, e.rule)
			}
		})
	}
	if holes, err := srv1.List(ctx); err != nil || len(holes) != 1 {
		t.Errorf("srv1 lists %v, %v; want its one hole (the bad batch closed nothing)", holes, err)
	}
	if holes, err := srv2.List(ctx); err != nil || len(holes) != 0 {
		t.Errorf("srv2 lists %v, %v; want none: holes are per delegate", holes, err)
	}
	if res, err := srv1.Renew(ctx, []Target{a.Target}, 10); err != nil || len(res.Renewed) != 1 || !res.Renewed[0].Expires.Equal(f.clock.t.Add(10*time.Second)) {
		t.Errorf("renew: %+v, %v", res, err)
	}
	if res, err := srv1.Sync(ctx, []Request{req("bob", "tcp 203.0.113.9 10.9.0.5 40002")}); err != nil || len(res.Holes) != 1 || len(res.Closed) != 1 {
		t.Errorf("sync: %+v, %v", res, err)
	}
	if res, err := srv1.Close(ctx, []Target{a.Target, req("", "tcp 203.0.113.9 10.9.0.5 40002").Target}); err != nil || len(res.Closed) != 1 || len(res.Missing) != 1 {
		t.Errorf("close: %+v, %v", res, err)
	}
	if got := f.table.keys(); len(got) != 0 {
		t.Errorf("kernel still holds %v", got)
	}
}

func TestAPIBadBodies(t *testing.T) {
	f := newAPIFixture(t)
	hc := f.clients["srv1"].HTTP
	tests := []struct {
		name, path, body string
		field            string
	}{
		{"syntax", PathOpen, `{"proto": tcp}`, "body"},
		{"empty", PathOpen, ``, "body"},
		{"unknown field", PathOpen, `{"proto":"tcp","peer":"203.0.113.9","host":"10.9.0.5","port":1,"user":"a","colour":"red"}`, "colour"},
		{"port as a string", PathOpen, `{"proto":"tcp","peer":"203.0.113.9","host":"10.9.0.5","port":"80","user":"a"}`, "port"},
		{"trailing data", PathOpen, `{"proto":"tcp","peer":"203.0.113.9","host":"10.9.0.5","port":1,"user":"a"} {}`, "body"},
		{"holes not a list", PathRenew, `{"holes": {}}`, "holes"},
		{"negative lease", PathRenew, `{"holes": [], "lease_seconds": -5}`, "lease_seconds"},
		{"repeated hole in a sync", PathSync, `{"holes": [{"proto":"tcp","peer":"203.0.113.9","host":"10.9.0.5","port":1,"user":"a"},{"proto":"tcp","peer":"203.0.113.9","host":"10.9.0.5","port":1,"user":"a"}]}`, "holes[1].host"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := hc.Post(f.url+tt.path, "application/json", strings.NewReader(tt.body))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			apiErr := &APIError{}
			if err := json.NewDecoder(resp.Body).Decode(apiErr); err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != 400 || apiErr.Field != tt.field {
				t.Errorf("status %d, %+v; want 400 on field %q", resp.StatusCode, apiErr, tt.field)
			}
		})
	}
	if got := f.table.keys(); len(got) != 0 {
		t.Errorf("bad bodies opened %v", got)
	}
}

func TestAPIAuthentication(t *testing.T) {
	f := newAPIFixture(t)
	// Without a certificate the TLS handshake itself fails.
	anon := NewClient(f.url, &tls.Config{RootCAs: f.ca.Pool(), MinVersion: tls.VersionTLS13})
	if _, err := anon.List(context.Background()); err == nil {
		t.Error("a client without a certificate was served")
	}
	handler := (&Server{C: f.Controller, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}).Handler()
	tests := []struct {
		name   string
		state  *tls.ConnectionState
		status int
	}{
		{"plain HTTP", nil, http.StatusUnauthorized},
		{"unverified", &tls.ConnectionState{}, http.StatusUnauthorized},
		{"name with a space", &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{{Subject: pkix.Name{CommonName: "srv 1"}}}}}, http.StatusForbidden},
		{"good name", &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{{Subject: pkix.Name{CommonName: "srv1"}}}}}, http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", PathHoles, nil)
			r.TLS = tt.state
			w := httptest.NewRecorder()
			handler.ServeHTTP(w, r)
			if w.Code != tt.status {
				t.Errorf("status %d, want %d: %s", w.Code, tt.status, w.Body)
			}
		})
	}
}
