package main

import (
	"debug/elf"
	"encoding/json"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/procgate/procgate/internal/bulk"
	"github.com/procgate/procgate/internal/ftpsite"
	"github.com/procgate/procgate/internal/nstest"
)

// buildBulk builds internal/bulk/cmd/bulk with CGO_ENABLED=0 and checks
// that it is static (no program interpreter): the Go server of the issue.
func buildBulk(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "bulk")
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, "github.com/procgate/procgate/internal/bulk/cmd/bulk")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build bulk: %v\n%s", err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Fatalf("%s has a program interpreter: not a static binary", bin)
		}
	}
	return bin
}

// bulkStats is what `bulk get|put` prints.
type bulkStats struct {
	Bytes   int64   `json:"bytes"`
	SHA256  string  `json:"sha256"`
	Passes  int     `json:"passes"`
	Sent    int64   `json:"sent"`
	Port    int     `json:"port"`
	Seconds float64 `json:"seconds"`
}

func runBulkClient(t *testing.T, ns, bin string, args ...string) bulkStats {
	t.Helper()
	cmd := exec.Command("nsenter", append([]string{"--net=" + ns, bin}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("bulk %v: %v\n%s", args, err, stderr.String())
	}
	var st bulkStats
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("bulk %v printed %q: %v", args, out, err)
	}
	return st
}

// writeRandomFile writes size bytes of seed's stream to path and returns
// their sha256.
func writeRandomFile(t *testing.T, path string, size int64, seed uint64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.Copy(f, io.LimitReader(ftpsite.Random(seed), size)); err != nil {
		t.Fatal(err)
	}
	sum, err := bulk.SumOf(f, size)
	if err != nil {
		t.Fatal(err)
	}
	return sum
}

// bulkThroughPerimeter fetches and sends 100 MB with the static bulk
// program through the perimeter: TCP control on 4600, UDP data on an aux
// port, checksums at both ends, and no hole of the agent left after.
func bulkThroughPerimeter(t *testing.T, s *perimeterSite, bin, dir, sum string) {
	t.Helper()
	ctrl := net.JoinHostPort(nstest.Server4, "4600")
	out := filepath.Join(t.TempDir(), "got.bin")

	st := runBulkClient(t, s.Client, bin, "get", "--server", ctrl, "--out", out, "big.bin")
	if st.Bytes != ftpSize || st.SHA256 != sum || st.Port < 40000 || st.Port > 40100 {
		t.Fatalf("get: %+v; want %d bytes with sha256 %s over an aux port", st, ftpSize, sum)
	}
	t.Logf("get: 100 MB in %.3fs, %d passes, %d datagrams, data port %d", st.Seconds, st.Passes, st.Sent, st.Port)
	st = runBulkClient(t, s.Client, bin, "put", "--server", ctrl, "--name", "up.bin", out)
	if st.Bytes != ftpSize || st.SHA256 != sum {
		t.Fatalf("put: %+v", st)
	}
	t.Logf("put: 100 MB in %.3fs, %d passes, %d datagrams, data port %d", st.Seconds, st.Passes, st.Sent, st.Port)
	f, err := os.Open(filepath.Join(dir, "up.bin"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if got, err := bulk.SumOf(f, ftpSize); err != nil || got != sum {
		t.Fatalf("the server stored sha256 %s, %v; want %s", got, err, sum)
	}
	s.waitNoAgentHoles(t, "after the bulk transfers")
}

// TestPinholeBulkUDP runs the bulk server, a static Go binary, as app
// bulk in the protected server (TCP control 4600, UDP data on an aux
// port, proto udp in the policy) and its client in the external client:
// the agent opens the hole from the server's UDP bind.
func TestPinholeBulkUDP(t *testing.T) {
	c := newChainSite(t, "10s")
	bin := buildBulk(t)
	dir, err := os.MkdirTemp("", "procgate-bulk-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sum := writeRandomFile(t, filepath.Join(dir, "big.bin"), ftpSize, 7)
	c.startInApp(t, "bulk", bin, "serve", "--listen", net.JoinHostPort(nstest.Server4, "4600"), "--ports", "40000-40100", "--dir", dir)
	c.waitListen(t, 4600)
	bulkThroughPerimeter(t, c.perimeterSite, bin, dir, sum)
	c.serviceLetIn(t, 4600)
}
