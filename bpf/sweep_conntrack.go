package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"github.com/mdlayher/netlink"
	vnetlink "github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
)

// deleteConntrack removes the conntrack entries of ended sockets in the
// calling thread's network namespace, so that no state of an ended flow
// lingers (a "ct state established" rule would still pass its packets).
// Each entry is deleted by its original tuple, which for a socket that made
// the connection is its local and peer address: one request per flow, many
// requests to a sendmsg, no walk of the kernel's table (shared by all
// namespaces, so a dump costs milliseconds even when empty). Entries in
// conntrack zones other than the default one are not found. Without
// conntrack, or with no entry in the namespace, there is nothing to do.
// The error names every entry that could not be deleted.
func deleteConntrack(ended []EndedSocket) (int, error) {
	if !tracksFlows() {
		return 0, nil
	}
	// The socket is made here, in the calling thread's namespace.
	c, err := dialBatch(unix.NETLINK_NETFILTER)
	if err != nil {
		if errors.Is(err, unix.EPROTONOSUPPORT) {
			return 0, nil // no nfnetlink: no conntrack
		}
		return 0, fmt.Errorf("open ctnetlink socket: %w", err)
	}
	defer c.close()
	msgs := make([]netlink.Message, len(ended))
	for i, s := range ended {
		if msgs[i], err = ctDelete(s); err != nil {
			return 0, fmt.Errorf("conntrack delete request for %s %s -> %s: %w", s.Proto, s.Local, s.Peer, err)
		}
	}
	answers, err := c.exec(msgs)
	var n, unanswered int
	var failed []error
	for i, aerr := range answers {
		s := ended[i]
		switch {
		case aerr == nil:
			n++
		case aerr == errNoAnswer:
			unanswered++
		case errors.Is(aerr, unix.ENOENT):
			// Not tracked, or gone already.
		case errors.Is(aerr, unix.EOPNOTSUPP), errors.Is(aerr, unix.EPROTONOSUPPORT):
			// No conntrack for this family.
		default:
			failed = append(failed, fmt.Errorf("delete conntrack entry of %s %s -> %s: %w", s.Proto, s.Local, s.Peer, aerr))
		}
	}
	if err != nil {
		failed = append(failed, fmt.Errorf("conntrack deletes, %d of %d unanswered: %w", unanswered, len(ended), err))
	}
	return n, errors.Join(failed...)
}

// ctDelete is the ctnetlink request that deletes the entry of s by its
// original tuple, which the kernel looks it up by.
func ctDelete(s EndedSocket) (netlink.Message, error) {
	local, peer := s.Local.Addr().Unmap(), s.Peer.Addr().Unmap()
	family, src, dst := uint8(unix.AF_INET6), uint16(nl.CTA_IP_V6_SRC), uint16(nl.CTA_IP_V6_DST)
	if peer.Is4() {
		family, src, dst = unix.AF_INET, nl.CTA_IP_V4_SRC, nl.CTA_IP_V4_DST
	}
	proto := uint8(unix.IPPROTO_TCP)
	if s.Proto == ruleset.UDP {
		proto = unix.IPPROTO_UDP
	}
	ip, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: src, Data: local.AsSlice()},
		{Type: dst, Data: peer.AsSlice()},
	})
	if err != nil {
		return netlink.Message{}, err
	}
	l4, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: nl.CTA_PROTO_NUM, Data: []byte{proto}},
		{Type: nl.CTA_PROTO_SRC_PORT, Data: binary.BigEndian.AppendUint16(nil, s.Local.Port())},
		{Type: nl.CTA_PROTO_DST_PORT, Data: binary.BigEndian.AppendUint16(nil, s.Peer.Port())},
	})
	if err != nil {
		return netlink.Message{}, err
	}
	tuple, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: netlink.Nested | nl.CTA_TUPLE_IP, Data: ip},
		{Type: netlink.Nested | nl.CTA_TUPLE_PROTO, Data: l4},
	})
	if err != nil {
		return netlink.Message{}, err
	}
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{{Type: netlink.Nested | nl.CTA_TUPLE_ORIG, Data: tuple}})
	if err != nil {
		return netlink.Message{}, err
	}
	data := append((&nl.Nfgenmsg{NfgenFamily: family, Version: nl.NFNETLINK_V0}).Serialize(), attrs...)
	return netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(int(vnetlink.ConntrackTable)<<8 | nl.IPCTNL_MSG_CT_DELETE)},
		Data:   data,
	}, nil
}

// ctCount is the number of conntrack entries of the reading thread's
// network namespace.
const ctCount = "/proc/sys/net/netfilter/nf_conntrack_count"

// tracksFlows says whether the calling thread's network namespace has any
// conntrack entry. One with none, often one whose rules match no conntrack
// state, would answer every delete ENOENT, one answer and one read each.
func tracksFlows() bool {
	b, err := os.ReadFile(ctCount)
	if err != nil {
		// No file: no conntrack. Unreadable: delete to be sure.
		return !errors.Is(err, fs.ErrNotExist)
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return err != nil || n > 0
}
