package main

import (
	"errors"
	"fmt"
	"net/netip"
)

// topo is where a lane's traffic goes.
type topo string

const (
	// topoLoopback: client and servers in one namespace where every
	// benchmark destination is local: nothing leaves it.
	topoLoopback topo = "loopback"
	// topoVeth: the client's namespace routes the destinations over a veth
	// pair to a server namespace where they are local.
	topoVeth topo = "veth"
	// topoTunnel: demo's laptop, reaching the internal service over a
	// wireguard-go tunnel (throughput only).
	topoTunnel topo = "wireguard"
	// topoVethExternal: the veth path to an external destination, for a
	// process of no app (its results; its lanes are veth lanes).
	topoVethExternal topo = "veth-external"
)

var (
	benchDestinations = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("198.51.100.0/24")}
	vethClient        = netip.MustParsePrefix("192.0.2.1/24")
	vethServer        = netip.MustParsePrefix("192.0.2.2/24")
)

// lane is one variant in one topology: namespaces, servers, a client in
// the variant's app0 cgroup.
type lane struct {
	v        *variant
	topo     topo
	clientNS string
	srv      *servers
	cl       *client
	// port is the port its latency attempts go to (0: servicePort).
	port uint16
	load loadStats
	// before and after run around each throughput batch (tunnel lanes that
	// share a namespace install their rules only for their own batches).
	before, after func() error
}

func (l *lane) String() string { return l.v.Name + "/" + string(l.topo) }

// destPort is the port of l's latency attempts.
func (l *lane) destPort() uint16 {
	if l.port != 0 {
		return l.port
	}
	return servicePort
}

// world is the lanes of one phase at one policy size.
type world struct {
	nsg   netnsGroup
	lanes []*lane
}

// buildWorld makes a lane per variant and topology with pol installed.
// Variants with MaxSize below the policy are left out.
func (b *bench) buildWorld(pol *benchPolicy, variants []*variant, topos []topo) (*world, error) {
	w := &world{nsg: netnsGroup{h: b.host}}
	for _, t := range topos {
		if err := b.addLanes(w, pol, variants, t); err != nil {
			return nil, err
		}
	}
	return w, nil
}

// addLanes adds a lane per variant in topology t to w; on error it closes w.
func (b *bench) addLanes(w *world, pol *benchPolicy, variants []*variant, t topo) error {
	for _, v := range variants {
		if v.MaxSize > 0 && pol.size > v.MaxSize {
			continue
		}
		err := b.ctx.Err()
		if err == nil {
			err = b.buildLane(w, pol, v, t)
		}
		if err != nil {
			return errors.Join(fmt.Errorf("%s/%s at %d prefixes: %w", v.Name, t, pol.size, err), w.close())
		}
	}
	return nil
}

// buildLane adds a lane to w; on error, w.close removes what it made.
func (b *bench) buildLane(w *world, pol *benchPolicy, v *variant, t topo) error {
	l := &lane{v: v, topo: t}
	w.lanes = append(w.lanes, l)
	var err error
	if l.clientNS, err = w.nsg.newNetNS(v.Name); err != nil {
		return err
	}
	serverNS := l.clientNS
	switch t {
	case topoLoopback:
		err = anyIPLocal(l.clientNS, benchDestinations...)
	case topoVeth:
		if serverNS, err = w.nsg.newNetNS(v.Name + "-srv"); err != nil {
			return err
		}
		if err = vethPair(l.clientNS, serverNS, vethClient, vethServer); err == nil {
			err = anyIPLocal(serverNS, benchDestinations...)
		}
		if err == nil {
			err = routeVia(l.clientNS, vethServer.Addr(), benchDestinations...)
		}
	default:
		err = fmt.Errorf("topology %s has no lanes of its own", t)
	}
	if err != nil {
		return err
	}
	if l.srv, err = startServers(serverNS, true); err != nil {
		return err
	}
	if v.install != nil {
		b.log.Info("installing policy", "lane", l.String(), "prefixes", pol.size)
		if l.load, err = v.install(b, l, pol); err != nil {
			return err
		}
	}
	l.cl, err = b.startLaneClient(v, t, l.clientNS)
	return err
}

// startLaneClient starts a client as variant v's app0.
func (b *bench) startLaneClient(v *variant, t topo, ns string) (*client, error) {
	uid := 0
	if v.uidBased {
		uid = appUID(0)
	}
	return startClient(v.Name+"/"+string(t), b.appCgroup(v.Name, 0), ns, uid, v.openToTracing)
}

func (w *world) close() error {
	var errs []error
	for _, l := range w.lanes {
		if l.cl != nil {
			if err := l.cl.close(); err != nil {
				errs = append(errs, fmt.Errorf("client %s: %w", l, err))
			}
		}
		if l.srv != nil {
			errs = append(errs, l.srv.close())
		}
	}
	w.lanes = nil
	errs = append(errs, w.nsg.close())
	return errors.Join(errs...)
}
