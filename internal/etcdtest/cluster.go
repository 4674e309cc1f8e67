package etcdtest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// envMember makes the test binary an etcd member (MaybeServe): its value
// is the member's configuration as JSON.
const envMember = "PROCGATE_ETCDTEST_MEMBER"

// served is set by MaybeServe: a binary that does not call it would run
// its tests again in every member it starts.
var served bool

// MaybeServe runs this process as a cluster member when a Cluster started
// it, and exits when the member stops; otherwise it returns at once. Call
// it first in TestMain (and in any other binary that starts a Cluster).
func MaybeServe() {
	served = true
	spec := os.Getenv(envMember)
	if spec == "" {
		return
	}
	var m memberConfig
	if err := json.Unmarshal([]byte(spec), &m); err != nil {
		fmt.Fprintln(os.Stderr, "etcdtest member:", err)
		os.Exit(2)
	}
	// The parent holds stdin open: its end (the parent exited, or was
	// killed) ends the member, so that no member outlives its test. Watched
	// from the start: a member waits for a quorum before it is ready, and
	// one whose parent died then would wait for ever.
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	e, err := m.start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "etcdtest member:", err)
		os.Exit(1)
	}
	select {
	case <-e.Server.ReadyNotify():
		fmt.Println("ready")
	case err := <-e.Err():
		fmt.Fprintln(os.Stderr, "etcdtest member:", err)
		os.Exit(1)
	}
	err = <-e.Err()
	fmt.Fprintln(os.Stderr, "etcdtest member:", err)
	os.Exit(1)
}

// memberConfig is what a member needs to start, the same after a restart.
type memberConfig struct {
	Name string `json:"name"`
	Dir  string `json:"dir"`
	// Client and Peer are the member's listen addresses (127.0.0.1:PORT).
	Client, Peer string
	// InitialCluster is every member's NAME=PEER-URL.
	InitialCluster string `json:"initial_cluster"`
	// Fsync: the bench keeps etcd's fsync; tests skip it (their data
	// lives as long as the test).
	Fsync bool `json:"fsync"`
	// TLS, when set, serves clients over TLS and checks their
	// certificates (the certificate's common name is the etcd user).
	TLS *TLSFiles `json:"tls,omitempty"`
}

// TLSFiles are a member's server certificate and the CA its clients'
// certificates must chain to.
type TLSFiles struct{ CA, Cert, Key string }

func (m memberConfig) scheme() string {
	if m.TLS != nil {
		return "https"
	}
	return "http"
}

func (m memberConfig) embedConfig() *embed.Config {
	client := url.URL{Scheme: m.scheme(), Host: m.Client}
	peer := url.URL{Scheme: "http", Host: m.Peer}
	cfg := embed.NewConfig()
	cfg.Name, cfg.Dir = m.Name, m.Dir
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
	cfg.InitialCluster = m.InitialCluster
	cfg.UnsafeNoFsync = !m.Fsync
	if m.TLS != nil {
		cfg.ClientTLSInfo.CertFile, cfg.ClientTLSInfo.KeyFile = m.TLS.Cert, m.TLS.Key
		cfg.ClientTLSInfo.TrustedCAFile, cfg.ClientTLSInfo.ClientCertAuth = m.TLS.CA, true
	}
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	return cfg
}

// start starts the member; a port freed by a stop can take a moment to be
// bound again.
func (m memberConfig) start() (*embed.Etcd, error) {
	var err error
	for i := 0; i < 50; i++ {
		var e *embed.Etcd
		if e, err = embed.StartEtcd(m.embedConfig()); err == nil {
			return e, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return nil, fmt.Errorf("start etcd member %s: %w", m.Name, err)
}

// Cluster is etcd members on 127.0.0.1, each its own process (the running
// binary again, through MaybeServe), so that a member can be killed as a
// crash kills it, and measured on its own.
type Cluster struct {
	Members []*Member
}

// Member is one member process of a Cluster.
type Member struct {
	cfg memberConfig
	// Endpoint is the member's client URL.
	Endpoint string
	mu       sync.Mutex
	cmd      *exec.Cmd
	stdin    io.Closer
	exited   chan struct{}
}

// ClusterOptions shape NewCluster's members.
type ClusterOptions struct {
	// Members: 3 if zero.
	Members int
	// Dir holds the members' data (a directory each).
	Dir string
	// Fsync keeps etcd's fsync (the bench); tests go without.
	Fsync bool
}

// NewCluster starts a cluster and waits until every member serves (within
// a minute). Close stops it. The binary must call MaybeServe first.
func NewCluster(o ClusterOptions) (*Cluster, error) {
	if !served {
		return nil, errors.New("etcdtest: call etcdtest.MaybeServe() first in TestMain or main: a cluster's members are this binary again")
	}
	n := o.Members
	if n == 0 {
		n = 3
	}
	c := &Cluster{}
	var initial []string
	for i := 0; i < n; i++ {
		m := memberConfig{Name: fmt.Sprintf("m%d", i), Dir: filepath.Join(o.Dir, fmt.Sprintf("m%d", i)), Fsync: o.Fsync}
		var err error
		if m.Client, err = freeAddr(); err == nil {
			m.Peer, err = freeAddr()
		}
		if err != nil {
			return nil, err
		}
		initial = append(initial, m.Name+"=http://"+m.Peer)
		c.Members = append(c.Members, &Member{cfg: m, Endpoint: m.scheme() + "://" + m.Client})
	}
	// Every member starts before any is ready: a new cluster needs a
	// quorum to publish its members.
	ready := make(chan error, n)
	for _, m := range c.Members {
		m.cfg.InitialCluster = strings.Join(initial, ",")
		wait, err := m.spawn()
		if err != nil {
			c.Close()
			return nil, err
		}
		go func() { ready <- wait() }()
	}
	for range c.Members {
		if err := <-ready; err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

// StartCluster is NewCluster for a test: data in its temporary directory,
// stopped at its end.
func StartCluster(t testing.TB, members int) *Cluster {
	t.Helper()
	c, err := NewCluster(ClusterOptions{Members: members, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// Endpoints are the members' client URLs.
func (c *Cluster) Endpoints() []string {
	var out []string
	for _, m := range c.Members {
		out = append(out, m.Endpoint)
	}
	return out
}

// Client is a client of every member, closed at the end of the test.
func (c *Cluster) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	return newClient(t, c.Endpoints())
}

// Leader is the index of the member that leads now, waiting (up to 30s)
// for the members that run to agree on one.
func (c *Cluster) Leader() (int, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		if i, ok := c.leader(); ok {
			return i, nil
		}
		if time.Now().After(deadline) {
			return 0, errors.New("etcd members agree on no leader within 30s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *Cluster) leader() (int, bool) {
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return 0, false
	}
	defer cli.Close()
	lead, agree := uint64(0), 0
	ids := map[uint64]int{}
	for i, m := range c.Members {
		if !m.Running() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := cli.Status(ctx, m.Endpoint)
		cancel()
		if err != nil || st.Leader == 0 || (lead != 0 && st.Leader != lead) {
			return 0, false
		}
		lead, ids[st.Header.MemberId], agree = st.Leader, i, agree+1
	}
	i, ok := ids[lead]
	return i, ok && agree > len(c.Members)/2
}

// Close kills every member.
func (c *Cluster) Close() {
	for _, m := range c.Members {
		m.Kill()
	}
}

// spawn starts the member's process; wait returns once it serves.
func (m *Member) spawn() (wait func() error, err error) {
	defer func() {
		if err != nil {
			err = fmt.Errorf("start etcd member %s: %w", m.cfg.Name, err)
		}
	}()
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	spec, err := json.Marshal(m.cfg)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(m.cfg.Dir, 0o700); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(filepath.Join(filepath.Dir(m.cfg.Dir), m.cfg.Name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), envMember+"="+string(spec))
	cmd.Stderr = logf
	// Its own process group: a signal to the test's group (a ^C) is the
	// parent's to handle; the member ends with the parent's stdin.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan struct{})
	m.mu.Lock()
	m.cmd, m.stdin, m.exited = cmd, stdin, exited
	m.mu.Unlock()
	readyc := make(chan bool, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		readyc <- line == "ready\n"
		_, _ = io.Copy(io.Discard, stdout)
		_ = cmd.Wait()
		close(exited)
	}()
	return func() error {
		select {
		case ok := <-readyc:
			if ok {
				return nil
			}
		case <-time.After(time.Minute):
		}
		m.Kill()
		log, _ := os.ReadFile(logf.Name())
		return fmt.Errorf("etcd member %s did not serve within a minute: %s", m.cfg.Name, log)
	}, nil
}

// Kill ends the member at once (SIGKILL, as a crash would); its data
// stays for Restart.
func (m *Member) Kill() {
	m.mu.Lock()
	cmd, stdin, exited := m.cmd, m.stdin, m.exited
	m.cmd = nil
	m.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	stdin.Close()
	<-exited
}

// Restart starts a killed member again with its data, and waits until it
// serves (which needs a quorum with it).
func (m *Member) Restart() error {
	if m.Running() {
		return nil
	}
	wait, err := m.spawn()
	if err != nil {
		return err
	}
	return wait()
}

// Running: the member's process runs.
func (m *Member) Running() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.cmd != nil
}

// Pid is the member's process (0 when killed).
func (m *Member) Pid() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return 0
	}
	return m.cmd.Process.Pid
}

// DataDir is the member's data directory.
func (m *Member) DataDir() string { return m.cfg.Dir }
