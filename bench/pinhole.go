package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/pki"
)

// The pinhole phase measures issue 6's three numbers on the perimeter
// gateway: how long until a hole is live, how many hole updates per
// second the router takes (batched and one at a time), and what a 100 MB
// transfer through a hole costs against a router without any firewall.
const phasePinhole = "pinhole"

// pinholeResult is the phase's part of results.json.
type pinholeResult struct {
	// OpenHow says where the open latency starts and ends.
	OpenHow     string  `json:"open_how"`
	OpenLatency summary `json:"open_latency"`
	// OpenLive counts sampled opens whose element was in the kernel when
	// the request returned (of OpenChecked).
	OpenLive    int `json:"open_live"`
	OpenChecked int `json:"open_checked"`
	// BindLatency is the whole chain's: from an app's bind() to the hole
	// in the router's kernel (a quarter as many holes as OpenLatency).
	BindHow     string  `json:"bind_how,omitempty"`
	BindLatency summary `json:"bind_latency"`
	// BindPollUS is the median delay of the nftables monitor that tells
	// when a hole is live (from the gateway's answer to the event), part
	// of the bind → live numbers; the name is from when the set was
	// polled.
	BindPollUS float64      `json:"bind_poll_us"`
	Updates    []updateRate `json:"updates"`
	Transfer   *transferRes `json:"transfer,omitempty"`
}

// updateRate is one way of changing holes: Path "netlink" is the
// gateway's Table.Update (one nftables transaction per batch, opening and
// closing in turn); "api" is the agent's view over mTLS: Open per hole
// (batch 1), or Sync of a whole set (batch N: N holes opened and N closed
// per request).
type updateRate struct {
	Path     string  `json:"path"`
	Batch    int     `json:"batch"`
	Existing int     `json:"existing"`
	Updates  int64   `json:"updates"`
	Seconds  float64 `json:"seconds"`
	PerSec   float64 `json:"updates_per_second"`
}

// transferRes is the transfer-time overhead: seconds per round and lane.
// "open" and "control" route through a router without any nftables table
// (control is the A/A check of the two lanes' noise); "stateful" through a
// wide-open stateful firewall (policy accept, conntrack on: what a router
// that tracks connections pays anyway); "pinhole" through the gateway's
// table, default drop for the server's range, the transfer let in by one
// hole.
type transferRes struct {
	Bytes          int64     `json:"bytes"`
	Open           []float64 `json:"open_seconds"`
	Control        []float64 `json:"control_seconds"`
	Stateful       []float64 `json:"stateful_seconds"`
	Pinhole        []float64 `json:"pinhole_seconds"`
	MedianOpen     float64   `json:"median_open_seconds"`
	MedianStateful float64   `json:"median_stateful_seconds"`
	MedianPinhole  float64   `json:"median_pinhole_seconds"`
	// Ratio, RatioOpen and AARatio are medians over rounds of
	// pinhole/stateful, pinhole/open and control/open in the same round.
	Ratio     float64 `json:"ratio"`
	RatioOpen float64 `json:"ratio_to_no_firewall"`
	AARatio   float64 `json:"aa_ratio"`
	// RatioCI and AACI are 95% bootstrap intervals of those medians: what
	// this machine's noise lets the run tell apart.
	RatioCI [2]float64 `json:"ratio_ci95"`
	AACI    [2]float64 `json:"aa_ratio_ci95"`
	Spread  float64    `json:"round_spread"`
	// HolePackets is the hole's counter after the rounds: the transfers
	// went through it.
	HolePackets uint64 `json:"hole_packets"`
	// Dropped counts a probe to a port without a hole, dropped by the
	// pinhole lane's router: it does filter.
	Dropped uint64 `json:"probe_dropped"`
}

// The pinhole site in each lane, as in the tests (nstest.Site).
var (
	phClient   = netip.MustParsePrefix("198.51.100.10/24")
	phClientGW = netip.MustParsePrefix("198.51.100.1/24")
	phServer   = netip.MustParsePrefix("10.9.0.5/24")
	phServerGW = netip.MustParsePrefix("10.9.0.1/24")
	phProtect  = netip.MustParsePrefix("10.9.0.0/24")
	phAnyV4    = netip.MustParsePrefix("0.0.0.0/0")
)

const (
	phDataPort   = 40000 // the transfer's aux port
	phProbePort  = 40001 // no hole: the probe that shows the router filters
	phOpenPorts  = 41000 // open latency uses 41000-41999
	phAPIPortMin = 42000 // API batches use 42000-45999
)

// phLanes are the transfer's lanes (see transferRes).
var phLanes = []string{"open", "control", "stateful", "pinhole"}

// phStateful is the stateful lane's wide-open firewall.
const phStateful = `table inet bench_stateful {
	chain forward {
		type filter hook forward priority filter; policy accept;
		ct state established,related accept
	}
}
`

// phRules let srv1 open holes to itself, and keep the binder's control
// port open as a service.
const phRules = `host srv1 10.9.0.5
allow srv1 * * * * self 40000-49999
service srv1 tcp 4600
`

// phLane is client — router — server, in namespaces of their own.
type phLane struct {
	name, client, router, server string
}

func (b *bench) phLane(nsg *netnsGroup, name string) (*phLane, error) {
	l := &phLane{name: name}
	for _, p := range []*string{&l.client, &l.router, &l.server} {
		ns, err := nsg.newNetNS("ph-" + name)
		if err != nil {
			return nil, err
		}
		*p = ns
	}
	if err := vethNamed(l.client, "eth0", l.router, "to-client", phClient, phClientGW); err != nil {
		return nil, err
	}
	if err := vethNamed(l.server, "eth0", l.router, "to-server", phServer, phServerGW); err != nil {
		return nil, err
	}
	if err := routeVia(l.client, phClientGW.Addr(), phAnyV4); err != nil {
		return nil, err
	}
	if err := routeVia(l.server, phServerGW.Addr(), phAnyV4); err != nil {
		return nil, err
	}
	return l, writeSysctl(l.router, "net/ipv4/ip_forward", "1")
}

// dialFrom dials from the namespace ns; the socket stays there.
func dialFrom(ns, network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := inNS(ns, func() (err error) {
		c, err = net.DialTimeout(network, addr, timeout)
		return err
	})
	return c, err
}

// phGateway is the pinhole lane's gateway and its clients.
type phGateway struct {
	gw  *perimeter.Gateway
	url string
	ca  *pki.CA
	// agent has srv1's certificate (the server's agent) and dials from
	// the server.
	agent *perimeter.Client
}

// issuePair issues a certificate of ca valid for the bench's run.
func issuePair(ca *pki.CA, r pki.IssueRequest) (tls.Certificate, error) {
	r.Validity = 2 * time.Hour
	iss, err := ca.Issue(r)
	if err != nil {
		return tls.Certificate{}, err
	}
	return iss.Pair()
}

// phStartGateway runs the perimeter gateway in the lane's router with an
// in-memory PKI.
func (b *bench) phStartGateway(l *phLane) (*phGateway, error) {
	ca, err := pki.NewCA("bench CA", 2*time.Hour)
	if err != nil {
		return nil, err
	}
	pair := func(r pki.IssueRequest) (tls.Certificate, error) { return issuePair(ca, r) }
	gwCert, err := pair(pki.IssueRequest{Name: "gateway", Usage: pki.Server, Hosts: []string{phServerGW.Addr().String()}})
	if err != nil {
		return nil, err
	}
	rules := filepath.Join(b.host.dir, "pinhole.rules")
	if err := os.WriteFile(rules, []byte(phRules), 0o600); err != nil {
		return nil, err
	}
	var ln net.Listener
	err = inNS(l.router, func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(phServerGW.Addr().String(), "8443"))
		return err
	})
	if err != nil {
		return nil, err
	}
	gw, err := perimeter.StartGateway(perimeter.GatewayConfig{
		RulesPath: rules, Listener: ln, Protect: []netip.Prefix{phProtect}, NetNS: l.router,
		TLS: pki.ServerTLS(gwCert, ca.Pool()), Lease: time.Minute,
		Log: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		ln.Close()
		return nil, err
	}
	b.host.undo.push(gw.Close)
	g := &phGateway{gw: gw, url: "https://" + ln.Addr().String(), ca: ca}
	for _, c := range []struct {
		name string
		to   **perimeter.Client
	}{{"srv1", &g.agent}} {
		cert, err := pair(pki.IssueRequest{Name: c.name, Usage: pki.Client})
		if err != nil {
			return nil, err
		}
		cl := perimeter.NewClient(g.url, pki.ClientTLS(cert, ca.Pool()))
		cl.HTTP.Transport.(*http.Transport).DialContext = func(_ context.Context, network, addr string) (net.Conn, error) {
			return dialFrom(l.server, network, addr, 10*time.Second)
		}
		*c.to = cl
	}
	return g, nil
}

func (b *bench) pinholePhase(ctx context.Context) error {
	nsg := &netnsGroup{h: b.host}
	defer nsg.close()
	res := &pinholeResult{}
	b.res.Pinhole = res
	lanes := map[string]*phLane{}
	for _, name := range phLanes {
		l, err := b.phLane(nsg, name)
		if err != nil {
			return fmt.Errorf("lane %s: %w", name, err)
		}
		lanes[name] = l
	}
	g, err := b.phStartGateway(lanes["pinhole"])
	if err != nil {
		return fmt.Errorf("gateway: %w", err)
	}
	gw, agent := g.gw, g.agent
	if _, err := nsRun(lanes["stateful"].router, []byte(phStateful), "nft", "-f", "-"); err != nil {
		return fmt.Errorf("stateful lane: %w", err)
	}
	if err := b.phOpenLatency(ctx, res, gw, agent); err != nil {
		return fmt.Errorf("open latency: %w", err)
	}
	if err := b.phBindLatency(ctx, res, lanes["pinhole"], g); err != nil {
		if ctx.Err() != nil {
			return err
		}
		// Until the server agent is wired into the daemon, this part has
		// nothing to run: say so, and measure the rest.
		b.res.Notes = append(b.res.Notes, "pinhole: bind → live latency not measured: "+err.Error())
		b.log.Warn("pinhole bind latency not measured", "error", err.Error())
	}
	if err := b.phAPIBatches(ctx, res, agent); err != nil {
		return fmt.Errorf("api updates: %w", err)
	}
	if err := b.phTableUpdates(ctx, res, nsg); err != nil {
		return fmt.Errorf("netlink updates: %w", err)
	}
	if err := b.phTransfer(ctx, res, lanes, gw, agent); err != nil {
		return fmt.Errorf("transfer: %w", err)
	}
	return nil
}

func phTarget(port int) perimeter.Target {
	return perimeter.Target{Proto: "tcp", Peer: phClient.Addr().String(), Host: phServer.Addr().String(), Port: port}
}

// phOpenLatency opens holes one at a time as an agent does and times each
// request: it returns once the gateway's transaction is in the kernel, so
// the hole is live then (checked on a sample by listing the set).
func (b *bench) phOpenLatency(ctx context.Context, res *pinholeResult, gw *perimeter.Gateway, agent *perimeter.Client) error {
	res.OpenHow = "agent's API request to the gateway (mTLS over the server's link) until the answer: the hole's nftables transaction is committed before the gateway answers"
	var s samples
	var round []uint32
	var opened []perimeter.Target
	var total time.Duration
	for i := range b.cfg.PinholeOpens {
		if err := ctx.Err(); err != nil {
			return err
		}
		t := phTarget(phOpenPorts + i%1000)
		t0 := time.Now()
		if _, err := agent.Open(ctx, perimeter.Request{Target: t, User: "bench"}); err != nil {
			return err
		}
		d := time.Since(t0)
		total += d
		round = append(round, uint32(min(d.Nanoseconds(), 1<<32-1)))
		opened = append(opened, t)
		if i%25 == 0 {
			res.OpenChecked++
			els, err := gw.Table().Elements()
			if err != nil {
				return err
			}
			if slices.ContainsFunc(els, func(e perimeter.Element) bool { return e.Key.Target() == t }) {
				res.OpenLive++
			}
		}
		if len(round) == 100 || i == b.cfg.PinholeOpens-1 {
			s.add(response{Latencies: round})
			round = nil
			if _, err := agent.Close(ctx, opened); err != nil {
				return err
			}
			opened = nil
		}
	}
	res.OpenLatency = s.summary()
	res.Updates = append(res.Updates, updateRate{Path: "api", Batch: 1, Updates: int64(b.cfg.PinholeOpens),
		Seconds: round3(total.Seconds()), PerSec: ratio(float64(b.cfg.PinholeOpens), total.Seconds())})
	if res.OpenLive != res.OpenChecked {
		return fmt.Errorf("%d of %d sampled holes were not in the kernel when the gateway answered", res.OpenChecked-res.OpenLive, res.OpenChecked)
	}
	return nil
}

// phAPIBatches syncs the agent's holes between two disjoint sets of n for
// a while: each request opens n holes and closes n in one transaction.
func (b *bench) phAPIBatches(ctx context.Context, res *pinholeResult, agent *perimeter.Client) error {
	const n = 1000
	sets := [2][]perimeter.Request{}
	for k := range sets {
		for i := range n {
			sets[k] = append(sets[k], perimeter.Request{Target: phTarget(phAPIPortMin + k*n + i), User: "bench"})
		}
	}
	if _, err := agent.Sync(ctx, sets[0]); err != nil {
		return err
	}
	var updates int64
	t0 := time.Now()
	for k := 1; time.Since(t0) < b.cfg.UpdateDuration; k++ {
		r, err := agent.Sync(ctx, sets[k%2])
		if err != nil {
			return err
		}
		if len(r.Holes) != n || len(r.Closed) != n {
			return fmt.Errorf("sync: %d holes, %d closed; want %d and %d", len(r.Holes), len(r.Closed), n, n)
		}
		updates += 2 * n
	}
	secs := time.Since(t0).Seconds()
	res.Updates = append(res.Updates, updateRate{Path: "api", Batch: n, Updates: updates, Seconds: round3(secs), PerSec: ratio(float64(updates), secs)})
	_, err := agent.Sync(ctx, nil)
	return err
}

// phKeys makes n distinct holes into 10.9.0.0/16 from 198.18.0.0/15.
func phKeys(n, offset int) []perimeter.Key {
	keys := make([]perimeter.Key, n)
	for i := range keys {
		j := i + offset
		keys[i] = perimeter.Key{
			Peer:  netip.AddrFrom4([4]byte{198, 18 + byte(j>>24&1), byte(j >> 16), byte(j >> 8)}),
			Proto: perimeter.TCP,
			Host:  netip.AddrFrom4([4]byte{10, 9, byte(j), 1}),
			Port:  uint16(1024 + j%60000),
		}
	}
	return keys
}

func phElements(keys []perimeter.Key) []perimeter.Element {
	els := make([]perimeter.Element, len(keys))
	for i, k := range keys {
		els[i] = perimeter.Element{Key: k, Timeout: time.Hour, Comment: "procgate d=bench u=bench"}
	}
	return els
}

// phTableUpdates opens and closes holes in the gateway's table in
// transactions of each batch size, with an empty set and (full run) with
// 100,000 other holes in it, in a namespace of its own.
func (b *bench) phTableUpdates(ctx context.Context, res *pinholeResult, nsg *netnsGroup) error {
	for _, existing := range b.cfg.UpdateExisting {
		ns, err := nsg.newNetNS("ph-updates")
		if err != nil {
			return err
		}
		tab, err := perimeter.OpenTable(perimeter.TableConfig{NetNS: ns, Name: "procgate_bench", Protect: []netip.Prefix{phProtect}})
		if err != nil {
			return err
		}
		err = func() error {
			defer tab.Close()
			if existing > 0 {
				if err := tab.Update(phElements(phKeys(existing, 1<<20)), nil); err != nil {
					return fmt.Errorf("fill %d holes: %w", existing, err)
				}
			}
			for _, batch := range b.cfg.UpdateBatches {
				if err := ctx.Err(); err != nil {
					return err
				}
				keys := phKeys(batch, 0)
				add := phElements(keys)
				var updates int64
				t0 := time.Now()
				for i := 0; time.Since(t0) < b.cfg.UpdateDuration || i%2 == 1; i++ {
					if i%2 == 0 {
						err = tab.Update(add, nil)
					} else {
						err = tab.Update(nil, keys)
					}
					if err != nil {
						return fmt.Errorf("batch of %d: %w", batch, err)
					}
					updates += int64(batch)
				}
				secs := time.Since(t0).Seconds()
				res.Updates = append(res.Updates, updateRate{Path: "netlink", Batch: batch, Existing: existing,
					Updates: updates, Seconds: round3(secs), PerSec: ratio(float64(updates), secs)})
				b.log.Debug("pinhole updates", "batch", batch, "existing", existing, "per_s", int(float64(updates)/secs))
			}
			return nil
		}()
		if err != nil {
			return err
		}
	}
	return nil
}

// phServe serves Bytes of random data on every connection to the lane's
// server port until the phase ends.
func (b *bench) phServe(l *phLane, data []byte, size int64) (func(), error) {
	var ln net.Listener
	err := inNS(l.server, func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(phServer.Addr().String(), strconv.Itoa(phDataPort)))
		return err
	})
	if err != nil {
		return nil, err
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			for left := size; left > 0; {
				n, err := c.Write(data[:min(int64(len(data)), left)])
				if err != nil {
					break
				}
				left -= int64(n)
			}
			c.Close()
		}
	}()
	return func() { ln.Close(); wg.Wait() }, nil
}

// phFetch downloads from the lane's server and returns the seconds from
// connect to the last byte.
func phFetch(l *phLane, size int64) (float64, error) {
	t0 := time.Now()
	c, err := dialFrom(l.client, "tcp", net.JoinHostPort(phServer.Addr().String(), strconv.Itoa(phDataPort)), 10*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	n, err := io.Copy(io.Discard, c)
	secs := time.Since(t0).Seconds()
	if err == nil && n != size {
		err = fmt.Errorf("got %d bytes of %d", n, size)
	}
	return secs, err
}

// phTransfer times TransferBytes downloads in every lane, rounds
// interleaved and each round in a rotated order.
func (b *bench) phTransfer(ctx context.Context, res *pinholeResult, lanes map[string]*phLane, gw *perimeter.Gateway, agent *perimeter.Client) error {
	size := b.cfg.TransferBytes
	data := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{6}).Read(data)
	names := phLanes
	for _, n := range names {
		stop, err := b.phServe(lanes[n], data, size)
		if err != nil {
			return err
		}
		defer stop()
	}
	// The router of the pinhole lane filters: a port without a hole is
	// dropped (and counted).
	before, err := gw.Table().Dropped()
	if err != nil {
		return err
	}
	if c, err := dialFrom(lanes["pinhole"].client, "tcp", net.JoinHostPort(phServer.Addr().String(), strconv.Itoa(phProbePort)), 300*time.Millisecond); err == nil {
		c.Close()
		return errors.New("the pinhole lane's router let a connection through without a hole")
	}
	after, err := gw.Table().Dropped()
	if err != nil {
		return err
	}
	tr := &transferRes{Bytes: size, Dropped: after - before}
	if tr.Dropped == 0 {
		return errors.New("the pinhole lane's router dropped nothing for a port without a hole")
	}
	hole := phTarget(phDataPort)
	secs := map[string]*[]float64{"open": &tr.Open, "control": &tr.Control, "stateful": &tr.Stateful, "pinhole": &tr.Pinhole}
	for r := range b.cfg.TransferRounds + 1 {
		if err := ctx.Err(); err != nil {
			return err
		}
		// Opening again renews the lease: the hole lasts the phase.
		if _, err := agent.Open(ctx, perimeter.Request{Target: hole, User: "bench"}); err != nil {
			return err
		}
		for k := range names {
			n := names[(r+k)%len(names)]
			s, err := phFetch(lanes[n], size)
			if err != nil {
				return fmt.Errorf("lane %s: %w", n, err)
			}
			if r > 0 { // round 0 warms up
				*secs[n] = append(*secs[n], math.Round(s*1e6)/1e6)
			}
		}
	}
	holes, err := agent.List(ctx)
	if err != nil {
		return err
	}
	for _, h := range holes {
		if h.Key.Target() == hole {
			tr.HolePackets = h.Packets
		}
	}
	if tr.HolePackets == 0 {
		return errors.New("the transfers did not go through the hole (its counter is 0)")
	}
	med := func(v []float64) float64 { return quantileF(slices.Sorted(slices.Values(v)), 0.5) }
	tr.MedianOpen, tr.MedianStateful, tr.MedianPinhole = med(tr.Open), med(tr.Stateful), med(tr.Pinhole)
	tr.Ratio, tr.RatioOpen = pairedRatio(tr.Pinhole, tr.Stateful), pairedRatio(tr.Pinhole, tr.Open)
	tr.AARatio = pairedRatio(tr.Control, tr.Open)
	tr.RatioCI, tr.AACI = medianCI(roundRatios(tr.Pinhole, tr.Stateful)), medianCI(roundRatios(tr.Control, tr.Open))
	tr.Spread = spread(tr.Open)
	res.Transfer = tr
	return nil
}

// medianCI is a 95% percentile-bootstrap interval of the median of vs
// (fixed seed: the same data give the same interval).
func medianCI(vs []float64) [2]float64 {
	if len(vs) == 0 {
		return [2]float64{}
	}
	rng := rand.New(rand.NewPCG(6, 6))
	const resamples = 2000
	meds := make([]float64, resamples)
	buf := make([]float64, len(vs))
	for i := range meds {
		for j := range buf {
			buf[j] = vs[rng.IntN(len(vs))]
		}
		slices.Sort(buf)
		meds[i] = quantileF(buf, 0.5)
	}
	slices.Sort(meds)
	return [2]float64{round3(quantileF(meds, 0.025)), round3(quantileF(meds, 0.975))}
}

// pinholeTargets judges issue 6's goals on this run.
func (r *results) pinholeTargets() []targetResult {
	p := r.Pinhole
	upd := targetResult{Name: "pinhole updates", Target: "≥ 100,000 hole updates/s with batching (seed 003: 10,000/s on iptables)"}
	xfer := targetResult{Name: "transfer through a pinhole", Target: "100 MB transfer time within +1% of a wide-open (stateful, accept-all) firewall"}
	if p == nil {
		return []targetResult{upd, xfer}
	}
	var best, one updateRate
	for _, u := range p.Updates {
		if u.Path == "netlink" && u.Existing == 0 {
			if u.PerSec > best.PerSec {
				best = u
			}
			if u.Batch == 1 {
				one = u
			}
		}
	}
	if best.Batch > 0 {
		upd.Value = fmt.Sprintf("%.0f/s in transactions of %d (one at a time: %.0f/s)", best.PerSec, best.Batch, one.PerSec)
		upd.Met = boolp(best.PerSec >= 100_000)
		if !*upd.Met {
			upd.Gap = fmt.Sprintf("%.0f/s short", 100_000-best.PerSec)
		}
	}
	if t := p.Transfer; t != nil && len(t.Open) > 0 {
		xfer.Value = fmt.Sprintf("%s (%.4f s vs %.4f s median); against no firewall at all %s; A/A control of two unfiltered lanes %s",
			pct(t.Ratio), t.MedianPinhole, t.MedianStateful, pct(t.RatioOpen), pct(t.AARatio))
		xfer.Met = boolp(t.Ratio <= 1.01)
		if !*xfer.Met {
			xfer.Gap = fmt.Sprintf("%.1f points over", (t.Ratio-1.01)*100)
			// Two identical lanes' median ratio strays this far from 1 in
			// this run: a miss by less is one the run cannot tell from
			// noise, and says so (still a miss).
			if aa := math.Max(math.Abs(t.AACI[0]-1), math.Abs(t.AACI[1]-1)); t.Ratio-1.01 <= aa {
				xfer.Gap += fmt.Sprintf(", within the A/A control's noise (its median ratio's 95%% interval reaches %.1f%% from even)", aa*100)
			}
		}
		xfer.Why = fmt.Sprintf("%d rounds; 95%% interval of the median ratio %s to %s, of the A/A control %s to %s (spread of the open lane %.0f%%)",
			len(t.Open), pct(t.RatioCI[0]), pct(t.RatioCI[1]), pct(t.AACI[0]), pct(t.AACI[1]), t.Spread*100)
	}
	return []targetResult{upd, xfer}
}

func (r *results) pinholeSection(w func(string, ...any)) {
	p := r.Pinhole
	if p == nil {
		return
	}
	w("## Pinholes")
	w("")
	w("The perimeter gateway (`procgate gateway`, in-process) in a router namespace between an external client (198.51.100.10) and a protected server (10.9.0.5), default drop for 10.9.0.0/24, as in the tests.")
	w("")
	w("**Hole open latency**: %s. %d holes one after another (ports cycling through 1,000), closed in batches between rounds of 100; %d of %d sampled holes were in the kernel's set when the answer came.",
		p.OpenHow, p.OpenLatency.N, p.OpenLive, p.OpenChecked)
	w("")
	if p.BindLatency.N > 0 {
		w("**Bind to live**, the whole chain: %s. The monitor's own delay, from the gateway's answer to a hole the bench opened to its event, was %.0f µs (median): included in these numbers.", p.BindHow, p.BindPollUS)
		w("")
	}
	w("| from | n | p50 µs | p90 µs | p99 µs | max µs | round spread |")
	w("|---|---|---|---|---|---|---|")
	for _, r := range []struct {
		name string
		l    summary
	}{{"app's bind()", p.BindLatency}, {"agent's API request", p.OpenLatency}} {
		if l := r.l; l.N > 0 {
			w("| %s | %d | %.0f | %.0f | %.0f | %.0f | %.1f%% |", r.name, l.N, l.P50, l.P90, l.P99, l.Max, l.Spread*100)
		}
	}
	w("")
	w("**Update rate.** *netlink*: the gateway's `Table.Update`, one nftables transaction per batch, opening and closing the same holes in turn, for %s per row, in a namespace of its own (with 0 or more other holes in the set). *api*: as an agent sees it over mTLS: `open` per hole (batch 1, the latency loop above), and `sync` of a set of 1,000 holes against another (1,000 opened and 1,000 closed per request, one transaction). Seed 003 measured 10,000 updates/s for iptables at its best batch size.", r.Config.UpdateDuration)
	w("")
	w("| path | batch | holes in the set | updates | updates/s |")
	w("|---|---|---|---|---|")
	for _, u := range p.Updates {
		w("| %s | %d | %d | %d | %.0f |", u.Path, u.Batch, u.Existing, u.Updates, u.PerSec)
	}
	w("")
	if t := p.Transfer; t != nil {
		w("**Transfer overhead**: %d MB over one TCP connection from the server to the client, through four lanes of client — router — server: *open* and *control* route through a router without any nftables table (conntrack off), *stateful* through a wide-open stateful firewall (policy accept, `ct state established,related accept`: conntrack on), *pinhole* through the gateway's table (default drop for the server's range), let in by one hole for the client and port %d. %d rounds after a warm-up round, the lanes in a rotated order each round; ratios are medians over rounds of the round's ratio. A probe to a port without a hole was dropped by the pinhole lane's router (its drop rule counted %d packets), and the hole counted %d packets (GSO super-packets: the veths pass up to 64 KiB at once).",
			t.Bytes>>20, phDataPort, len(t.Open), t.Dropped, t.HolePackets)
		w("")
		w("The 95%% bootstrap interval of the median ratio is %s to %s for pinhole against stateful, %s to %s for the A/A control: differences inside the A/A interval are this machine's noise, not the firewall's.",
			pct(t.RatioCI[0]), pct(t.RatioCI[1]), pct(t.AACI[0]), pct(t.AACI[1]))
		w("")
		w("| lane | median s | p10 s | p90 s | ratio |")
		w("|---|---|---|---|---|")
		q := func(v []float64, at float64) float64 { return quantileF(slices.Sorted(slices.Values(v)), at) }
		for _, lane := range []struct {
			name string
			secs []float64
			vs   string
		}{{"open", t.Open, ""}, {"control (A/A)", t.Control, pct(t.AARatio) + " vs open"},
			{"stateful", t.Stateful, ""}, {"pinhole", t.Pinhole, pct(t.Ratio) + " vs stateful, " + pct(t.RatioOpen) + " vs open"}} {
			w("| %s | %.4f | %.4f | %.4f | %s |", lane.name, q(lane.secs, 0.5), q(lane.secs, 0.1), q(lane.secs, 0.9), lane.vs)
		}
		w("")
	}
}
