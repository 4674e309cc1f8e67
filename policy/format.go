package policy

import (
	"bytes"
	"fmt"
	"reflect"
	"strconv"

	"gopkg.in/yaml.v3"

	"github.com/procgate/procgate/ruleset"
)

// Format writes rs as policy YAML such that Parse reads back rs apart from
// Source. rs must be in the form Parse produces (masked 4-byte IPv4 prefixes,
// ports sorted and deduplicated, grant indexes equal to positions, names and
// paths valid, AuditRate in range); otherwise Format says what differs instead
// of writing a file that would mean something else.
func Format(rs *ruleset.Ruleset) ([]byte, error) {
	if rs == nil {
		return nil, fmt.Errorf("format policy: no ruleset")
	}
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(policyNode(rs)); err != nil {
		return nil, fmt.Errorf("encode policy: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encode policy: %w", err)
	}
	out := buf.Bytes()
	back, _, err := Parse("formatted", out)
	if err != nil {
		return nil, fmt.Errorf("ruleset cannot be written as a policy:\n%w", err)
	}
	if d := diff(rs, back); d != "" {
		return nil, fmt.Errorf("ruleset is not in the form a policy compiles to: %s", d)
	}
	return out, nil
}

func scalar(tag, v string) *yaml.Node { return &yaml.Node{Kind: yaml.ScalarNode, Tag: tag, Value: v} }
func text(v string) *yaml.Node        { return scalar("!!str", v) }
func number(v int) *yaml.Node         { return scalar("!!int", strconv.Itoa(v)) }

func mapping(style yaml.Style, kv ...*yaml.Node) *yaml.Node {
	return &yaml.Node{Kind: yaml.MappingNode, Style: style, Content: kv}
}

func flowList[T any](items []T, node func(T) *yaml.Node) *yaml.Node {
	n := &yaml.Node{Kind: yaml.SequenceNode, Style: yaml.FlowStyle, Content: []*yaml.Node{}}
	for _, it := range items {
		n.Content = append(n.Content, node(it))
	}
	return n
}

func policyNode(rs *ruleset.Ruleset) *yaml.Node {
	internal := mapping(0, text("prefixes"), flowList(rs.Internal, func(p ruleset.InternalPrefix) *yaml.Node {
		return text(p.Prefix.String())
	}))
	if len(rs.Interfaces) > 0 {
		internal.Content = append(internal.Content, text("interfaces"), flowList(rs.Interfaces, text))
	}
	top := mapping(0, text("version"), number(Version), text("internal"), internal)
	if rs.AuditRate != DefaultAuditRate {
		top.Content = append(top.Content, text("audit"), mapping(0, text("rate"), number(int(rs.AuditRate))))
	}
	if len(rs.Everyone) > 0 {
		top.Content = append(top.Content, text("everyone"), mapping(0, text("allow"), grantList(rs.Everyone)))
	}
	apps := &yaml.Node{Kind: yaml.SequenceNode, Content: []*yaml.Node{}}
	for _, a := range rs.Apps {
		apps.Content = append(apps.Content, appNode(a))
	}
	top.Content = append(top.Content, text("apps"), apps)
	return top
}

func appNode(a ruleset.App) *yaml.Node {
	n := mapping(0, text("name"), text(a.Name))
	if len(a.Exe) > 0 {
		n.Content = append(n.Content, text("exe"), exeNode(a.Exe))
	}
	if len(a.Users) > 0 {
		n.Content = append(n.Content, text("users"), flowList(a.Users, text))
	}
	if len(a.KeepCaps) > 0 {
		n.Content = append(n.Content, text("keep_caps"), flowList(a.KeepCaps, text))
	}
	if a.Traceable {
		n.Content = append(n.Content, text("traceable"), &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!bool", Value: "true"})
	}
	if a.AllowHandover {
		n.Content = append(n.Content, text("handover"), text("allow"))
	}
	if a.AuditAllow {
		n.Content = append(n.Content, text("audit"), text("all"))
	}
	if a.AuditOnly {
		n.Content = append(n.Content, text("mode"), text("audit"))
	}
	if a.Match != nil {
		n.Content = append(n.Content, text("match"), mapping(0, text(a.Match.Kind.String()), text(a.Match.Value)))
	}
	if a.OutsideDeny {
		n.Content = append(n.Content, text("outside"), text("deny"))
	}
	if a.LoopbackDeny {
		n.Content = append(n.Content, text("loopback"), text("deny"))
	}
	if a.Listen != nil {
		n.Content = append(n.Content, text("listen"), portList(a.Listen.Ports))
	}
	n.Content = append(n.Content, text("allow"), grantList(a.Grants))
	if a.Inbound != nil {
		n.Content = append(n.Content, text("inbound"), mapping(0, text("dynamic"), dynamicNode(a.Inbound)))
	}
	return n
}

func portList(rs []ruleset.PortRange) *yaml.Node {
	return flowList(rs, func(r ruleset.PortRange) *yaml.Node {
		if r.Lo == r.Hi {
			return number(int(r.Lo))
		}
		return text(r.String())
	})
}

func dynamicNode(in *ruleset.Inbound) *yaml.Node {
	n := mapping(0)
	if len(in.Control) > 0 {
		n.Content = append(n.Content, text("control"), portList(in.Control))
	}
	n.Content = append(n.Content, text("ports"), portList(in.Ports))
	n.Content = appendProto(n.Content, in.Proto)
	if in.Lease != 0 {
		n.Content = append(n.Content, text("lease"), text(in.Lease.String()))
	}
	return n
}

// exeNode writes a flow list of paths when no exe is pinned by hash, and a
// block list (with one {path, sha256} per line) when one is.
func exeNode(exes []ruleset.Exe) *yaml.Node {
	item := func(e ruleset.Exe) *yaml.Node {
		if e.SHA256 == "" {
			return text(e.Path)
		}
		return mapping(yaml.FlowStyle, text("path"), text(e.Path), text("sha256"), text(e.SHA256))
	}
	n := flowList(exes, item)
	for _, e := range exes {
		if e.SHA256 != "" {
			n.Style = 0
		}
	}
	return n
}

// appendProto adds a proto field unless p is both, the default.
func appendProto(kv []*yaml.Node, p ruleset.Proto) []*yaml.Node {
	switch p {
	case ruleset.Both:
		return kv
	case ruleset.TCP:
		return append(kv, text("proto"), text("tcp"))
	case ruleset.UDP:
		return append(kv, text("proto"), text("udp"))
	}
	// Unrepresentable; written as is so that the read-back check names it.
	return append(kv, text("proto"), text(p.String()))
}

// grantList writes grants one per item, or [] when there are none.
func grantList(gs []ruleset.Grant) *yaml.Node {
	allow := &yaml.Node{Kind: yaml.SequenceNode, Content: []*yaml.Node{}}
	if len(gs) == 0 {
		allow.Style = yaml.FlowStyle
	}
	for _, g := range gs {
		allow.Content = append(allow.Content, grantNode(g))
	}
	return allow
}

func grantNode(g ruleset.Grant) *yaml.Node {
	to := g.Prefix.String()
	if g.Name != "" {
		to = g.Name
	}
	n := mapping(0, text("to"), text(to))
	n.Content = appendProto(n.Content, g.Proto)
	if len(g.Ports) != 1 || g.Ports[0] != ruleset.AllPorts {
		n.Content = append(n.Content, text("ports"), portList(g.Ports))
	}
	return n
}

// diff names the first part of want that reads back differently, or "".
func diff(want, got *ruleset.Ruleset) string {
	a, b := withoutSources(want), withoutSources(got)
	type part struct {
		name      string
		want, got any
	}
	parts := []part{
		{"internal prefixes", a.Internal, b.Internal},
		{"everyone grants", a.Everyone, b.Everyone},
		{"interfaces", a.Interfaces, b.Interfaces},
		{"audit rate", a.AuditRate, b.AuditRate},
		{"number of apps", len(a.Apps), len(b.Apps)},
	}
	for _, p := range parts {
		if !reflect.DeepEqual(p.want, p.got) {
			return fmt.Sprintf("%s %v reads back as %v", p.name, p.want, p.got)
		}
	}
	for i := range a.Apps {
		if !reflect.DeepEqual(a.Apps[i], b.Apps[i]) {
			return fmt.Sprintf("apps[%d] %+v reads back as %+v", i, a.Apps[i], b.Apps[i])
		}
	}
	return ""
}

// withoutSources returns a copy of rs without sources and with empty lists as nil,
// the form in which a ruleset and its formatted read-back must be equal.
func withoutSources(rs *ruleset.Ruleset) *ruleset.Ruleset {
	c := rs.Clone()
	for i := range c.Internal {
		c.Internal[i].Source = ruleset.Source{}
	}
	c.Internal = nilIfEmpty(c.Internal)
	c.Interfaces = nilIfEmpty(c.Interfaces)
	c.Everyone = grantsWithoutSources(c.Everyone)
	c.Apps = nilIfEmpty(c.Apps)
	for i := range c.Apps {
		a := &c.Apps[i]
		a.Source = ruleset.Source{}
		a.Exe, a.Users, a.KeepCaps = nilIfEmpty(a.Exe), nilIfEmpty(a.Users), nilIfEmpty(a.KeepCaps)
		a.Grants = grantsWithoutSources(a.Grants)
		if a.Listen != nil {
			a.Listen.Source = ruleset.Source{}
			if a.Listen.Ports == nil {
				a.Listen.Ports = []ruleset.PortRange{}
			}
		}
		if a.Inbound != nil {
			a.Inbound.Source = ruleset.Source{}
			a.Inbound.Control = nilIfEmpty(a.Inbound.Control)
		}
	}
	return c
}

func grantsWithoutSources(gs []ruleset.Grant) []ruleset.Grant {
	gs = nilIfEmpty(gs)
	for j := range gs {
		gs[j].Source = ruleset.Source{}
		gs[j].Ports = nilIfEmpty(gs[j].Ports)
	}
	return gs
}

func nilIfEmpty[T any](s []T) []T {
	if len(s) == 0 {
		return nil
	}
	return s
}
