package bulk

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// memFile is an in-memory io.WriterAt and io.ReaderAt.
type memFile []byte

func (m memFile) WriteAt(p []byte, off int64) (int, error) { return copy(m[off:], p), nil }
func (m memFile) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m)) {
		return 0, io.EOF
	}
	n := copy(p, m[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(seed)}).Read(b)
	return b
}

func startServer(t *testing.T) (*Server, string) {
	t.Helper()
	s := &Server{Dir: t.TempDir(), PortMin: 42000, PortMax: 42100}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	t.Cleanup(func() {
		ln.Close()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return s, ln.Addr().String()
}

func TestGetAndPut(t *testing.T) {
	s, addr := startServer(t)
	for _, size := range []int{0, 1, BlockSize, BlockSize + 1, 3<<20 + 17} {
		data := randomBytes(size, uint64(size))
		name := "f" + string(rune('a'+size%26))
		if err := os.WriteFile(filepath.Join(s.Dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
		cl := &Client{Server: addr}
		got := make(memFile, size)
		st, err := cl.Get(name, got)
		if err != nil {
			t.Fatalf("get %d bytes: %v", size, err)
		}
		if !bytes.Equal(got, data) || st.Bytes != int64(size) || st.Port < 42000 || st.Port > 42100 || st.Passes < 1 {
			t.Fatalf("get %d bytes: stats %+v, data equal %v", size, st, bytes.Equal(got, data))
		}
		if _, err := cl.Put("up-"+name, memFile(data), int64(size)); err != nil {
			t.Fatalf("put %d bytes: %v", size, err)
		}
		if up, err := os.ReadFile(filepath.Join(s.Dir, "up-"+name)); err != nil || !bytes.Equal(up, data) {
			t.Fatalf("put %d bytes: the server has %d bytes, %v", size, len(up), err)
		}
	}
}

func TestRefusals(t *testing.T) {
	_, addr := startServer(t)
	cl := &Client{Server: addr}
	for _, tc := range []struct{ name, want string }{
		{"../etc/passwd", "want a plain file name"},
		{".hidden", "want a plain file name"},
		{"missing", "no such file"},
	} {
		if _, err := cl.Get(tc.name, make(memFile, 0)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("get %q: %v, want an error with %q", tc.name, err, tc.want)
		}
	}
	if _, err := cl.Put("x", memFile(nil), -1); err == nil {
		t.Error("put of size -1: no error")
	}
}

// TestLossyPasses drops a fifth of the datagrams on the way: the passes
// must bring every block, and the rate must come down.
func TestLossyPasses(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	ca := conn{enc: json.NewEncoder(a), dec: json.NewDecoder(bufio.NewReader(a))}
	cb := conn{enc: json.NewEncoder(b), dec: json.NewDecoder(bufio.NewReader(b))}
	rx, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	bigBuffers(rx)
	tx, err := net.DialUDP("udp", nil, rx.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	data := randomBytes(2<<20, 9)
	rng := rand.New(rand.NewPCG(1, 2))
	write := func(p []byte) error {
		if rng.IntN(5) == 0 {
			return nil
		}
		_, err := tx.Write(p)
		return err
	}
	got := make(memFile, len(data))
	errc := make(chan error, 1)
	go func() { errc <- receiver(cb, rx, nil, got, int64(len(data)), 7) }()
	sent, passes, err := sender(ca, write, memFile(data), int64(len(data)), 7, 50<<20)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the received data differs")
	}
	if n := int64(blocks(int64(len(data)))); passes < 2 || sent <= n {
		t.Errorf("%d passes, %d datagrams for %d blocks: want retransmissions", passes, sent, n)
	}
}
