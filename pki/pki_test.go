package pki

import (
	"crypto/tls"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestInitAndIssueFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	if _, err := Init(dir, "test CA", time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := Init(dir, "again", time.Hour); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("second Init: %v, want already exists", err)
	}
	tests := []struct {
		name    string
		req     IssueRequest
		wantErr string
	}{
		{"client", IssueRequest{Name: "srv1", Usage: Client, Validity: time.Hour}, ""},
		{"server", IssueRequest{Name: "gw", Usage: Server, Hosts: []string{"10.0.0.1", "gw.example"}, Validity: time.Hour}, ""},
		{"again", IssueRequest{Name: "srv1", Usage: Client, Validity: time.Hour}, "already exists"},
		{"server without hosts", IssueRequest{Name: "gw2", Usage: Server, Validity: time.Hour}, "at least one DNS name or IP"},
		{"bad name", IssueRequest{Name: "../x", Usage: Client, Validity: time.Hour}, "want letters"},
		{"no usage", IssueRequest{Name: "x", Validity: time.Hour}, "usage"},
		{"expired", IssueRequest{Name: "x", Usage: Client, Validity: -5 * 24 * time.Hour}, "validity -120h0m0s out of range"},
		{"too long", IssueRequest{Name: "x", Usage: Client, Validity: MaxValidity + time.Hour}, "at most 3650 days"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			certPath, keyPath, err := IssueFiles(dir, tt.req)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("IssueFiles: %v, want an error with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{certPath, keyPath} {
				st, err := os.Stat(p)
				if err != nil {
					t.Fatal(err)
				}
				if st.Mode().Perm() != 0o600 {
					t.Errorf("%s has mode %v, want 0600", p, st.Mode().Perm())
				}
			}
		})
	}
	for _, f := range []string{CACertFile, CAKeyFile} {
		if st, err := os.Stat(filepath.Join(dir, f)); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, mode %v, want 0600", f, err, st.Mode().Perm())
		}
	}
	// The files make a working mTLS pair.
	srv, err := ServerConfig(Files{Cert: filepath.Join(dir, "gw.crt"), Key: filepath.Join(dir, "gw.key"), CA: filepath.Join(dir, CACertFile)})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := ClientConfig(Files{Cert: filepath.Join(dir, "srv1.crt"), Key: filepath.Join(dir, "srv1.key"), CA: filepath.Join(dir, CACertFile)})
	if err != nil {
		t.Fatal(err)
	}
	cli.ServerName = "10.0.0.1"
	if name, err := handshake(t, srv, cli); err != nil || name != "srv1" {
		t.Fatalf("handshake: peer %q, %v", name, err)
	}
}

// handshake runs one TLS handshake over loopback TCP (buffered, unlike
// net.Pipe, so that both sides may send an alert at once) and returns the
// client certificate's common name as the server saw it.
func handshake(t *testing.T, srv, cli *tls.Config) (string, error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	b, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	a, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	type result struct {
		name string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		s := tls.Server(a, srv)
		err := s.Handshake()
		name := ""
		if err == nil && len(s.ConnectionState().PeerCertificates) > 0 {
			name = s.ConnectionState().PeerCertificates[0].Subject.CommonName
		}
		a.Close() // unblocks the client if the server gave up
		done <- result{name, err}
	}()
	cerr := tls.Client(b, cli).Handshake()
	b.Close()
	r := <-done
	return r.name, errors.Join(cerr, r.err)
}

func TestMTLS(t *testing.T) {
	ca, err := NewCA("site", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	other, err := NewCA("elsewhere", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pair := func(ca *CA, name string, u Usage, hosts ...string) tls.Certificate {
		t.Helper()
		is, err := ca.Issue(IssueRequest{Name: name, Usage: u, Hosts: hosts, Validity: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		p, err := is.Pair()
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	gw := pair(ca, "gw", Server, "gw.test")
	tests := []struct {
		name     string
		server   tls.Certificate
		client   tls.Certificate
		wantName string // empty: the handshake must fail
	}{
		{"agent of the site", gw, pair(ca, "srv1", Client), "srv1"},
		{"agent of another CA", gw, pair(other, "srv1", Client), ""},
		{"server certificate used as a client", gw, pair(ca, "gw3", Server, "gw3.test"), ""},
		{"client certificate used as a server", pair(ca, "gw.test", Client), pair(ca, "srv1", Client), ""},
		{"server of another CA", pair(other, "gw", Server, "gw.test"), pair(ca, "srv1", Client), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cli := ClientTLS(tt.client, ca.Pool())
			cli.ServerName = "gw.test"
			name, err := handshake(t, ServerTLS(tt.server, ca.Pool()), cli)
			if tt.wantName == "" {
				if err == nil {
					t.Fatalf("handshake succeeded (peer %q), want a failure", name)
				}
				return
			}
			if err != nil || name != tt.wantName {
				t.Fatalf("handshake: peer %q, %v; want %q", name, err, tt.wantName)
			}
		})
	}
}

func TestParseUsage(t *testing.T) {
	for in, want := range map[string]Usage{"client": Client, "server": Server, "both": Client | Server} {
		if got, err := ParseUsage(in); err != nil || got != want {
			t.Errorf("ParseUsage(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseUsage("ca"); err == nil {
		t.Error("ParseUsage accepted ca")
	}
}

func TestIssuedEndsWithTheCA(t *testing.T) {
	ca, err := NewCA("short", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	is, err := ca.Issue(IssueRequest{Name: "srv1", Usage: Client, Validity: 365 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	pair, err := is.Pair()
	if err != nil {
		t.Fatal(err)
	}
	if pair.Leaf.NotAfter.After(ca.Cert.NotAfter) {
		t.Errorf("certificate ends %v, after its CA (%v)", pair.Leaf.NotAfter, ca.Cert.NotAfter)
	}
	if pair.Leaf.SerialNumber.Cmp(ca.Cert.SerialNumber) == 0 {
		t.Error("certificate and CA share a serial number")
	}
}

func TestValidity(t *testing.T) {
	for _, tt := range []struct {
		validity time.Duration
		want     time.Duration // 0: refused
	}{
		{0, DefaultValidity},
		{time.Hour, time.Hour},
		{MaxValidity, MaxValidity},
		{-time.Hour, 0},
		{MaxValidity + 1, 0},
	} {
		ca, err := NewCA("v", tt.validity)
		if tt.want == 0 {
			if err == nil {
				t.Errorf("NewCA(%v): no error, want out of range", tt.validity)
			}
			continue
		}
		if err != nil {
			t.Fatalf("NewCA(%v): %v", tt.validity, err)
		}
		if got := ca.Cert.NotAfter.Sub(ca.Cert.NotBefore); got < tt.want || got > tt.want+2*time.Minute {
			t.Errorf("NewCA(%v): valid for %v, want %v", tt.validity, got, tt.want)
		}
	}
}
