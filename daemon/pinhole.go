package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/pinhole"
	"github.com/procgate/procgate/pki"
	"github.com/procgate/procgate/ruleset"
)

// pinholes is the pinhole agent of a daemon started with --gateway.
type pinholes struct {
	gateway *perimeter.Failover
	kernel  *pinhole.Kernel
	agent   *pinhole.Agent
	metrics *pinholeMetrics
	// mu guards seq and apps, held only to read or set them. send orders
	// the agent's app updates (the last policy wins) and is held across
	// the agent's SetApps, which may wait a minute for the gateway: the
	// reconciler never takes it, so a slow gateway does not hold up the
	// next generation. Lock order: send, then mu.
	mu   sync.Mutex
	send sync.Mutex
	seq  uint64
	apps []pinhole.App
	// ctx and wg are Run's: the goroutines that send the agent its apps
	// end with the daemon, and Run waits for them.
	ctx context.Context
	wg  *sync.WaitGroup
}

// startPinholes attaches the observation and host guard and runs the agent
// until ctx ends or stop is called. Without --gateway it does nothing: no
// dynamic app gets a hole, and their auxiliary ports are not guarded on
// the host. stop ends the agent and then closes the kernel's handles: Run
// calls it once the reconciler, which writes the kernel's apps
// (setPinholeApps), has returned.
func (d *Daemon) startPinholes(ctx context.Context, wg *sync.WaitGroup) (stop func(), err error) {
	if d.cfg.GatewayURL == "" {
		return func() {}, nil
	}
	tlsConf, err := pki.ClientConfig(pki.Files{Cert: d.cfg.GatewayCert, Key: d.cfg.GatewayKey, CA: d.cfg.GatewayCA})
	if err != nil {
		return nil, fmt.Errorf("pinhole agent: %w", err)
	}
	urls, err := gatewayURLs(d.cfg.GatewayURL)
	if err != nil {
		return nil, err
	}
	gw, err := perimeter.NewFailover(urls, tlsConf, d.log)
	if err != nil {
		return nil, fmt.Errorf("pinhole agent: %w", err)
	}
	k, err := pinhole.OpenKernel(d.cfg.BPFDir, d.cfg.CgroupRoot, d.log)
	if err != nil {
		return nil, err
	}
	// A starting agent holds no hole, so the host guard lets nobody in
	// until the gateway has opened one again.
	if err := k.Reset(); err != nil {
		k.Close()
		return nil, fmt.Errorf("reset host guard: %w", err)
	}
	ph := &pinholes{gateway: gw, kernel: k, metrics: &pinholeMetrics{drops: k.Drops, held: k.Held}, ctx: ctx, wg: wg}
	_, apps := pinholeApps(d.current().bindings)
	namedPath := filepath.Join(d.cfg.StateDir, "pinhole-named.json")
	named, err := loadNamedPeers(namedPath)
	if err != nil {
		// Named peers are a convenience of the apps: a bad file costs them
		// their namings, never the daemon its start.
		d.log.Warn("named peers of the last run dropped", "err", err)
	}
	ph.agent = pinhole.New(pinhole.Config{
		Named: named, SaveNamed: func(ps []pinhole.NamedPeer) error { return writeJSON(namedPath, ps) },
		Apps:    apps,
		Gateway: gw, Guard: k, Source: k, Log: d.log,
		Notify: d.notePinhole, Initial: k.Snapshot,
		StaleAfter: max(d.cfg.PinholeIdle, 0), Uses: k.Uses,
	})
	ph.metrics.counts = ph.agent.Counts
	// Before the API serves and the reconciler runs: on the reconciler's
	// goroutine, as setPinholeApps wants.
	d.ph = ph
	err = d.setPinholeApps(d.current().bindings)
	if err != nil {
		k.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	ran := make(chan struct{})
	go func() {
		defer close(ran)
		if err := ph.agent.Run(ctx); err != nil && ctx.Err() == nil {
			d.log.Error("pinhole agent stopped", "err", err)
		}
	}()
	d.log.Info("pinhole agent started", "gateway", d.cfg.GatewayURL)
	return func() {
		cancel()
		<-ran
		// Ends the agent's event reader; the API's and the metrics'
		// calls still under way finish first, later ones fail.
		k.Close()
	}, nil
}

// gatewayURLs splits --gateway into the site's gateways, each
// https://HOST:PORT.
func gatewayURLs(s string) ([]string, error) {
	var urls []string
	for i, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		u, err := url.Parse(item)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return nil, fmt.Errorf("--gateway item %d %q: want https://HOST:PORT (several gateways of one site: comma-separated)", i+1, item)
		}
		urls = append(urls, item)
	}
	return urls, nil
}

// loadNamedPeers reads the named peers an earlier run saved (none if the
// file does not exist).
func loadNamedPeers(path string) ([]pinhole.NamedPeer, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read named peers: %w", err)
	}
	var ps []pinhole.NamedPeer
	if err := json.Unmarshal(data, &ps); err != nil {
		return nil, fmt.Errorf("parse named peers %s: %w", path, err)
	}
	return ps, nil
}

// dynamicBinding is an app with inbound: dynamic and where it lives (a
// launched app's cgroup; 0 for an app with match:).
type dynamicBinding struct {
	app      ruleset.App
	id       uint32
	cgroupID uint64
}

// setPinholeApps tells the kernel (now) and the agent (in the background:
// it may be talking to the gateway) which apps are dynamic. Reconciler
// only.
func (d *Daemon) setPinholeApps(bs []dynamicBinding) error {
	ph := d.ph
	if ph == nil {
		return nil
	}
	kb, apps := pinholeApps(bs)
	if err := ph.kernel.SetApps(kb); err != nil {
		return err
	}
	ph.mu.Lock()
	ph.seq++
	seq := ph.seq
	ph.apps = apps
	ph.mu.Unlock()
	ph.wg.Add(1)
	go func() {
		defer ph.wg.Done()
		ph.send.Lock()
		defer ph.send.Unlock()
		ph.mu.Lock()
		latest, apps := ph.seq, ph.apps
		ph.mu.Unlock()
		if latest != seq {
			return // a newer policy's apps follow
		}
		ctx, cancel := context.WithTimeout(ph.ctx, time.Minute)
		defer cancel()
		if err := ph.agent.SetApps(ctx, apps); err != nil && ph.ctx.Err() == nil {
			d.log.Warn("pinhole agent did not take the new apps", "err", err)
		}
	}()
	return nil
}

func pinholeApps(bs []dynamicBinding) (kb []pinhole.Binding, apps []pinhole.App) {
	for _, b := range bs {
		kb = append(kb, pinhole.Binding{AppID: b.id, CgroupID: b.cgroupID, Inbound: b.app.Inbound})
		apps = append(apps, pinhole.App{Name: b.app.Name, ID: b.id, Inbound: b.app.Inbound})
	}
	return kb, apps
}

// notePinhole writes the agent's opens, closes and refusals to the audit log.
func (d *Daemon) notePinhole(n pinhole.Notice) {
	if ph := d.ph; ph != nil {
		ph.metrics.note(n.Action)
	}
	if d.auditor == nil {
		return
	}
	// Best effort, as for kernel events: the process may be gone.
	comm, _ := os.ReadFile("/proc/" + strconv.FormatUint(uint64(n.PID), 10) + "/comm")
	exe, _ := os.Readlink("/proc/" + strconv.FormatUint(uint64(n.PID), 10) + "/exe")
	d.auditor.Append(audit.Record{
		Verdict: n.Action, Reason: n.Reason, App: n.App, PID: n.PID, UID: n.UID, Hook: "pinhole", Rule: n.Rule,
		Comm: strings.ToValidUTF8(strings.TrimSpace(string(comm)), "\uFFFD"), Exe: strings.ToValidUTF8(exe, "\uFFFD"),
		Dest: n.Key.Peer.String() + " -> " + netip.AddrPortFrom(n.Key.Host, n.Key.Port).String() + "/" + n.Key.Proto.String(),
		Kind: audit.KindPinhole,
		Pinhole: &audit.Pinhole{Proto: n.Key.Proto.String(), Peer: n.Key.Peer.String(), Host: n.Key.Host.String(),
			Port: n.Key.Port, User: n.User},
	})
}

// pinholeOpen serves `procgate pinhole open`: the caller's app (by its
// cgroup, from the socket's peer credentials) names a peer for one of its
// auxiliary ports.
func (d *Daemon) pinholeOpen(ctx context.Context, p peer, req api.Request) (*api.Pinhole, error) {
	if d.ph == nil {
		return nil, errors.New("the pinhole agent is off: start the daemon with --gateway URL")
	}
	cur := d.current()
	name, err := d.appOfPID(cur, int(p.pid))
	if err != nil {
		return nil, err
	}
	app := cur.effective().App(name)
	var in *ruleset.Inbound
	if app != nil {
		in = app.Inbound
	}
	id := cur.appIDs[name]
	switch {
	case name == "":
		return nil, fmt.Errorf("caller pid %d is in no app: run it with `procgate run --app NAME`", p.pid)
	case in == nil:
		return nil, fmt.Errorf("app %s has no inbound: dynamic in the policy", name)
	}
	proto := perimeter.TCP
	if in.Proto == ruleset.UDP {
		proto = perimeter.UDP
	}
	if req.Proto != "" {
		if proto, err = perimeter.ParseProto(req.Proto); err != nil {
			return nil, fmt.Errorf("proto: %w", err)
		}
	}
	if req.Port < 1 || req.Port > 65535 {
		return nil, fmt.Errorf("port: want 1-65535, got %d", req.Port)
	}
	port := uint16(req.Port)
	set := ruleset.TCP
	if proto == perimeter.UDP {
		set = ruleset.UDP
	}
	if !in.IsAux(set, port) {
		return nil, fmt.Errorf("port %d/%s is not an auxiliary port of app %s (policy: inbound.dynamic.ports)", port, proto, name)
	}
	peerAddr, err := netip.ParseAddr(req.Peer)
	if err != nil || peerAddr.Zone() != "" {
		return nil, fmt.Errorf("peer: %q is not one IP address (a hole is for one peer, never a network or any)", req.Peer)
	}
	peerAddr = peerAddr.Unmap()
	host, err := localAddrFor(peerAddr, port)
	if err != nil {
		return nil, err
	}
	st, err := d.ph.agent.Open(ctx, id, uint32(p.pid), p.uid, peerAddr, host, proto, port)
	if err != nil {
		return nil, err
	}
	out := toAPIPinhole(st)
	return &out, nil
}

// localAddrFor is the address this host sends from to peer: the host
// address of a hole for it. A UDP "connect" only looks up the route.
func localAddrFor(peer netip.Addr, port uint16) (netip.Addr, error) {
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(peer, port)))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("no route to peer %s: %w", peer, err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap(), nil
}

func toAPIPinhole(s pinhole.Status) api.Pinhole {
	return api.Pinhole{App: s.App, User: s.User, PID: s.PID, Proto: s.Proto.String(), Peer: s.Peer.String(), Host: s.Host.String(),
		Port: s.Port, State: s.State, Reason: s.Reason, Opened: s.Opened, Expires: s.Expires, Packets: s.Packets, Bytes: s.Bytes}
}

func (d *Daemon) listPinholes(ctx context.Context) ([]api.Pinhole, error) {
	if d.ph == nil {
		return nil, errors.New("the pinhole agent is off: start the daemon with --gateway URL")
	}
	hs, err := d.ph.agent.Holes(ctx)
	if err != nil {
		return nil, err
	}
	out := []api.Pinhole{}
	for _, h := range hs {
		out = append(out, toAPIPinhole(h))
	}
	return out, nil
}

func (d *Daemon) pinholeStatus(ctx context.Context) *api.PinholeAgent {
	if d.ph == nil {
		return nil
	}
	st := &api.PinholeAgent{Gateway: d.ph.gateway.Current()}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st.Open, st.Pending, st.Refused, _ = d.ph.agent.Counts(ctx)
	st.GuardDrops, _ = d.ph.kernel.Drops()
	st.Held, _ = d.ph.kernel.Held()
	return st
}
