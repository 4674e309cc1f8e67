package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
)

// ctnetlink message and attributes (linux/netfilter/nfnetlink_conntrack.h).
const (
	ctDelete       = 1<<8 | 2 // NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
	ctaTupleOrig   = 1
	ctaTupleIP     = 1
	ctaTupleProto  = 2
	ctaIPv4Src     = 1
	ctaIPv4Dst     = 2
	ctaIPv6Src     = 3
	ctaIPv6Dst     = 4
	ctaProtoNum    = 1
	ctaProtoSrc    = 2
	ctaProtoDst    = 3
	nlaFlagNested  = 0x8000
	nfnetlinkV0    = 0
	nfgenmsgLength = 4
)

// deleteConntrack removes the conntrack entries of ended sockets in the
// calling thread's network namespace, so that no state of an ended flow
// lingers (a "ct state established" rule would still pass its packets).
// Each entry is deleted by its original tuple, which for a socket that made
// the connection is its local and peer address: one request per flow, no
// walk of the kernel's table (shared by all namespaces, so a dump costs
// milliseconds even when empty). Entries in conntrack zones other than the
// default one are not found. Without conntrack there is nothing to do.
func deleteConntrack(ended []EndedSocket) (int, error) {
	c, err := dialNetlink(unix.NETLINK_NETFILTER)
	if err != nil {
		if errors.Is(err, unix.EPROTONOSUPPORT) {
			return 0, nil // no nfnetlink: no conntrack
		}
		return 0, err
	}
	defer c.close()
	var n int
	for _, s := range ended {
		err := c.do(ctDelete, unix.NLM_F_ACK, ctTuple(s), nil)
		switch {
		case err == nil:
			n++
		case errors.Is(err, unix.ENOENT):
			// Not tracked.
		case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.EPROTONOSUPPORT):
			return n, nil // no conntrack for this family
		default:
			return n, fmt.Errorf("delete conntrack entry of %s %s -> %s: %w", s.Proto, s.Local, s.Peer, err)
		}
	}
	return n, nil
}

// ctTuple is the payload of a delete: struct nfgenmsg, then CTA_TUPLE_ORIG.
func ctTuple(s EndedSocket) []byte {
	local, peer := s.Local.Addr().Unmap(), s.Peer.Addr().Unmap()
	family, src, dst := uint8(unix.AF_INET6), uint16(ctaIPv6Src), uint16(ctaIPv6Dst)
	if peer.Is4() {
		family, src, dst = unix.AF_INET, ctaIPv4Src, ctaIPv4Dst
	}
	proto := uint8(unix.IPPROTO_TCP)
	if s.Proto == ruleset.UDP {
		proto = unix.IPPROTO_UDP
	}
	ports := func(p uint16) []byte { return binary.BigEndian.AppendUint16(nil, p) }
	ip := append(nlAttr(src, local.AsSlice()), nlAttr(dst, peer.AsSlice())...)
	l4 := append(append(nlAttr(ctaProtoNum, []byte{proto}), nlAttr(ctaProtoSrc, ports(s.Local.Port()))...), nlAttr(ctaProtoDst, ports(s.Peer.Port()))...)
	tuple := append(nlAttr(ctaTupleIP|nlaFlagNested, ip), nlAttr(ctaTupleProto|nlaFlagNested, l4)...)
	msg := []byte{family, nfnetlinkV0, 0, 0} // nfgenmsg: family, version, res_id (big-endian 0)
	return append(msg[:nfgenmsgLength], nlAttr(ctaTupleOrig|nlaFlagNested, tuple)...)
}

// nlAttr is one netlink attribute, padded to 4 bytes.
func nlAttr(typ uint16, data []byte) []byte {
	b := binary.NativeEndian.AppendUint16(nil, uint16(unix.SizeofRtAttr+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%unix.NLMSG_ALIGNTO != 0 {
		b = append(b, 0)
	}
	return b
}
