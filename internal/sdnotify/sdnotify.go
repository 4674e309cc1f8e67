// Package sdnotify tells systemd about the daemon's state (sd_notify(3)):
// READY=1 once it enforces and serves, RELOADING=1 and READY=1 around a
// reload, STOPPING=1 on the way out. Written by hand: the protocol is one
// datagram on $NOTIFY_SOCKET, and no systemd library is in go.mod.
package sdnotify

import (
	"fmt"
	"net"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// SocketEnv names the socket systemd passes to a Type=notify service.
const SocketEnv = "NOTIFY_SOCKET"

// Notify sends state (newline-separated KEY=VALUE lines) to $NOTIFY_SOCKET.
// Without it (not started by systemd, or not Type=notify) it does nothing.
func Notify(state string) error {
	addr := os.Getenv(SocketEnv)
	if addr == "" {
		return nil
	}
	// A leading '@' is an abstract socket (sd_notify(3)); Go's unix
	// addresses spell it the same way.
	if addr[0] != '/' && addr[0] != '@' {
		return fmt.Errorf("%s=%q: want an absolute path or @abstract name", SocketEnv, addr)
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify to %s: %w", addr, err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify to %s: %w", addr, err)
	}
	return nil
}

// Ready says the service is up: for procgate, the programs are attached,
// the policy is applied and the API socket serves.
func Ready() error { return Notify("READY=1") }

// Reloading says a reload began. MONOTONIC_USEC lets systemd (253+, for
// Type=notify-reload) match it to the reload it asked for; older systemd
// ignores it and shows the unit as reloading.
func Reloading() error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return fmt.Errorf("clock_gettime(CLOCK_MONOTONIC): %w", err)
	}
	usec := ts.Sec*1_000_000 + ts.Nsec/1_000
	return Notify("RELOADING=1\nMONOTONIC_USEC=" + strconv.FormatInt(usec, 10))
}

// Stopping says the service is shutting down.
func Stopping() error { return Notify("STOPPING=1") }
