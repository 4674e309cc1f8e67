package perimeter

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// DefaultTableName is the nftables table (family inet) the gateway owns.
const DefaultTableName = "procgate_perimeter"

const (
	set4Name  = "holes4"
	set6Name  = "holes6"
	chainName = "forward" // not "fwd": that is a keyword in nft's syntax
	// chunk is how many elements go in one netlink message of a
	// transaction: the element list is one attribute, whose length is 16
	// bits, and an element with the longest comment takes about 240 bytes.
	chunk = 200
	// sockBuf is the netlink socket's send and receive buffer: a whole
	// transaction is one sendmsg, which the kernel refuses beyond the send
	// buffer (EMSGSIZE); 100,000 updates take about 12 MiB.
	sockBuf = 64 << 20
)

var (
	// Concatenated keys: every field padded to 4 bytes, as in the
	// registers the rule loads them into.
	key4Type = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetProto, nftables.TypeIPAddr, nftables.TypeInetService)
	key6Type = nftables.MustConcatSetType(nftables.TypeIP6Addr, nftables.TypeInetProto, nftables.TypeIP6Addr, nftables.TypeInetService)
)

// TableConfig says where the gateway's table lives and what it protects.
type TableConfig struct {
	// Name of the inet table; DefaultTableName if empty.
	Name string
	// NetNS is the path of a network namespace file (/run/netns/NAME,
	// /proc/PID/ns/net); empty: the caller's namespace.
	NetNS string
	// Protect are the ranges whose inbound traffic is dropped unless it
	// belongs to a connection already established or goes through a hole.
	Protect []netip.Prefix
	// Services are always open (the rules' `service` lines).
	Services []Service
}

// Element is a hole as the kernel holds it.
type Element struct {
	Key
	// Timeout is the lease from now when adding; when listing, the timeout
	// the element was last given.
	Timeout time.Duration
	// Expires is, when listing, what is left of the timeout.
	Expires time.Duration
	// Packets and Bytes count what went through the hole.
	Packets, Bytes uint64
	// Comment is the element's userdata: whose hole it is (see comment).
	Comment string
}

// Table is the gateway's nftables table in one network namespace:
//
//	table inet procgate_perimeter {
//	  set holes4 { type ipv4_addr . inet_proto . ipv4_addr . inet_service; flags timeout; counter }
//	  set holes6 { type ipv6_addr . inet_proto . ipv6_addr . inet_service; flags timeout; counter }
//	  chain forward {
//	    type filter hook forward priority filter; policy accept
//	    ip saddr . meta l4proto . ip daddr . th dport @holes4 accept
//	    ip6 saddr . meta l4proto . ip6 daddr . th dport @holes6 accept
//	    ct state established,related accept
//	    ip daddr HOST tcp dport PORTS counter accept comment "service FILE:LINE"  # services
//	    ip daddr PROTECTED counter drop     # one per protected prefix
//	  }
//	}
//
// The hole lookups come before the conntrack rule so that an element's
// counter counts every packet through it: after an established,related
// accept, only the first packet of each connection would reach the set
// (TestGatewayEndToEnd wants more than one counted). Counters are how
// stale holes are told from used ones. Every change is one netlink
// transaction.
type Table struct {
	mu      sync.Mutex
	conn    *nftables.Conn
	ns      *os.File
	table   *nftables.Table
	chain   *nftables.Chain
	set4    *nftables.Set
	set6    *nftables.Set
	protect []netip.Prefix
	// services are in the chain now; changed only with it, after the
	// kernel took the transaction.
	services []Service
}

// OpenTable creates the table, or adopts it as a restarted gateway finds
// it: the sets and their holes are kept, the chain is rewritten for
// cfg.Protect. It is one transaction, so the forward policy is never missing
// or half written.
func OpenTable(cfg TableConfig) (*Table, error) {
	if cfg.Name == "" {
		cfg.Name = DefaultTableName
	}
	if len(cfg.Protect) == 0 {
		return nil, errors.New("open nftables table: no protected range")
	}
	t := &Table{protect: slices.Clone(cfg.Protect), services: slices.Clone(cfg.Services)}
	opts := []nftables.ConnOption{nftables.AsLasting(), nftables.WithSockOptions(bigBuffers)}
	if cfg.NetNS != "" {
		f, err := os.Open(cfg.NetNS)
		if err != nil {
			return nil, fmt.Errorf("open netns %s: %w", cfg.NetNS, err)
		}
		t.ns = f
		opts = append(opts, nftables.WithNetNSFd(int(f.Fd())))
	}
	conn, err := nftables.New(opts...)
	if err != nil {
		t.closeNS()
		return nil, fmt.Errorf("open nftables netlink socket: %w", err)
	}
	t.conn = conn
	if err := t.install(cfg.Name); err != nil {
		t.Close()
		return nil, fmt.Errorf("install nftables table inet %s: %w", cfg.Name, err)
	}
	return t, nil
}

// bigBuffers lets one transaction carry many thousands of updates.
func bigBuffers(c *netlink.Conn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = raw.Control(func(fd uintptr) {
		// The FORCE variants pass over net.core.wmem_max; they need
		// CAP_NET_ADMIN, which changing nftables needs anyway.
		serr = errors.Join(
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, sockBuf),
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, sockBuf))
	})
	if err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set netlink socket buffers: %w", serr)
	}
	return nil
}

func (t *Table) install(name string) error {
	if err := t.queueInstall(name); err != nil {
		return err
	}
	return t.conn.Flush()
}

// queueInstall queues the table, its sets and its chain.
func (t *Table) queueInstall(name string) error {
	c := t.conn
	t.table = c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: name})
	t.set4 = &nftables.Set{Table: t.table, Name: set4Name, KeyType: key4Type, Concatenation: true, HasTimeout: true, Counter: true}
	t.set6 = &nftables.Set{Table: t.table, Name: set6Name, KeyType: key6Type, Concatenation: true, HasTimeout: true, Counter: true}
	for _, s := range []*nftables.Set{t.set4, t.set6} {
		if err := c.AddSet(s, nil); err != nil {
			return fmt.Errorf("add set %s: %w", s.Name, err)
		}
	}
	accept := nftables.ChainPolicyAccept
	t.chain = c.AddChain(&nftables.Chain{
		Name: chainName, Table: t.table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept,
	})
	t.queueChain(t.services)
	return nil
}

// serviceComment is the comment of a service's rules (nft shows it): it
// tells them from the drop rules when counting, and names the line. The
// kernel keeps at most 256 bytes of a rule's userdata: a longer file name
// loses its beginning.
func serviceComment(where string) string {
	const max = 240
	if len(where) > max {
		where = "..." + where[len(where)-max:]
	}
	return "service " + where
}

// queueChain queues the chain's rules, services included, after a flush of
// the chain: whatever transaction it joins replaces the chain whole.
func (t *Table) queueChain(services []Service) {
	t.conn.FlushChain(t.chain)
	for _, r := range t.chainRules(services) {
		t.conn.AddRule(r)
	}
}

// chainRules are the forward chain's rules, in order.
func (t *Table) chainRules(services []Service) []*nftables.Rule {
	var rules []*nftables.Rule
	add := func(exprs ...expr.Any) {
		rules = append(rules, &nftables.Rule{Table: t.table, Chain: t.chain, Exprs: exprs})
	}
	add(holeLookup(false, t.set4)...)
	add(holeLookup(true, t.set6)...)
	add(
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binary.NativeEndian.AppendUint32(nil, expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED),
			Xor:  make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
		&expr.Verdict{Kind: expr.VerdictAccept},
	)
	// Services come after the conntrack rule, so that their counters count
	// the packets that open connections (and unanswered datagrams), not
	// every packet of them.
	for _, sv := range services {
		for _, m := range sv.matches() {
			for _, r := range sv.Ports {
				rules = append(rules, &nftables.Rule{Table: t.table, Chain: t.chain, Exprs: serviceAccept(sv.Proto, m, r),
					UserData: userdata.AppendString(nil, userdata.TypeComment, serviceComment(sv.Where))})
			}
		}
	}
	for _, p := range t.protect {
		add(protectDrop(p)...)
	}
	return rules
}

// serviceAccept is `meta l4proto P [ip saddr FROM] ip daddr HOST th dport
// PORTS counter accept` (or ip6).
func serviceAccept(proto Proto, m ServiceMatch, ports [2]uint16) []expr.Any {
	v6 := m.Host.Addr().Is6()
	exprs := append(nfproto(v6),
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(proto)}},
	)
	saddr, daddr := uint32(12), uint32(16)
	if v6 {
		saddr, daddr = 8, 24
	}
	if m.From.IsValid() {
		exprs = append(exprs, prefixMatch(m.From, saddr)...)
	}
	exprs = append(exprs, prefixMatch(m.Host, daddr)...)
	exprs = append(exprs, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2})
	lo, hi := binary.BigEndian.AppendUint16(nil, ports[0]), binary.BigEndian.AppendUint16(nil, ports[1])
	if ports[0] == ports[1] {
		exprs = append(exprs, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: lo})
	} else {
		exprs = append(exprs, &expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: lo, ToData: hi})
	}
	return append(exprs, &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictAccept})
}

// prefixMatch compares the address at off in the network header with p.
func prefixMatch(p netip.Prefix, off uint32) []expr.Any {
	alen := uint32(p.Addr().BitLen() / 8)
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: alen},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: alen, Mask: netipMask(p), Xor: make([]byte, alen)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Masked().Addr().AsSlice()},
	}
}

// nfproto matches packets of one family in an inet chain, the dependency
// nft adds before an ip or ip6 match.
func nfproto(v6 bool) []expr.Any {
	proto := byte(unix.NFPROTO_IPV4)
	if v6 {
		proto = unix.NFPROTO_IPV6
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
	}
}

// holeLookup is `ip saddr . meta l4proto . ip daddr . th dport @set accept`
// (or the ip6 form): the four fields loaded into consecutive 32-bit
// registers from NFT_REG_1 on, as nft itself lays them out.
func holeLookup(v6 bool, set *nftables.Set) []expr.Any {
	alen, saddr, daddr := uint32(4), uint32(12), uint32(16) // IPv4 header offsets
	if v6 {
		alen, saddr, daddr = 16, 8, 24
	}
	words := alen / 4
	reg := func(word uint32) uint32 { return unix.NFT_REG32_00 + word }
	return append(nfproto(v6),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: saddr, Len: alen},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg(words)},
		&expr.Payload{DestRegister: reg(words + 1), Base: expr.PayloadBaseNetworkHeader, Offset: daddr, Len: alen},
		&expr.Payload{DestRegister: reg(2*words + 1), Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
		&expr.Verdict{Kind: expr.VerdictAccept},
	)
}

// protectDrop is `ip daddr PREFIX counter drop` (or ip6).
func protectDrop(p netip.Prefix) []expr.Any {
	v6 := p.Addr().Is6()
	off := uint32(16)
	if v6 {
		off = 24
	}
	exprs := append(nfproto(v6), prefixMatch(p, off)...)
	return append(exprs, &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop})
}

func netipMask(p netip.Prefix) []byte {
	mask := make([]byte, p.Addr().BitLen()/8)
	for i := 0; i < p.Bits(); i++ {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	return mask
}

// elementKey lays k out as the lookup's registers hold it.
func elementKey(k Key) []byte {
	alen := 4
	if k.Peer.Is6() {
		alen = 16
	}
	b := make([]byte, 2*alen+8)
	copy(b, k.Peer.AsSlice())
	b[alen] = byte(k.Proto)
	copy(b[alen+4:], k.Host.AsSlice())
	binary.BigEndian.PutUint16(b[2*alen+4:], k.Port)
	return b
}

// keyOf reads what elementKey writes.
func keyOf(b []byte) (Key, bool) {
	var alen int
	switch len(b) {
	case 16:
		alen = 4
	case 40:
		alen = 16
	default:
		return Key{}, false
	}
	peer, _ := netip.AddrFromSlice(b[:alen])
	host, _ := netip.AddrFromSlice(b[alen+4 : 2*alen+4])
	return Key{Peer: peer, Proto: Proto(b[alen]), Host: host, Port: binary.BigEndian.Uint16(b[2*alen+4:])}, true
}

// Update adds the elements of add (a hole opened or renewed: an element
// added again keeps its counter and takes the new timeout, which needs a
// kernel that updates element timeouts, as 6.18 does) and deletes those of
// del, in one transaction. An element the kernel already expired cannot be
// deleted and would fail the transaction: then the set is read and the
// transaction sent again without it.
func (t *Table) Update(add []Element, del []Key) error {
	return t.apply(nil, add, del)
}

// UpdateServices rewrites the chain with services and applies add and del
// as Update does, all in one transaction: a rules reload changes the
// always-open services and the holes the new rules refuse together, or
// neither.
func (t *Table) UpdateServices(services []Service, add []Element, del []Key) error {
	if services == nil {
		services = []Service{}
	}
	return t.apply(services, add, del)
}

// apply is Update, and rewrites the chain too when services is not nil.
func (t *Table) apply(services []Service, add []Element, del []Key) error {
	for _, e := range add {
		if e.Timeout < time.Millisecond {
			return fmt.Errorf("add hole %s: timeout %v: every hole needs a lease of 1ms or more", e.Key, e.Timeout)
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	err := t.update(services, add, del)
	if err == nil || len(del) == 0 {
		return err
	}
	present, lerr := t.elements()
	if lerr != nil {
		return errors.Join(err, lerr)
	}
	have := make(map[Key]bool, len(present))
	for _, e := range present {
		have[e.Key] = true
	}
	del = slices.DeleteFunc(slices.Clone(del), func(k Key) bool { return !have[k] })
	if rerr := t.update(services, add, del); rerr != nil {
		return fmt.Errorf("update nftables holes: %w (first attempt: %v)", rerr, err)
	}
	return nil
}

func (t *Table) update(services []Service, add []Element, del []Key) error {
	if services != nil {
		t.queueChain(services)
	}
	var add4, add6, del4, del6 []nftables.SetElement
	for _, e := range add {
		el := nftables.SetElement{Key: elementKey(e.Key), Timeout: e.Timeout, Comment: e.Comment}
		if e.Peer.Is4() {
			add4 = append(add4, el)
		} else {
			add6 = append(add6, el)
		}
	}
	for _, k := range del {
		el := nftables.SetElement{Key: elementKey(k)}
		if k.Peer.Is4() {
			del4 = append(del4, el)
		} else {
			del6 = append(del6, el)
		}
	}
	// Deletions first: a key both deleted and added ends up present.
	steps := []struct {
		set  *nftables.Set
		els  []nftables.SetElement
		call func(*nftables.Set, []nftables.SetElement) error
	}{
		{t.set4, del4, t.conn.SetDeleteElements},
		{t.set6, del6, t.conn.SetDeleteElements},
		{t.set4, add4, t.conn.SetAddElements},
		{t.set6, add6, t.conn.SetAddElements},
	}
	for _, s := range steps {
		for part := range slices.Chunk(s.els, chunk) {
			if err := s.call(s.set, part); err != nil {
				// Keys come from validated holes, so this is a bug; the
				// messages queued so far are discarded by the next Flush
				// failing or by Close.
				return fmt.Errorf("encode nftables set elements: %w", err)
			}
		}
	}
	if err := t.conn.Flush(); err != nil {
		return fmt.Errorf("nftables transaction (%d added, %d deleted): %w", len(add), len(del), err)
	}
	if services != nil {
		t.services = slices.Clone(services)
	}
	return nil
}

// Elements lists the holes in the kernel, with their counters and what is
// left of their timeouts.
func (t *Table) Elements() ([]Element, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.elements()
}

func (t *Table) elements() ([]Element, error) {
	var out []Element
	for _, s := range []*nftables.Set{t.set4, t.set6} {
		els, err := t.conn.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("list nftables set %s: %w", s.Name, err)
		}
		for _, el := range els {
			k, ok := keyOf(el.Key)
			if !ok {
				return nil, fmt.Errorf("nftables set %s holds a key of %d bytes", s.Name, len(el.Key))
			}
			e := Element{Key: k, Timeout: el.Timeout, Expires: el.Expires, Comment: el.Comment}
			if el.Counter != nil {
				e.Packets, e.Bytes = el.Counter.Packets, el.Counter.Bytes
			}
			out = append(out, e)
		}
	}
	return out, nil
}

// Reconcile makes the kernel's holes exactly want, in one transaction:
// missing ones are added, extra ones deleted, present ones given want's
// timeouts. It returns how many it added and deleted.
func (t *Table) Reconcile(want []Element) (added, deleted int, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	have, err := t.elements()
	if err != nil {
		return 0, 0, err
	}
	wanted := make(map[Key]bool, len(want))
	for _, e := range want {
		wanted[e.Key] = true
	}
	present := make(map[Key]bool, len(have))
	var del []Key
	for _, e := range have {
		present[e.Key] = true
		if !wanted[e.Key] {
			del = append(del, e.Key)
		}
	}
	for _, e := range want {
		if !present[e.Key] {
			added++
		}
	}
	for _, e := range want {
		if e.Timeout < time.Millisecond {
			return 0, 0, fmt.Errorf("reconcile hole %s: timeout %v: every hole needs a lease of 1ms or more", e.Key, e.Timeout)
		}
	}
	if err := t.update(nil, want, del); err != nil {
		return 0, 0, err
	}
	return added, len(del), nil
}

// Dropped returns how many packets the default-drop rules have dropped.
func (t *Table) Dropped() (uint64, error) {
	dropped, _, err := t.Counters()
	return dropped, err
}

// Counters returns how many packets the default-drop rules have dropped
// and, by the service's "file:line", how many packets each always-open
// service let in (those that opened connections: see queueChain).
func (t *Table) Counters() (dropped uint64, services map[string]uint64, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	rules, err := t.conn.GetRules(t.table, t.chain)
	if err != nil {
		return 0, nil, fmt.Errorf("list rules of inet %s %s: %w", t.table.Name, chainName, err)
	}
	services = map[string]uint64{}
	where := map[string]string{}
	for _, sv := range t.services {
		where[serviceComment(sv.Where)] = sv.Where
	}
	for _, r := range rules {
		var n uint64
		drop := false
		for _, e := range r.Exprs {
			switch e := e.(type) {
			case *expr.Counter:
				n += e.Packets
			case *expr.Verdict:
				drop = e.Kind == expr.VerdictDrop
			}
		}
		comment, _ := userdata.GetString(r.UserData, userdata.TypeComment)
		if w, ok := where[comment]; ok {
			services[w] += n
		} else if drop {
			dropped += n
		}
	}
	return dropped, services, nil
}

// Remove deletes the table, its holes and its forward policy.
func (t *Table) Remove() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.conn.DelTable(t.table)
	if err := t.conn.Flush(); err != nil {
		return fmt.Errorf("delete nftables table inet %s: %w", t.table.Name, err)
	}
	return nil
}

// Close releases the netlink socket; the table stays in the kernel, so
// that a restarted gateway finds its holes.
func (t *Table) Close() error {
	err := t.conn.CloseLasting()
	t.closeNS()
	return err
}

func (t *Table) closeNS() {
	if t.ns != nil {
		t.ns.Close()
		t.ns = nil
	}
}
