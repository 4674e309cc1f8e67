package launch

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/procgate/procgate/ruleset"
	"github.com/procgate/procgate/users"
)

// Authorize decides whether the user uid may run app. Root always may;
// anyone else must be named in app.Users (by name or uid), or be a member
// (primary or supplementary) of a group listed there as "@group" (by name
// or gid). Users and groups are looked up through NSS (package users), so
// directory users such as bob@EXAMPLE.COM are known. A name that is not
// the uid's own is looked up too: a directory may know one user by
// several names (an alias, a name in another case).
func Authorize(app ruleset.App, uid uint32) error {
	if uid == 0 {
		return nil
	}
	id := strconv.FormatUint(uint64(uid), 10)
	if slices.Contains(app.Users, id) {
		return nil
	}
	u, err := users.LookupUID(uid)
	if err != nil {
		return fmt.Errorf("app %s: uid %d may not run it: no user name for the uid: %w", app.Name, uid, err)
	}
	if slices.Contains(app.Users, u.Name) {
		return nil
	}
	var gids []uint32
	for _, entry := range app.Users {
		ok, err := admits(entry, u, &gids)
		if err != nil {
			return fmt.Errorf("app %s: user %s (uid %d): %w", app.Name, u.Name, uid, err)
		}
		if ok {
			return nil
		}
	}
	return fmt.Errorf("app %s: user %s (uid %d) is not allowed to run it (users: %s)", app.Name, u.Name, uid, strings.Join(app.Users, ", "))
}

// admits says whether one users: entry names u, other than by its own name
// or uid (Authorize compares those first, without a lookup); gids are u's
// groups, read on the first "@group" entry. A user or group the database lacks admits
// no one; a database that fails is an error, not a silent no.
func admits(entry string, u users.User, gids *[]uint32) (bool, error) {
	group, isGroup := strings.CutPrefix(entry, "@")
	if !isGroup {
		if numeric(entry) {
			return false, nil // a uid: compared before any lookup
		}
		other, err := users.LookupName(entry)
		switch {
		case errors.Is(err, users.ErrUnknown):
			return false, nil
		case err != nil:
			return false, err
		}
		return other.UID == u.UID, nil
	}
	if *gids == nil {
		g, err := users.Groups(u)
		if err != nil {
			return false, err
		}
		*gids = g
	}
	if numeric(group) {
		gid, err := strconv.ParseUint(group, 10, 32)
		return err == nil && slices.Contains(*gids, uint32(gid)), nil
	}
	g, err := users.LookupGroup(group)
	switch {
	case errors.Is(err, users.ErrUnknown):
		return false, nil // a group the policy names but the host lacks
	case err != nil:
		return false, err
	}
	return slices.Contains(*gids, g.GID), nil
}

// numeric: a uid or gid written as digits.
func numeric(s string) bool { return s != "" && strings.Trim(s, "0123456789") == "" }
