// Package pinhole is the server side of dynamic perimeter pinholes (issue 6):
// it observes, from eBPF, the control connections and the auxiliary ports
// of apps whose policy says `inbound: dynamic`, asks the perimeter gateway
// for a hole per (peer, proto, host, port) while the port is in use, renews
// the leases, closes the holes when the port is released, and lets the same
// peers, and only them, through the host's own guard of those ports.
//
// The agent (agent.go) is kernel-neutral: events come from a Source and holes
// go to a Gateway and a Guard, so that tests can drive it with fakes. Kernel
// (kernel.go) is the eBPF Source and Guard.
package pinhole

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/procgate/procgate/perimeter"
)

// Kind is what an event reports.
type Kind uint8

// The values are shared with pinhole.c (enum event_kind).
const (
	AuxOpen      Kind = 1 // a UDP bind or TCP listen on an auxiliary port
	AuxClose     Kind = 2 // that socket's release
	ControlOpen  Kind = 3 // a connection accepted on a control port
	ControlClose Kind = 4 // its end
	// AuxPeer is listed only (Kernel.Uses), never sent: an established
	// connection accepted on an auxiliary port, with its peer.
	AuxPeer Kind = 5
)

func (k Kind) String() string {
	switch k {
	case AuxOpen:
		return "aux-open"
	case AuxClose:
		return "aux-close"
	case ControlOpen:
		return "control-open"
	case ControlClose:
		return "control-close"
	case AuxPeer:
		return "aux-peer"
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// Event is one observation of the kernel.
type Event struct {
	Kind Kind
	// Cookie is the socket's identity: the close of a socket names the
	// cookie its open named.
	Cookie   uint64
	AppID    uint32
	TGID     uint32 // the process that bound the socket (for a control connection: its listener's binder)
	UID      uint32
	CgroupID uint64
	Proto    perimeter.Proto
	// Local is the socket's address and port (for an auxiliary socket the
	// address may be unspecified); Remote is a control connection's peer.
	// IPv4-mapped IPv6 addresses are IPv4.
	Local, Remote netip.AddrPort
}

func (e Event) String() string {
	return fmt.Sprintf("%s cookie=%d app=%d tgid=%d %s %s<-%s", e.Kind, e.Cookie, e.AppID, e.TGID, e.Proto, e.Local, e.Remote)
}

// eventSize is sizeof(struct pinhole_event).
const eventSize = 8 + 8 + 4*4 + 4 + 2 + 2 + 16 + 16

// DecodeEvent decodes a ring buffer sample of pinhole.c.
func DecodeEvent(raw []byte) (Event, error) {
	if len(raw) < eventSize {
		return Event{}, fmt.Errorf("pinhole event of %d bytes, want %d", len(raw), eventSize)
	}
	le := binary.LittleEndian
	e := Event{
		Cookie:   le.Uint64(raw[0:]),
		CgroupID: le.Uint64(raw[8:]),
		AppID:    le.Uint32(raw[16:]),
		TGID:     le.Uint32(raw[20:]),
		UID:      le.Uint32(raw[28:]),
		Kind:     Kind(raw[32]),
	}
	switch raw[33] {
	case 1:
		e.Proto = perimeter.TCP
	case 2:
		e.Proto = perimeter.UDP
	default:
		return Event{}, fmt.Errorf("pinhole event with protocol %d", raw[33])
	}
	if e.Kind < AuxOpen || e.Kind > AuxPeer {
		return Event{}, fmt.Errorf("pinhole event of unknown kind %d", raw[32])
	}
	family := raw[34]
	lport, rport := le.Uint16(raw[36:]), le.Uint16(raw[38:])
	e.Local = netip.AddrPortFrom(addrOf(family, raw[40:56]), lport)
	e.Remote = netip.AddrPortFrom(addrOf(family, raw[56:72]), rport)
	return e, nil
}

func addrOf(family byte, b []byte) netip.Addr {
	if family == 4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16([16]byte(b[:16])).Unmap()
}
