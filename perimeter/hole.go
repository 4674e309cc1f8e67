package perimeter

import (
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Proto is the transport protocol of a hole, as its IP protocol number (the
// value `meta l4proto` loads in the kernel).
type Proto uint8

const (
	TCP Proto = unix.IPPROTO_TCP
	UDP Proto = unix.IPPROTO_UDP
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return "proto(" + strconv.Itoa(int(p)) + ")"
}

// ParseProto reads "tcp" or "udp".
func ParseProto(s string) (Proto, error) {
	switch s {
	case "tcp":
		return TCP, nil
	case "udp":
		return UDP, nil
	}
	return 0, fmt.Errorf("want tcp or udp, got %q", s)
}

// MarshalText writes the protocol's name.
func (p Proto) MarshalText() ([]byte, error) {
	if p != TCP && p != UDP {
		return nil, fmt.Errorf("protocol %d is neither tcp nor udp", p)
	}
	return []byte(p.String()), nil
}

// UnmarshalText reads what MarshalText writes.
func (p *Proto) UnmarshalText(b []byte) error {
	v, err := ParseProto(string(b))
	if err != nil {
		return err
	}
	*p = v
	return nil
}

// Key is what the kernel matches for a hole: packets from Peer (any source
// port) to Host:Port over Proto. Peer and Host are of one family; IPv4-mapped
// IPv6 addresses are stored as IPv4.
type Key struct {
	Peer  netip.Addr `json:"peer"`
	Proto Proto      `json:"proto"`
	Host  netip.Addr `json:"host"`
	Port  uint16     `json:"port"`
}

func (k Key) String() string {
	return k.Proto.String() + " " + k.Peer.String() + " -> " + netip.AddrPortFrom(k.Host, k.Port).String()
}

// Target returns k as the API names it.
func (k Key) Target() Target {
	return Target{Proto: k.Proto.String(), Peer: k.Peer.String(), Host: k.Host.String(), Port: int(k.Port)}
}

// Hole is an open pinhole and what the controller knows of it.
type Hole struct {
	Key
	// Delegate is the agent that holds the lease (its certificate's name).
	Delegate string `json:"delegate"`
	// User is the end user on whose behalf the delegate asked.
	User string `json:"user"`
	// Rule is where the allow rule that authorized the hole is written
	// ("rules.conf:12"); empty for a hole adopted from the kernel and not
	// yet re-authorized.
	Rule    string    `json:"rule,omitempty"`
	Opened  time.Time `json:"opened"`
	Expires time.Time `json:"expires"`
	// Packets and Bytes are the kernel's counters of the hole's element.
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// Target names a hole in the API, as the agent writes it.
type Target struct {
	Proto string `json:"proto"`
	Peer  string `json:"peer"`
	Host  string `json:"host"`
	Port  int    `json:"port"`
}

// Request asks for a hole for User.
type Request struct {
	Target
	User string `json:"user"`
	// LeaseSeconds is the lease asked for; 0 means the gateway's default,
	// more than its maximum is cut to the maximum.
	LeaseSeconds int `json:"lease_seconds,omitempty"`
}

// FieldError is bad input: Field names the value (a JSON path such as
// "holes[2].peer"), Msg says what is wrong with it.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }

// within prefixes the field of a FieldError with the path of its container.
func within(path string, err error) error {
	if fe, ok := err.(*FieldError); ok {
		return &FieldError{Field: path + "." + fe.Field, Msg: fe.Msg}
	}
	return err
}

// Key validates t and returns the hole it names.
func (t Target) Key() (Key, error) {
	var k Key
	var err error
	if k.Proto, err = ParseProto(t.Proto); err != nil {
		return Key{}, &FieldError{"proto", err.Error()}
	}
	if k.Peer, err = parseAddr(t.Peer); err != nil {
		return Key{}, &FieldError{"peer", err.Error()}
	}
	if k.Host, err = parseAddr(t.Host); err != nil {
		return Key{}, &FieldError{"host", err.Error()}
	}
	if k.Peer.Is4() != k.Host.Is4() {
		return Key{}, &FieldError{"peer", fmt.Sprintf("%s and host %s are of different address families", k.Peer, k.Host)}
	}
	if t.Port < 1 || t.Port > 65535 {
		return Key{}, &FieldError{"port", fmt.Sprintf("want 1-65535, got %d", t.Port)}
	}
	k.Port = uint16(t.Port)
	return k, nil
}

// parseAddr reads one unicast address; a hole for a network, "any" or a
// multicast group is refused because a hole is for exactly one host.
func parseAddr(s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, fmt.Errorf("missing (want an IPv4 or IPv6 address)")
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%q is not an IP address", s)
	}
	if a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("%q: zones are not allowed", s)
	}
	a = a.Unmap()
	if a.IsUnspecified() || a.IsMulticast() || (a.Is4() && a == netip.AddrFrom4([4]byte{255, 255, 255, 255})) {
		return netip.Addr{}, fmt.Errorf("%s is not a unicast host address", a)
	}
	return a, nil
}

// nameRE is what delegate and user names may look like: no spaces, so that
// they fit the element comments that carry them through a restart.
var nameRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._@+-]{0,63}$`)

// checkName validates a delegate or user name.
func checkName(field, s string) error {
	if !nameRE.MatchString(s) {
		return &FieldError{field, fmt.Sprintf("%q is not a valid name (letters, digits and ._@+-, at most 64)", s)}
	}
	return nil
}

// Parse validates r and returns its hole and user.
func (r Request) Parse() (Key, error) {
	k, err := r.Target.Key()
	if err != nil {
		return Key{}, err
	}
	if err := checkName("user", r.User); err != nil {
		return Key{}, err
	}
	if r.LeaseSeconds < 0 {
		return Key{}, &FieldError{"lease_seconds", fmt.Sprintf("want 0 (the default) or more, got %d", r.LeaseSeconds)}
	}
	return k, nil
}

// comment is what a hole's kernel element carries so that a restarted
// controller knows whose it is.
func comment(delegate, user string) string {
	return "procgate d=" + delegate + " u=" + user
}

// parseComment reads what comment writes.
func parseComment(c string) (delegate, user string, ok bool) {
	rest, ok := strings.CutPrefix(c, "procgate d=")
	if !ok {
		return "", "", false
	}
	delegate, user, ok = strings.Cut(rest, " u=")
	if !ok || !nameRE.MatchString(delegate) || !nameRE.MatchString(user) {
		return "", "", false
	}
	return delegate, user, true
}
