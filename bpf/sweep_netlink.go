package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/ruleset"
)

// The sock_diag fallback, for kernels without socket iterators or
// bpf_sock_destroy: dump the namespace's sockets with their cgroup ids
// (INET_DIAG_CGROUP_ID, 5.7+), decide each in Go with the ruleset of the
// generation this process applied last, and end the doomed ones with
// SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY). The cookie in each request makes
// sure a socket closed since the dump, whose addresses a new one took, is
// left alone. Same choice of sockets as sweep.c.

// TCP states (include/net/tcp_states.h).
const (
	tcpEstablished = 1
	tcpTimeWait    = 6
	tcpClose       = 7
	tcpListen      = 10
	tcpNewSynRecv  = 12
)

const (
	inetDiagCgroupID = 21 // INET_DIAG_CGROUP_ID attribute
	protoUDP         = 2  // PROTO_UDP of decision.h
)

// inetDiagReq is struct inet_diag_req_v2; id is struct inet_diag_sockid.
// Ours, not a library's: mdlayher/netlink frames the messages, but no
// library at hand sends SOCK_DESTROY with the socket's cookie.
type inetDiagReq struct {
	Family   uint8
	Protocol uint8
	Ext      uint8
	Pad      uint8
	States   uint32
	ID       inetDiagSockID
}

type inetDiagSockID struct {
	Sport  [2]byte // big-endian
	Dport  [2]byte
	Src    [16]byte
	Dst    [16]byte
	If     uint32
	Cookie [2]uint32
}

// inetDiagMsg is struct inet_diag_msg.
type inetDiagMsg struct {
	Family  uint8
	State   uint8
	Timer   uint8
	Retrans uint8
	ID      inetDiagSockID
	Expires uint32
	Rqueue  uint32
	Wqueue  uint32
	UID     uint32
	Inode   uint32
}

type diagSocket struct {
	msg      inetDiagMsg
	cgroupID uint64
	hasCg    bool
}

func (s diagSocket) addrs() (local, peer netip.AddrPort) {
	addr := func(b [16]byte) netip.Addr {
		if s.msg.Family == unix.AF_INET {
			return netip.AddrFrom4([4]byte(b[:4]))
		}
		return netip.AddrFrom16(b).Unmap()
	}
	return netip.AddrPortFrom(addr(s.msg.ID.Src), binary.BigEndian.Uint16(s.msg.ID.Sport[:])),
		netip.AddrPortFrom(addr(s.msg.ID.Dst), binary.BigEndian.Uint16(s.msg.ID.Dport[:]))
}

// owner is the principal of the sockets made in one cgroup.
type owner struct {
	app    string // "" none
	fenced bool
}

func (e *Enforcer) sweepNetlink(fence fenceRef) ([]EndedSocket, error) {
	g := e.applied.Load()
	if g == nil {
		return nil, errors.New("sweep through sock_diag: no generation applied by this process yet")
	}
	owners, err := cgroupOwners(e.opts.CgroupDir, g.Bindings, fence)
	if err != nil {
		return nil, err
	}
	// The sockets are made here, in the calling thread's namespace.
	c, err := netlink.Dial(unix.NETLINK_SOCK_DIAG, nil)
	if err != nil {
		return nil, fmt.Errorf("open sock_diag socket: %w", err)
	}
	defer c.Close()
	// The destroys go many to a sendmsg, each socket answered apart, as
	// many senders at once as a sweep has TCP walks: each teardown runs
	// in its sender's thread.
	bs, err := dialBatches(unix.NETLINK_SOCK_DIAG, sweepShards())
	if err != nil {
		return nil, fmt.Errorf("open sock_diag socket: %w", err)
	}
	defer closeBatches(bs)

	out, destroys, err := diagDoomed(c, g, owners, e.Learned())
	if len(destroys) == 0 {
		return out, err
	}
	// Also after a failed dump: those found so far are ended.
	errs, berr := execSplit(bs, destroys)
	for i := range out {
		out[i].Err = errs[i] // the kernel's errno, as the iterator's records give it
	}
	if berr != nil {
		err = errors.Join(err, fmt.Errorf("destroy %d sockets: %w", len(destroys), berr))
	}
	return out, err
}

// diagDoomed dumps the sockets of c's namespace and returns those that g
// no longer allows, with the SOCK_DESTROY request of each.
func diagDoomed(c *netlink.Conn, g *Generation, owners map[uint64]owner, learned []ruleset.Learned) ([]EndedSocket, []netlink.Message, error) {
	now := time.Now()
	listening := map[uint16]bool{}
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := diagDump(c, fam, unix.IPPROTO_TCP, 1<<tcpListen)
		if err != nil {
			return nil, nil, err
		}
		for _, s := range socks {
			local, _ := s.addrs()
			listening[local.Port()] = true
		}
	}
	tcpStates := uint32(1<<(tcpNewSynRecv+1)-1) &^ (1<<tcpListen | 1<<tcpTimeWait | 1<<tcpClose | 1<<tcpNewSynRecv | 1)
	var out []EndedSocket
	var destroys []netlink.Message
	for _, q := range []struct {
		proto  uint8
		states uint32
		rs     ruleset.Proto
	}{{unix.IPPROTO_TCP, tcpStates, ruleset.TCP}, {unix.IPPROTO_UDP, 1 << tcpEstablished, ruleset.UDP}} {
		for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
			socks, err := diagDump(c, fam, q.proto, q.states)
			if err != nil {
				return out, destroys, err
			}
			for _, s := range socks {
				if !s.hasCg {
					return out, destroys, errors.New("sweep through sock_diag: the kernel names no cgroup of sockets (needs 5.7+)")
				}
				local, peer := s.addrs()
				if q.proto == unix.IPPROTO_TCP && listening[local.Port()] {
					continue // accepted
				}
				o, ok := owners[s.cgroupID]
				if !ok || (o.app == "" && !o.fenced) {
					continue
				}
				// With the DNS answers in force, as the kernel decides;
				// an app in audit mode keeps its sockets (sweep.c).
				if g.Rules.DecideLearned(o.app, ruleset.Dest{Addr: peer.Addr(), Proto: q.rs, Port: peer.Port()}, learned, now).Passes() {
					continue
				}
				req, err := diagDestroy(fam, q.proto, s.msg.ID)
				if err != nil {
					return out, destroys, err
				}
				destroys = append(destroys, req)
				out = append(out, EndedSocket{Proto: q.rs, Local: local, Peer: peer, CgroupID: s.cgroupID, AppID: g.AppIDs[o.app]})
			}
		}
	}
	return out, destroys, nil
}

func diagDump(c *netlink.Conn, family, proto uint8, states uint32) ([]diagSocket, error) {
	req, err := binary.Append(nil, binary.NativeEndian, inetDiagReq{Family: family, Protocol: proto, States: states,
		ID: inetDiagSockID{Cookie: [2]uint32{^uint32(0), ^uint32(0)}}})
	if err != nil {
		return nil, err
	}
	msgs, err := c.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.SOCK_DIAG_BY_FAMILY, Flags: netlink.Request | netlink.Dump},
		Data:   req,
	})
	if err != nil {
		return nil, fmt.Errorf("sock_diag dump (family %d, protocol %d): %w", family, proto, err)
	}
	size := binary.Size(inetDiagMsg{})
	out := make([]diagSocket, 0, len(msgs))
	for _, m := range msgs {
		var s diagSocket
		if _, err := binary.Decode(m.Data, binary.NativeEndian, &s.msg); err != nil {
			return nil, fmt.Errorf("sock_diag dump (family %d, protocol %d): message of %d bytes: %w", family, proto, len(m.Data), err)
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[min(nlAlign(size), len(m.Data)):])
		if err != nil {
			return nil, fmt.Errorf("sock_diag dump (family %d, protocol %d): %w", family, proto, err)
		}
		for ad.Next() {
			if ad.Type() == inetDiagCgroupID {
				s.cgroupID, s.hasCg = ad.Uint64(), true
			}
		}
		if err := ad.Err(); err != nil {
			return nil, fmt.Errorf("sock_diag dump (family %d, protocol %d): %w", family, proto, err)
		}
		out = append(out, s)
	}
	return out, nil
}

// diagDestroy is the SOCK_DESTROY request for one socket of a dump, named
// by its addresses and cookie.
func diagDestroy(family, proto uint8, id inetDiagSockID) (netlink.Message, error) {
	req, err := binary.Append(nil, binary.NativeEndian, inetDiagReq{Family: family, Protocol: proto, States: ^uint32(0), ID: id})
	return netlink.Message{Header: netlink.Header{Type: unix.SOCK_DESTROY}, Data: req}, err
}

func nlAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// cgroupOwners maps the id of every cgroup below root to the principal of
// the sockets made in it: the deepest bound app among it and its ancestors,
// and whether it lies below the fence.
func cgroupOwners(root string, bindings []Binding, fence fenceRef) (map[uint64]owner, error) {
	apps := make(map[uint64]string, len(bindings))
	for _, b := range bindings {
		apps[b.CgroupID] = b.App
	}
	byPath := map[string]owner{}
	out := map[uint64]owner{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while walking
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		id, err := cgroups.ID(path)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return fs.SkipDir
			}
			return err
		}
		o := byPath[filepath.Dir(path)]
		if app, ok := apps[id]; ok {
			o.app = app
		}
		if fence.id != 0 && id == fence.id {
			o.fenced = true
		}
		byPath[path] = o
		out[id] = o
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("walk cgroups below %s: %w", root, err)
	}
	return out, nil
}
