package etcdtest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	MaybeServe() // the member of TestMemberEndsWithItsParent
	os.Exit(m.Run())
}

// A member still waiting for its quorum (here one it never gets: its two
// peers do not exist) ends when its parent's end of stdin closes, as when
// a test is killed while its cluster starts: it must not wait for ever.
func TestMemberEndsWithItsParent(t *testing.T) {
	dir := t.TempDir()
	addrs := make([]string, 4) // client, then three peers
	for i := range addrs {
		a, err := freeAddr()
		if err != nil {
			t.Fatal(err)
		}
		addrs[i] = a
	}
	var initial []string
	for i, p := range addrs[1:] {
		initial = append(initial, "m"+string(rune('0'+i))+"=http://"+p)
	}
	m := &Member{cfg: memberConfig{Name: "m0", Dir: filepath.Join(dir, "m0"), Client: addrs[0], Peer: addrs[1],
		InitialCluster: strings.Join(initial, ",")}}
	if _, err := m.spawn(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Kill)
	m.mu.Lock()
	stdin, exited := m.stdin, m.exited
	m.mu.Unlock()
	stdin.Close()
	select {
	case <-exited:
	case <-time.After(time.Minute):
		t.Fatal("a member waiting for its quorum outlived its parent's end of stdin by a minute")
	}
}
