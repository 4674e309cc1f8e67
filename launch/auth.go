package launch

import (
	"fmt"
	"os/user"
	"slices"
	"strconv"
	"strings"

	"github.com/procgate/procgate/ruleset"
)

// Authorize decides whether the user uid may run app. Root always may;
// anyone else must be named in app.Users, or be a member (primary or
// supplementary, per the group database) of a group listed there as
// "@group".
func Authorize(app ruleset.App, uid uint32) error {
	if uid == 0 {
		return nil
	}
	id := strconv.FormatUint(uint64(uid), 10)
	u, err := user.LookupId(id)
	if err != nil {
		return fmt.Errorf("app %s: uid %d may not run it: no user name for the uid: %w", app.Name, uid, err)
	}
	if slices.Contains(app.Users, u.Username) {
		return nil
	}
	var gids []string
	for _, entry := range app.Users {
		name, ok := strings.CutPrefix(entry, "@")
		if !ok {
			continue
		}
		if gids == nil {
			if gids, err = u.GroupIds(); err != nil {
				return fmt.Errorf("app %s: groups of user %s (uid %d): %w", app.Name, u.Username, uid, err)
			}
			gids = append(gids, u.Gid)
		}
		g, err := user.LookupGroup(name)
		if err != nil {
			continue // a group the policy names but the host lacks admits no one
		}
		if slices.Contains(gids, g.Gid) {
			return nil
		}
	}
	return fmt.Errorf("app %s: user %s (uid %d) is not allowed to run it (users: %s)", app.Name, u.Username, uid, strings.Join(app.Users, ", "))
}
