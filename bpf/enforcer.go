package bpf

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/cgroups"
	"github.com/procgate/procgate/internal/bpfpin"
)

// hook is an attach point, named as its program and pinned link.
type hook struct {
	name   string
	attach ebpf.AttachType
	prog   func(*Enforcer) *ebpf.Program
	// names: attached only while the generation in force has DNS-name
	// grants (attachDNS).
	names bool
	// tracker: attached only while some app process may be open to
	// tracing (tracker.go).
	tracker bool
}

// hooks are the attach points.
var hooks = []hook{
	{name: "connect4", attach: ebpf.AttachCGroupInet4Connect, prog: func(e *Enforcer) *ebpf.Program { return e.objs.AuthorizeConnect4 }},
	{name: "connect6", attach: ebpf.AttachCGroupInet6Connect, prog: func(e *Enforcer) *ebpf.Program { return e.objs.AuthorizeConnect6 }},
	{name: "sendmsg4", attach: ebpf.AttachCGroupUDP4Sendmsg, prog: func(e *Enforcer) *ebpf.Program { return e.objs.AuthorizeSendmsg4 }},
	{name: "sendmsg6", attach: ebpf.AttachCGroupUDP6Sendmsg, prog: func(e *Enforcer) *ebpf.Program { return e.objs.AuthorizeSendmsg6 }},
	{name: "bind4", attach: ebpf.AttachCGroupInet4Bind, prog: func(e *Enforcer) *ebpf.Program { return e.objs.AuthorizeBind4 }},
	{name: "bind6", attach: ebpf.AttachCGroupInet6Bind, prog: func(e *Enforcer) *ebpf.Program { return e.objs.AuthorizeBind6 }},
	{name: "sock_create", attach: ebpf.AttachCGroupInetSockCreate, prog: func(e *Enforcer) *ebpf.Program { return e.harden.GuardSockCreate }},
	{name: "egress", attach: ebpf.AttachCGroupInetEgress, prog: func(e *Enforcer) *ebpf.Program { return e.harden.BackstopEgress }},
	// Optional: the handover guard's tracker; nil when it did not load.
	// Attached only while needed (syncTracker).
	{name: "handover", attach: ebpf.AttachCGroupSockOps, prog: func(e *Enforcer) *ebpf.Program { return e.handover.TrackOwnedSockets }, tracker: true},
	// Optional: needs the bpf LSM; nil (and not attached) without it.
	{name: "lsm_socket_create", attach: ebpf.AttachLSMCgroup, prog: func(e *Enforcer) *ebpf.Program { return e.lsm.GuardPacketSocket }},
	// Optional: apps' DNS queries to the daemon's proxy (dnsredirect.c),
	// attached after the authorize programs, so that they run after them,
	// and only while some app has name grants.
	{name: "dns_connect4", attach: ebpf.AttachCGroupInet4Connect, prog: func(e *Enforcer) *ebpf.Program { return e.dns.DnsConnect4 }, names: true},
	{name: "dns_sendmsg4", attach: ebpf.AttachCGroupUDP4Sendmsg, prog: func(e *Enforcer) *ebpf.Program { return e.dns.DnsSendmsg4 }, names: true},
	{name: "dns_recvmsg4", attach: ebpf.AttachCGroupUDP4Recvmsg, prog: func(e *Enforcer) *ebpf.Program { return e.dns.DnsRecvmsg4 }, names: true},
	{name: "dns_connect6", attach: ebpf.AttachCGroupInet6Connect, prog: func(e *Enforcer) *ebpf.Program { return e.dns.DnsConnect6 }, names: true},
	{name: "dns_sendmsg6", attach: ebpf.AttachCGroupUDP6Sendmsg, prog: func(e *Enforcer) *ebpf.Program { return e.dns.DnsSendmsg6 }, names: true},
	{name: "dns_recvmsg6", attach: ebpf.AttachCGroupUDP6Recvmsg, prog: func(e *Enforcer) *ebpf.Program { return e.dns.DnsRecvmsg6 }, names: true},
}

// HookNames lists the attach points in a stable order.
func HookNames() []string {
	names := make([]string, len(hooks))
	for i, h := range hooks {
		names[i] = h.name
	}
	return names
}

// backstops are the backstops of harden.c; they share the pinned maps
// of the main object.
type backstops struct {
	GuardSockCreate *ebpf.Program `ebpf:"guard_sock_create"`
	BackstopEgress  *ebpf.Program `ebpf:"backstop_egress"`
}

// plainBackstops are backstops whose egress program leaves out the UDP
// handover check, for kernels that refuse the helpers it calls.
type plainBackstops struct {
	GuardSockCreate *ebpf.Program `ebpf:"guard_sock_create"`
	BackstopEgress  *ebpf.Program `ebpf:"backstop_egress_plain"`
}

// handoverGuard keeps the TCP connections an app opened to internal
// destinations for the app's processes (harden.c): optional, without it
// Guards says so.
type handoverGuard struct {
	TrackOwnedSockets *ebpf.Program `ebpf:"track_owned_sockets"`
	GuardHandover     *ebpf.Program `ebpf:"guard_handover"`
	OwnedSockets      *ebpf.Map     `ebpf:"owned_sockets"`
	OwnedSocketsFull  *ebpf.Map     `ebpf:"owned_sockets_full"`
	OwnedUnmatched    *ebpf.Map     `ebpf:"owned_sockets_unmatched"`
}

// lsmHandoverGuard is the handover guard where BPF LSM loads: one
// host-wide socket_sendmsg program instead of the sockops program, the
// sockhash and its sk_msg program (harden.c, guard_handover_lsm).
type lsmHandoverGuard struct {
	GuardHandoverLSM *ebpf.Program `ebpf:"guard_handover_lsm"`
}

// lsmGuards need the bpf LSM (lsm= on the kernel command line lists bpf);
// without it they are not loaded and Guards says so.
type lsmGuards struct {
	GuardPacketSocket *ebpf.Program // loaded by loadLSMCgroup
}

// migrationGuard marks processes moved into an app cgroup from inside
// another app (migrate.c); tp_btf programs, attached to the whole host,
// optional: without them Guards says so.
type migrationGuard struct {
	MarkMigration *ebpf.Program `ebpf:"mark_migration"`
	MarkFork      *ebpf.Program `ebpf:"mark_fork"`
	ForgetExit    *ebpf.Program `ebpf:"forget_exit"`
}

// tracingHooks are migrate.c's programs, named as their pinned links.
func (e *Enforcer) tracingHooks() []tracingHook {
	return []tracingHook{
		{"migrate_attach_task", e.migrate.MarkMigration},
		{"migrate_fork", e.migrate.MarkFork},
		{"migrate_exit", e.migrate.ForgetExit},
	}
}

// objects is what the daemon loads: programs and the pinned maps. The
// generation_info_inner template of decision.h is left out, so it is never
// created.
type objects struct {
	AuthorizeConnect4 *ebpf.Program `ebpf:"authorize_connect4"`
	AuthorizeConnect6 *ebpf.Program `ebpf:"authorize_connect6"`
	AuthorizeSendmsg4 *ebpf.Program `ebpf:"authorize_sendmsg4"`
	AuthorizeSendmsg6 *ebpf.Program `ebpf:"authorize_sendmsg6"`
	AuthorizeBind4    *ebpf.Program `ebpf:"authorize_bind4"`
	AuthorizeBind6    *ebpf.Program `ebpf:"authorize_bind6"`

	PolicyCurrent     *ebpf.Map `ebpf:"policy_current"`
	Rules             *ebpf.Map `ebpf:"rules"`
	PortRanges        *ebpf.Map `ebpf:"port_ranges"`
	AppByCgroup       *ebpf.Map `ebpf:"app_by_cgroup"`
	AppExes           *ebpf.Map `ebpf:"app_exes"`
	AppByUid          *ebpf.Map `ebpf:"app_by_uid"`
	VerdictCounters   *ebpf.Map `ebpf:"verdict_counters"`
	WouldDenyCounters *ebpf.Map `ebpf:"would_deny_counters"`
	AuditBudgets      *ebpf.Map `ebpf:"audit_budgets"`
	AuditEvents       *ebpf.Map `ebpf:"audit_events"`
	NameGrants        *ebpf.Map `ebpf:"name_grants"`
}

// Options says where the enforcer lives.
type Options struct {
	// BPFDir is a directory on a bpffs where programs' maps and links are
	// pinned; it is created if missing.
	BPFDir string
	// CgroupDir is the cgroup2 directory whose subtree is enforced.
	CgroupDir string
	Log       *slog.Logger
}

// Enforcer is the eBPF backend: pinned maps and links that enforce a
// generation even when no process holds them open.
type Enforcer struct {
	opts   Options
	objs   objects
	harden backstops
	lsm    lsmGuards
	// lsmErr says why the LSM guards are missing (nil: loaded).
	lsmErr error
	// udpHandoverErr says why the egress backstop runs without the UDP
	// handover check (nil: with it).
	udpHandoverErr error
	// handover and handoverErr, why it is missing (nil: loaded); unused
	// where lsmHandover loaded (lsmHandoverErr nil), which takes its place.
	handover       handoverGuard
	handoverErr    error
	lsmHandover    lsmHandoverGuard
	lsmHandoverErr error
	// tun and listen are lsmguard.c's guards; tunErr and listenErr say
	// why they are missing (nil: loaded).
	tun       tunGuard
	tunErr    error
	listen    listenGuard
	listenErr error
	// migrate and its links; migrateErr says why they are missing.
	migrate    migrationGuard
	migrateErr error
	// follow binds unit and cgroup apps' new cgroups; followErr says why
	// it is missing. mount is the cgroup2 mount, cgroupRoot and rootLevel
	// CgroupDir below it; matched counts the cgroups the last scan bound.
	follow     cgroupFollower
	followErr  error
	mount      string
	cgroupRoot string
	rootLevel  int
	matched    map[string]int
	tracing    []link.Link
	specs      *ebpf.CollectionSpec
	links      []link.Link
	// Adopted is true when the enforcer took over pinned state left by an
	// earlier daemon; the generation in force then was kept.
	Adopted bool
	// written holds the keys this process wrote to each slot, so that a slot
	// can be cleared without walking the maps, and the slot's rules, which
	// are not cleared: the next Apply to the slot writes only what differs
	// (diffRules). nil: unknown (adopted state, or a write failed), and
	// the slot is read by iteration.
	written [2]*slotKeys
	// clearing is closed when the background clear and refill of the idle
	// slot, begun by the last Apply, are done; Apply and Close wait for
	// them. closing: Close has begun, and the refill stops early.
	clearing chan error
	closing  atomic.Bool
	// sweep ends live sockets a new generation denies (sweep.go); applied
	// is the generation this process applied last, for its sock_diag path
	// and Guards; atomic: Guards answers the daemon's status while Apply
	// runs.
	sweep   *sweeper
	applied atomic.Pointer[Generation]
	// names is what DNS answers taught (names.go); dns redirects apps'
	// queries to the proxy that learns them, dnsErr says why it is
	// missing.
	names  learnedNames
	dns    dnsRedirect
	dnsErr error
	// attached: Attach ran. dnsHooks are the redirect's links, attached
	// only while some app has name grants.
	attached bool
	dnsHooks hookSwitch
	// tracker is the handover guard's sockops program's state
	// (tracker.go).
	tracker tracker
}

type slotKeys struct {
	// rules are the slot's entries of the rules trie, sorted by key: they
	// stay when the slot is cleared. Their keys may carry the other slot's
	// bit (both slots share one slice once the idle one is refilled):
	// diffRules ignores it and writeRuleDiff sets the slot's own.
	rules []ruleEntry
	apps  []procgateAppKey
	users []procgateUserKey
	exes  []procgateExeKey
	// Pattern keys of unit and cgroup apps; followed: the slot had some,
	// so the kernel may have bound cgroups in it that apps does not list.
	exactPatterns, globPatterns []migrateCgroupPathKey
	followed                    bool
}

// kernelHasFunc reports whether the running kernel's BTF has the function
// name (a kfunc, say). No BTF: no.
func kernelHasFunc(name string) bool {
	kernel, err := btf.LoadKernelSpec()
	if err != nil {
		return false
	}
	var fn *btf.Func
	return kernel.TypeByName(name, &fn) == nil
}

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// Open loads the programs and pinned maps, and makes sure each hook's link is
// attached to opts.CgroupDir and runs this build's program. A pinned link from
// an earlier run is updated in place (BPF_LINK_UPDATE), so there is no moment
// without enforcement. A fresh install starts at generation 0, which the
// programs treat as "no policy": every connection below the cgroup is denied
// until Apply installs the first generation. Call Apply before Attach to
// avoid that window.
func Open(opts Options) (*Enforcer, error) {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if err := checkBPFFS(opts.BPFDir); err != nil {
		return nil, err
	}
	specs, err := loadProcgate()
	if err != nil {
		return nil, fmt.Errorf("load embedded BPF objects: %w", err)
	}
	e := &Enforcer{opts: opts, specs: specs}
	_, statErr := os.Stat(filepath.Join(opts.BPFDir, "policy_current"))
	e.Adopted = statErr == nil
	e.names.init(e.Adopted)
	if !e.Adopted {
		// Fresh maps: both slots are empty, no need to walk them.
		e.written = [2]*slotKeys{{}, {}}
	}
	if err := bpfpin.Load(specs, &e.objs, opts.BPFDir, "BPF"); err != nil {
		return nil, err
	}
	hspecs, err := loadHarden()
	if err != nil {
		bpfpin.Close(&e.objs)
		return nil, fmt.Errorf("load embedded backstop objects: %w", err)
	}
	// The backstop reads a packet's socket's cgroup in place where the
	// kernel has the kfunc that gives it the kernel's sk_buff (6.2+);
	// elsewhere by a helper (harden.c, skb_cgroup_id).
	inPlace, ok := hspecs.Variables["skb_cgroup_in_place"]
	if !ok {
		bpfpin.Close(&e.objs)
		return nil, errors.New("embedded backstop object: no skb_cgroup_in_place")
	}
	if err := inPlace.Set(boolByte(kernelHasFunc("bpf_cast_to_kern_ctx"))); err != nil {
		bpfpin.Close(&e.objs)
		return nil, fmt.Errorf("set skb_cgroup_in_place: %w", err)
	}
	// After the main object: its maps are pinned now, and these programs
	// find them there.
	err = hspecs.LoadAndAssign(&e.harden, bpfpin.Maps(opts.BPFDir))
	if err != nil {
		// Linux 6.1 and 6.12 refuse backstop_egress: their cgroup_skb
		// programs lack current-task helpers that the UDP handover check
		// calls (bpf_get_current_cgroup_id on 6.1, bpf_get_current_uid_gid
		// for its audit record on 6.12; 6.18 has them). The backstop without that check still
		// guards everything else.
		var plain plainBackstops
		if perr := hspecs.LoadAndAssign(&plain, bpfpin.Maps(opts.BPFDir)); perr != nil {
			bpfpin.Close(&e.objs)
			return nil, fmt.Errorf("load backstop programs (sock_create, egress): %w", errors.Join(err, perr))
		}
		e.harden = backstops(plain)
		e.udpHandoverErr = err
	}
	// The handover guard: the BPF LSM program where the kernel loads it
	// (no per-connection kernel object), else sockops, sockhash and sk_msg.
	e.lsmHandoverErr = hspecs.LoadAndAssign(&e.lsmHandover, bpfpin.Maps(opts.BPFDir))
	if e.lsmHandoverErr != nil {
		e.lsmHandover = lsmHandoverGuard{}
		e.handoverErr = hspecs.LoadAndAssign(&e.handover, bpfpin.Maps(opts.BPFDir))
		if e.handoverErr != nil {
			e.handover = handoverGuard{} // what was assigned before the failure is closed
		}
	}
	e.lsm.GuardPacketSocket, e.lsmErr = loadLSMCgroup(hspecs.Programs["guard_packet_socket"], opts.BPFDir)
	e.loadTaskGuards()
	mspecs, err := loadMigrate()
	if err == nil {
		err = mspecs.LoadAndAssign(&e.migrate, bpfpin.Maps(opts.BPFDir))
	}
	e.migrateErr = err
	e.followErr = err
	if err == nil {
		e.followErr = mspecs.LoadAndAssign(&e.follow, bpfpin.Maps(opts.BPFDir))
		if e.followErr != nil {
			e.follow = cgroupFollower{}
		}
	}
	e.loadDNSRedirect()
	if err := e.locateRoot(); err != nil {
		bpfpin.Close(&e.objs)
		return nil, err
	}
	e.sweep = openSweeper(opts.BPFDir, opts.Log)
	for _, g := range e.Guards() {
		if g.Active {
			opts.Log.Info("guard active", "guard", g.Name, "what", g.What)
		} else {
			opts.Log.Warn("guard NOT active", "guard", g.Name, "what", g.What, "why", g.Why)
		}
	}
	return e, nil
}

// Attach attaches (or adopts and updates) the hooks' links on the cgroup.
func (e *Enforcer) Attach() error {
	for _, h := range hooks {
		if h.names || h.tracker {
			continue
		}
		l, err := e.attachHook(h)
		if err != nil {
			return err
		}
		if l != nil {
			e.links = append(e.links, l)
		}
	}
	e.attached = true
	// Without an Apply of this process, the generation in force is an
	// earlier daemon's: its name grants are unknown, so the redirect stays.
	g := e.applied.Load()
	if err := e.syncDNS(g == nil || g.hasNames); err != nil {
		return err
	}
	if e.lsmHandover.GuardHandoverLSM != nil {
		if err := e.attachTracing([]tracingHook{{"lsm_handover", e.lsmHandover.GuardHandoverLSM}}); err != nil {
			// The sockhash guard was not loaded in its place: say so.
			e.lsmHandoverErr = err
			e.handoverErr = fmt.Errorf("BPF LSM handover program loaded but did not attach: %w", err)
			e.opts.Log.Warn("guard NOT active", "guard", "tcp-handover", "why", e.handoverErr)
		}
	}
	if e.handoverErr == nil && e.handover.GuardHandover != nil {
		// Attached to the pinned map, not to a cgroup: it stays with the
		// map. Attaching again replaces the program for sockets added
		// from now on (a socket keeps the program it was added with).
		err := link.RawAttachProgram(link.RawAttachProgramOptions{
			Target: e.handover.OwnedSockets.FD(), Program: e.handover.GuardHandover, Attach: ebpf.AttachSkMsgVerdict,
		})
		if err != nil {
			// Optional like its loading: the sockops program only fills
			// the map, and Guards says the guard is missing.
			e.handoverErr = fmt.Errorf("attach guard_handover to owned_sockets: %w", err)
			e.opts.Log.Warn("guard NOT active", "guard", "tcp-handover", "why", e.handoverErr)
		}
	}
	// After the sk_msg program: without it the tracker would fill the
	// sockhash for nothing.
	if err := e.attachTracker(g); err != nil {
		return err
	}
	e.attachTaskGuards()
	if e.migrateErr == nil {
		e.migrateErr = e.attachTracing(e.tracingHooks())
		if e.migrateErr != nil {
			e.opts.Log.Warn("guard NOT active", "guard", "cgroup-migration", "why", e.migrateErr)
		}
	}
	if e.followErr == nil {
		e.followErr = e.attachTracing(e.followHooks())
		if e.followErr != nil {
			e.opts.Log.Warn("guard NOT active", "guard", "unit-restarts", "why", e.followErr)
		}
	}
	return nil
}

// attachHook attaches h's program to the cgroup, or updates the link an
// earlier run pinned; nil for an optional guard this kernel lacks (Guards
// says so).
func (e *Enforcer) attachHook(h hook) (link.Link, error) {
	prog := h.prog(e)
	if prog == nil {
		return nil, nil
	}
	if err := e.pinProg(h.name, prog); err != nil {
		return nil, err
	}
	return bpfpin.Cgroup(filepath.Join(e.opts.BPFDir, "link_"+h.name), h.name, e.opts.CgroupDir, h.attach, prog)
}

// pinProg pins hook name's program for inspection (`bpftool prog show
// pinned`) in place of an earlier run's; the link holds the program in
// place either way.
func (e *Enforcer) pinProg(name string, prog *ebpf.Program) error {
	progPin := filepath.Join(e.opts.BPFDir, "prog_"+name)
	if err := os.Remove(progPin); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("replace pinned program %s: %w", progPin, err)
	}
	if err := prog.Pin(progPin); err != nil {
		return fmt.Errorf("pin %s program at %s: %w", name, progPin, err)
	}
	return nil
}

// syncDNS attaches the DNS redirect's programs (on, after the authorize
// programs, which stay attached: a new link runs after them) or detaches
// them. They run on every connect, sendmsg and recvmsg below the cgroup,
// of processes in no app too, and do nothing for apps without name
// grants: one program run each (the bench's floor), paid only while some
// app has name grants. Apply attaches them before a generation with name
// grants is in force and detaches them once one without is; a pinned link
// of an earlier daemon is updated or detached alike. Before Attach it
// does nothing.
func (e *Enforcer) syncDNS(on bool) error {
	if !e.attached {
		return nil
	}
	_, err := e.switchHooks(&e.dnsHooks, func(h hook) bool { return h.names }, on, false)
	return err
}

// hookSwitch is this process' state of a group of optional cgroup hooks
// that are attached only while the generation in force needs them (the
// DNS redirect, the handover guard's tracker): their links while on.
type hookSwitch struct {
	links  []link.Link
	on     bool
	synced bool // false: not synced yet by this process
}

// switchHooks attaches the hooks of the table that in selects (on) or
// detaches them, with the pinned links of an earlier daemon, unless this
// process already did; the first call syncs them whatever they were. A
// detached hook's pinned program is removed, or with keepProgs pinned
// still (for inspection and the bench). It says whether anything changed.
func (e *Enforcer) switchHooks(s *hookSwitch, in func(hook) bool, on, keepProgs bool) (bool, error) {
	if s.synced && s.on == on {
		return false, nil
	}
	for _, h := range hooks {
		if !in(h) {
			continue
		}
		if on {
			l, err := e.attachHook(h)
			if err != nil {
				return false, err
			}
			if l != nil {
				s.links = append(s.links, l)
			}
			continue
		}
		if err := unpinCgroupLink(filepath.Join(e.opts.BPFDir, "link_"+h.name)); err != nil {
			return false, err
		}
		if prog := h.prog(e); keepProgs && prog != nil {
			if err := e.pinProg(h.name, prog); err != nil {
				return false, err
			}
			continue
		}
		if err := os.Remove(filepath.Join(e.opts.BPFDir, "prog_"+h.name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return false, fmt.Errorf("remove pinned program of %s: %w", h.name, err)
		}
	}
	if !on {
		s.close()
	}
	s.on, s.synced = on, true
	return true, nil
}

// close closes this process' links; pinned, they stay attached.
func (s *hookSwitch) close() {
	for _, l := range s.links {
		l.Close()
	}
	s.links = nil
}

// unpinCgroupLink detaches the cgroup link pinned at pin, if any, and
// removes the pin: detached first, as a link freed by its unpin goes
// later (Uninstall).
func unpinCgroupLink(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	defer l.Close()
	if err := l.Detach(); err != nil {
		return fmt.Errorf("detach %s: %w", pin, err)
	}
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpin %s: %w", pin, err)
	}
	return nil
}

// followHooks are the follower's programs, named as their pinned links.
func (e *Enforcer) followHooks() []tracingHook {
	return []tracingHook{
		{"follow_mkdir", e.follow.FollowMkdir},
		{"follow_rmdir", e.follow.ForgetRmdir},
	}
}

// locateRoot finds CgroupDir below the cgroup2 mount, where unit and
// cgroup matches are resolved.
func (e *Enforcer) locateRoot() error {
	mount, err := cgroups.Mount()
	if err != nil {
		return err
	}
	level, err := cgroups.Level(mount, e.opts.CgroupDir)
	if err != nil {
		return err
	}
	rel, err := filepath.Rel(mount, e.opts.CgroupDir)
	if err != nil {
		return fmt.Errorf("cgroup %s below %s: %w", e.opts.CgroupDir, mount, err)
	}
	e.mount, e.rootLevel, e.cgroupRoot = mount, level, ""
	if rel != "." {
		e.cgroupRoot = "/" + filepath.ToSlash(rel)
	}
	return nil
}

// tracingHook is a tp_btf or LSM program and the name of its pinned link.
type tracingHook struct {
	name string
	prog *ebpf.Program
}

// attachTracing attaches tp_btf and LSM programs and pins their links in
// place of an earlier run's (bpfpin.Replace: they cannot be updated).
func (e *Enforcer) attachTracing(hooks []tracingHook) error {
	for _, h := range hooks {
		var l link.Link
		var err error
		if h.prog.Type() == ebpf.LSM {
			l, err = link.AttachLSM(link.LSMOptions{Program: h.prog})
		} else {
			l, err = link.AttachTracing(link.TracingOptions{Program: h.prog})
		}
		if err != nil {
			return fmt.Errorf("attach %s: %w", h.name, err)
		}
		if err := bpfpin.Replace(filepath.Join(e.opts.BPFDir, "link_"+h.name), h.name, l); err != nil {
			return err
		}
		e.tracing = append(e.tracing, l)
	}
	return nil
}

// Close releases this process' handles. Pinned links and maps stay, so
// enforcement holds after the daemon exits (fail closed).
func (e *Enforcer) Close() error {
	e.closing.Store(true) // a refill stops at its next batch
	_ = e.waitClear()
	for _, l := range slices.Concat(e.links, e.tracing) {
		l.Close()
	}
	e.dnsHooks.close()
	e.tracker.close()
	e.links, e.tracing = nil, nil
	e.sweep.close()
	e.sweep = nil
	// One struct per load: each is closed whole, whatever it holds.
	return bpfpin.Close(&e.objs, &e.harden, &e.lsm, &e.handover, &e.lsmHandover, &e.tun, &e.listen, &e.migrate, &e.follow, &e.dns)
}

// current reads the generation in force; ok is false when there is none.
func (e *Enforcer) current() (info procgateGenerationInfo, ok bool, err error) {
	var inner *ebpf.Map
	if err := e.objs.PolicyCurrent.Lookup(uint32(0), &inner); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return info, false, nil
		}
		return info, false, fmt.Errorf("read policy_current: %w", err)
	}
	defer inner.Close()
	if err := inner.Lookup(uint32(0), &info); err != nil {
		return info, false, fmt.Errorf("read generation info: %w", err)
	}
	return info, true, nil
}

// Generation returns the generation in force (0: none yet).
func (e *Enforcer) Generation() (uint32, error) {
	info, _, err := e.current()
	return info.Generation, err
}

// Apply installs g as the next generation and switches to it in one step.
// When Apply returns, no decision uses the previous generation any more. On
// error the generation in force is unchanged.
// Apply is not safe for concurrent use; the daemon serializes reloads.
func (e *Enforcer) Apply(g Generation) (uint32, error) {
	cur, ok, err := e.current()
	if err != nil {
		return 0, err
	}
	slot := uint32(0)
	if ok {
		slot = (cur.Slot + 1) & 1
	}
	next := cur.Generation + 1
	start := time.Now()
	g.cgroupRoot, g.cgroupRootLevel = e.cgroupRoot, e.rootLevel
	g.udpMarks = e.lsmJudgesUDP()
	t, err := encode(g, slot)
	if err != nil {
		return 0, fmt.Errorf("encode policy: %w", err)
	}
	t.info.Generation = next

	// The idle slot is read by no decision: the previous Apply waited for
	// its readers before returning. So it can be rewritten in any order.
	encoded := time.Now()
	if err := e.waitClear(); err != nil {
		return 0, err
	}
	if err := e.clearSlot(slot); err != nil { // no-op unless adopted or the last clear failed
		return 0, err
	}
	cleared := time.Now()
	// The slot still holds the rules of the generation before the one in
	// force: a reload changes few of them, and writing (or deleting) a
	// trie entry costs about a microsecond.
	old := e.written[slot].rules
	ak, av := splitKV(t.apps)
	uk, uv := splitKV(t.users)
	// Recorded before writing, so that a failed Apply still lets the next
	// one clear whatever part of the slot did get written; the rules are
	// unknown until written whole.
	e.written[slot] = nil
	deleted, put, err := writeRuleDiff(e.objs.Rules, slot, old, t.rules, nil)
	if err != nil {
		return 0, fmt.Errorf("rules of generation %d: %w", next, err)
	}
	e.written[slot] = &slotKeys{rules: t.rules, apps: ak, users: uk, exes: t.exes, followed: len(t.patterns) > 0}
	for k := range t.exactPatterns {
		e.written[slot].exactPatterns = append(e.written[slot].exactPatterns, k)
	}
	for k := range t.globPatterns {
		e.written[slot].globPatterns = append(e.written[slot].globPatterns, k)
	}
	if n := len(t.ports); n > 0 {
		idx := make([]uint32, n)
		for i := range idx {
			idx[i] = slot*portsPerSlot + uint32(i)
		}
		if err := putBatch(e.objs.PortRanges, idx, t.ports); err != nil {
			return 0, fmt.Errorf("write %d port ranges of generation %d: %w", n, next, err)
		}
	}
	if err := putBatch(e.objs.AppByCgroup, ak, av); err != nil {
		return 0, fmt.Errorf("write %d app bindings of generation %d: %w", len(ak), next, err)
	}
	if err := putBatch(e.objs.AppByUid, uk, uv); err != nil {
		return 0, fmt.Errorf("write %d user apps of generation %d: %w", len(uk), next, err)
	}
	if err := putBatch(e.objs.AppExes, t.exes, make([]uint8, len(t.exes))); err != nil {
		return 0, fmt.Errorf("write %d app binaries of generation %d: %w", len(t.exes), next, err)
	}
	// The slot's patterns before the scan: a cgroup made in between is
	// bound by the kernel, one made before by the scan.
	if err := e.writePatterns(t); err != nil {
		return 0, fmt.Errorf("generation %d: %w", next, err)
	}
	found, matched, err := e.scanPatterns(t, slot)
	if err != nil {
		return 0, fmt.Errorf("generation %d: %w", next, err)
	}
	fk, fv := splitKV(found)
	if err := putBatch(e.objs.AppByCgroup, fk, fv); err != nil {
		return 0, fmt.Errorf("write %d matched cgroups of generation %d: %w", len(fk), next, err)
	}

	info, err := ebpf.NewMap(e.specs.Maps["policy_current"].InnerMap)
	if err != nil {
		return 0, fmt.Errorf("create generation info map: %w", err)
	}
	defer info.Close() // policy_current holds its own reference
	if err := info.Put(uint32(0), &t.info); err != nil {
		return 0, fmt.Errorf("write generation info: %w", err)
	}
	// What DNS answers taught, under the new policy; held until the
	// switch, so that no answer learned in between is lost to either slot.
	e.names.mu.Lock()
	defer e.names.mu.Unlock()
	if err := e.writeNames(slot, g.Rules, g.AppIDs, t.namePorts); err != nil {
		return 0, fmt.Errorf("generation %d: %w", next, err)
	}
	// Apps' DNS queries go to the proxy from the switch on: the redirect
	// is attached before it (under the previous generation it redirects
	// the apps that had name grants then, if any).
	g.hasNames = len(t.namePorts) > 0
	if g.hasNames {
		if err := e.syncDNS(true); err != nil {
			return 0, fmt.Errorf("generation %d: %w", next, err)
		}
	}
	// The tracker likewise: before a generation that needs it, after one
	// that does not.
	trackerOn, trackerWhy := trackerNeed(&g)
	if trackerOn {
		if err := e.syncTracker(true, trackerWhy); err != nil {
			return 0, fmt.Errorf("generation %d: %w", next, err)
		}
	}
	// The switch. It returns after an RCU grace period, so from here on no
	// decision reads the previous slot.
	written := time.Now()
	if err := e.objs.PolicyCurrent.Put(uint32(0), info); err != nil {
		return 0, fmt.Errorf("switch to generation %d: %w", next, err)
	}
	if !g.hasNames {
		if err := e.syncDNS(false); err != nil {
			// In force anyway; the redirect runs on for nothing.
			e.opts.Log.Warn("detach the DNS redirect", "error", err)
		}
	}
	if !trackerOn {
		if err := e.syncTracker(false, trackerWhy); err != nil {
			// In force anyway; the tracker runs on for nothing.
			e.opts.Log.Warn("detach the TCP handover guard's tracker", "error", err)
		}
	}
	e.names.live, e.names.slot, e.names.rules, e.names.ids, e.names.ports = true, slot, g.Rules, g.AppIDs, t.namePorts
	e.opts.Log.Debug("generation applied", "generation", next, "slot", slot, "rules", len(t.rules), "rules_written", put,
		"rules_deleted", deleted, "port_ranges", len(t.ports),
		"app_bindings", len(ak), "encode", encoded.Sub(start), "clear", cleared.Sub(encoded), "write", written.Sub(cleared),
		"switch", time.Since(written))
	// No decision reads the old slot any more: empty it now, in the
	// background, and give it this generation's rules, so that the next
	// Apply finds it ready and writes only what that reload changes. At
	// 1,000,000 prefixes the first reload after a load otherwise wrote
	// all 2,000,000 entries (about 2.4 s of kernel time) on the reload's
	// path; now that runs while the next reload is still parsing.
	if ok {
		old := cur.Slot & 1
		done := make(chan error, 1)
		e.clearing = done
		go func() {
			err := e.clearSlot(old)
			if err == nil {
				e.refillSlot(old, t.rules)
			}
			done <- err
		}()
	}
	e.applied.Store(&g)
	e.matched = matched
	return next, nil
}

// refillSlot writes rules, the generation in force's, into the idle slot
// (cleared but for its rules): no decision reads it, so nothing is in a
// hurry. Both slots then share one slice of entries, which the trie keys
// apart by their slot bit only (diffRules ignores it). A failure, or Close,
// leaves the slot's rules unknown, for the next Apply to walk: it is not
// the next reload's to fail.
func (e *Enforcer) refillSlot(slot uint32, rules []ruleEntry) {
	have := e.written[slot]
	e.written[slot] = nil
	_, put, err := writeRuleDiff(e.objs.Rules, slot, have.rules, rules, e.closing.Load)
	if err != nil {
		if !errors.Is(err, errClosing) {
			e.opts.Log.Warn("refill the idle slot's rules; the next reload walks it", "slot", slot, "error", err)
		}
		return
	}
	e.opts.Log.Debug("idle slot refilled", "slot", slot, "rules", len(rules), "rules_written", put)
	have.rules = rules
	e.written[slot] = have
}

// waitClear waits for the background clear begun by the last Apply.
func (e *Enforcer) waitClear() error {
	if e.clearing == nil {
		return nil
	}
	err := <-e.clearing
	e.clearing = nil
	return err
}

// clearSlot deletes a slot's entries but its rules, by the keys this
// process wrote or, for adopted state, by walking the maps.
func (e *Enforcer) clearSlot(slot uint32) error {
	keys := e.written[slot]
	if keys == nil {
		var err error
		if keys, err = e.scanSlot(slot); err != nil {
			return err
		}
	}
	// Patterns first: from then on the kernel binds no cgroup in the slot.
	if err := e.clearPatterns(slot, keys); err != nil {
		return err
	}
	if keys.followed {
		// A follow_mkdir that found a pattern just before it went may
		// still bind a cgroup in the slot: wait it out, then walk.
		if err := e.rcuFence(); err != nil {
			return err
		}
		if err := e.clearFollowed(slot); err != nil {
			return err
		}
	} else if err := deleteBatch(e.objs.AppByCgroup, keys.apps); err != nil {
		return fmt.Errorf("clear app bindings of slot %d: %w", slot, err)
	}
	if err := deleteBatch(e.objs.AppExes, keys.exes); err != nil {
		return fmt.Errorf("clear app binaries of slot %d: %w", slot, err)
	}
	if err := deleteBatch(e.objs.AppByUid, keys.users); err != nil {
		return fmt.Errorf("clear user apps of slot %d: %w", slot, err)
	}
	if err := e.clearNames(slot); err != nil {
		return err
	}
	e.written[slot] = &slotKeys{rules: keys.rules} // known empty but for its rules
	return nil
}

func (e *Enforcer) scanSlot(slot uint32) (*slotKeys, error) {
	keys := &slotKeys{}
	var rk procgateRuleKey
	var rv procgateRuleValue
	it := e.objs.Rules.Iterate()
	for it.Next(&rk, &rv) {
		if tagOrder(&rk)>>31 == slot {
			keys.rules = append(keys.rules, ruleEntry{rk, rv})
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("walk rules: %w", err)
	}
	sortRules(keys.rules)
	var ak procgateAppKey
	var av procgateAppInfo
	it = e.objs.AppByCgroup.Iterate()
	for it.Next(&ak, &av) {
		if ak.Slot == slot {
			keys.apps = append(keys.apps, ak)
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("walk app bindings: %w", err)
	}
	if err := e.scanPatternKeys(slot, keys); err != nil {
		return nil, err
	}
	var uk procgateUserKey
	it = e.objs.AppByUid.Iterate()
	for it.Next(&uk, &av) {
		if uk.Slot == slot {
			keys.users = append(keys.users, uk)
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("walk user apps: %w", err)
	}
	var ek procgateExeKey
	var ev uint8
	it = e.objs.AppExes.Iterate()
	for it.Next(&ek, &ev) {
		if ek.Slot == slot {
			keys.exes = append(keys.exes, ek)
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("walk app binaries: %w", err)
	}
	return keys, nil
}

// putBatch writes entries with BPF_MAP_UPDATE_BATCH (one syscall; LPM tries
// have it since 6.x), or one by one where the kernel lacks it.
func putBatch[K, V any](m *ebpf.Map, keys []K, values []V) error {
	if len(keys) == 0 {
		return nil
	}
	_, err := m.BatchUpdate(keys, values, nil)
	if !errors.Is(err, ebpf.ErrNotSupported) {
		return err
	}
	for i := range keys {
		if err := m.Put(&keys[i], &values[i]); err != nil {
			return err
		}
	}
	return nil
}

// deleteBatch deletes keys; keys already gone are fine.
func deleteBatch[K any](m *ebpf.Map, keys []K) error {
	if len(keys) == 0 {
		return nil
	}
	_, err := m.BatchDelete(keys, nil)
	if err == nil {
		return nil
	}
	if !errors.Is(err, ebpf.ErrNotSupported) && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return err
	}
	// One by one: either the kernel lacks batch deletes, or the batch
	// stopped at a missing key.
	for i := range keys {
		if err := m.Delete(&keys[i]); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

// Guard is one protection and whether this kernel gives it.
type Guard struct {
	Name   string
	What   string
	Active bool
	Why    string // when not active
}

// Guards lists what is guarded on this kernel, for the start-up log and
// `procgate status`. Tracing of app processes is the launcher's guard
// (launch.TraceGuard), not the kernel programs'.
func (e *Enforcer) Guards() []Guard {
	applied := e.applied.Load()
	udpOn, udpWhy := UDPHandover(applied != nil && applied.NoUDPHandover)
	udpHow := "dropped at egress (EPERM); NFQUEUE-reinjected datagrams count as the verdict giver's"
	switch {
	case e.udpMarks():
		// The egress check's helpers are refused (6.1, 6.12), BPF LSM is
		// not: the socket_sendmsg program judges the writer.
		udpOn, udpWhy = true, ""
		udpHow = "refused at sendmsg (EACCES) by the BPF LSM socket_sendmsg program, which this kernel loads where it refuses the egress check's current-task helpers"
	case e.udpHandoverErr != nil:
		udpOn, udpWhy = false, "this kernel refuses current-task helpers the check calls in cgroup_skb programs (6.1: bpf_get_current_cgroup_id; 6.12: bpf_get_current_uid_gid; 6.18 allows them), and BPF LSM programs: "+firstLine(e.udpHandoverErr)
		if applied != nil && applied.NoUDPHandover {
			udpWhy = "turned off (--udp-handover=false)"
		}
	}
	gs := []Guard{
		{Name: "connect-sendmsg", What: "connect() and UDP sendmsg() of every task below the cgroup, IPv4 and IPv6", Active: true},
		{Name: "listen", What: "bind() of an app with listen: to a port it does not list is refused (EACCES), TCP and UDP, IPv4 and IPv6; listen() on a never-bound socket, which the kernel binds to a port of its choosing without a bind hook, is the listen-autobind guard's", Active: true},
		{Name: "egress-backstop", What: "packets to internal destinations that bypass connect/sendmsg (raw, ping, other IP protocols, new TCP connections)", Active: true},
		{Name: "udp-handover", What: "a connected UDP socket of an app takes datagrams only from the app's processes: others' are " + udpHow,
			Active: udpOn, Why: udpWhy},
		{Name: "raw-sockets", What: "no raw IP sockets inside app cgroups", Active: true},
		{Name: "packet-sockets", What: "no AF_PACKET or AF_XDP sockets inside app cgroups (BPF LSM)", Active: e.lsmErr == nil, Why: lsmWhy(e.lsmErr)},
		{Name: "tun-devices", What: "no TUN or TAP device created or attached by an app's process (BPF LSM tun_dev_create, tun_dev_open, tun_dev_attach_queue)", Active: e.tunErr == nil, Why: lsmWhy(e.tunErr)},
		{Name: "listen-autobind", What: "listen() on a never-bound socket of an app with listen: is judged as a bind to port 0: refused (EACCES) unless listen: lists 0 (BPF LSM socket_listen)", Active: e.listenErr == nil, Why: lsmWhy(e.listenErr)},
		{Name: "cgroup-migration", What: "processes moved or cloned into an app cgroup from inside another app hold no grants (tp_btf cgroup_attach_task, sched_process_fork)",
			Active: e.migrateErr == nil},
	}
	if e.migrateErr != nil {
		gs[len(gs)-1].Why = "tp_btf programs did not load or attach: " + e.migrateErr.Error()
	}
	gs = append(gs, Guard{Name: "unit-restarts", Active: e.followErr == nil,
		What: "a cgroup that a match.unit or match.cgroup app names is the app's from its mkdir, before any process runs in it: restarted units and new containers (tp_btf cgroup_mkdir)"})
	if e.followErr != nil {
		gs[len(gs)-1].Why = "tp_btf programs did not load or attach: " + e.followErr.Error() + "; new cgroups are bound at the next reload only"
	}
	scope := "every app connection"
	if applied != nil && applied.TrustTraceGuard {
		scope = "connections of app processes open to tracing (traceable: true, scripts, unit, cgroup and user apps, root); the trace guard covers the others, whose connections an app could only give away itself (SCM_RIGHTS; --tcp-handover=all guards those too)"
	}
	how := "BPF LSM socket_sendmsg, host-wide: socket storage per guarded connection"
	if e.lsmHandover.GuardHandoverLSM == nil {
		how = "sockops, sockhash and sk_msg (this kernel refuses BPF LSM: " + firstLine(e.lsmHandoverErr) + "): socket storage and a sockhash entry per guarded connection, about 1.3 µs, and the tcp_bpf send path"
	}
	if e.lsmHandover.GuardHandoverLSM == nil && e.handoverErr == nil {
		if on, why := e.Tracker(); on {
			how += "; sockops tracker attached (" + why + ")"
		} else {
			how += "; sockops tracker not attached, so TCP connects run no sockops program (" + why + ")"
		}
	}
	gs = append(gs, Guard{Name: "tcp-handover", Active: e.handoverErr == nil,
		What: "a TCP connection an app opened to an internal destination takes data only from the app's processes: a write by any other process is refused (EACCES); guarded: " + scope + "; by " + how})
	if e.handoverErr != nil {
		gs[len(gs)-1].Why = "sockops and sk_msg programs did not load: " + e.handoverErr.Error()
		if e.lsmHandoverErr != nil {
			gs[len(gs)-1].Why = "BPF LSM socket_sendmsg program did not load: " + lsmWhy(e.lsmHandoverErr) + "; " + gs[len(gs)-1].Why
		}
	}
	sweepHow := "socket iterators and bpf_sock_destroy"
	if e.sweep == nil || e.sweep.err != nil {
		sweepHow = "sock_diag SOCK_DESTROY (no socket iterators with bpf_sock_destroy here)"
	}
	gs = append(gs, Guard{Name: "live-sockets", Active: true,
		What: "after each new generation, app sockets (TCP, connected UDP) to destinations it no longer allows are ended, by " + sweepHow})
	gs = append(gs, Guard{Name: "dns-redirect", Active: e.dnsErr == nil,
		What: "the DNS queries (port 53, UDP and TCP, to IPv4 and IPv6 resolvers) of apps with name grants go to the daemon's DNS proxy, which learns the answers before relaying them (its programs are attached only while some app has name grants); not covered: DNS over TLS or HTTPS by the app, and in a network namespace where no proxy of the daemon runs yet, the query that has the daemon start one there (dns-unobserved: its answer grants nothing)"})
	if e.dnsErr != nil {
		gs[len(gs)-1].Why = firstLine(e.dnsErr) + "; name grants allow nothing"
	}
	return gs
}

// firstLine is err's message up to its first newline (a verifier log
// follows it).
func firstLine(err error) string {
	msg, _, _ := strings.Cut(err.Error(), "\n")
	return msg
}

// lsmWhy says why the BPF LSM guards are missing ("" when loaded).
func lsmWhy(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, unix.EPERM):
		return "this kernel refuses BPF LSM programs (EPERM on load: no BPF trampolines or the bpf LSM is off)"
	}
	return "BPF LSM program did not load: " + err.Error()
}

// Counters returns the kernel's per-app counters, summed over CPUs: for each
// app id, the counts indexed by CountAllow ... CountWouldDeny.
func (e *Enforcer) Counters(ids []uint32) (map[uint32][NumCounts]uint64, error) {
	out := make(map[uint32][NumCounts]uint64, len(ids))
	per := make([]uint64, runtime.NumCPU())
	sum := func(m *ebpf.Map, key uint32) (uint64, error) {
		if err := m.Lookup(key, &per); err != nil {
			return 0, err
		}
		var n uint64
		for _, v := range per {
			n += v
		}
		return n, nil
	}
	for _, id := range ids {
		var c [NumCounts]uint64
		var err error
		for s := range counterSlots {
			if c[s], err = sum(e.objs.VerdictCounters, id*uint32(counterSlots)+uint32(s)); err != nil {
				return nil, fmt.Errorf("read counters of app id %d: %w", id, err)
			}
		}
		if c[CountWouldDeny], err = sum(e.objs.WouldDenyCounters, id); err != nil {
			return nil, fmt.Errorf("read would-deny counter of app id %d: %w", id, err)
		}
		out[id] = c
	}
	return out, nil
}

// Events opens a reader of the audit ring buffer.
func (e *Enforcer) Events() (*ringbuf.Reader, error) {
	r, err := ringbuf.NewReader(e.objs.AuditEvents)
	if err != nil {
		return nil, fmt.Errorf("open audit ring buffer: %w", err)
	}
	return r, nil
}

// Attached reports, per hook, whether its pinned link exists.
func (e *Enforcer) Attached() map[string]bool {
	out := map[string]bool{}
	for _, h := range hooks {
		_, err := os.Stat(filepath.Join(e.opts.BPFDir, "link_"+h.name))
		out[h.name] = err == nil
	}
	return out
}

// checkBPFFS makes dir (if needed) and refuses anything not on a bpffs, where
// pins would silently fail or land in the wrong place.
func checkBPFFS(dir string) error {
	if dir == "" {
		return errors.New("no BPF pin directory given")
	}
	parent := dir
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		parent = filepath.Dir(dir)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(parent, &fs); err != nil {
		return fmt.Errorf("statfs %s: %w", parent, err)
	}
	if fs.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("%s is not on a bpf filesystem (mount one with `mount -t bpf bpf %s`)", parent, parent)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create BPF pin directory %s: %w", dir, err)
	}
	return nil
}

// diffRules compares the sorted entries a slot holds (old) with those it
// must hold (new), in key order and whatever slot bit their keys carry:
// each key to delete (del set) and each entry to write.
func diffRules(old, new []ruleEntry, each func(e ruleEntry, del bool)) {
	i, j := 0, 0
	for i < len(old) || j < len(new) {
		c := 0
		switch {
		case i == len(old):
			c = 1
		case j == len(new):
			c = -1
		default:
			c = compareSlotless(&old[i].key, &new[j].key)
		}
		switch {
		case c < 0:
			each(old[i], true)
			i++
		case c > 0:
			each(new[j], false)
			j++
		default:
			if old[i].value != new[j].value {
				each(new[j], false)
			}
			i++
			j++
		}
	}
}

// ruleBatch is how many rules one batch call deletes or writes.
const ruleBatch = 16384

// errClosing: Close stopped a refill.
var errClosing = errors.New("the enforcer is closing")

// writeRuleDiff turns slot's entries in the rules map, old, into new (both
// sorted; the keys written carry slot's bit whatever theirs), deletes
// first, a batch at a time: a copy of what differs, whole, was 2,000,000
// entries of 44 bytes at 1,000,000 prefixes and grants, and its keys and
// values as the batch calls take them as much again. stop, if not nil, is
// asked before each batch; true ends the write with errClosing.
func writeRuleDiff(m *ebpf.Map, slot uint32, old, new []ruleEntry, stop func() bool) (deleted, written int, err error) {
	keys := make([]procgateRuleKey, 0, ruleBatch)
	vals := make([]procgateRuleValue, 0, ruleBatch)
	flush := func(del bool) {
		if err != nil || len(keys) == 0 {
			return
		}
		if stop != nil && stop() {
			err = errClosing
			return
		}
		if del {
			if err = deleteBatch(m, keys); err != nil {
				err = fmt.Errorf("delete %d rules: %w", len(keys), err)
			}
			deleted += len(keys)
		} else {
			if err = putBatch(m, keys, vals); err != nil {
				err = fmt.Errorf("write %d rules: %w", len(keys), err)
			}
			written += len(keys)
		}
		keys, vals = keys[:0], vals[:0]
	}
	for _, dels := range []bool{true, false} {
		diffRules(old, new, func(e ruleEntry, del bool) {
			if del != dels {
				return
			}
			keys, vals = append(keys, withSlot(e.key, slot)), append(vals, e.value)
			if len(keys) == ruleBatch {
				flush(dels)
			}
		})
		flush(dels)
	}
	return deleted, written, err
}

// splitKV turns a map into parallel key and value slices for batch calls.
func splitKV[K comparable, V any](m map[K]V) ([]K, []V) {
	ks := make([]K, 0, len(m))
	vs := make([]V, 0, len(m))
	for k, v := range m {
		ks = append(ks, k)
		vs = append(vs, v)
	}
	return ks, vs
}

// UDPHandover: is the UDP handover check on, when off asks for it off
// (--udp-handover=false), on this machine? If not, why not.
func UDPHandover(off bool) (bool, string) {
	if ok, why := udpHandoverSupported(); !ok {
		return false, "turned off: " + why
	}
	if off {
		return false, "turned off (--udp-handover=false)"
	}
	return true, ""
}

// lsmJudgesUDP says whether the UDP handover check falls to the BPF LSM
// handover program: the egress backstop runs without it (its helpers
// refused) and the program is attached.
func (e *Enforcer) lsmJudgesUDP() bool {
	return e.udpHandoverErr != nil && e.lsmHandover.GuardHandoverLSM != nil && e.lsmHandoverErr == nil
}

// udpMarks says whether the UDP handover check is the BPF LSM handover
// program's (lsmJudgesUDP) and not turned off.
func (e *Enforcer) udpMarks() bool {
	applied := e.applied.Load()
	return e.lsmJudgesUDP() && !(applied != nil && applied.NoUDPHandover)
}

// udpHandoverSupported says whether the UDP handover check can tell a
// sender's task context from softirq on this machine: it relies on x86-64
// running softirqs on the CPU's own IRQ stack, which PREEMPT_RT kernels
// (softirqs in threads, on task stacks) and other architectures do not.
func udpHandoverSupported() (bool, string) {
	if runtime.GOARCH != "amd64" {
		return false, "not amd64: softirqs may run on task stacks"
	}
	if b, err := os.ReadFile("/sys/kernel/realtime"); err == nil && strings.TrimSpace(string(b)) == "1" {
		return false, "PREEMPT_RT kernel: softirqs run in threads, on task stacks"
	}
	return true, ""
}

// HandoverStats is the TCP handover guard's state.
type HandoverStats struct {
	Guarded int // connections it watches now
	// Since the maps were made: connections it could not take
	// (owned_sockets full), and marked ones established with another peer
	// than the marked one.
	Unguarded, Unmatched uint64
}

// Handover reads the TCP handover guard's state; ok is false without it.
func (e *Enforcer) Handover() (st HandoverStats, ok bool, err error) {
	if e.handoverErr != nil || e.handover.OwnedSockets == nil {
		return st, false, nil
	}
	for _, c := range []struct {
		m    *ebpf.Map
		to   *uint64
		what string
	}{{e.handover.OwnedSocketsFull, &st.Unguarded, "owned_sockets_full"}, {e.handover.OwnedUnmatched, &st.Unmatched, "owned_sockets_unmatched"}} {
		var per []uint64
		if err := c.m.Lookup(uint32(0), &per); err != nil {
			return st, true, fmt.Errorf("read %s: %w", c.what, err)
		}
		for _, v := range per {
			*c.to += v
		}
	}
	// Keys only: a lookup of a sockhash value would read a socket cookie
	// per entry for nothing. Bounded, and counted as a set: a key deleted
	// under the walk restarts it from the first.
	var next uint64
	var prev any // nil: from the first key
	seen := map[uint64]bool{}
	for range 2 * e.handover.OwnedSockets.MaxEntries() {
		err := e.handover.OwnedSockets.NextKey(prev, &next)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			st.Guarded = len(seen)
			return st, true, nil
		}
		if err != nil {
			return st, true, fmt.Errorf("walk owned_sockets: %w", err)
		}
		seen[next] = true
		prev = next
	}
	return st, true, errors.New("walk owned_sockets: did not end (connections coming and going)")
}
