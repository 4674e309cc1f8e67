// Package api is the daemon's local API: JSON messages over a unix stream
// socket, one request per connection. The daemon checks the peer's
// credentials (SO_PEERCRED) on every request.
//
// A request is one JSON line. The answer is one JSON line, except for
// streaming requests (events --follow, run), which answer with a line per
// record or state change. `run` passes the caller's stdin, stdout and stderr
// with the request line (SCM_RIGHTS) and may send Signal lines afterwards.
package api

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/procgate/procgate/internal/version"
	"github.com/procgate/procgate/ruleset"
)

// DefaultSocket is where the daemon listens unless told otherwise.
const DefaultSocket = "/run/procgate/procgate.sock"

// SocketFromEnv is the socket a client uses: the flag, else $PROCGATE_SOCKET,
// else DefaultSocket.
func SocketFromEnv(flag string) string {
	if flag != "" {
		return flag
	}
	if s := os.Getenv("PROCGATE_SOCKET"); s != "" {
		return s
	}
	return DefaultSocket
}

// Ops.
const (
	OpStatus  = "status"
	OpExplain = "explain"
	OpRevoke  = "revoke"
	OpEvents  = "events"
	OpRun     = "run"
	OpAppInfo = "app-info"
	OpReload  = "reload"
	// OpPinholeOpen names a peer for an auxiliary port of the caller's app
	// (its cgroup decides which); OpPinholes lists the agent's holes.
	OpPinholeOpen = "pinhole-open"
	OpPinholes    = "pinholes"
)

// MaxRequestBytes bounds a request line: the daemon reads no more.
const MaxRequestBytes = 1 << 20

// Request is every request; each op reads the fields it names.
type Request struct {
	Op string `json:"op"`

	App string `json:"app,omitempty"` // explain, revoke, run, app-info
	// explain
	Dest string `json:"dest,omitempty"`
	PID  int    `json:"pid,omitempty"`
	// revoke
	Grant   *int `json:"grant,omitempty"`
	Restore bool `json:"restore,omitempty"`
	// events: App, and these filters, all of which a record must pass.
	// The daemon filters, not the client: a caller other than root gets
	// only the records of its own uid, whatever it asks.
	Follow  bool      `json:"follow,omitempty"`
	Last    int       `json:"last,omitempty"` // of the records that pass
	Verdict string    `json:"verdict,omitempty"`
	Since   time.Time `json:"since,omitzero"`
	// DestPrefix: records whose destination address is in it (an
	// address or a prefix).
	DestPrefix string `json:"dest_prefix,omitempty"`
	// run
	// The caller's working directory comes as a descriptor after its stdio;
	// Dir is its path, for messages.
	Argv []string `json:"argv,omitempty"`
	Env  []string `json:"env,omitempty"`
	Dir  string   `json:"dir,omitempty"`
	// Pty: stdin (a new pty the client relays) becomes the app's
	// controlling terminal.
	Pty bool `json:"pty,omitempty"`
	// Untraced, with app-info from root: the caller is about to launch a
	// process into the app outside the trace guard, and says why; the
	// daemon answers once the TCP handover guard's tracker is attached.
	Untraced string `json:"untraced,omitempty"`
	// All, with status: every internal prefix and grant, not only the
	// first StatusListMax of each list.
	All bool `json:"all,omitempty"`
	// Signal, sent on a run connection after the request: relay it.
	Signal int `json:"signal,omitempty"`
	// pinhole-open: one peer address, an auxiliary port, tcp or udp ("":
	// tcp, or udp for an app whose auxiliary ports are udp only)
	Peer  string `json:"peer,omitempty"`
	Port  int    `json:"port,omitempty"`
	Proto string `json:"proto,omitempty"`
}

// Decode reads one request line, refusing unknown fields and oversize input.
func Decode(r io.Reader) (Request, error) {
	line, err := bufio.NewReaderSize(io.LimitReader(r, MaxRequestBytes), 4096).ReadBytes('\n')
	if err != nil && !(errors.Is(err, io.EOF) && len(line) > 0) {
		return Request{}, fmt.Errorf("read request: %w", err)
	}
	return DecodeLine(line)
}

// DecodeLine parses one request.
func DecodeLine(line []byte) (Request, error) {
	var req Request
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return Request{}, fmt.Errorf("decode request: %w", err)
	}
	switch req.Op {
	case OpStatus, OpExplain, OpRevoke, OpEvents, OpRun, OpAppInfo, OpReload, OpPinholeOpen, OpPinholes:
	case "":
		return Request{}, errors.New("request has no op")
	default:
		return Request{}, fmt.Errorf("unknown op %q", req.Op)
	}
	if len(req.Argv) > 4096 || len(req.Env) > 4096 {
		return Request{}, errors.New("request argv or env too long")
	}
	return req, nil
}

// Status is the answer to OpStatus.
type Status struct {
	// Version is the daemon's build: a client compares it with its own
	// and warns when they differ (an upgrade that did not restart it).
	Version      version.Info    `json:"version"`
	Generation   uint32          `json:"generation"`
	Policy       string          `json:"policy"`
	PolicySHA256 string          `json:"policy_sha256"`
	LoadedAt     time.Time       `json:"loaded_at"`
	LastError    string          `json:"last_error,omitempty"` // last rejected reload, kept until a good one
	CgroupRoot   string          `json:"cgroup_root"`
	BPFDir       string          `json:"bpf_dir"`
	Hooks        map[string]bool `json:"hooks"`
	Guards       []Guard         `json:"guards"`
	Adopted      bool            `json:"adopted"`
	// Internal are the internal prefixes in force: the first
	// StatusListMax of InternalTotal, all of them when asked (All).
	Internal      []string    `json:"internal"`
	InternalTotal int         `json:"internal_total"`
	Apps          []AppStatus `json:"apps"`
	Unbound       Counters    `json:"unbound"`
	Audit         AuditStats  `json:"audit"`
	// PolicyDropins are the policy.d drop-ins merged into Policy, in
	// merge order.
	PolicyDropins []string `json:"policy_dropins,omitempty"`
	// Pinholes is the pinhole agent; nil when the daemon runs without
	// --gateway.
	Pinholes *PinholeAgent `json:"pinholes,omitempty"`
	// Fleet is the policy's source when it comes from etcd
	// (--policy-store etcd); nil with the policy file.
	Fleet *FleetSource `json:"fleet,omitempty"`
}

// StatusListMax bounds the internal prefixes, and each app's grants, that
// a status answer lists unless asked for all: a policy of a million
// prefixes would otherwise make every status a megabytes-long answer.
const StatusListMax = 32

// InternalCount is how many internal prefixes are in force, listed or
// not (a daemon before internal_total listed them all).
func (s *Status) InternalCount() int { return max(s.InternalTotal, len(s.Internal)) }

// GrantCount is how many grants the app has, listed or not.
func (a *AppStatus) GrantCount() int { return max(a.GrantsTotal, len(a.Grants)) }

// ModeColumn is the app's mode as a table shows it: audit mode in
// capitals, as it is not enforcement.
func (a *AppStatus) ModeColumn() string {
	if a.Mode == ruleset.ModeAudit {
		return "AUDIT"
	}
	return a.Mode
}

// AuditModeApps are the names of the apps in audit mode, in status order.
func (s *Status) AuditModeApps() []string {
	var out []string
	for _, a := range s.Apps {
		if a.Mode == ruleset.ModeAudit {
			out = append(out, a.Name)
		}
	}
	return out
}

// FleetSource is the etcd policy source in Status.
type FleetSource struct {
	Host      string   `json:"host"`
	Labels    []string `json:"labels,omitempty"`
	Endpoints []string `json:"endpoints"`
	// Revision is the etcd revision of the policy in force.
	Revision int64 `json:"revision"`
	// Source is "etcd", or "last-known-good" while the policy in force is
	// the one kept on disk because etcd did not answer at boot (stale).
	Source    string `json:"source"`
	Connected bool   `json:"connected"`
	EtcdError string `json:"etcd_error,omitempty"`
}

// PinholeAgent is the pinhole agent in Status.
type PinholeAgent struct {
	// Gateway is the gateway the agent speaks to now (of --gateway's).
	Gateway string `json:"gateway"`
	Open    int    `json:"open"`
	Pending int    `json:"pending"`
	Refused int    `json:"refused"`
	// GuardDrops counts packets the host guard dropped at auxiliary ports.
	GuardDrops uint64 `json:"guard_drops"`
	// Held counts data segments of control connections held until the
	// app's new holes were live at the gateway.
	Held uint64 `json:"held_segments"`
}

// Pinhole is one hole of the agent: open at the gateway, refused by it, or
// pending (wanted, not yet open).
type Pinhole struct {
	App     string    `json:"app"`
	User    string    `json:"user"`
	PID     uint32    `json:"pid,omitempty"`
	Proto   string    `json:"proto"`
	Peer    string    `json:"peer"`
	Host    string    `json:"host"`
	Port    uint16    `json:"port"`
	State   string    `json:"state"`
	Reason  string    `json:"reason,omitempty"`
	Opened  time.Time `json:"opened,omitzero"`
	Expires time.Time `json:"expires,omitzero"`
	Packets uint64    `json:"packets"`
	Bytes   uint64    `json:"bytes"`
}

// Guard is one protection and whether this kernel gives it.
type Guard struct {
	Name   string `json:"name"`
	What   string `json:"what"`
	Active bool   `json:"active"`
	Why    string `json:"why,omitempty"`
}

// AppStatus is one app in Status.
type AppStatus struct {
	Name   string `json:"name"`
	ID     uint32 `json:"id"`
	Cgroup string `json:"cgroup"`
	// Principal is what processes the app is: "launched", "unit
	// nginx.service", "cgroup system.slice/docker-*.scope", "user backup".
	Principal string `json:"principal"`
	// Cgroups counts the existing cgroups a unit or cgroup match took at
	// the last scan (cgroups made since are followed by the kernel).
	Cgroups int `json:"cgroups"`
	// Grants are the app's grants: the first StatusListMax of
	// GrantsTotal, all of them when asked (All).
	Grants      []string `json:"grants"`
	GrantsTotal int      `json:"grants_total"`
	Revoked     []string `json:"revoked,omitempty"` // "all" or grant numbers; "fleet:..." revoked fleet-wide
	Counters    Counters `json:"counters"`
	// Mode is the app's mode in force: "enforce", or "audit" (mode:
	// audit: what its policy refuses passes, as would-deny). An app whose
	// grants are all revoked is enforced.
	Mode string `json:"mode"`
}

// Counters are the kernel's per-principal decision counts.
type Counters struct {
	Allow      uint64 `json:"allow"`
	Deny       uint64 `json:"deny"`
	External   uint64 `json:"external"`
	AuditDrops uint64 `json:"audit_drops"`
	// WouldDeny counts the attempts of an app in audit mode that its
	// policy refuses, which passed.
	WouldDeny uint64 `json:"would_deny,omitempty"`
}

// AuditStats summarizes the audit reader.
type AuditStats struct {
	Events       uint64 `json:"events"`
	DecodeErrors uint64 `json:"decode_errors"`
	Dropped      uint64 `json:"dropped"`
	Log          string `json:"log"`
}

// Explain is the answer to OpExplain.
type Explain struct {
	App string `json:"app"` // "" unbound
	// Principal says how the process is the app (--pid): "launched",
	// "unit nginx.service", "user backup"; "" for --app.
	Principal string `json:"principal,omitempty"`
	Dest      string `json:"dest"`
	// Allow and Reason are the decision as enforced: for an app in audit
	// mode, what enforcement would decide.
	Allow  bool   `json:"allow"`
	Reason string `json:"reason"`
	// Verdict is what the attempt's audit record says: "allow", "deny",
	// or "would-deny" (an app in audit mode: denied, and it passes).
	Verdict string `json:"verdict"`
	// Mode is the app's mode, "enforce" or "audit"; "" unbound.
	Mode     string `json:"mode,omitempty"`
	Decision string `json:"decision"` // human form with the rules behind it
}

// Revoke is the answer to OpRevoke.
type Revoke struct {
	Generation uint32 `json:"generation"`
	Revoked    string `json:"revoked"`
	// SocketsEnded counts the app's live sockets (TCP, connected UDP) to
	// destinations no longer allowed that were ended.
	SocketsEnded int `json:"sockets_ended"`
}

// AppInfo is the answer to OpAppInfo: what a root caller needs to launch
// an app itself.
type AppInfo struct {
	Name   string   `json:"name"`
	Cgroup string   `json:"cgroup"`
	Exe    []string `json:"exe,omitempty"`
	SHA256 []string `json:"sha256,omitempty"`
	Users  []string `json:"users,omitempty"`
	// KeepCaps are the app's keep_caps: the launcher leaves them in the
	// bounding set.
	KeepCaps []string `json:"keep_caps,omitempty"`
	// Traceable is the app's traceable: no trace guard for it.
	Traceable bool `json:"traceable,omitempty"`
	// GuardGID is the daemon's trace guard gid (0: off), for a root
	// caller's own launch to apply the same guard.
	GuardGID uint32 `json:"guard_gid,omitempty"`
}

// RunState is a line on a run connection: first Started, last Exited, and
// between them Stopped and Continued as the app stops and continues (job
// control: the client stops itself while the app is stopped).
type RunState struct {
	Started   int  `json:"started,omitempty"` // child pid
	Stopped   int  `json:"stopped,omitempty"` // the stop signal
	Continued bool `json:"continued,omitempty"`
	Exited    bool `json:"exited,omitempty"`
	Code      int  `json:"code"`
	Signal    int  `json:"signal,omitempty"`
}

// Response wraps every answer line.
type Response struct {
	Error string `json:"error,omitempty"`
	// ExitCode comes with Error on a run connection: the status the client
	// exits with, 126 (cannot execute) or 127 (not found); 125 otherwise.
	ExitCode int             `json:"exit_code,omitempty"`
	Status   *Status         `json:"status,omitempty"`
	Explain  *Explain        `json:"explain,omitempty"`
	Revoke   *Revoke         `json:"revoke,omitempty"`
	Event    json.RawMessage `json:"event,omitempty"`
	AppInfo  *AppInfo        `json:"app_info,omitempty"`
	Run      *RunState       `json:"run,omitempty"`
	Reload   *uint32         `json:"reload,omitempty"` // new generation
	// SocketsEnded (reload) counts the live sockets the new generation
	// ended.
	SocketsEnded int       `json:"sockets_ended,omitempty"`
	Pinhole      *Pinhole  `json:"pinhole,omitempty"`
	Pinholes     []Pinhole `json:"pinholes,omitempty"`
}

// Client talks to a daemon.
type Client struct {
	Socket string
}

// Dial opens a connection and sends req.
func (c Client) Dial(req Request) (*net.UnixConn, *bufio.Reader, error) {
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: c.Socket, Net: "unix"})
	if err != nil {
		return nil, nil, fmt.Errorf("connect to procgate daemon at %s (is it running? set --socket or PROCGATE_SOCKET): %w", c.Socket, err)
	}
	if err := WriteLine(conn, req); err != nil {
		conn.Close()
		return nil, nil, err
	}
	return conn, bufio.NewReader(conn), nil
}

// Do sends req and reads one response.
func (c Client) Do(req Request) (*Response, error) {
	conn, r, err := c.Dial(req)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return ReadResponse(r)
}

// ReadResponse reads one response line; a response with Error set becomes
// an error.
func ReadResponse(r *bufio.Reader) (*Response, error) {
	line, err := r.ReadBytes('\n')
	if err != nil {
		if errors.Is(err, io.EOF) && len(line) == 0 {
			return nil, io.EOF
		}
		if !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("read daemon response: %w", err)
		}
	}
	var resp Response
	if err := json.Unmarshal(line, &resp); err != nil {
		return nil, fmt.Errorf("decode daemon response: %w", err)
	}
	if resp.Error != "" {
		return &resp, errors.New(resp.Error)
	}
	return &resp, nil
}

// WriteLine writes v as one JSON line.
func WriteLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if _, err := w.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("write to daemon socket: %w", err)
	}
	return nil
}
