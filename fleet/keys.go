// Package fleet keeps a fleet's policy in etcd: where each document lives,
// how a host merges the documents that concern it, how a daemon follows
// them (one etcd revision at a time) and reports what it applied, and the
// administrator's side (push, diff, status).
package fleet

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// The key layout (docs/fleet.md).
const (
	// Prefix holds every key procgate writes.
	Prefix = "/procgate/"
	// PolicyPrefix holds the policy documents; a daemon watches it.
	PolicyPrefix = Prefix + "policy/"
	// FleetKey is the fleet document: every host's main policy file.
	FleetKey = PolicyPrefix + "fleet"
	// GroupPrefix holds the overlays of hosts with a label:
	// GroupPrefix + "k=v".
	GroupPrefix = PolicyPrefix + "groups/"
	// HostPrefix holds the per-host overlays: HostPrefix + NAME.
	HostPrefix = PolicyPrefix + "hosts/"
	// StatusPrefix holds the hosts' reports:
	// StatusPrefix + NAME + "/status".
	StatusPrefix = Prefix + "hosts/"
)

// GroupKey is the key of the overlay for hosts with label k=v.
func GroupKey(l Label) string { return GroupPrefix + l.String() }

// HostKey is the key of host name's overlay.
func HostKey(name string) string { return HostPrefix + name }

// StatusKey is where host name reports what it applied.
func StatusKey(name string) string { return StatusPrefix + name + "/status" }

// Label is one of a host's labels, k=v.
type Label struct{ Key, Value string }

func (l Label) String() string { return l.Key + "=" + l.Value }

// A label's key and value, and a host name, are one path element of a key
// each: no slash, no "=" in a key, nothing a shell or a URL would quote.
var (
	labelKey  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)
	labelVal  = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)
	hostNameR = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)
)

// ParseLabel reads k=v.
func ParseLabel(s string) (Label, error) {
	k, v, ok := strings.Cut(s, "=")
	if !ok || !labelKey.MatchString(k) || !labelVal.MatchString(v) {
		return Label{}, fmt.Errorf("label %q: want key=value, letters, digits, '.', '_' and '-' (e.g. site=paris)", s)
	}
	return Label{Key: k, Value: v}, nil
}

// ParseLabels reads k=v,k=v (as --host-labels takes them), sorted by key:
// the order their groups' overlays are merged in. A key given twice is an
// error: its two overlays would have no order.
func ParseLabels(s string) ([]Label, error) {
	var out []Label
	for _, part := range strings.Split(s, ",") {
		if part = strings.TrimSpace(part); part == "" {
			continue
		}
		l, err := ParseLabel(part)
		if err != nil {
			return nil, err
		}
		out = append(out, l)
	}
	slices.SortFunc(out, func(a, b Label) int { return strings.Compare(a.Key, b.Key) })
	for i := 1; i < len(out); i++ {
		if out[i].Key == out[i-1].Key {
			return nil, fmt.Errorf("label %q given twice (%s, %s): a host has one value per label", out[i].Key, out[i-1], out[i])
		}
	}
	return out, nil
}

// CheckHostName refuses a host name that is not one key element.
func CheckHostName(name string) error {
	if !hostNameR.MatchString(name) {
		return fmt.Errorf("host name %q: want letters, digits, '.', '_' and '-', starting with a letter or digit", name)
	}
	return nil
}

// Host is who a daemon is in the fleet: its name and labels.
type Host struct {
	Name   string
	Labels []Label // sorted by key (ParseLabels)
}

// Keys are the documents host merges, in merge order: the fleet document,
// the groups of its labels in label-key order, its own overlay.
func (h Host) Keys() []string {
	keys := []string{FleetKey}
	labels := slices.Clone(h.Labels)
	slices.SortFunc(labels, func(a, b Label) int { return strings.Compare(a.Key, b.Key) })
	for _, l := range labels {
		keys = append(keys, GroupKey(l))
	}
	if h.Name != "" {
		keys = append(keys, HostKey(h.Name))
	}
	return keys
}
