package bpf

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// releaseLimit bounds how long Uninstall waits for the kernel to let go of
// links it could not detach. It guards against waiting forever on a link
// that another process holds; a release takes an RCU grace period and a
// workqueue run, milliseconds even on a loaded machine.
var releaseLimit = 5 * time.Second

// Uninstall detaches and removes everything a daemon pinned in bpfDir. It
// returns without error only when none of the links it found is attached
// any more; otherwise the error names each link still attached and the
// processes that hold it.
//
// Links are detached before they are unpinned: the last reference that an
// unpin drops frees the link from a workqueue (kernel commit "bpf: Remove
// in_atomic() from bpf_link_put()", 2023: only close() frees at once), so
// a connect() right after would still meet the program, and a process that
// holds a descriptor of the link (inherited, or taken by id) would keep it
// attached for as long as it lives. BPF_LINK_DETACH (cgroup links, 5.9+)
// detaches it whoever holds it, before Uninstall returns. Links that cannot
// be detached (raw tracepoint and tracing links) are unpinned and waited for.
func Uninstall(bpfDir string) (removed []string, err error) {
	if err := checkBPFFS(bpfDir); err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(bpfDir)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", bpfDir, err)
	}
	var errs []error
	var unpinned []pinnedLink
	for _, ent := range ents {
		p := filepath.Join(bpfDir, ent.Name())
		l, err := detachPinned(p)
		if err != nil {
			errs = append(errs, err)
		}
		if err := os.Remove(p); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", p, err))
			continue
		}
		if l != nil {
			unpinned = append(unpinned, *l)
		}
		removed = append(removed, ent.Name())
	}
	if err := os.Remove(bpfDir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", bpfDir, err))
	}
	errs = append(errs, waitReleased(unpinned, releaseLimit)...)
	return removed, errors.Join(errs...)
}

// pinnedLink is a link that goes with its unpin rather than by a detach.
type pinnedLink struct {
	path    string
	id      link.ID
	program ebpf.ProgramID
}

// detachPinned detaches the link pinned at p and checks that a cgroup link
// is attached to no cgroup any more. It returns a link that cannot be
// detached, to be waited for once unpinned. A pin that is not a link (a map,
// a program) is left alone; the daemon pins its links as link_*, so a
// link_* pin that does not load is an error.
func detachPinned(p string) (*pinnedLink, error) {
	l, err := link.LoadPinnedLink(p, nil)
	if err != nil {
		if strings.HasPrefix(filepath.Base(p), "link_") {
			return nil, fmt.Errorf("load pinned link %s to detach it: %w", p, err)
		}
		return nil, nil
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return nil, fmt.Errorf("pinned link %s: %w", p, err)
	}
	err = l.Detach()
	if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EOPNOTSUPP) {
		return &pinnedLink{path: p, id: info.ID, program: info.Program}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("detach %s: %w", p, err)
	}
	if info.Cgroup() != nil {
		// The link's cgroup is cleared under the cgroup lock that also
		// takes the program out of the cgroup's effective programs.
		after, err := l.Info()
		if err != nil {
			return nil, fmt.Errorf("pinned link %s after its detach: %w", p, err)
		}
		if cg := after.Cgroup(); cg == nil || cg.CgroupId != 0 {
			return nil, fmt.Errorf("link %d pinned at %s (program %d) is still attached to cgroup id %d after its detach",
				info.ID, p, info.Program, info.Cgroup().CgroupId)
		}
	}
	return nil, nil
}

// waitReleased waits until the kernel has freed every link in links, which
// were unpinned, for at most limit, and returns an error for each link still
// there then: attached, and held by someone else.
func waitReleased(links []pinnedLink, limit time.Duration) []error {
	deadline := time.Now().Add(limit)
	for {
		links = slices.DeleteFunc(links, released)
		if len(links) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	var errs []error
	for _, l := range links {
		errs = append(errs, fmt.Errorf("link %d (program %d), unpinned from %s, is still attached %v later: %s",
			l.id, l.program, l.path, limit, holders(l.id)))
	}
	return errs
}

// released says whether the kernel has freed l: no link has its id (a link
// frees its id first, then detaches its program in the same call). Link ids
// are allocated cyclically, so no new link takes the id over within the wait;
// a link there with another program would be another link all the same.
func released(l pinnedLink) bool {
	k, err := link.NewFromID(l.id)
	if err != nil {
		return errors.Is(err, os.ErrNotExist)
	}
	defer k.Close()
	info, err := k.Info()
	return err == nil && info.Program != l.program
}

// holders names the processes with a descriptor of link id, from their
// /proc/PID/fdinfo, for an operator to end.
func holders(id link.ID) string {
	want := fmt.Sprintf("link_id:\t%d", id)
	fdinfos, _ := filepath.Glob("/proc/[0-9]*/fdinfo/*")
	var who []string
	for _, f := range fdinfos {
		if !hasLine(f, want) {
			continue
		}
		pidDir := filepath.Dir(filepath.Dir(f))
		comm, _ := os.ReadFile(filepath.Join(pidDir, "comm"))
		h := fmt.Sprintf("pid %s (%s) fd %s", filepath.Base(pidDir), strings.TrimSpace(string(comm)), filepath.Base(f))
		if !slices.Contains(who, h) {
			who = append(who, h)
		}
	}
	if len(who) == 0 {
		return "no process holds a descriptor of it (pinned elsewhere, or held by a process of another pid namespace)"
	}
	return "held by " + strings.Join(who, ", ")
}

func hasLine(path, line string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if sc.Text() == line {
			return true
		}
	}
	return false
}
