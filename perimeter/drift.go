package perimeter

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// Drift says what of the table's frame (the table, its two sets, the
// forward chain and its rules) is not as the gateway wrote it, or "" when
// all of it is. An administrator's `nft add rule`, `nft delete table` or
// `nft flush chain` shows here; the holes themselves are the
// Controller's to compare (Controller.Repair).
func (t *Table) Drift() (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, err := t.conn.ListTableOfFamily(t.table.Name, nftables.TableFamilyINet); err != nil {
		if missing(err) {
			return "table inet " + t.table.Name + " missing", nil
		}
		return "", fmt.Errorf("list nftables table inet %s: %w", t.table.Name, err)
	}
	for _, want := range []*nftables.Set{t.set4, t.set6} {
		s, err := t.conn.GetSetByName(t.table, want.Name)
		if err != nil {
			if missing(err) {
				return "set " + want.Name + " missing", nil
			}
			return "", fmt.Errorf("list nftables set %s: %w", want.Name, err)
		}
		if s.KeyType.Bytes != want.KeyType.Bytes || !s.HasTimeout || !s.Concatenation {
			return "set " + want.Name + " changed", nil
		}
	}
	ch, err := t.conn.ListChain(t.table, chainName)
	if err != nil {
		if missing(err) {
			return "chain " + chainName + " missing", nil
		}
		return "", fmt.Errorf("list nftables chain %s: %w", chainName, err)
	}
	if ch.Hooknum == nil || *ch.Hooknum != *nftables.ChainHookForward || ch.Policy == nil || *ch.Policy != nftables.ChainPolicyAccept ||
		ch.Priority == nil || *ch.Priority != *nftables.ChainPriorityFilter || ch.Type != nftables.ChainTypeFilter {
		return "chain " + chainName + " changed (type, hook, priority or policy)", nil
	}
	have, err := t.conn.GetRules(t.table, t.chain)
	if err != nil {
		return "", fmt.Errorf("list rules of inet %s %s: %w", t.table.Name, chainName, err)
	}
	want := t.chainRules(t.services)
	if len(have) != len(want) {
		return fmt.Sprintf("chain %s has %d rules, want %d", chainName, len(have), len(want)), nil
	}
	for i := range want {
		if ruleShape(have[i]) != ruleShape(want[i]) {
			return fmt.Sprintf("chain %s rule %d changed", chainName, i+1), nil
		}
	}
	return "", nil
}

// missing reports whether the kernel said an object does not exist.
func missing(err error) bool {
	return errors.Is(err, os.ErrNotExist) || strings.Contains(err.Error(), "no such file or directory")
}

// ruleShape is what a rule does, without its counters and handles: the
// kernel's copy of a rule and the one the gateway builds compare equal
// when they match the same packets to the same verdict.
func ruleShape(r *nftables.Rule) string {
	var b strings.Builder
	for _, e := range r.Exprs {
		switch e := e.(type) {
		case *expr.Counter:
			b.WriteString("counter;")
		case *expr.Lookup:
			fmt.Fprintf(&b, "lookup %s %d %v;", e.SetName, reg(e.SourceRegister), e.Invert)
		case *expr.Cmp:
			fmt.Fprintf(&b, "cmp %d %d %x;", e.Op, reg(e.Register), e.Data)
		case *expr.Verdict:
			fmt.Fprintf(&b, "verdict %d %s;", e.Kind, e.Chain)
		case *expr.Payload:
			fmt.Fprintf(&b, "payload %d %d %d %d;", e.Base, e.Offset, e.Len, reg(e.DestRegister))
		case *expr.Meta:
			fmt.Fprintf(&b, "meta %d %d;", e.Key, reg(e.Register))
		case *expr.Bitwise:
			fmt.Fprintf(&b, "bitwise %d %d %d %x %x;", reg(e.SourceRegister), reg(e.DestRegister), e.Len, e.Mask, e.Xor)
		case *expr.Range:
			fmt.Fprintf(&b, "range %d %d %x %x;", reg(e.Register), e.Op, e.FromData, e.ToData)
		case *expr.Ct:
			fmt.Fprintf(&b, "ct %d %d;", e.Key, reg(e.Register))
		default:
			fmt.Fprintf(&b, "%T %+v;", e, e)
		}
	}
	c, _ := userdata.GetString(r.UserData, userdata.TypeComment)
	return b.String() + "comment " + c
}

// reg is a register as a 32-bit register number: the kernel dumps
// NFT_REG32_04 as NFT_REG_2, the same place (nft_parse_register in
// net/netfilter/nf_tables_api.c).
func reg(r uint32) uint32 {
	if r <= unix.NFT_REG_4 {
		return r * 4
	}
	return r - unix.NFT_REG32_00 + 4
}

// Rebuild writes the table anew with holes as its elements, in one
// transaction: the table (if the kernel still has one) is deleted and
// created again, so that whatever an administrator changed in it is gone.
// The holes' counters start again from zero.
func (t *Table) Rebuild(holes []Element) error {
	for _, e := range holes {
		if e.Timeout < time.Millisecond {
			return fmt.Errorf("rebuild: hole %s: timeout %v: every hole needs a lease of 1ms or more", e.Key, e.Timeout)
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	name := t.table.Name
	if _, err := t.conn.ListTableOfFamily(name, nftables.TableFamilyINet); err == nil {
		t.conn.DelTable(t.table)
	} else if !missing(err) {
		return fmt.Errorf("rebuild nftables table inet %s: %w", name, err)
	}
	if err := t.queueInstall(name); err != nil {
		return fmt.Errorf("rebuild nftables table inet %s: %w", name, err)
	}
	if err := t.update(nil, holes, nil); err != nil {
		return fmt.Errorf("rebuild nftables table inet %s: %w", name, err)
	}
	return nil
}
