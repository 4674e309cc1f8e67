//go:build !(linux && amd64)

package main

import (
	"errors"
	"time"

	"golang.org/x/sys/unix"
)

// ptraceInject is written for amd64 registers only.
func ptraceInject(a attempt, _ int, _ unix.Sockaddr, _ []byte, _ time.Duration) attempt {
	return a.unavailable("ptrace injection", errors.New("implemented for linux/amd64 only"))
}
