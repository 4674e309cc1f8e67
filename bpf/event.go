package bpf

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"unsafe"

	"github.com/procgate/procgate/ruleset"
)

// Hook names a kernel attach point: enum hook of decision.h, whose values
// bpf2go generates (procgate_bpfel.go).
type Hook uint8

const (
	HookConnect4   = Hook(procgateHookHOOK_CONNECT4)
	HookConnect6   = Hook(procgateHookHOOK_CONNECT6)
	HookSendmsg4   = Hook(procgateHookHOOK_SENDMSG4)
	HookSendmsg6   = Hook(procgateHookHOOK_SENDMSG6)
	HookEgress4    = Hook(procgateHookHOOK_EGRESS4) // cgroup_skb egress backstop
	HookEgress6    = Hook(procgateHookHOOK_EGRESS6)
	HookSockCreate = Hook(procgateHookHOOK_SOCK_CREATE)
	HookTCPSend    = Hook(procgateHookHOOK_TCP_SEND) // sk_msg: a write to an app's TCP connection
	HookBind4      = Hook(procgateHookHOOK_BIND4)    // cgroup/bind4: a bind of an app with listen:
	HookBind6      = Hook(procgateHookHOOK_BIND6)
	HookUDPSend    = Hook(procgateHookHOOK_UDP_SEND) // BPF LSM socket_sendmsg: a write to an app's connected UDP socket
	HookTUN        = Hook(procgateHookHOOK_TUN)      // BPF LSM: a TUN or TAP device made or attached
	HookListen     = Hook(procgateHookHOOK_LISTEN)   // BPF LSM socket_listen: listen() on a never-bound socket
)

func (h Hook) String() string {
	switch h {
	case HookConnect4:
		return "connect4"
	case HookConnect6:
		return "connect6"
	case HookSendmsg4:
		return "sendmsg4"
	case HookSendmsg6:
		return "sendmsg6"
	case HookEgress4:
		return "egress4"
	case HookEgress6:
		return "egress6"
	case HookSockCreate:
		return "sock_create"
	case HookTCPSend:
		return "tcp_send"
	case HookBind4:
		return "bind4"
	case HookBind6:
		return "bind6"
	case HookUDPSend:
		return "udp_send"
	case HookTUN:
		return "tun"
	case HookListen:
		return "listen"
	}
	return fmt.Sprintf("hook(%d)", uint8(h))
}

// auditWouldDeny is AUDIT_WOULD_DENY in decision.h: audit_event.allowed of
// a would-be denial. Any other value but 1 (allowed) reads as denied.
const auditWouldDeny = 2

// Event is one audit record from the kernel.
type Event struct {
	MonotonicNS uint64 // bpf_ktime_get_ns: CLOCK_MONOTONIC
	CgroupID    uint64
	PID, TID    uint32
	UID, GID    uint32
	AppID       uint32 // 0: unbound
	Generation  uint32
	Allowed     bool
	// WouldDeny: denied by the policy of an app in audit mode, and let
	// pass (Allowed is false).
	WouldDeny bool
	Reason    ruleset.Reason
	Hook      Hook
	Dest      ruleset.Dest
	Comm      string
}

// EventSize is the size of struct audit_event.
const EventSize = int(unsafe.Sizeof(procgateAuditEvent{}))

// DecodeEvent parses one ring buffer record. It checks sizes and fields, as
// the bytes come from a map any root process may write to.
func DecodeEvent(raw []byte) (Event, error) {
	if len(raw) < EventSize {
		return Event{}, fmt.Errorf("audit event is %d bytes, want %d", len(raw), EventSize)
	}
	var e procgateAuditEvent
	if err := binary.Read(bytes.NewReader(raw[:EventSize]), binary.NativeEndian, &e); err != nil {
		return Event{}, fmt.Errorf("decode audit event: %w", err)
	}
	out := Event{
		MonotonicNS: e.TsNs, CgroupID: e.CgroupId, PID: e.Pid, TID: e.Tid, UID: e.Uid, GID: e.Gid,
		AppID: e.AppId, Generation: e.Generation, Allowed: e.Allowed == 1, WouldDeny: e.Allowed == auditWouldDeny,
		Reason: ruleset.Reason(e.Reason), Hook: Hook(e.Hook),
	}
	switch e.Proto {
	case 1:
		out.Dest.Proto = ruleset.TCP
	case 2:
		out.Dest.Proto = ruleset.UDP
	}
	out.Dest.Port = e.Port
	switch e.Family {
	case 4:
		out.Dest.Addr = netip.AddrFrom4([4]byte(e.Addr[:4]))
	case 6:
		out.Dest.Addr = netip.AddrFrom16(e.Addr)
	default:
		return Event{}, fmt.Errorf("audit event of hook %s, reason %s: address family %d", out.Hook, out.Reason, e.Family)
	}
	comm := make([]byte, 0, len(e.Comm))
	for _, c := range e.Comm {
		if c == 0 {
			break
		}
		comm = append(comm, byte(c))
	}
	out.Comm = string(comm)
	return out, nil
}
