package daemon

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/audit"
	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/fleet"
	"github.com/procgate/procgate/internal/version"
	"github.com/procgate/procgate/launch"
	"github.com/procgate/procgate/ruleset"
)

// apiStopGrace is how long, once the daemon stops, a request in flight
// may still read from and write to its client: a client that sends or
// reads nothing must not hold the daemon's stop.
const apiStopGrace = 5 * time.Second

// serveAPI serves the API on ln, each connection on a goroutine of its
// own, until stop. stop closes ln, so that no request starts; ends the
// requests' context, so that event streams and calls to the reconciler
// end and run relays let go of their apps (run); gives every request's
// connection apiStopGrace more; and waits for every handler to return.
// Run calls stop before it closes what handlers use (the enforcer, the
// pinhole agent and kernel, the audit reader), as pinhole.Kernel.Close
// waits for the calls in flight.
func (d *Daemon) serveAPI(ctx context.Context, ln *net.UnixListener) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var handlers sync.WaitGroup
	var inFlight atomic.Int64
	handlers.Add(1)
	go func() {
		defer handlers.Done()
		for {
			conn, err := ln.AcceptUnix()
			if err != nil {
				if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
					return
				}
				d.log.Warn("accept on API socket", "err", err)
				time.Sleep(10 * time.Millisecond)
				continue
			}
			// Added here, before stop can wait: a Wait that has begun
			// never meets an Add.
			handlers.Add(1)
			inFlight.Add(1)
			go func() {
				defer handlers.Done()
				defer inFlight.Add(-1)
				d.handle(ctx, conn)
			}()
		}
	}()
	return func() {
		ln.Close()
		cancel()
		if n := inFlight.Load(); n > 0 {
			d.log.Info("stopping: waiting for the API requests in flight", "requests", n, "grace", apiStopGrace)
		}
		handlers.Wait()
	}
}

// peer is who sent a request, as the kernel says (SO_PEERCRED,
// SO_PEERGROUPS), never as the request says.
type peer struct {
	uid, gid uint32
	pid      int32
	groups   []uint32
}

func peerOf(conn *net.UnixConn) (peer, error) {
	cred, err := launch.PeerCred(conn)
	if err != nil {
		return peer{}, err
	}
	p := peer{uid: cred.Uid, gid: cred.Gid, pid: cred.Pid}
	raw, err := conn.SyscallConn()
	if err != nil {
		return peer{}, err
	}
	var gerr error
	raw.Control(func(fd uintptr) {
		buf := make([]uint32, 1024)
		n := uint32(len(buf) * 4)
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		if e != 0 {
			gerr = fmt.Errorf("SO_PEERGROUPS: %w", e)
			return
		}
		p.groups = slices.Clone(buf[:n/4])
	})
	return p, gerr
}

func (d *Daemon) handle(ctx context.Context, conn *net.UnixConn) {
	defer conn.Close()
	defer context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now().Add(apiStopGrace)) })()
	p, err := peerOf(conn)
	if err != nil {
		d.log.Warn("API peer credentials", "err", err)
		return
	}
	// The request line comes with the caller's stdio and working directory
	// for `run` (SCM_RIGHTS), so the first read takes the ancillary data too.
	buf := make([]byte, 64<<10)
	n, files, err := launch.RecvWithFds(conn, buf, 4)
	if err != nil {
		d.log.Warn("API read", "err", err, "uid", p.uid, "pid", p.pid)
		return
	}
	line := buf[:n]
	rest := bufio.NewReader(conn)
	if !bytes.Contains(line, []byte{'\n'}) {
		more, err := rest.ReadBytes('\n')
		if err != nil && len(more) == 0 {
			closeAll(files)
			return
		}
		line = append(line, more...)
		if len(line) > api.MaxRequestBytes {
			closeAll(files)
			_ = api.WriteLine(conn, api.Response{Error: "request too large"})
			return
		}
	}
	first, extra, _ := bytes.Cut(line, []byte{'\n'})
	req, err := api.DecodeLine(first)
	if err != nil {
		closeAll(files)
		_ = api.WriteLine(conn, api.Response{Error: err.Error()})
		return
	}
	if req.Op != api.OpRun {
		closeAll(files)
		files = nil
	}
	d.log.Debug("API request", "op", req.Op, "uid", p.uid, "pid", p.pid)
	resp := d.dispatch(ctx, conn, p, req, files, bufio.NewReader(io.MultiReader(bytes.NewReader(extra), rest)))
	if resp != nil {
		_ = api.WriteLine(conn, resp)
	}
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

func errResp(format string, args ...any) *api.Response {
	return &api.Response{Error: fmt.Sprintf(format, args...)}
}

// dispatch answers one request. Streaming ops write their own lines and
// return nil.
func (d *Daemon) dispatch(ctx context.Context, conn *net.UnixConn, p peer, req api.Request, files []*os.File, more *bufio.Reader) *api.Response {
	rootOnly := func() *api.Response {
		if p.uid != 0 {
			return errResp("%s needs root (caller uid %d)", req.Op, p.uid)
		}
		return nil
	}
	switch req.Op {
	case api.OpStatus:
		cur := d.current()
		st, err := d.status(cur, req.All)
		if err != nil {
			return errResp("%v", err)
		}
		st.Pinholes = d.pinholeStatus(ctx)
		if p.uid != 0 {
			ownRows(cur, st, p.uid)
		}
		return &api.Response{Status: st}
	case api.OpExplain:
		ex, err := d.explain(req)
		if err != nil {
			return errResp("%v", err)
		}
		return &api.Response{Explain: ex}
	case api.OpRevoke:
		if r := rootOnly(); r != nil {
			return r
		}
		rv, err := d.revoke(ctx, req)
		if err != nil {
			return errResp("%v", err)
		}
		return &api.Response{Revoke: rv}
	case api.OpReload:
		if r := rootOnly(); r != nil {
			return r
		}
		gen, ended, err := d.reloadNow(ctx)
		if err != nil {
			return errResp("policy rejected, generation %d stays in force: %v", gen, err)
		}
		return &api.Response{Reload: &gen, SocketsEnded: ended}
	case api.OpEvents:
		keep, err := eventFilter(p, req)
		if err != nil {
			return errResp("%v", err)
		}
		d.streamEvents(ctx, conn, p, req, keep)
		return nil
	case api.OpAppInfo:
		info, err := d.appInfo(req.App)
		if err != nil {
			return errResp("%v", err)
		}
		if req.Untraced != "" {
			if r := rootOnly(); r != nil {
				return r
			}
			if err := d.keepTracker(req.App, req.Untraced); err != nil {
				return errResp("%v", err)
			}
		}
		return &api.Response{AppInfo: info}
	case api.OpRun:
		d.run(ctx, conn, p, req, files, more)
		return nil
	case api.OpPinholeOpen:
		ph, err := d.pinholeOpen(ctx, p, req)
		if err != nil {
			return errResp("%v", err)
		}
		return &api.Response{Pinhole: ph}
	case api.OpPinholes:
		if r := rootOnly(); r != nil {
			return r
		}
		hs, err := d.listPinholes(ctx)
		if err != nil {
			return errResp("%v", err)
		}
		return &api.Response{Pinholes: hs}
	}
	return errResp("unknown op %q", req.Op)
}

// status is the daemon's status in cur, the State in force: it never
// waits for the reconciler. It lists the internal prefixes and grants
// cur.listed holds, and all of them with all.
func (d *Daemon) status(cur *State, all bool) (*api.Status, error) {
	counters, err := d.counters(cur)
	if err != nil {
		return nil, err
	}
	st := &api.Status{
		Version:    version.Get(),
		Generation: cur.gen, Policy: d.cfg.PolicyPath, PolicySHA256: cur.policyHash, PolicyDropins: cur.policyDropins, LoadedAt: cur.loadedAt,
		LastError: cur.lastErr, CgroupRoot: d.cfg.CgroupRoot, BPFDir: d.cfg.BPFDir,
		Hooks: d.enf.Attached(), Adopted: d.adopted,
		Unbound: toCounters(counters[""]),
		Fleet:   d.fleetStatus(cur),
	}
	if d.fleet != nil {
		st.Policy = "etcd " + fleet.PolicyPrefix
	}
	for _, g := range d.enf.Guards() {
		st.Guards = append(st.Guards, api.Guard{Name: g.Name, What: g.What, Active: g.Active, Why: g.Why})
	}
	what, active, why := launch.TraceGuard(d.cfg.GuardGID)
	st.Guards = append(st.Guards, api.Guard{Name: "app-tracing", What: what, Active: active, Why: why})
	if cur.effective() == nil {
		return st, nil
	}
	lists := cur.listed
	if lists == nil { // a State not made by publish
		lists = listStatus(cur.policy, cur.effective())
	}
	st.Internal, st.InternalTotal = lists.internal, len(cur.effective().Internal)
	if all {
		st.Internal = internalStrings(cur.effective(), -1)
	}
	for _, a := range cur.policy.Apps {
		as := api.AppStatus{Name: a.Name, ID: cur.appIDs[a.Name], Cgroup: filepath.Join(d.appDirs.Base, a.Name), Principal: a.Match.Describe(),
			Cgroups: 1, Revoked: cur.revoked[a.Name], Counters: toCounters(counters[a.Name]), Mode: a.Mode()}
		if e := cur.effective().App(a.Name); e != nil {
			as.Mode = e.Mode() // a revoked app is enforced
		}
		switch a.Kind() {
		case ruleset.MatchUser:
			as.Cgroup, as.Cgroups = "", 0
		case ruleset.MatchUnit, ruleset.MatchCgroup, ruleset.MatchContainer:
			as.Cgroup, as.Cgroups = filepath.Join(d.cfg.CgroupRoot, a.Match.Path), cur.matched[a.Name]
		}
		as.Grants, as.GrantsTotal = lists.grants[a.Name], len(a.Grants)
		if all {
			as.Grants = grantStrings(a, -1)
		}
		st.Apps = append(st.Apps, as)
	}
	if d.auditor != nil {
		s := d.auditor.Stats()
		st.Audit = api.AuditStats{Events: s.Events, DecodeErrors: s.DecodeErrors, Dropped: s.Dropped,
			Log: strings.Join(d.auditSinkNames(), ", ")}
	}
	return st, nil
}

func toCounters(c [bpf.NumCounts]uint64) api.Counters {
	return api.Counters{Allow: c[bpf.CountAllow], Deny: c[bpf.CountDeny], External: c[bpf.CountExternal],
		AuditDrops: c[bpf.CountAuditDrop], WouldDeny: c[bpf.CountWouldDeny]}
}

// launchable refuses apps that `procgate run` must not start: an app with
// match: is the processes of a unit, of cgroups or of a user, and a
// process launched into procgate.apps/NAME would not be one of them.
func launchable(app *ruleset.App) error {
	if app.Match == nil {
		return nil
	}
	return fmt.Errorf("app %q is matched by %s, not launched: procgate run cannot start it (start the unit or container, or run the program as the user; the kernel makes it the app)",
		app.Name, app.Match.Describe())
}

// appOfPID finds pid's principal as the kernel would (ruleset.Principal):
// the deepest app cgroup among its cgroup and their ancestors, else the
// user app of its real uid; "" when none.
func (d *Daemon) appOfPID(st *State, pid int) (string, error) {
	dir, err := cgroups.OfPID(pid)
	if err != nil {
		return "", err
	}
	uid, err := realUID(pid)
	if err != nil {
		return "", err
	}
	rel, err := filepath.Rel(d.cfg.CgroupRoot, dir)
	if err != nil || strings.HasPrefix(rel, "..") {
		rel = "" // outside the enforced subtree: no app cgroup
	}
	return st.effective().Principal(filepath.ToSlash(rel), uid, AppsDir), nil
}

// realUID reads pid's real uid (the first of the Uid: line of
// /proc/PID/status), the uid match.user goes by.
func realUID(pid int) (uint32, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("uid of pid %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				if uid, err := strconv.ParseUint(f[0], 10, 32); err == nil {
					return uint32(uid), nil
				}
			}
		}
	}
	return 0, fmt.Errorf("uid of pid %d: no Uid: line in /proc/%d/status", pid, pid)
}

func (d *Daemon) explain(req api.Request) (*api.Explain, error) {
	dest, err := ruleset.ParseDest(req.Dest)
	if err != nil {
		return nil, err
	}
	st := d.current()
	if st.effective() == nil {
		return nil, errors.New("no policy in force yet")
	}
	app := req.App
	if req.PID != 0 {
		if app, err = d.appOfPID(st, req.PID); err != nil {
			return nil, err
		}
	} else if st.effective().App(app) == nil {
		return nil, fmt.Errorf("no app %q in the policy %s", app, d.cfg.PolicyPath)
	}
	dec := st.index().DecideLearned(app, dest, d.enf.Learned(), time.Now())
	ex := &api.Explain{App: app, Dest: dest.String(), Allow: dec.Allow, Reason: dec.Reason.String(), Verdict: dec.Verdict(), Decision: dec.String()}
	if a := st.effective().App(app); a != nil {
		ex.Mode = a.Mode()
		if req.PID != 0 {
			ex.Principal = a.Match.Describe()
		}
	}
	// As the kernel does: in an app with exe:, a process running another
	// binary holds none of the grants.
	// Only the app's own grants depend on it: everyone's and a sandbox's
	// loopback hold for any binary.
	if a := st.effective().App(app); req.PID != 0 && a != nil && len(a.Exe) > 0 && (dec.Reason == ruleset.ReasonGranted || dec.Reason == ruleset.ReasonName) {
		exe := fmt.Sprintf("/proc/%d/exe", req.PID)
		id, err := bpf.FileIDOf(exe)
		if err != nil || !slices.Contains(st.exes[app], id) {
			target, _ := os.Readlink(exe)
			ungranted := st.effective().Clone()
			ungranted.App(app).Grants = nil
			if dec := ungranted.Decide(app, dest); dec.Allow {
				ex.Reason = dec.Reason.String()
				ex.Decision = fmt.Sprintf("%s (the process runs %s, %s, so not by its own grants)", dec, target, st.exeWhy(app, target))
			} else {
				ex.Allow, ex.Reason = false, ruleset.ReasonExe.String()
				ex.Decision = fmt.Sprintf("deny (%s): the process runs %s, %s", ruleset.ReasonExe, target, st.exeWhy(app, target))
				if dec.AuditOnly {
					ex.Decision += ruleset.AuditOnlyNote
				}
				ex.Verdict = dec.Verdict()
			}
		}
	}
	return ex, nil
}

// revoke withdraws (or restores) an app's grants, on the reconciler.
func (d *Daemon) revoke(ctx context.Context, req api.Request) (rv *api.Revoke, err error) {
	if cerr := d.call(ctx, func() { rv, err = d.revokeNow(req) }); cerr != nil {
		return nil, cerr
	}
	return rv, err
}

// revokeNow is revoke on the reconciler.
func (d *Daemon) revokeNow(req api.Request) (*api.Revoke, error) {
	cur := d.current()
	if cur.policy == nil {
		return nil, errors.New("no policy in force yet")
	}
	app := cur.policyApp(req.App)
	if app == nil {
		return nil, fmt.Errorf("no app %q in the policy %s", req.App, d.cfg.PolicyPath)
	}
	saved := *d.revoked
	saved.Apps, saved.Grants = maps.Clone(d.revoked.Apps), maps.Clone(d.revoked.Grants)
	what := "all grants"
	switch {
	case req.Restore && req.Grant == nil:
		delete(d.revoked.Apps, req.App)
		delete(d.revoked.Grants, req.App)
		what = "restored all grants"
	case req.Restore:
		d.revoked.Grants[req.App] = slices.DeleteFunc(slices.Clone(d.revoked.Grants[req.App]), func(g int) bool { return g == *req.Grant })
		what = fmt.Sprintf("restored grant #%d", *req.Grant)
	case req.Grant != nil:
		if *req.Grant < 0 || *req.Grant >= len(app.Grants) {
			return nil, fmt.Errorf("app %s has grants #0..#%d, not #%d", req.App, len(app.Grants)-1, *req.Grant)
		}
		if !slices.Contains(d.revoked.Grants[req.App], *req.Grant) {
			d.revoked.Grants[req.App] = append(d.revoked.Grants[req.App], *req.Grant)
		}
		what = fmt.Sprintf("grant #%d", *req.Grant)
	default:
		d.revoked.Apps[req.App] = true
	}
	gen, err := d.applyEffective(withRoutes(d.withRevoked(cur.policy), cur.routes), nil)
	if err != nil {
		*d.revoked = saved
		return nil, err
	}
	if err := d.revoked.save(); err != nil {
		d.log.Error("revocation is in force but not saved; it will not survive a restart", "err", err)
	}
	ended := d.current().ended
	d.log.Info("revoked", "app", req.App, "what", what, "generation", gen, "sockets_ended", ended)
	return &api.Revoke{Generation: gen, Revoked: what, SocketsEnded: ended}, nil
}

func (d *Daemon) appInfo(name string) (*api.AppInfo, error) {
	app := d.current().policyApp(name)
	if app == nil {
		return nil, fmt.Errorf("no app %q in the policy %s", name, d.cfg.PolicyPath)
	}
	if err := launchable(app); err != nil {
		return nil, err
	}
	info := &api.AppInfo{Name: name, Cgroup: filepath.Join(d.appDirs.Base, name), Users: app.Users, KeepCaps: app.KeepCaps,
		Traceable: app.Traceable, GuardGID: d.cfg.GuardGID}
	for _, e := range app.Exe {
		info.Exe = append(info.Exe, e.Path)
		info.SHA256 = append(info.SHA256, e.SHA256)
	}
	return info, nil
}

// ownRows keeps in st only what a caller other than root may see: the apps
// it may run or whose processes it is (match.user), not the unbound
// processes' counters nor other users' apps.
func ownRows(cur *State, st *api.Status, uid uint32) {
	apps := map[string]ruleset.App{}
	if cur.policy != nil {
		for _, a := range cur.policy.Apps {
			apps[a.Name] = a
		}
	}
	st.Apps = slices.DeleteFunc(st.Apps, func(as api.AppStatus) bool {
		a, ok := apps[as.Name]
		if !ok {
			return true
		}
		if a.Match != nil {
			return a.Kind() != ruleset.MatchUser || a.Match.UID != uid
		}
		return launch.Authorize(a, uid) != nil
	})
	st.Unbound = api.Counters{}
}

// eventFilter is the events request's filters, and for a caller other
// than root, its own uid's records only.
func eventFilter(p peer, req api.Request) (func(audit.Record) bool, error) {
	var dest netip.Prefix
	if req.DestPrefix != "" {
		var err error
		if dest, err = netip.ParsePrefix(req.DestPrefix); err != nil {
			a, aerr := netip.ParseAddr(req.DestPrefix)
			if aerr != nil {
				return nil, fmt.Errorf("events: --dest %q is neither an address nor a prefix", req.DestPrefix)
			}
			dest = netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen())
		}
		dest = dest.Masked()
	}
	return func(r audit.Record) bool {
		switch {
		case p.uid != 0 && r.UID != p.uid:
		case req.App != "" && r.App != req.App:
		case req.Verdict != "" && r.Verdict != req.Verdict:
		case !req.Since.IsZero() && r.Time.Before(req.Since):
		case dest.IsValid() && !dest.Contains(recordAddr(r)):
		default:
			return true
		}
		return false
	}, nil
}

// recordAddr is the address of a record's destination (ADDR:PORT/PROTO),
// IPv4-mapped as IPv4; invalid when it has none.
func recordAddr(r audit.Record) netip.Addr {
	s, _, _ := strings.Cut(r.Dest, "/")
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

func (d *Daemon) streamEvents(ctx context.Context, conn *net.UnixConn, p peer, req api.Request, keep func(audit.Record) bool) {
	var live <-chan audit.Record
	var cancel func()
	if req.Follow {
		// Subscribe before reading the log so nothing falls between them.
		live, cancel = d.auditor.Subscribe(256)
		defer cancel()
	}
	// With filters, the last N that pass: read them all.
	n := req.Last
	if req.App != "" || req.Verdict != "" || !req.Since.IsZero() || req.DestPrefix != "" || p.uid != 0 {
		n = 0
	}
	var recs []audit.Record
	var err error
	switch log := d.cfg.auditLog(); {
	case log != "":
		recs, err = audit.ReadLog(log, n)
	case !req.Follow:
		err = errors.New("the daemon keeps no audit log (--audit-sink journald): read past events with journalctl -t procgate, or follow new ones with events --follow")
	}
	if err != nil {
		_ = api.WriteLine(conn, errResp("%v", err))
		return
	}
	recs = slices.DeleteFunc(recs, func(r audit.Record) bool { return !keep(r) })
	if req.Last > 0 && len(recs) > req.Last {
		recs = recs[len(recs)-req.Last:]
	}
	for _, r := range recs {
		if err := writeEvent(conn, r); err != nil {
			return
		}
	}
	if !req.Follow {
		return
	}
	// A closed client shows up as a failed write or as EOF on read.
	gone := make(chan struct{})
	go func() {
		var b [1]byte
		conn.Read(b[:])
		close(gone)
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case <-gone:
			return
		case r := <-live:
			if !keep(r) {
				continue
			}
			if err := writeEvent(conn, r); err != nil {
				return
			}
		}
	}
}

// auditSinkNames says where audit records go, for status: the log file's
// path, journald's socket.
func (d *Daemon) auditSinkNames() []string {
	var out []string
	if log := d.cfg.auditLog(); log != "" {
		out = append(out, log)
	}
	if j := d.cfg.journal(); j != "" {
		out = append(out, "journald "+j)
	}
	return out
}

func writeEvent(conn *net.UnixConn, r audit.Record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return api.WriteLine(conn, api.Response{Event: b})
}

// keepTracker attaches the TCP handover guard's tracker before a process
// of app starts outside the trace guard (why), and keeps it until the
// daemon stops: the process and its descendants are open to tracing, so
// the connect hooks mark their connections, and whether any of them still
// lives is not followed (a restart looks again: bpf.Enforcer.Attach).
func (d *Daemon) keepTracker(app, why string) error {
	if err := d.enf.KeepTracker(fmt.Sprintf("a process of app %s was launched outside the trace guard (%s)", app, why)); err != nil {
		return fmt.Errorf("app %s: attach the TCP handover guard's tracker for a process outside the trace guard: %w", app, err)
	}
	return nil
}

// run starts an app for the peer: as the peer's uid, gids and groups, with
// its stdio, in the app's cgroup, and in the peer's namespaces, root,
// working directory and umask (launch.Caller); it relays signals and the
// exit status until ctx ends.
func (d *Daemon) run(ctx context.Context, conn *net.UnixConn, p peer, req api.Request, files []*os.File, more *bufio.Reader) {
	defer closeAll(files)
	failStatus := func(status int, format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		d.log.Warn("run refused", "app", req.App, "uid", p.uid, "pid", p.pid, "reason", msg)
		_ = api.WriteLine(conn, api.Response{Error: msg, ExitCode: status})
	}
	fail := func(format string, args ...any) { failStatus(launch.StatusFailed, format, args...) }
	if len(files) != 4 {
		fail("run needs the caller's stdin, stdout, stderr and working directory (got %d descriptors: a procgate client older than the daemon?)", len(files))
		return
	}
	if len(req.Argv) == 0 {
		fail("run needs a command")
		return
	}
	var app ruleset.App
	a := d.current().policyApp(req.App)
	if a != nil {
		app = *a
	}
	if a == nil {
		fail("no app %q in the policy %s", req.App, d.cfg.PolicyPath)
		return
	}
	if err := launchable(&app); err != nil {
		fail("%v", err)
		return
	}
	if err := launch.Authorize(app, p.uid); err != nil {
		fail("%v", err)
		return
	}
	// Never the daemon's namespaces instead: a caller whose own cannot be
	// entered is refused.
	caller, err := launch.OpenCaller(conn, p.pid, p.uid, files[3])
	files = files[:3] // the Caller owns the working directory now
	if err != nil {
		fail("app %s: cannot launch in the caller's namespaces: %v", app.Name, err)
		return
	}
	defer caller.Close()
	d.proxyNetnsOf(int(p.pid), &app)
	proc, err := launch.Start(launch.Spec{
		App:       app,
		CgroupDir: filepath.Join(d.appDirs.Base, app.Name),
		Argv:      req.Argv,
		Env:       req.Env,
		Caller:    caller,
		Cred:      &launch.Cred{UID: p.uid, GID: p.gid, Groups: p.groups},
		Stdio:     [3]*os.File{files[0], files[1], files[2]},
		Tty:       req.Pty,
		GuardGID:  d.cfg.GuardGID,
		Untraced:  func(why string) error { return d.keepTracker(app.Name, why) },
	})
	if err != nil {
		failStatus(launch.StatusOf(err), "%v", err)
		return
	}
	closeAll(files) // the child has its own copies
	files = nil
	caller.Close()
	attrs := []any{"app", app.Name, "uid", p.uid, "pid", proc.Pid(), "argv0", req.Argv[0]}
	guarded, why := proc.Guarded()
	attrs = append(attrs, "trace_guard", guarded)
	if !guarded {
		attrs = append(attrs, "trace_guard_off", why)
	}
	d.log.Info("run", attrs...)
	if err := api.WriteLine(conn, api.Response{Run: &api.RunState{Started: proc.Pid()}}); err != nil {
		_ = proc.Signal(syscall.SIGHUP)
	}
	go func() {
		for {
			line, err := more.ReadBytes('\n')
			if err != nil {
				// The caller went away: like a closed terminal. Not
				// when the daemon let go of the app (below).
				if ctx.Err() == nil {
					_ = proc.Signal(syscall.SIGHUP)
				}
				return
			}
			var r api.Request
			if json.Unmarshal(line, &r) == nil && r.Signal > 0 && r.Signal < 65 {
				_ = proc.Relay(syscall.Signal(r.Signal))
			}
		}
	}()
	// The wait reaps the app whenever it ends, and touches only proc and
	// conn, which it owns: it may outlive the handler.
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		exit, err := proc.WaitJob(func(stop syscall.Signal) {
			_ = api.WriteLine(conn, api.Response{Run: &api.RunState{Stopped: int(stop), Continued: stop == 0}})
		})
		if err != nil {
			_ = api.WriteLine(conn, errResp("wait for pid %d: %v", proc.Pid(), err))
			return
		}
		_ = api.WriteLine(conn, api.Response{Run: &api.RunState{Exited: true, Code: exit.Code, Signal: int(exit.Signal)}})
	}()
	select {
	case <-exited:
	case <-ctx.Done():
		// The daemon stops. An app may run for days: it must not hold
		// the stop (nor a restart for an upgrade), and stopping the
		// daemon must not end it, as the pinned programs still enforce
		// its policy. The app runs on, and the caller is told.
		d.log.Info("run: daemon stopping; the app runs on, no longer relayed", "app", app.Name, "pid", proc.Pid())
		_ = api.WriteLine(conn, api.Response{ExitCode: launch.StatusFailed, Error: fmt.Sprintf(
			"the daemon is stopping: app %s (pid %d) runs on, still enforced, but its signals and exit status are no longer relayed", app.Name, proc.Pid())})
	}
}
