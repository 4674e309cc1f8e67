package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/procgate/procgate/ruleset"
)

// procgateCLI runs this test binary as procgate, without a daemon.
func procgateCLI(t *testing.T, args ...string) (string, int) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, args...)
	cmd.Env = append(os.Environ(), envAsMain+"=1")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), 0
}

func TestCLIWithoutDaemon(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(good, []byte("version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: db\n    allow:\n      - to: 10.1.2.0/24\n        proto: tcp\n        ports: [5432]\n"), 0o644)
	everyone := filepath.Join(dir, "everyone.yaml")
	os.WriteFile(everyone, []byte("version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\neveryone:\n  allow:\n    - {to: 10.0.0.53, proto: udp, ports: [53]}\napps:\n  - name: db\n    allow:\n      - to: 10.0.0.0/24\n  - name: box\n    outside: deny\n    allow:\n      - {to: 192.0.2.10, proto: tcp, ports: [443]}\n  - name: sealed\n    outside: deny\n    loopback: deny\n"), 0o644)
	host := filepath.Join(dir, "host.yaml")
	os.WriteFile(host, []byte("version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: db\n    users: [root, procgate-no-such-user]\n    exe: [/nonexistent/psql]\n"), 0o644)
	os.WriteFile(bad, []byte("version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: db\n    allow:\n      - to: 10.1.2.3/24\n        ports: [70000]\n"), 0o644)
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
		want     []string
	}{
		{"validate ok", []string{"validate", good}, 0, []string{"ok: 1 internal prefixes, 1 apps, 1 grants"}},
		{"validate names every error with file:line", []string{"validate", bad}, 1,
			[]string{bad + ":7:", "10.1.2.0/24", bad + ":8:", "70000"}},
		{"validate warns about users and binaries the host lacks", []string{"validate", host}, 0, []string{
			"warning: " + host + `:6:19: apps[0].users[1]: unknown user "procgate-no-such-user" on this host`,
			"warning: " + host + ":7:11: apps[0].exe[0]: binary /nonexistent/psql does not exist on this host",
			"ok: 1 internal prefixes, 1 apps, 0 grants"}},
		{"validate missing file", []string{"validate", filepath.Join(dir, "nope.yaml")}, 1, []string{"nope.yaml"}},
		{"explain offline allow", []string{"explain", "--policy", good, "--app", "db", "10.1.2.3:5432"}, 0,
			[]string{"db -> 10.1.2.3:5432/tcp: allow (granted)", good + ":7"}},
		{"explain offline unbound", []string{"explain", "--policy", good, "--app", "", "10.1.2.3:5432"}, 0,
			[]string{"(unbound) -> 10.1.2.3:5432/tcp: deny (unbound)"}},
		{"explain offline everyone", []string{"explain", "--policy", everyone, "--app", "", "10.0.0.53:53/udp"}, 0,
			[]string{"(unbound) -> 10.0.0.53:53/udp: allow (granted-everyone)", "everyone grant #0 10.0.0.53/32 udp ports 53 [" + everyone + ":6]"}},
		{"explain offline: the app's own grant first", []string{"explain", "--policy", everyone, "--app", "db", "10.0.0.53:53/udp"}, 0,
			[]string{"db -> 10.0.0.53:53/udp: allow (granted)", "; grant #0 10.0.0.0/24"}},
		{"validate counts everyone grants", []string{"validate", everyone}, 0, []string{"3 apps, 2 grants, 1 everyone grants"}},
		{"explain offline: a sandbox's loopback", []string{"explain", "--policy", everyone, "--app", "box", "127.0.0.1:80"}, 0,
			[]string{"box -> 127.0.0.1:80/tcp: allow (loopback) outside: deny, loopback: allow"}},
		{"explain offline: a sandbox's internet", []string{"explain", "--policy", everyone, "--app", "box", "192.0.2.1:443"}, 0,
			[]string{"box -> 192.0.2.1:443/tcp: deny (outside-denied) outside: deny, and no grant covers it"}},
		{"explain offline: a sandbox's grant outside", []string{"explain", "--policy", everyone, "--app", "box", "192.0.2.10:443"}, 0,
			[]string{"box -> 192.0.2.10:443/tcp: allow (granted); grant #0 192.0.2.10/32"}},
		{"explain offline: loopback: deny", []string{"explain", "--policy", everyone, "--app", "sealed", "[::1]:80"}, 0,
			[]string{"sealed -> [::1]:80/tcp: deny (loopback) outside: deny, loopback: deny"}},
		{"explain bad destination", []string{"explain", "--policy", good, "--app", "db", "10.1.2.3"}, 1, []string{"ADDR:PORT"}},
		{"explain deny exits 0 without --exit-code", []string{"explain", "--policy", good, "--app", "db", "10.1.2.3:22"}, 0,
			[]string{"db -> 10.1.2.3:22/tcp: deny"}},
		{"explain --exit-code allow", []string{"explain", "--exit-code", "--policy", good, "--app", "db", "10.1.2.3:5432"}, 0,
			[]string{"allow (granted)"}},
		{"explain --exit-code deny", []string{"explain", "--exit-code", "--policy", good, "--app", "db", "10.1.2.3:22"}, 1,
			[]string{"db -> 10.1.2.3:22/tcp: deny"}},
		{"explain --exit-code bad destination", []string{"explain", "--exit-code", "--policy", good, "--app", "db", "10.1.2.3"}, 2, []string{"ADDR:PORT"}},
		{"explain --exit-code invalid policy", []string{"explain", "--exit-code", "--policy", bad, "--app", "db", "10.1.2.3:5432"}, 2, []string{"70000"}},
		{"explain --exit-code no destination", []string{"explain", "--exit-code", "--policy", good, "--app", "db"}, 2, []string{"want one destination"}},
		{"explain --exit-code bad flag", []string{"explain", "--exit-code", "--nope"}, 2, []string{"unknown flag"}},
		{"explain --exit-code no daemon", []string{"explain", "--exit-code", "--socket", filepath.Join(dir, "none.sock"), "--app", "db", "10.1.2.3:5432"}, 2,
			[]string{"is it running?"}},
		{"validate ignores --socket and says so", []string{"validate", "--socket", "/x", good}, 0, []string{"ok:", "--socket has been deprecated"}},
		{"pki issue ignores --socket", []string{"pki", "issue", "--socket", "/x", "--help"}, 0, []string{"--days"}},
		{"pki init refuses 0 days", []string{"pki", "init", "--dir", filepath.Join(dir, "pki"), "--days", "0"}, 1, []string{"--days 0: want 1 to 3650"}},
		{"pki issue refuses negative days", []string{"pki", "issue", "--dir", filepath.Join(dir, "pki"), "--name", "a", "--days", "-5"}, 1, []string{"--days -5: want 1 to 3650"}},
		{"pki init refuses more than ten years", []string{"pki", "init", "--dir", filepath.Join(dir, "pki"), "--days", "3651"}, 1, []string{"--days 3651: want 1 to 3650"}},
		{"daemon refuses nobody's group as the guard gid", []string{"daemon", "--policy", good, "--guard-gid", "65534",
			"--cgroup-root", filepath.Join(dir, "no-cgroup"), "--bpf-dir", filepath.Join(dir, "no-bpf"), "--state-dir", filepath.Join(dir, "state"),
			"--socket", filepath.Join(dir, "d.sock")}, 1,
			[]string{"--guard-gid 65534 is the primary group of", "nobody"}},
		{"client without daemon says so", []string{"--socket", filepath.Join(dir, "none.sock"), "status"}, 1,
			[]string{"is it running?"}},
		{"socket flag after the command", []string{"status", "--socket", filepath.Join(dir, "none.sock")}, 1,
			[]string{"none.sock", "is it running?"}},
		{"run needs --app", []string{"run", "--", "true"}, 125, []string{"app"}},
		{"help lists the commands", []string{"help"}, 0,
			[]string{"daemon", "uninstall", "run", "validate", "status", "explain", "events", "revoke", "demo"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := procgateCLI(t, tc.args...)
			if code != tc.wantCode {
				t.Fatalf("exit %d, want %d:\n%s", code, tc.wantCode, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}

// TestSocketOnlyOnClients: commands that do not talk to the daemon do not
// offer --socket in their help; clients do.
func TestSocketOnlyOnClients(t *testing.T) {
	for _, tc := range []struct {
		args   []string
		socket bool
	}{
		{[]string{"status", "--help"}, true},
		{[]string{"explain", "--help"}, true},
		{[]string{"pinhole", "open", "--help"}, true},
		{[]string{"daemon", "--help"}, true},
		{[]string{"validate", "--help"}, false},
		{[]string{"dial", "--help"}, false},
		{[]string{"pki", "issue", "--help"}, false},
		{[]string{"gateway", "--help"}, false},
		{[]string{"uninstall", "--help"}, false},
	} {
		out, code := procgateCLI(t, tc.args...)
		if code != 0 {
			t.Fatalf("%v: exit %d:\n%s", tc.args, code, out)
		}
		if got := strings.Contains(out, "--socket"); got != tc.socket {
			t.Errorf("%v: --socket in help is %v, want %v:\n%s", tc.args, got, tc.socket, out)
		}
	}
}

func TestSplitNameDest(t *testing.T) {
	tests := []struct {
		in    string
		name  string
		port  uint16
		proto ruleset.Proto
		ok    bool
	}{
		{"db.corp.example:5432", "db.corp.example", 5432, ruleset.TCP, true},
		{"db.corp.example:53/udp", "db.corp.example", 53, ruleset.UDP, true},
		{"DB.corp.example:443/TCP", "DB.corp.example", 443, ruleset.TCP, true},
		{"10.1.2.3:99999", "", 0, 0, false}, // an address: ParseDest's error
		{"db.corp.example:http", "", 0, 0, false},
		{"db.corp.example:5432/sctp", "", 0, 0, false},
		{"db.corp.example", "", 0, 0, false},
		{":5432", "", 0, 0, false},
	}
	for _, tt := range tests {
		name, port, proto, ok := splitNameDest(tt.in)
		if name != tt.name || port != tt.port || ok != tt.ok || ok && proto != tt.proto {
			t.Errorf("splitNameDest(%q) = %q, %d, %v, %v; want %q, %d, %v, %v", tt.in, name, port, proto, ok, tt.name, tt.port, tt.proto, tt.ok)
		}
	}
}
