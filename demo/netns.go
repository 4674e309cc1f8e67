package demo

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// inNS runs fn on an OS thread that has joined the network namespace pinned at
// path. Sockets, TUN devices and netlink handles that fn opens keep that
// namespace after fn returns, whichever thread uses them later.
func inNS(path string, fn func() error) error {
	return onMovedThread(func() error {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open netns %s: %w", path, err)
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("join netns %s: %w", path, err)
		}
		return nil
	}, fn)
}

// onMovedThread runs fn on a locked OS thread after enter has moved that
// thread (only) to another network namespace, then moves it back. enter must
// leave the namespace unchanged when it fails.
//
// When the move back fails, the goroutine exits still locked: the Go runtime
// then ends the thread instead of handing a thread in a foreign namespace to
// other goroutines. Threads are not simply always discarded that way because
// the main thread is never ended, only parked, and a parked main thread would
// keep the namespace alive until the process exits.
func onMovedThread(enter, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own netns: %w", err)
			return
		}
		defer unix.Close(home)
		if err := enter(); err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		err = fn()
		if backErr := unix.Setns(home, unix.CLONE_NEWNET); backErr != nil {
			errc <- errors.Join(err, fmt.Errorf("return to own netns: %w", backErr))
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	return <-errc
}

// newNS creates a network namespace and pins it by bind-mounting its nsfs
// file on path, so that it outlives the thread that made it and can be
// entered with `nsenter --net=PATH`. The mount is made from a thread that
// changed only its network namespace, so it lands in the caller's mount
// namespace. On error nothing is left at path.
func newNS(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return fmt.Errorf("create netns file %s: %w", path, err)
	}
	f.Close()
	err = onMovedThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare netns: %w", err)
		}
		return nil
	}, func() error {
		if err := unix.Mount("/proc/thread-self/ns/net", path, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind-mount netns on %s: %w", path, err)
		}
		return nil
	})
	if err != nil {
		return errors.Join(err, removeNS(path))
	}
	return nil
}

// removeNS unpins a namespace made by newNS and removes its file. The kernel
// frees the namespace (and the veths in it) once nothing else refers to it.
// Missing mounts and files are not errors, so that it can run on a partial
// setup and more than once.
func removeNS(path string) error {
	var errs []error
	// EINVAL: not a mount point (never mounted, or already unmounted).
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount netns %s: %w", path, err))
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove netns file %s: %w", path, err))
	}
	return errors.Join(errs...)
}
