//go:build 386 || arm

package launch

import "golang.org/x/sys/unix"

// The 32-bit id calls: on 386 and arm the unsuffixed ones take 16-bit ids.
const (
	sysSetresuid = unix.SYS_SETRESUID32
	sysSetresgid = unix.SYS_SETRESGID32
)
