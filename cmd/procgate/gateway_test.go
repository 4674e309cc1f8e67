package main

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/pinholetest"
	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/pki"
)

const gatewayRules = `host srv1 10.9.0.5
allow srv1 * tcp * * self 40000-40100
`

// gatewayPKI makes a CA, the gateway's certificate for 127.0.0.1 and an
// agent's (srv1) with the CLI, and returns the directory.
func gatewayPKI(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pki")
	for _, args := range [][]string{
		{"pki", "init", "--dir", dir},
		{"pki", "issue", "--dir", dir, "--name", "gateway", "--usage", "server", "--hosts", "127.0.0.1"},
		{"pki", "issue", "--dir", dir, "--name", "srv1"},
	} {
		if out, code := procgateCLI(t, args...); code != 0 {
			t.Fatalf("procgate %v: exit %d\n%s", args, code, out)
		}
	}
	return dir
}

func TestGatewayCLI(t *testing.T) {
	dir := gatewayPKI(t)
	good := filepath.Join(dir, "good.rules")
	bad := filepath.Join(dir, "bad.rules")
	os.WriteFile(good, []byte(gatewayRules), 0o644)
	os.WriteFile(bad, []byte("allow srv1 * tcp * * * 70000\nlimit alice many\nservice * tcp 21\n"), 0o644)
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
		want     []string
	}{
		{"check ok", []string{"gateway", "--rules", good, "--check"}, 0, []string{good + ": ok: 1 rules, 0 services"}},
		{"check names every error", []string{"gateway", "--rules", bad, "--check"}, 1,
			[]string{bad + ":1:24: expected a port", bad + ":2:13: expected a number of holes", bad + ":3:9: expected the HOST of a service"}},
		{"a bad file does not start", []string{"gateway", "--rules", bad, "--listen", "127.0.0.1:0", "--protect", "10.9.0.0/16",
			"--cert", filepath.Join(dir, "gateway.crt"), "--key", filepath.Join(dir, "gateway.key"), "--ca", filepath.Join(dir, "ca.crt")}, 1,
			[]string{bad + ":1:24"}},
		{"needs --protect", []string{"gateway", "--rules", good, "--listen", "127.0.0.1:0"}, 1, []string{"--protect is required"}},
		{"protect with host bits", []string{"gateway", "--rules", good, "--listen", "127.0.0.1:0", "--protect", "10.9.0.1/16",
			"--cert", "x", "--key", "x", "--ca", "x"}, 1, []string{"did you mean 10.9.0.0/16"}},
		{"pki refuses a second CA", []string{"pki", "init", "--dir", dir}, 1, []string{"already exists"}},
		{"pki server needs hosts", []string{"pki", "issue", "--dir", dir, "--name", "gw2", "--usage", "server"}, 1, []string{"at least one DNS name or IP"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := procgateCLI(t, tc.args...)
			if code != tc.wantCode {
				t.Fatalf("exit %d, want %d\n%s", code, tc.wantCode, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}

// TestGatewayCommand runs `procgate gateway` as a process: its table lives
// in a test namespace (--netns), its API on loopback. SIGHUP with a broken
// rules file keeps the old rules; SIGTERM stops it and leaves the holes.
func TestGatewayCommand(t *testing.T) {
	nstest.RequireRoot(t)
	nft := nstest.Program(t, "nft")
	ns := nstest.NetNS(t)
	dir := gatewayPKI(t)
	rules := filepath.Join(dir, "site.rules")
	os.WriteFile(rules, []byte(gatewayRules), 0o644)
	// A free loopback port: the gateway takes it a moment later.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, "gateway", "--rules", rules, "--listen", addr, "--protect", "10.9.0.0/24",
		"--netns", ns, "--lease", "1m", "--log-format", "json",
		"--cert", filepath.Join(dir, "gateway.crt"), "--key", filepath.Join(dir, "gateway.key"), "--ca", filepath.Join(dir, "ca.crt"))
	cmd.Env = append(os.Environ(), envAsMain+"=1")
	var logs pinholetest.SyncBuffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("gateway log:\n%s", logs.String())
		}
		exec.Command("nsenter", "--net="+ns, nft, "delete", "table", "inet", perimeter.DefaultTableName).Run()
	})

	tlsConf, err := pki.ClientConfig(pki.Files{Cert: filepath.Join(dir, "srv1.crt"), Key: filepath.Join(dir, "srv1.key"), CA: filepath.Join(dir, "ca.crt")})
	if err != nil {
		t.Fatal(err)
	}
	agent := perimeter.NewClient("https://"+addr, tlsConf)
	ctx := context.Background()
	open := func(port int) error {
		_, err := agent.Open(ctx, perimeter.Request{User: "alice",
			Target: perimeter.Target{Proto: "tcp", Peer: "198.51.100.10", Host: "10.9.0.5", Port: port}})
		return err
	}
	// Wait for the API; the deadline only bounds a hang.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := agent.List(ctx); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("gateway API not up: %v", err)
		}
	}
	if err := open(40000); err != nil {
		t.Fatal(err)
	}
	nftList := func() string {
		out, err := exec.Command("nsenter", "--net="+ns, nft, "list", "set", "inet", perimeter.DefaultTableName, "holes4").CombinedOutput()
		if err != nil {
			t.Fatalf("nft list set: %v\n%s", err, out)
		}
		return string(out)
	}
	if out := nftList(); !strings.Contains(out, "198.51.100.10 . tcp . 10.9.0.5 . 40000") {
		t.Fatalf("the hole is not in the namespace's table:\n%s", out)
	}

	os.WriteFile(rules, []byte("allow srv1 * tcp * * self 1-\n"), 0o644)
	cmd.Process.Signal(syscall.SIGHUP)
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(logs.String(), "rules not reloaded"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no log of the refused reload")
		}
	}
	if err := open(40001); err != nil {
		t.Errorf("the old rules are not in force after a refused reload: %v", err)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	err = <-exited
	stopped = true
	if err != nil {
		t.Fatalf("gateway exit: %v", err)
	}
	out := nftList()
	for _, port := range []int{40000, 40001} {
		if !strings.Contains(out, "10.9.0.5 . "+strconv.Itoa(port)) {
			t.Errorf("after the gateway stopped, hole %d is gone (a restart would lose it):\n%s", port, out)
		}
	}
}
