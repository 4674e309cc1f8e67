package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/ruleset"
)

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type internal_key -type grant_key -type grant_ports -type port_set -type port_range minimal minimal.c

// The minimal decision (minimal.c): what deciding alone costs at connect4
// and sendmsg4, with the floor's empty programs at the other hooks, so
// that the lane differs from empty-programs by the lookups only.

// minimalRanges is MAX_RANGES of minimal.c.
const minimalRanges = uint32(len(minimalPortSet{}.Ranges))

// attachMinimal loads the minimal decision, fills its maps with pol (app
// a's cgroup of v is app a, as procgate's bindings have it) and attaches
// it to v's cgroup with the floor's programs at the other hooks.
func (b *bench) attachMinimal(v *variant, pol *benchPolicy) error {
	var objs minimalObjects
	if err := loadMinimalObjects(&objs, nil); err != nil {
		return fmt.Errorf("load the minimal decision: %w", err)
	}
	b.host.undo.push(objs.minimalMaps.Close)
	if err := b.fillMinimal(&objs.minimalMaps, v, pol); err != nil {
		return errors.Join(err, objs.minimalPrograms.Close())
	}
	return b.attachFloor(v, map[string]*ebpf.Program{"connect4": objs.MinimalConnect4, "sendmsg4": objs.MinimalSendmsg4})
}

// fillMinimal puts v's app cgroups, pol's internal prefixes and its
// grants, as procgate gets them (pol.ruleset()), into m.
func (b *bench) fillMinimal(m *minimalMaps, v *variant, pol *benchPolicy) error {
	ids := pol.appIDs()
	for a := range pol.apps {
		cg, err := cgroups.ID(b.appCgroup(v.Name, a))
		if err != nil {
			return err
		}
		if err := m.AppOfCgroup.Put(cg, ids[appName(a)]); err != nil {
			return fmt.Errorf("minimal decision: app of cgroup %d: %w", cg, err)
		}
	}
	for _, p := range pol.internal {
		k := minimalInternalKey{Prefixlen: uint32(p.Bits()), Addr: addrKey(p.Addr())}
		if err := m.InternalPrefixes.Put(k, uint8(1)); err != nil {
			return fmt.Errorf("minimal decision: internal prefix %s: %w", p, err)
		}
	}
	// Grants of one app and prefix share a key: their port ranges add up.
	// (The trie answers the longest prefix only, so a grant nested in a
	// wider one of the same app would hide it; the bench's policy has
	// none.)
	ports := map[minimalGrantKey]*minimalGrantPorts{}
	for _, app := range pol.ruleset().Apps {
		for _, g := range app.Grants {
			if !g.Prefix.Addr().Is4() {
				continue // IPv4 only, as minimal.c
			}
			k := minimalGrantKey{Prefixlen: 32 + uint32(g.Prefix.Bits()), App: ids[app.Name], Addr: addrKey(g.Prefix.Addr())}
			gp := ports[k]
			if gp == nil {
				gp = &minimalGrantPorts{}
				ports[k] = gp
			}
			rs := g.Ports
			if len(rs) == 0 {
				rs = []ruleset.PortRange{ruleset.AllPorts}
			}
			for _, r := range rs {
				if g.Proto&ruleset.TCP != 0 && !gp.Tcp.add(r) || g.Proto&ruleset.UDP != 0 && !gp.Udp.add(r) {
					return fmt.Errorf("minimal decision: app %s, %s: more than %d port ranges", app.Name, g.Prefix, minimalRanges)
				}
			}
		}
	}
	for k, gp := range ports {
		if err := m.Grants.Put(k, gp); err != nil {
			return fmt.Errorf("minimal decision: grant of app %d: %w", k.App, err)
		}
	}
	return nil
}

// add appends r to the set; false if it is full.
func (s *minimalPortSet) add(r ruleset.PortRange) bool {
	if s.N == minimalRanges {
		return false
	}
	s.Ranges[s.N] = minimalPortRange{Lo: r.Lo, Hi: r.Hi}
	s.N++
	return true
}

// addrKey is an IPv4 address as the kernel hands it to sock_addr programs
// (user_ip4, network order) and as the maps' keys hold it.
func addrKey(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}
