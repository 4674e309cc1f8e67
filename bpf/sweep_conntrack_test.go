package bpf

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/ruleset"
)

// TestDeleteConntrack deletes entries of a namespace in batches (more
// requests than one sendmsg carries): tracked flows go, untracked ones are
// no error, and a request the kernel refuses is reported by its flow
// without stopping the others.
func TestDeleteConntrack(t *testing.T) {
	nstest.RequireRoot(t)
	flow := func(proto ruleset.Proto, i int, v6 bool) EndedSocket {
		local, peer := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), netip.MustParseAddr("10.9.0.1")
		if v6 {
			local, peer = netip.AddrFrom16([16]byte{0: 0xfd, 14: byte(i >> 8), 15: byte(i)}), netip.MustParseAddr("fd00::9")
		}
		return EndedSocket{Proto: proto, Local: netip.AddrPortFrom(local, uint16(40000+i)), Peer: netip.AddrPortFrom(peer, 5432)}
	}
	// A flow whose addresses are of two families: ctnetlink refuses it.
	mixed := EndedSocket{Proto: ruleset.TCP, Local: netip.MustParseAddrPort("10.1.0.1:1"), Peer: netip.MustParseAddrPort("[fd00::9]:2")}
	for _, tt := range []struct {
		name               string
		tracked, untracked int
		bad                bool
	}{
		{"one", 1, 0, false},
		{"batches", 300, 0, false},
		{"untracked among tracked", 200, 100, false},
		{"none tracked", 0, 150, false},
		{"refused among tracked", 200, 0, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ns := nstest.NetNS(t)
			var ended []EndedSocket
			for i := range tt.tracked + tt.untracked {
				proto, v6 := ruleset.TCP, i%2 == 1
				if i%3 == 0 {
					proto = ruleset.UDP
				}
				s := flow(proto, i, v6)
				if i < tt.tracked {
					createConntrack(t, ns, s)
				}
				ended = append(ended, s)
			}
			if tt.bad {
				ended = append(ended[:len(ended)/2], append([]EndedSocket{mixed}, ended[len(ended)/2:]...)...)
			}
			var n int
			var err error
			if ierr := nstest.InNS(t, ns, func() error {
				n, err = deleteConntrack(ended)
				return nil
			}); ierr != nil {
				t.Fatal(ierr)
			}
			if n != tt.tracked {
				t.Errorf("%d entries deleted, want %d", n, tt.tracked)
			}
			switch {
			case tt.bad && (err == nil || !strings.Contains(err.Error(), mixed.Local.String()) || errors.Is(err, errNoAnswer)):
				t.Errorf("error %v, want one naming the refused flow %s", err, mixed.Local)
			case !tt.bad && err != nil:
				t.Errorf("error %v, want none", err)
			}
			if left := conntrackFlows(t, ns); len(left) != 0 {
				t.Errorf("%d entries left, first %s", len(left), left[0])
			}
		})
	}
}

// createConntrack makes the conntrack entry of s in ns, as its first packet
// would.
func createConntrack(t *testing.T, ns string, s EndedSocket) {
	t.Helper()
	proto, fam := uint8(unix.IPPROTO_TCP), netlink.InetFamily(unix.AF_INET)
	if s.Proto == ruleset.UDP {
		proto = unix.IPPROTO_UDP
	}
	if s.Peer.Addr().Is6() {
		fam = unix.AF_INET6
	}
	f := &netlink.ConntrackFlow{
		FamilyType: uint8(fam),
		Forward:    netlink.IPTuple{Protocol: proto, SrcIP: net.IP(s.Local.Addr().AsSlice()), DstIP: net.IP(s.Peer.Addr().AsSlice()), SrcPort: s.Local.Port(), DstPort: s.Peer.Port()},
		Reverse:    netlink.IPTuple{Protocol: proto, SrcIP: net.IP(s.Peer.Addr().AsSlice()), DstIP: net.IP(s.Local.Addr().AsSlice()), SrcPort: s.Peer.Port(), DstPort: s.Local.Port()},
		TimeOut:    600,
	}
	if proto == unix.IPPROTO_TCP {
		f.ProtoInfo = &netlink.ProtoInfoTCP{State: 3} // TCP_CONNTRACK_ESTABLISHED
	}
	if err := nstest.InNS(t, ns, func() error {
		return netlink.ConntrackCreate(netlink.ConntrackTable, fam, f)
	}); err != nil {
		t.Fatalf("create conntrack entry of %s -> %s: %v", s.Local, s.Peer, err)
	}
}

// TestTracksFlows reads whether a namespace has conntrack entries from that
// namespace's count, not the host's or another namespace's.
func TestTracksFlows(t *testing.T) {
	nstest.RequireRoot(t)
	if _, err := os.Stat(ctCount); err != nil {
		t.Skipf("kernel feature missing: conntrack (%v)", err)
	}
	withEntries := nstest.NetNS(t)
	createConntrack(t, withEntries, EndedSocket{Proto: ruleset.TCP, Local: netip.MustParseAddrPort("10.1.0.1:40000"), Peer: netip.MustParseAddrPort("10.9.0.1:5432")})
	for _, tt := range []struct {
		name string
		ns   string
		want bool
	}{
		{"entries", withEntries, true},
		{"none", nstest.NetNS(t), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var got bool
			if err := nstest.InNS(t, tt.ns, func() error {
				got = tracksFlows()
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("tracksFlows() = %v, want %v", got, tt.want)
			}
		})
	}
}
