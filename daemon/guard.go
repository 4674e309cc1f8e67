package daemon

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/procgate/procgate/users"
)

// resolveGuard settles cfg.GuardGID: 0 when the guard is off, else the gid
// given or that of cfg.GuardGroup, which it creates (groupadd --system)
// when missing. It refuses a gid that is some user's primary group: the
// launcher cannot guard that user's apps (their real gid would equal their
// effective one), so nobody's and many service accounts' apps ran
// unguarded under the old default, nogroup. A warning would be read after
// the fact; the refusal comes before any app is launched.
func resolveGuard(cfg *Config, log *slog.Logger) error {
	if cfg.NoTraceGuard {
		cfg.GuardGID = 0
		return nil
	}
	given := cfg.GuardGID != 0
	if !given {
		g, err := users.LookupGroup(cfg.GuardGroup)
		if errors.Is(err, users.ErrUnknown) {
			if g, err = users.AddSystemGroup(cfg.GuardGroup); err == nil {
				log.Info("created the trace guard's group", "group", g.Name, "guard_gid", g.GID)
			}
		}
		if err != nil {
			return fmt.Errorf("trace guard group %s: %w; create it (a system group that is no user's primary group), or give --guard-gid GID, or --guard-gid off", cfg.GuardGroup, err)
		}
		cfg.GuardGID = g.GID
	}
	names, err := users.WithPrimaryGroup(cfg.GuardGID)
	if err != nil {
		// The launcher still checks each user at launch (launch.guardOf).
		log.Warn("cannot check that the trace guard gid is no user's primary group", "guard_gid", cfg.GuardGID, "err", err)
		return nil
	}
	if len(names) == 0 {
		return nil
	}
	what := fmt.Sprintf("group %s (gid %d)", cfg.GuardGroup, cfg.GuardGID)
	if given {
		what = fmt.Sprintf("--guard-gid %d", cfg.GuardGID)
	}
	return fmt.Errorf("%s is the primary group of %s: apps of %s could not be trace-guarded; give --guard-gid a group that is no user's primary group (default: %s, created when missing), or --guard-gid off",
		what, listNames(names), plural(len(names), "that user", "those users"), DefaultGuardGroup)
}

// listNames lists names, at most 5 of them.
func listNames(names []string) string {
	if len(names) <= 5 {
		return plural(len(names), "user ", "users ") + strings.Join(names, ", ")
	}
	return fmt.Sprintf("users %s and %d more", strings.Join(names[:5], ", "), len(names)-5)
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
