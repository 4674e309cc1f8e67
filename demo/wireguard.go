package demo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"

	"golang.org/x/crypto/curve25519"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
)

const (
	tunnelMTU      = 1420
	gatewayWGPort  = 51820
	wgKeyLen       = curve25519.ScalarSize
	wgLogComponent = "wireguard"
)

type wgKeyPair struct {
	private, public [wgKeyLen]byte
}

func newWGKeyPair() (wgKeyPair, error) {
	var kp wgKeyPair
	if _, err := rand.Read(kp.private[:]); err != nil {
		return kp, fmt.Errorf("wireguard private key: %w", err)
	}
	// Clamp as WireGuard does (RFC 7748), so that the key prints the same in wg(8).
	kp.private[0] &= 248
	kp.private[31] = (kp.private[31] & 127) | 64
	pub, err := curve25519.X25519(kp.private[:], curve25519.Basepoint)
	if err != nil {
		return kp, fmt.Errorf("wireguard public key: %w", err)
	}
	copy(kp.public[:], pub)
	return kp, nil
}

// wgPeerConfig is one end of the tunnel in wireguard's UAPI terms.
type wgPeerConfig struct {
	listenPort uint16
	self       wgKeyPair
	peer       [wgKeyLen]byte
	endpoint   netip.AddrPort // zero: learnt from the peer's first handshake
	allowedIPs []netip.Prefix
}

func (c wgPeerConfig) uapi() string {
	var b strings.Builder
	fmt.Fprintf(&b, "private_key=%s\n", hex.EncodeToString(c.self.private[:]))
	fmt.Fprintf(&b, "listen_port=%d\n", c.listenPort)
	b.WriteString("replace_peers=true\n")
	fmt.Fprintf(&b, "public_key=%s\n", hex.EncodeToString(c.peer[:]))
	if c.endpoint.IsValid() {
		fmt.Fprintf(&b, "endpoint=%s\n", c.endpoint)
	}
	b.WriteString("replace_allowed_ips=true\n")
	for _, p := range c.allowedIPs {
		fmt.Fprintf(&b, "allowed_ip=%s\n", p)
	}
	return b.String()
}

// nsBind opens wireguard's UDP sockets in a fixed network namespace. The
// device reopens its sockets from whatever goroutine brings it up (including
// its TUN event reader), so pinning the namespace here rather than at the
// caller keeps every reopen in the right namespace.
type nsBind struct {
	conn.Bind
	ns string
}

func (b *nsBind) Open(port uint16) (fns []conn.ReceiveFunc, actual uint16, err error) {
	err = inNS(b.ns, func() error {
		var openErr error
		fns, actual, openErr = b.Bind.Open(port)
		return openErr
	})
	return fns, actual, err
}

// nsTUN wraps the native TUN device for a device in another namespace.
type nsTUN struct {
	tun.Device
	events chan tun.Event
	// drained is closed when the native device's event stream has ended,
	// which it does only after closing its netlink socket: until then that
	// socket keeps the namespace alive.
	drained chan struct{}
}

func newNSTUN(dev tun.Device) *nsTUN {
	t := &nsTUN{Device: dev, events: make(chan tun.Event, 5), drained: make(chan struct{})}
	go func() {
		for ev := range dev.Events() {
			t.events <- ev
		}
		close(t.events)
		close(t.drained)
	}()
	return t
}

func (t *nsTUN) Events() <-chan tun.Event { return t.events }

// MTU answers without the native device's name-based ioctl, which would look
// the name up in the namespace of whichever thread asks.
func (t *nsTUN) MTU() (int, error) { return tunnelMTU, nil }

// wgEnd is one end of the tunnel: a wireguard-go device on its TUN.
type wgEnd struct {
	*device.Device
	tun *nsTUN
}

// close stops the device and returns once nothing of it refers to its
// namespace any more.
func (e *wgEnd) close() {
	e.Device.Close()
	<-e.tun.drained
}

// startWireGuard creates the TUN device ifname in the namespace ns and runs a
// wireguard-go device on it, in this process. The interface is left down and
// unaddressed; the caller configures it with netlink.
func startWireGuard(ns, ifname, role string, cfg wgPeerConfig, log *slog.Logger) (*wgEnd, error) {
	var native tun.Device
	err := inNS(ns, func() error {
		var err error
		native, err = tun.CreateTUN(ifname, tunnelMTU)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("create TUN %s in %s: %w", ifname, role, err)
	}
	end := &wgEnd{tun: newNSTUN(native)}
	end.Device = device.NewDevice(end.tun, &nsBind{Bind: conn.NewDefaultBind(), ns: ns}, wgLogger(log, role))
	if err := end.IpcSet(cfg.uapi()); err != nil {
		end.close()
		return nil, fmt.Errorf("configure wireguard in %s: %w", role, err)
	}
	if err := end.Up(); err != nil {
		end.close()
		return nil, fmt.Errorf("start wireguard in %s: %w", role, err)
	}
	return end, nil
}

// wgLogger sends wireguard-go's chatter to slog at debug level: its "errors"
// include routine ones during shutdown, which are not failures of the demo.
func wgLogger(log *slog.Logger, role string) *device.Logger {
	l := log.With("component", wgLogComponent, "ns", role)
	logf := func(format string, args ...any) {
		if l.Enabled(context.Background(), slog.LevelDebug) {
			l.Debug(fmt.Sprintf(format, args...))
		}
	}
	return &device.Logger{Verbosef: logf, Errorf: logf}
}
