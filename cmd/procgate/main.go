// Command procgate authorizes internal routes per application, enforced in
// the kernel with cgroup v2 and eBPF. See README.md, or `procgate help`.
package main

import (
	"errors"
	"fmt"
	"os"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		var ec exitCode
		if errors.As(err, &ec) {
			os.Exit(int(ec))
		}
		var rf runFailed
		if errors.As(err, &rf) {
			fmt.Fprintln(os.Stderr, "procgate:", err)
			os.Exit(rf.status)
		}
		fmt.Fprintln(os.Stderr, "procgate:", err)
		os.Exit(1)
	}
}

// exitCode ends the process with a code and no message (the command has
// already said what happened, or is relaying a child's status).
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }
