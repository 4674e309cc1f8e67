package pinhole

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/procgate/procgate/perimeter"
)

// rawEvent lays out a struct pinhole_event as the kernel writes it.
func rawEvent(kind, proto, family byte, local, remote []byte, lport, rport uint16) []byte {
	b := make([]byte, eventSize)
	le := binary.LittleEndian
	le.PutUint64(b[0:], 42)   // cookie
	le.PutUint64(b[8:], 99)   // cgroup id
	le.PutUint32(b[16:], 7)   // app id
	le.PutUint32(b[20:], 100) // tgid
	le.PutUint32(b[28:], 1000)
	b[32], b[33], b[34] = kind, proto, family
	le.PutUint16(b[36:], lport)
	le.PutUint16(b[38:], rport)
	copy(b[40:], local)
	copy(b[56:], remote)
	return b
}

func TestDecodeEvent(t *testing.T) {
	v4 := func(s string) []byte { a := netip.MustParseAddr(s).As4(); return a[:] }
	v6 := func(s string) []byte { a := netip.MustParseAddr(s).As16(); return a[:] }
	tests := []struct {
		name    string
		raw     []byte
		want    Event
		wantErr bool
	}{
		{"control over IPv4", rawEvent(3, 1, 4, v4("10.9.0.5"), v4("198.51.100.10"), 21, 50000),
			Event{Kind: ControlOpen, Cookie: 42, CgroupID: 99, AppID: 7, TGID: 100, UID: 1000, Proto: perimeter.TCP,
				Local: netip.MustParseAddrPort("10.9.0.5:21"), Remote: netip.MustParseAddrPort("198.51.100.10:50000")}, false},
		{"IPv4-mapped IPv6 is IPv4", rawEvent(3, 1, 6, v6("::ffff:10.9.0.5"), v6("::ffff:198.51.100.10"), 21, 50000),
			Event{Kind: ControlOpen, Cookie: 42, CgroupID: 99, AppID: 7, TGID: 100, UID: 1000, Proto: perimeter.TCP,
				Local: netip.MustParseAddrPort("10.9.0.5:21"), Remote: netip.MustParseAddrPort("198.51.100.10:50000")}, false},
		{"udp aux over IPv6", rawEvent(1, 2, 6, v6("fd09::5"), nil, 40001, 0),
			Event{Kind: AuxOpen, Cookie: 42, CgroupID: 99, AppID: 7, TGID: 100, UID: 1000, Proto: perimeter.UDP,
				Local: netip.MustParseAddrPort("[fd09::5]:40001"), Remote: netip.AddrPortFrom(netip.IPv6Unspecified(), 0)}, false},
		{"short", rawEvent(1, 2, 4, nil, nil, 1, 0)[:eventSize-1], Event{}, true},
		{"unknown kind", rawEvent(9, 1, 4, nil, nil, 1, 0), Event{}, true},
		{"unknown protocol", rawEvent(1, 3, 4, nil, nil, 1, 0), Event{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeEvent(tt.raw)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Errorf("DecodeEvent = %+v, %v; want %+v (error %v)", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func FuzzDecodeEvent(f *testing.F) {
	f.Add(rawEvent(3, 1, 4, nil, nil, 21, 1))
	f.Fuzz(func(t *testing.T, raw []byte) {
		e, err := DecodeEvent(raw)
		if err == nil && (e.Kind < AuxOpen || e.Kind > AuxPeer || (e.Proto != perimeter.TCP && e.Proto != perimeter.UDP)) {
			t.Errorf("decoded an impossible event %+v", e)
		}
	})
}
