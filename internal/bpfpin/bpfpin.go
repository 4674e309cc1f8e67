// Package bpfpin keeps eBPF links pinned on a bpffs, so that enforcement
// outlives the process that attached it, and closes what a loader loaded.
// The enforcer (bpf/) and the pinhole observer (pinhole/) pin their links
// the same way, through here: a link pinned by an earlier run is adopted
// and moved to this build's program with BPF_LINK_UPDATE, with no moment
// unattached; without one, the program is attached and its link pinned.
package bpfpin

import (
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Load loads spec into objs (ebpf.CollectionSpec.LoadAndAssign) with the
// maps that spec pins pinned in bpfDir: an earlier run's are reused, so
// that state survives a restart. what names the objects in errors ("BPF",
// "pinhole").
func Load(spec *ebpf.CollectionSpec, objs any, bpfDir, what string) error {
	err := spec.LoadAndAssign(objs, Maps(bpfDir))
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		return fmt.Errorf("pinned %s maps in %s come from an incompatible procgate version (run `procgate uninstall --bpf-dir %s` first): %w", what, bpfDir, bpfDir, err)
	}
	if err != nil {
		return fmt.Errorf("load %s programs and maps (pinned in %s): %w", what, bpfDir, err)
	}
	return nil
}

// Maps are the load options of an object whose maps are pinned in bpfDir:
// those of objects loaded before (an earlier run's, or the main object's
// for the objects that share its maps) are reused.
func Maps(bpfDir string) *ebpf.CollectionOptions {
	return &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: bpfDir}}
}

// Cgroup returns the link that runs prog at hook attach of the cgroup
// cgroupDir, pinned at pin: the pinned link of an earlier run, updated to
// prog, or a new one, attached and pinned. name says which hook, in errors.
// A pinned link attached to another cgroup is an error, not replaced: it
// enforces a subtree this caller was not told about.
func Cgroup(pin, name, cgroupDir string, attach ebpf.AttachType, prog *ebpf.Program) (link.Link, error) {
	var st unix.Stat_t
	if err := unix.Stat(cgroupDir, &st); err != nil {
		return nil, fmt.Errorf("stat cgroup %s: %w", cgroupDir, err)
	}
	l, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		info, err := l.Info()
		if err == nil && info.Cgroup() != nil && info.Cgroup().CgroupId != st.Ino {
			l.Close()
			return nil, fmt.Errorf("pinned link %s is attached to cgroup id %d, not %s (id %d): uninstall first or use the same --cgroup-root",
				pin, info.Cgroup().CgroupId, cgroupDir, st.Ino)
		}
		if err := l.Update(prog); err != nil {
			l.Close()
			return nil, fmt.Errorf("update pinned link %s to the new %s program: %w", pin, name, err)
		}
		return l, nil
	case !errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	l, err = link.AttachCgroup(link.CgroupOptions{Path: cgroupDir, Attach: attach, Program: prog})
	if err != nil {
		return nil, fmt.Errorf("attach %s to %s: %w", name, cgroupDir, err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("pin %s link at %s: %w", name, pin, err)
	}
	return l, nil
}

// Replace pins l, a link just attached, at pin in place of the link an
// earlier run pinned there, for links the kernel cannot update in place
// (tracing and LSM links): the new one is attached before the old one is
// let go, so that no event goes unseen in between. On error l is closed.
func Replace(pin, name string, l link.Link) error {
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		err = old.Unpin()
		old.Close()
		if err != nil {
			l.Close()
			return fmt.Errorf("unpin the earlier %s link: %w", name, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		l.Close()
		return fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return fmt.Errorf("pin %s link at %s: %w", name, pin, err)
	}
	return nil
}

// Close closes every program, map and link held in the structs objs
// point to (as LoadAndAssign fills them, embedded structs included) and
// sets the fields to nil: a field added to such a struct is closed with
// the others, with no list to keep. Pins stay: a pinned map or link lives
// on in the kernel. It returns the errors joined.
func Close(objs ...any) error {
	var errs []error
	for _, o := range objs {
		v := reflect.ValueOf(o)
		if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
			errs = append(errs, fmt.Errorf("close %T: want a pointer to a struct", o))
			continue
		}
		errs = append(errs, closeStruct(v.Elem()))
	}
	return errors.Join(errs...)
}

var closerType = reflect.TypeFor[io.Closer]()

func closeStruct(v reflect.Value) error {
	var errs []error
	for i := range v.NumField() {
		// Through unsafe, for unexported fields (bpf2go embeds its
		// unexported Programs and Maps structs): v is addressable.
		f := v.Field(i)
		f = reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem()
		switch {
		case f.Kind() == reflect.Struct:
			errs = append(errs, closeStruct(f))
		case (f.Kind() == reflect.Pointer || f.Kind() == reflect.Interface) && f.IsNil():
		case f.Type().Implements(closerType):
			errs = append(errs, f.Interface().(io.Closer).Close())
			f.SetZero()
		case f.Kind() == reflect.Slice && f.Type().Elem().Implements(closerType):
			for j := range f.Len() {
				if c := f.Index(j); !c.IsNil() {
					errs = append(errs, c.Interface().(io.Closer).Close())
				}
			}
			f.SetZero()
		}
	}
	return errors.Join(errs...)
}
