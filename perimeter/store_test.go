package perimeter

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/procgate/procgate/internal/etcdtest"
	"github.com/procgate/procgate/internal/nstest"
)

func TestHoleKeyRoundTrip(t *testing.T) {
	for _, s := range []string{"tcp 198.51.100.7 10.9.0.5 40000", "udp 2001:db8::7 fd09::5 5004"} {
		k := key(s)
		got, err := keyOfHole(holeKey(k))
		if err != nil || got != k {
			t.Errorf("keyOfHole(holeKey(%v)) = %v, %v", k, got, err)
		}
	}
	for _, bad := range []string{HolesPrefix + "tcp/1.2.3.4/10.9.0.5", HolesPrefix + "icmp/1.2.3.4/10.9.0.5/1", HolesPrefix + "tcp/1.2.3.4/10.9.0.5/x"} {
		if _, err := keyOfHole(bad); err == nil {
			t.Errorf("keyOfHole(%q) accepted it", bad)
		}
	}
}

// sharedGateway is a controller over a real table in a namespace of its
// own that shares its holes through etcd, as StartGateway wires it.
type sharedGateway struct {
	ns     string
	tab    *Table
	c      *Controller
	log    *syncBuffer
	cancel context.CancelFunc
	done   chan struct{}
}

const sharedRules = "host srv1 10.9.0.5,fd09::5\nallow srv1 * * * * self *\n"

func startShared(t *testing.T, cli *clientv3.Client, ns string) *sharedGateway {
	t.Helper()
	g := &sharedGateway{ns: ns, log: &syncBuffer{}, done: make(chan struct{})}
	var err error
	if g.tab, err = OpenTable(TableConfig{NetNS: ns, Protect: testProtect}); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewJSONHandler(g.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if g.c, err = NewController(ControllerConfig{Rules: mustRules(t, sharedRules), Table: g.tab, Protect: testProtect, Lease: time.Hour, Log: log}); err != nil {
		t.Fatal(err)
	}
	store := NewHoleStore(cli, log)
	holes, rev, err := store.List()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.c.Replace(holes); err != nil {
		t.Fatal(err)
	}
	g.c.SetStore(store)
	ctx, cancel := context.WithCancel(context.Background())
	g.cancel = cancel
	go func() { store.Follow(ctx, g.c, rev); close(g.done) }()
	t.Cleanup(func() {
		g.stop()
		if t.Failed() {
			t.Logf("gateway in %s log:\n%s", ns, g.log)
		}
	})
	return g
}

// stop is the gateway dying: it follows etcd no more; its table stays.
func (g *sharedGateway) stop() {
	if g.cancel != nil {
		g.cancel()
		<-g.done
		g.tab.Close()
		g.cancel = nil
	}
}

// waitKernel waits until the kernel of g holds exactly want (a hang guard:
// the deadline is far above one watch round trip).
func waitKernel(t *testing.T, g *sharedGateway, why string, want ...string) map[Key]Element {
	t.Helper()
	var ws []string
	for _, w := range want {
		ws = append(ws, key(w).String())
	}
	slices.Sort(ws)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		got := elementsByKey(t, g.tab)
		if slices.Equal(sortedKeys(got), ws) {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: kernel in %s holds %v, want %v", why, g.ns, sortedKeys(got), ws)
		}
	}
}

func TestSharedHoles(t *testing.T) {
	nstest.RequireRoot(t)
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	nsA, nsB := nstest.NetNS(t), nstest.NetNS(t)
	a, b := startShared(t, cli, nsA), startShared(t, cli, nsB)
	const h1, h2, h3 = "tcp 198.51.100.7 10.9.0.5 40000", "udp 2001:db8::7 fd09::5 5004", "tcp 198.51.100.8 10.9.0.5 40001"

	if _, err := a.c.Open("srv1", req("alice", h1)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	els := waitKernel(t, b, "a hole opened through A", h1)
	t.Logf("hole on B %v after it opened on A", time.Since(start))
	if d, u, ok := parseComment(els[key(h1)].Comment); !ok || d != "srv1" || u != "alice" || els[key(h1)].Expires < 59*time.Minute {
		t.Errorf("B's element: %+v", els[key(h1)])
	}

	// A hole whose agent died: nobody renews it, its lease closes it on
	// both gateways, and in etcd.
	short := req("alice", h2)
	short.LeaseSeconds = 2
	if _, err := a.c.Open("srv1", short); err != nil {
		t.Fatal(err)
	}
	waitKernel(t, b, "a short hole", h1, h2)
	waitKernel(t, a, "the short hole's lease ended on A", h1)
	waitKernel(t, b, "the short hole's lease ended on B", h1)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		resp, err := cli.Get(context.Background(), holeKey(key(h2)))
		if err != nil {
			t.Fatal(err)
		}
		if resp.Count == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("etcd kept the short hole past its lease")
		}
	}

	// Closed through B: gone from A.
	if _, err := b.c.Close("srv1", []Target{key(h1).Target()}); err != nil {
		t.Fatal(err)
	}
	waitKernel(t, a, "a hole closed through B", nothing...)
	if _, err := b.c.Open("srv1", req("bob", h1)); err != nil {
		t.Fatal(err)
	}
	waitKernel(t, a, "a hole opened through B", h1)

	// A dies: its holes stay on B.
	a.stop()
	time.Sleep(300 * time.Millisecond)
	waitKernel(t, b, "after A died", h1)

	// While A is down, h1 closes and h3 opens; A's kernel still has h1 and
	// an element nobody wrote. A restarted gateway holds exactly etcd's.
	if _, err := b.c.Close("srv1", []Target{key(h1).Target()}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.c.Open("srv1", req("alice", h3)); err != nil {
		t.Fatal(err)
	}
	stale, err := OpenTable(TableConfig{NetNS: nsA, Protect: testProtect})
	if err != nil {
		t.Fatal(err)
	}
	if err := stale.Update([]Element{{Key: key("tcp 198.51.100.9 10.9.0.5 40002"), Timeout: time.Hour, Comment: comment("srv1", "alice")}}, nil); err != nil {
		t.Fatal(err)
	}
	stale.Close()
	a = startShared(t, cli, nsA)
	els = waitKernel(t, a, "A restarted", h3)
	if e := els[key(h3)]; e.Expires < 59*time.Minute || e.Expires > time.Hour {
		t.Errorf("restarted A's element for h3 expires in %v, want what is left of an hour", e.Expires)
	}
	waitKernel(t, b, "B after A's restart", h3)
}

var nothing []string

// TestGatewaySharedStore is StartGateway with etcd: a hole an agent opens
// through the router's gateway is at a second gateway (in a namespace of
// its own) within one watch round trip; the router's gateway, restarted
// after its router lost its table, installs the hole from etcd before any
// agent syncs, and the client's traffic passes.
func TestGatewaySharedStore(t *testing.T) {
	e := startE2E(t)
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	if err := e.gw.Close(); err != nil {
		t.Fatal(err)
	}
	e.cfg.Etcd = cli
	e.start(t)
	second := startShared(t, cli, nstest.NetNS(t))
	ctx := context.Background()
	tcpHole := Target{Proto: "tcp", Peer: client4, Host: server4, Port: auxPort}
	if _, err := e.agent.Open(ctx, Request{Target: tcpHole, User: "alice"}); err != nil {
		t.Fatal(err)
	}
	waitKernel(t, second, "the second gateway", "tcp "+client4+" "+server4+" 40000")

	if err := e.gw.Close(); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("nsenter", "--net="+e.top.router, nstest.Program(t, "nft"), "delete", "table", tname).CombinedOutput()
	if err != nil {
		t.Fatalf("nft delete table: %v\n%s", err, out)
	}
	e.start(t)
	els, err := e.gw.Table().Elements()
	if err != nil || len(els) != 1 || els[0].Key.Target() != tcpHole {
		t.Fatalf("restarted gateway's kernel: %+v, %v; want the hole from etcd", els, err)
	}
	e.mustPass(t, e.top.client, "tcp", net.JoinHostPort(server4, "40000"), "the hole from etcd")
	e.mustBlock(t, e.top.client, "udp", net.JoinHostPort(server4, "40001"), "no hole")
}

// TestGatewayRulesFromEtcd: rules read from etcd, reloaded on change; a
// bad document or a deleted key is refused whole and the old rules stay.
func TestGatewayRulesFromEtcd(t *testing.T) {
	e := startE2E(t)
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	if err := e.gw.Close(); err != nil {
		t.Fatal(err)
	}
	e.cfg.Etcd, e.cfg.RulesFromEtcd = cli, true
	err := nstest.InNS(t, e.top.router, func() (err error) {
		e.cfg.Listener, err = net.Listen("tcp", net.JoinHostPort(routerAPI, "8443"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := StartGateway(e.cfg); err == nil || !strings.Contains(err.Error(), "no such key") {
		t.Fatalf("start without rules in etcd: %v", err)
	}
	e.cfg.Listener.Close()
	ctx := context.Background()
	put := func(v string) {
		t.Helper()
		if _, err := cli.Put(ctx, RulesKey, v); err != nil {
			t.Fatal(err)
		}
	}
	put(e2eRules)
	e.start(t)
	tcpHole := Target{Proto: "tcp", Peer: client4, Host: server4, Port: auxPort}
	udpHole := Target{Proto: "udp", Peer: client4, Host: server4, Port: udpPort}
	if _, err := e.agent.Open(ctx, Request{Target: tcpHole, User: "alice"}); err != nil {
		t.Fatal(err)
	}
	waitLog := func(want string, n int) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); strings.Count(e.log.String(), want) < n; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the gateway did not log %q %d times", want, n)
			}
		}
	}
	put("allow srv1 * * * * self 40000-40100\nbogus line\n")
	waitLog(`"msg":"rules not reloaded; the old rules stay in force"`, 1)
	if !strings.Contains(e.log.String(), rulesName+":2:1") {
		t.Errorf("the refusal does not name the document and line:\n%s", e.log)
	}
	if _, err := e.agent.Open(ctx, Request{Target: udpHole, User: "alice"}); err != nil {
		t.Fatalf("the old rules should still allow the udp hole: %v", err)
	}
	if _, err := cli.Delete(ctx, RulesKey); err != nil {
		t.Fatal(err)
	}
	waitLog("rules deleted from etcd; the old rules stay in force", 1)
	put(e2eRules + "deny * * * " + client4 + " * * *\n")
	waitLog(`"msg":"rules reloaded"`, 1)
	if els, err := e.gw.Table().Elements(); err != nil || len(els) != 0 {
		t.Errorf("holes the new rules deny are still in the kernel: %+v, %v", els, err)
	}
	var apiErr *APIError
	if _, err := e.agent.Open(ctx, Request{Target: tcpHole, User: "alice"}); !errors.As(err, &apiErr) || apiErr.Status != 403 {
		t.Errorf("open under the new rules: %v, want a 403", err)
	}
}
