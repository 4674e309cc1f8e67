// Package launch starts a command as a procgate application: inside the
// app's cgroup from its first instruction (clone3 with CLONE_INTO_CGROUP), as
// the calling user, with an environment that cannot load foreign code into
// the binary, after checking that the binary is one the app pins.
package launch

import "strings"

// unsecureEnv is glibc's list of variables it drops for set-user-ID programs
// (sysdeps/generic/unsecvars.h), less TMPDIR. Names with the prefixes in
// unsecurePrefixes are dropped whole and not repeated here.
//
// The launched process runs as the caller, so these are not about the
// caller's privileges but about the app's: an app that pins a binary gives
// its grants to that binary's code only. LD_PRELOAD, LD_LIBRARY_PATH,
// LD_AUDIT, GCONV_PATH (iconv modules), NLSPATH/LOCPATH (message catalogues
// with format strings), GLIBC_TUNABLES and the resolver variables let
// whoever sets them run or steer other code inside the pinned binary, which
// would then reach the app's destinations on the caller's behalf.
//
// TMPDIR stays: glibc drops it only so that a set-user-ID program does not
// write where its unprivileged caller points; here the program is the
// caller's own, and many programs need it.
var unsecureEnv = map[string]bool{
	"GCONV_PATH":       true,
	"GETCONF_DIR":      true,
	"GLIBC_TUNABLES":   true,
	"HOSTALIASES":      true,
	"LOCALDOMAIN":      true,
	"LOCPATH":          true,
	"NIS_PATH":         true,
	"NLSPATH":          true,
	"RESOLV_HOST_CONF": true,
	"RES_OPTIONS":      true,
	"TZDIR":            true,
}

// unsecurePrefixes: every dynamic loader variable (LD_PRELOAD, LD_AUDIT,
// LD_LIBRARY_PATH, LD_BIND_NOW, ... and whatever later glibc versions add),
// and every malloc tunable alias (MALLOC_TRACE writes a file, the others
// change allocator behaviour an exploit could lean on).
var unsecurePrefixes = []string{"LD_", "MALLOC_"}

// ScrubEnv returns env without the variables that change how glibc's loader
// and libc behave (see unsecureEnv), and without malformed entries (no '=').
// The order of the rest is kept.
func ScrubEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		name, _, ok := strings.Cut(kv, "=")
		if !ok || name == "" || unsecure(name) {
			continue
		}
		out = append(out, kv)
	}
	return out
}

func unsecure(name string) bool {
	if unsecureEnv[name] {
		return true
	}
	for _, p := range unsecurePrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}
