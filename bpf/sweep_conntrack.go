package bpf

import (
	"errors"
	"fmt"

	"github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/ruleset"
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
	// The socket is made here, in the calling thread's namespace.
	c, err := conntrack.Dial(nil)
	if err != nil {
		if errors.Is(err, unix.EPROTONOSUPPORT) {
			return 0, nil // no nfnetlink: no conntrack
		}
		return 0, fmt.Errorf("open ctnetlink socket: %w", err)
	}
	defer c.Close()
	// Every request through the library starts a goroutine and waits for
	// it (mdlayher/socket watches the request's context). On a thread
	// locked into a network namespace, as sweeps run, each such wait hands
	// the thread off and back: some 50 µs a flow instead of 5. The socket
	// stays in the namespace it was made in, so the requests are sent from
	// a goroutine of no locked thread.
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := deleteFlows(c, ended)
		done <- result{n, err}
	}()
	r := <-done
	return r.n, r.err
}

// deleteFlows deletes the entries of ended through c, one request each.
func deleteFlows(c *conntrack.Conn, ended []EndedSocket) (int, error) {
	var n int
	for _, s := range ended {
		err := c.Delete(ctFlow(s))
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

// ctFlow names the flow of s by its original tuple, which the kernel
// looks it up by. The reply tuple (the same, reversed, without NAT) is
// there for conntrack.Conn.Delete, which takes the request's address
// family as IPv6 only when both tuples are.
func ctFlow(s EndedSocket) conntrack.Flow {
	local, peer := s.Local.Addr().Unmap(), s.Peer.Addr().Unmap()
	proto := uint8(unix.IPPROTO_TCP)
	if s.Proto == ruleset.UDP {
		proto = unix.IPPROTO_UDP
	}
	orig := conntrack.Tuple{
		IP:    conntrack.IPTuple{SourceAddress: local, DestinationAddress: peer},
		Proto: conntrack.ProtoTuple{Protocol: proto, SourcePort: s.Local.Port(), DestinationPort: s.Peer.Port()},
	}
	reply := conntrack.Tuple{
		IP:    conntrack.IPTuple{SourceAddress: peer, DestinationAddress: local},
		Proto: conntrack.ProtoTuple{Protocol: proto, SourcePort: s.Peer.Port(), DestinationPort: s.Local.Port()},
	}
	return conntrack.Flow{TupleOrig: orig, TupleReply: reply}
}
