package pinhole

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/procgate/procgate/internal/bpfpin"
	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/ruleset"
)

// hooks are pinhole.c's attach points, named as their pinned links
// (link_pinhole_NAME in the BPF directory, beside the enforcer's).
var hooks = []struct {
	name   string
	attach ebpf.AttachType
	prog   func(*pinholeObjects) *ebpf.Program
}{
	{"post_bind4", ebpf.AttachCGroupInet4PostBind, func(o *pinholeObjects) *ebpf.Program { return o.ObservePostBind4 }},
	{"post_bind6", ebpf.AttachCGroupInet6PostBind, func(o *pinholeObjects) *ebpf.Program { return o.ObservePostBind6 }},
	{"sockops", ebpf.AttachCGroupSockOps, func(o *pinholeObjects) *ebpf.Program { return o.ObserveSockops }},
	{"sock_release", ebpf.AttachCgroupInetSockRelease, func(o *pinholeObjects) *ebpf.Program { return o.ObserveSockRelease }},
	{"ingress", ebpf.AttachCGroupInetIngress, func(o *pinholeObjects) *ebpf.Program { return o.GuardIngress }},
	{"hold_egress", ebpf.AttachCGroupInetEgress, func(o *pinholeObjects) *ebpf.Program { return o.HoldEgress }},
}

// HookNames lists the pinned link names of the pinhole programs.
func HookNames() []string {
	var out []string
	for _, h := range hooks {
		out = append(out, "pinhole_"+h.name)
	}
	return out
}

// Kernel is the eBPF side: it observes the dynamic apps' sockets and guards
// their auxiliary ports on the host. Its maps and links are pinned in the
// BPF directory like the enforcer's, so `procgate uninstall` removes them.
type Kernel struct {
	// mu is held shared by every call that uses the handles below and
	// whole by Close: Close waits for the calls in flight, and a call
	// after it fails with ErrClosed instead of using a closed handle.
	// The daemon's API and metrics read the counters on goroutines of
	// their own, and the agent's reader may call Read once more.
	mu     sync.RWMutex
	closed bool
	objs   pinholeObjects
	links  []link.Link
	rd     *ringbuf.Reader
	// ports are the pinhole_ports keys written last, to delete the stale.
	ports map[pinholePortKey]uint8
	apps  map[uint64]uint32
}

// ErrClosed is the answer of a Kernel's calls once it is closed.
var ErrClosed = errors.New("pinhole kernel closed")

// use holds k's handles open until the returned func is called; it fails
// once k is closed.
func (k *Kernel) use() (func(), error) {
	k.mu.RLock()
	if k.closed {
		k.mu.RUnlock()
		return nil, ErrClosed
	}
	return k.mu.RUnlock, nil
}

// Binding is a dynamic app as the kernel sees it.
type Binding struct {
	AppID uint32
	// CgroupID is a launched app's cgroup; 0 for an app with match:,
	// whose processes the kernel finds by the enforcer's principal
	// lookup (pinhole.c, app_of_current).
	CgroupID uint64
	Inbound  *ruleset.Inbound
}

// OpenKernel loads pinhole.c with its maps pinned in bpfDir and attaches (or
// adopts and updates) its programs on cgroupDir, the subtree the daemon
// enforces.
func OpenKernel(bpfDir, cgroupDir string, log *slog.Logger) (*Kernel, error) {
	spec, err := loadPinhole()
	if err != nil {
		return nil, fmt.Errorf("load embedded pinhole BPF objects: %w", err)
	}
	k := &Kernel{}
	if err := bpfpin.Load(spec, &k.objs, bpfDir, "pinhole"); err != nil {
		return nil, err
	}
	if err := k.attach(bpfDir, cgroupDir); err != nil {
		k.Close()
		return nil, err
	}
	if k.rd, err = ringbuf.NewReader(k.objs.PinholeEvents); err != nil {
		k.Close()
		return nil, fmt.Errorf("open pinhole ring buffer: %w", err)
	}
	if err := k.readPinned(); err != nil {
		k.Close()
		return nil, err
	}
	if err := k.releaseAll(); err != nil {
		k.Close()
		return nil, err
	}
	log.Info("pinhole observation attached", "cgroup_root", cgroupDir, "hooks", HookNames())
	return k, nil
}

func (k *Kernel) attach(bpfDir, cgroupDir string) error {
	for _, h := range hooks {
		l, err := bpfpin.Cgroup(filepath.Join(bpfDir, "link_pinhole_"+h.name), "pinhole "+h.name, cgroupDir, h.attach, h.prog(&k.objs))
		if err != nil {
			return err
		}
		k.links = append(k.links, l)
	}
	return nil
}

// readPinned takes the ports and apps an earlier run left in the pinned
// maps as the ones written last: the first SetApps then deletes those the
// policy no longer lists (a port left there stays guarded for ever, its
// peers dropped) and leaves the others as they are, guarded throughout.
func (k *Kernel) readPinned() error {
	k.ports, k.apps = map[pinholePortKey]uint8{}, map[uint64]uint32{}
	var port pinholePortKey
	var what uint8
	it := k.objs.PinholePorts.Iterate()
	for it.Next(&port, &what) {
		k.ports[port] = what
	}
	var id uint64
	var app pinholePinholeApp
	apps := k.objs.PinholeApps.Iterate()
	for apps.Next(&id, &app) {
		k.apps[id] = app.AppId
	}
	if err := errors.Join(it.Err(), apps.Err()); err != nil {
		return fmt.Errorf("read the dynamic apps of an earlier run: %w", err)
	}
	return nil
}

// SetApps makes the kernel watch exactly these dynamic apps.
func (k *Kernel) SetApps(bs []Binding) error {
	done, err := k.use()
	if err != nil {
		return fmt.Errorf("write dynamic apps to the kernel: %w", err)
	}
	defer done()
	apps := map[uint64]uint32{}
	ports := map[pinholePortKey]uint8{}
	principals := uint32(0)
	for _, b := range bs {
		if b.CgroupID == 0 {
			principals = 1
		} else {
			apps[b.CgroupID] = b.AppID
		}
		put := func(rs []ruleset.PortRange, proto ruleset.Proto, what uint8) {
			for _, r := range rs {
				for p := uint32(r.Lo); p <= uint32(r.Hi); p++ {
					if proto&ruleset.TCP != 0 {
						ports[pinholePortKey{AppId: b.AppID, Port: uint16(p), Proto: protoTCP}] = what
					}
					if proto&ruleset.UDP != 0 {
						ports[pinholePortKey{AppId: b.AppID, Port: uint16(p), Proto: protoUDP}] = what
					}
				}
			}
		}
		put(b.Inbound.Control, ruleset.TCP, uint8(pinholePortRolePORT_CONTROL))
		put(b.Inbound.Ports, b.Inbound.Proto, uint8(pinholePortRolePORT_AUX))
	}
	var errs []error
	// Set before the ports are written, cleared after the stale ones are
	// deleted: no principal app's port is listed without the lookup that
	// finds its binds.
	if principals == 1 {
		errs = append(errs, k.objs.PinholePrincipals.Put(uint32(0), principals))
	}
	for key, what := range ports {
		if k.ports[key] != what {
			errs = append(errs, k.objs.PinholePorts.Put(key, what))
		}
	}
	for id, app := range apps {
		if old, ok := k.apps[id]; !ok || old != app {
			errs = append(errs, k.objs.PinholeApps.Put(id, pinholePinholeApp{AppId: app}))
		}
	}
	for key := range k.ports {
		if _, ok := ports[key]; !ok {
			_ = k.objs.PinholePorts.Delete(key)
		}
	}
	for id := range k.apps {
		if _, ok := apps[id]; !ok {
			_ = k.objs.PinholeApps.Delete(id)
		}
	}
	if principals == 0 {
		errs = append(errs, k.objs.PinholePrincipals.Put(uint32(0), principals))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("write dynamic apps to the kernel: %w", err)
	}
	k.ports, k.apps = ports, apps
	return nil
}

func allowKey(h perimeter.Key) pinholeAllowKey {
	k := pinholeAllowKey{Port: h.Port, Proto: protoTCP, Family: 4}
	if h.Proto == perimeter.UDP {
		k.Proto = protoUDP
	}
	peer := h.Peer.Unmap()
	if peer.Is4() {
		a := peer.As4()
		copy(k.Peer[:], a[:])
	} else {
		k.Family = 6
		a := peer.As16()
		copy(k.Peer[:], a[:])
	}
	return k
}

// Allow lets the hole's peer in to its port on this host.
func (k *Kernel) Allow(h perimeter.Key) error {
	done, err := k.use()
	if err != nil {
		return fmt.Errorf("host guard: allow %s: %w", h, err)
	}
	defer done()
	if err := k.objs.PinholeAllow.Put(allowKey(h), uint8(1)); err != nil {
		return fmt.Errorf("host guard: allow %s: %w", h, err)
	}
	return nil
}

// Revoke undoes Allow.
func (k *Kernel) Revoke(h perimeter.Key) error {
	done, err := k.use()
	if err != nil {
		return fmt.Errorf("host guard: revoke %s: %w", h, err)
	}
	defer done()
	if err := k.objs.PinholeAllow.Delete(allowKey(h)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("host guard: revoke %s: %w", h, err)
	}
	return nil
}

// Reset empties the host guard's allow list (a starting agent holds no hole).
func (k *Kernel) Reset() error {
	done, err := k.use()
	if err != nil {
		return err
	}
	defer done()
	var key pinholeAllowKey
	var keys []pinholeAllowKey
	var v uint8
	it := k.objs.PinholeAllow.Iterate()
	for it.Next(&key, &v) {
		keys = append(keys, key)
	}
	for _, key := range keys {
		_ = k.objs.PinholeAllow.Delete(key)
	}
	return it.Err()
}

// releaseAll releases every hold an earlier run left: a starting agent
// reads only the events that come after it, so it could never release
// the opens counted before.
func (k *Kernel) releaseAll() error {
	var app uint32
	var h pinholeHoldOpened
	it := k.objs.PinholeHoldOpened.Iterate()
	var errs []error
	for it.Next(&app, &h) {
		errs = append(errs, k.objs.PinholeHoldReleased.Put(app, h.Opened))
	}
	if err := errors.Join(append(errs, it.Err())...); err != nil {
		return fmt.Errorf("release the holds of an earlier run: %w", err)
	}
	return nil
}

// Release counts n more auxiliary opens of app as answered by the gateway
// (hole open, refused, or the gateway unreachable) and pushes what
// hold_egress held on the app's control connections. Only the agent's
// goroutine calls it: pinhole_hold_released is written nowhere else.
func (k *Kernel) Release(app uint32, n uint64) error {
	done, err := k.use()
	if err != nil {
		return fmt.Errorf("release the hold of app %d: %w", app, err)
	}
	defer done()
	var released uint64
	if err := k.objs.PinholeHoldReleased.Lookup(app, &released); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("release the hold of app %d: %w", app, err)
	}
	if err := k.objs.PinholeHoldReleased.Put(app, released+n); err != nil {
		return fmt.Errorf("release the hold of app %d: %w", app, err)
	}
	if _, err := runIter(k.objs.KickControlSocks); err != nil {
		return fmt.Errorf("push the held data of app %d: %w", app, err)
	}
	return nil
}

// Held is how many data segments of control connections hold_egress held.
func (k *Kernel) Held() (uint64, error) {
	return k.sumCounter(func(o *pinholeObjects) *ebpf.Map { return o.PinholeHeld }, "held segments")
}

// Drops is how many packets the host guard dropped.
func (k *Kernel) Drops() (uint64, error) {
	return k.sumCounter(func(o *pinholeObjects) *ebpf.Map { return o.PinholeDrops }, "host guard drops")
}

// sumCounter reads a per-CPU counter of pinhole.c's count().
func (k *Kernel) sumCounter(counter func(*pinholeObjects) *ebpf.Map, what string) (uint64, error) {
	done, err := k.use()
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", what, err)
	}
	defer done()
	var per []uint64
	if err := counter(&k.objs).Lookup(uint32(0), &per); err != nil {
		return 0, fmt.Errorf("read %s: %w", what, err)
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	return n, nil
}

// Snapshot lists, as the events that made them, the auxiliary sockets still
// bound (TCP: listening) and the control connections still established: a
// restarted agent starts from them.
// The iterators walk the network namespace of the calling thread.
func (k *Kernel) Snapshot() ([]Event, error) {
	es, err := k.list()
	return slices.DeleteFunc(es, func(e Event) bool { return e.Kind == AuxPeer }), err
}

// Uses lists the peers that use an auxiliary port now, from the sockets'
// tags: the established connections an auxiliary listener accepted, and
// the UDP auxiliary sockets connected to a peer. An unconnected UDP socket
// shows no peer; the gateway's counters speak for it.
func (k *Kernel) Uses() ([]Use, error) {
	es, err := k.list()
	if err != nil {
		return nil, err
	}
	var out []Use
	for _, e := range es {
		if e.Kind == AuxPeer || (e.Kind == AuxOpen && e.Proto == perimeter.UDP && e.Remote.Addr().IsValid() && !e.Remote.Addr().IsUnspecified()) {
			out = append(out, Use{Proto: e.Proto, Peer: e.Remote.Addr(), Port: e.Local.Port()})
		}
	}
	return out, nil
}

func (k *Kernel) list() ([]Event, error) {
	done, err := k.use()
	if err != nil {
		return nil, fmt.Errorf("list pinhole sockets: %w", err)
	}
	defer done()
	var out []Event
	for _, prog := range []*ebpf.Program{k.objs.ListTcpSocks, k.objs.ListUdpSocks} {
		raw, err := runIter(prog)
		if err != nil {
			return nil, err
		}
		for len(raw) >= eventSize {
			if e, err := DecodeEvent(raw[:eventSize]); err == nil {
				out = append(out, e)
			}
			raw = raw[eventSize:]
		}
	}
	return out, nil
}

func runIter(prog *ebpf.Program) ([]byte, error) {
	it, err := link.AttachIter(link.IterOptions{Program: prog})
	if err != nil {
		return nil, fmt.Errorf("attach pinhole socket iterator: %w", err)
	}
	defer it.Close()
	rd, err := it.Open()
	if err != nil {
		return nil, fmt.Errorf("open pinhole socket iterator: %w", err)
	}
	defer rd.Close()
	raw, err := io.ReadAll(rd)
	if err != nil {
		return nil, fmt.Errorf("read pinhole socket iterator: %w", err)
	}
	return raw, nil
}

// Read blocks for the next event; it fails once Close was called (Close
// ends a Read that waits).
func (k *Kernel) Read() (Event, error) {
	done, err := k.use()
	if err != nil {
		return Event{}, err
	}
	defer done()
	for {
		rec, err := k.rd.Read()
		if err != nil {
			return Event{}, err
		}
		ev, err := DecodeEvent(rec.RawSample)
		if err != nil {
			continue // a sample this build cannot read: never fatal
		}
		return ev, nil
	}
}

// Close releases this process' handles once the calls in flight have
// returned; the pinned links and maps stay.
func (k *Kernel) Close() error {
	k.mu.RLock()
	rd := k.rd
	k.mu.RUnlock()
	if rd != nil {
		// A Read waiting for an event holds mu until its reader is closed
		// (ringbuf's Close ends a Read in flight).
		rd.Close()
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return nil
	}
	k.closed = true
	return bpfpin.Close(k) // the objects, links and reader it holds
}
