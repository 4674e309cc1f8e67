// Package perimeter is procgate's perimeter controller: it keeps, on the
// router between the outside and a protected range, a default-drop forward
// policy in an nftables table of its own and opens pinholes in it, each for
// one external peer, one protocol, one protected host and one port, while the
// agent on that host holds a lease on it.
//
// Requests are authenticated by mTLS (the client certificate's common name
// is the delegate) and authorized by site rules in the grammar of Diaper
// (seed 003) with two extensions, time windows and per-user limits. Every
// change to the kernel is one batched netlink transaction; a hole's lease is
// both the element's timeout in the kernel and the controller's own
// deadline, so a dead agent's holes close even if the controller dies too.
//
// The pieces, from the kernel up: Table (nftables), Rules (authorization),
// Controller (leases and bookkeeping), Server and Client (the HTTP/JSON API),
// Gateway (all of it behind `procgate gateway`).
package perimeter
