package fleet

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/procgate/procgate/internal/etcdtest"
	"github.com/procgate/procgate/policy"
)

// The tests on a 3-member cluster run each host as its daemon's fleet side
// in the test process (an Agent and an applier that does what the daemon's
// applyFleet does), not as a daemon: three daemons would load three sets of
// BPF programs for what is etcd's and the agent's behaviour. The partition
// test runs a real daemon (cmd/procgate).

// applied is one generation a test host made: the revision of the
// snapshot and the mark (last line) of its fleet document.
type applied struct {
	rev  int64
	mark string
}

// testHost is one simulated host.
type testHost struct {
	h     Host
	agent *Agent
	mu    sync.Mutex
	hash  string
	gens  []applied
}

// startHost runs a host with its own etcd client to endpoints, as a
// daemon has, until the end of the test.
func startHost(t *testing.T, endpoints []string, h Host) *testHost {
	t.Helper()
	cli, err := Config{Endpoints: endpoints}.Client()
	if err != nil {
		t.Fatal(err)
	}
	th := &testHost{h: h}
	th.agent = NewAgent(AgentOptions{Client: cli, Host: h, StateDir: t.TempDir(), Version: "test", LeaseTTL: 5 * time.Second, Heartbeat: time.Second,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	c, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); th.agent.Run(c) }()
	go func() {
		defer wg.Done()
		for {
			select {
			case <-c.Done():
				return
			case s := <-th.agent.Updates():
				th.apply(s)
			}
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait(); cli.Close() })
	return th
}

// apply is the daemon's applyFleet without the kernel: the same
// documents as in force make no generation (a re-list after a lost watch
// reads them again), others a new one.
func (th *testHost) apply(s Snapshot) {
	files, err := s.Files(th.h)
	if err == nil {
		_, _, err = policy.ParseFiles(files)
	}
	th.mu.Lock()
	defer th.mu.Unlock()
	if err != nil {
		th.agent.Applied(s, Outcome{Generation: uint32(len(th.gens)), PolicySHA256: th.hash, Err: err})
		return
	}
	if hash := policy.Hash(files); hash != th.hash {
		fleet := strings.TrimSuffix(string(s.Docs[FleetKey]), "\n")
		th.hash = hash
		th.gens = append(th.gens, applied{rev: s.Revision, mark: fleet[strings.LastIndex(fleet, "\n")+1:]})
	}
	th.agent.Applied(s, Outcome{Generation: uint32(len(th.gens)), PolicySHA256: th.hash})
}

func (th *testHost) generations() []applied {
	th.mu.Lock()
	defer th.mu.Unlock()
	return slices.Clone(th.gens)
}

// waitMark waits until the host's newest generation has mark.
func (th *testHost) waitMark(t *testing.T, mark string) applied {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		g := th.generations()
		if len(g) > 0 && g[len(g)-1].mark == mark {
			return g[len(g)-1]
		}
		if time.Now().After(deadline) {
			st, connected, etcdErr := th.agent.State()
			t.Fatalf("host %s: no generation with %q within 30s; generations %v, status %+v, connected %v (%s)", th.h.Name, mark, g, st, connected, etcdErr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pushRetrying pushes doc as the fleet document until it is written,
// through a leader election: a push whose answer was lost may have been
// written, which the document in etcd tells. It returns the revision of
// the write.
func pushRetrying(t *testing.T, cli *clientv3.Client, doc string) int64 {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		rev, err := Push(c, cli, Target{}, []byte(doc), 0)
		if err != nil {
			if r, gerr := cli.Get(c, FleetKey); gerr == nil && len(r.Kvs) == 1 && string(r.Kvs[0].Value) == doc {
				rev, err = r.Kvs[0].ModRevision, nil
			}
		}
		cancel()
		if err == nil {
			return rev
		}
		if time.Now().After(deadline) {
			t.Fatalf("push not written within 30s: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// rotate is endpoints starting at the i-th: each host first dials another
// member.
func rotate(endpoints []string, i int) []string {
	i %= len(endpoints)
	return append(slices.Clone(endpoints[i:]), endpoints[:i]...)
}

func waitStatus(t *testing.T, cli *clientv3.Client, what string, ok func(Overview) bool) Overview {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var o Overview
	for {
		c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		var err error
		o, err = FleetStatus(c, cli)
		cancel()
		if err == nil && ok(o) {
			return o
		}
		if time.Now().After(deadline) {
			t.Fatalf("fleet status: no %s within 30s: %+v (%v)", what, o, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A push to a 3-member cluster reaches three hosts, each through another
// member, and all three apply and report the revision of the push.
func TestClusterPushReachesEveryHost(t *testing.T) {
	c := etcdtest.StartCluster(t, 3)
	cli := c.Client(t)
	pushRetrying(t, cli, fleetDoc+"# push 0\n")
	paris := Label{Key: "site", Value: "paris"}
	hosts := []*testHost{
		startHost(t, rotate(c.Endpoints(), 0), Host{Name: "web-1", Labels: []Label{paris}}),
		startHost(t, rotate(c.Endpoints(), 1), Host{Name: "web-2"}),
		startHost(t, rotate(c.Endpoints(), 2), Host{Name: "web-3"}),
	}
	for _, h := range hosts {
		h.waitMark(t, "# push 0")
	}
	if _, err := Push(ctx(t), cli, Target{Group: &paris}, []byte(overlay("web", "10.2.0.0/16")), 0); err != nil {
		t.Fatal(err)
	}
	rev := pushRetrying(t, cli, fleetDoc+"# push 1\n")
	for _, h := range hosts {
		if g := h.waitMark(t, "# push 1"); g.rev != rev {
			t.Errorf("host %s applied the push at revision %d, want %d", h.h.Name, g.rev, rev)
		}
	}
	o := waitStatus(t, cli, "three hosts at the push's revision", func(o Overview) bool {
		n := 0
		for _, h := range o.Hosts {
			if h.Revision == rev && !h.Behind && h.Error == "" {
				n++
			}
		}
		return n == 3
	})
	// web-1 merges the site=paris overlay, the others do not: the same
	// revision, two policies.
	if o.Hosts[0].PolicySHA256 == o.Hosts[1].PolicySHA256 || o.Hosts[1].PolicySHA256 != o.Hosts[2].PolicySHA256 {
		t.Fatalf("policies %s %s %s: want web-1's own, web-2's and web-3's the same", o.Hosts[0].PolicySHA256, o.Hosts[1].PolicySHA256, o.Hosts[2].PolicySHA256)
	}
}

// The leader is killed twice during a series of pushes (and the first one
// comes back in between). Every push that was written is applied by every
// host, in order, each exactly once: a re-list after a lost watch reads the
// same documents again and makes no generation.
func TestClusterLeaderFailure(t *testing.T) {
	c := etcdtest.StartCluster(t, 3)
	cli := c.Client(t)
	pushRetrying(t, cli, fleetDoc+"# push 0\n")
	var hosts []*testHost
	for i := range 3 {
		hosts = append(hosts, startHost(t, rotate(c.Endpoints(), i), Host{Name: fmt.Sprintf("web-%d", i+1)}))
	}
	for _, h := range hosts {
		h.waitMark(t, "# push 0")
	}
	const pushes = 12
	revs := map[string]int64{}
	var killed *etcdtest.Member
	for n := 1; n <= pushes; n++ {
		switch n {
		case 4, 10:
			lead, err := c.Leader()
			if err != nil {
				t.Fatal(err)
			}
			killed = c.Members[lead]
			t.Logf("push %d: killing the leader %s", n, killed.Endpoint)
			killed.Kill()
		case 8:
			if err := killed.Restart(); err != nil {
				t.Fatal(err)
			}
		}
		mark := fmt.Sprintf("# push %d", n)
		revs[mark] = pushRetrying(t, cli, fleetDoc+mark+"\n")
		for _, h := range hosts {
			h.waitMark(t, mark)
		}
	}
	for _, h := range hosts {
		gens := h.generations()
		for i, g := range gens {
			if want := fmt.Sprintf("# push %d", i); g.mark != want {
				t.Errorf("host %s: generation %d applied %q, want %q (all: %v)", h.h.Name, i, g.mark, want, gens)
				break
			}
			// Applied at the push's revision, or (its watch lost) read
			// again at a later one, before the next push was written.
			next, ok := revs[fmt.Sprintf("# push %d", i+1)]
			if i > 0 && (g.rev < revs[g.mark] || ok && g.rev >= next) {
				t.Errorf("host %s: %q applied at revision %d, written at %d, next push at %d", h.h.Name, g.mark, g.rev, revs[g.mark], next)
			}
		}
		if len(gens) != pushes+1 {
			t.Errorf("host %s: %d generations for %d pushes: %v", h.h.Name, len(gens), pushes+1, gens)
		}
	}
}
