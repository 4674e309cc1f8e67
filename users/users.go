// Package users looks users and groups up in the host's user database,
// NSS included, without cgo.
//
// procgate is built with CGO_ENABLED=0, so os/user reads /etc/passwd and
// /etc/group only: users and groups of a directory (sssd, LDAP, winbind)
// are unknown to it. A name the files do not have is asked of getent(1),
// which goes through glibc's NSS as nsswitch.conf says: every module the
// host is configured with, systemd's userdb included (nss-systemd), which
// systemd's varlink userdb alone would not give (sssd and LDAP do not
// serve it). Without getent, only the files are read.
package users

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"time"
)

// ErrUnknown is wrapped by lookups of a name or id that the user database
// does not have.
var ErrUnknown = errors.New("not in the user database")

// User is a user as the user database has it.
type User struct {
	Name     string
	UID, GID uint32 // GID: the primary group
}

// Group is a group as the user database has it.
type Group struct {
	Name string
	GID  uint32
}

// getentTimeout bounds one getent run: a directory server that does not
// answer must not hold a launch or the daemon's start forever.
const getentTimeout = 10 * time.Second

// errNoGetent: getent is not installed.
var errNoGetent = errors.New("getent not found")

// getent runs `getent DB [-- KEYS...]` and returns its lines; a key it does
// not know is ErrUnknown.
func getent(db string, keys ...string) ([]string, error) {
	path, err := exec.LookPath("getent")
	if err != nil {
		return nil, errNoGetent
	}
	ctx, cancel := context.WithTimeout(context.Background(), getentTimeout)
	defer cancel()
	args := []string{db}
	if len(keys) > 0 {
		// "--": a key that starts with '-' is a key, not an option.
		args = append(append(args, "--"), keys...)
	}
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = []string{"LC_ALL=C"}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee) && ee.ExitCode() == 2:
		// getent(1): "One or more supplied key could not be found in the
		// database."
		return nil, ErrUnknown
	case err != nil:
		return nil, fmt.Errorf("getent %s %s: %w %s", db, strings.Join(keys, " "), err, strings.TrimSpace(stderr.String()))
	}
	return strings.Split(strings.TrimRight(string(out), "\n"), "\n"), nil
}

func parseID(s string) (uint32, error) {
	v, err := strconv.ParseUint(s, 10, 32)
	return uint32(v), err
}

// parsePasswd reads a passwd(5) line: name:password:uid:gid:gecos:home:shell.
func parsePasswd(line string) (User, error) {
	f := strings.Split(line, ":")
	if len(f) < 4 {
		return User{}, fmt.Errorf("passwd entry %q: want name:password:uid:gid:...", line)
	}
	uid, err1 := parseID(f[2])
	gid, err2 := parseID(f[3])
	if err := errors.Join(err1, err2); err != nil {
		return User{}, fmt.Errorf("passwd entry %q: %w", line, err)
	}
	return User{Name: f[0], UID: uid, GID: gid}, nil
}

// parseGroup reads a group(5) line: name:password:gid:members.
func parseGroup(line string) (Group, error) {
	f := strings.Split(line, ":")
	if len(f) < 3 {
		return Group{}, fmt.Errorf("group entry %q: want name:password:gid:members", line)
	}
	gid, err := parseID(f[2])
	if err != nil {
		return Group{}, fmt.Errorf("group entry %q: %w", line, err)
	}
	return Group{Name: f[0], GID: gid}, nil
}

// fromFiles converts os/user's answer.
func fromFiles(u *user.User) (User, error) {
	uid, err1 := parseID(u.Uid)
	gid, err2 := parseID(u.Gid)
	if err := errors.Join(err1, err2); err != nil {
		return User{}, fmt.Errorf("user %s: %w", u.Username, err)
	}
	return User{Name: u.Username, UID: uid, GID: gid}, nil
}

// unknownInFiles says whether os/user's error means "not there" (rather
// than, say, an unreadable /etc/passwd).
func unknownInFiles(err error) bool {
	var (
		u  user.UnknownUserError
		ui user.UnknownUserIdError
		g  user.UnknownGroupError
		gi user.UnknownGroupIdError
	)
	return errors.As(err, &u) || errors.As(err, &ui) || errors.As(err, &g) || errors.As(err, &gi)
}

// lookup asks the files, then getent for what they do not have; key is
// what getent is asked (a name, or an id in decimal).
func lookup[T any](what, key string, files func() (T, error), parse func(string) (T, error), db string) (T, error) {
	v, err := files()
	if err == nil {
		return v, nil
	}
	var zero T
	filesErr := err
	lines, err := getent(db, key)
	switch {
	case errors.Is(err, errNoGetent) && unknownInFiles(filesErr):
		return zero, fmt.Errorf("%s %s: %w (files only: getent is not installed)", what, key, ErrUnknown)
	case errors.Is(err, errNoGetent):
		return zero, fmt.Errorf("%s %s: %w", what, key, filesErr)
	case errors.Is(err, ErrUnknown):
		return zero, fmt.Errorf("%s %s: %w", what, key, ErrUnknown)
	case err != nil:
		return zero, fmt.Errorf("%s %s: %w", what, key, err)
	}
	return parse(lines[0])
}

// LookupName finds the user called name.
func LookupName(name string) (User, error) {
	return lookup("user", name, func() (User, error) {
		u, err := user.Lookup(name)
		if err != nil {
			return User{}, err
		}
		return fromFiles(u)
	}, parsePasswd, "passwd")
}

// LookupUID finds the user with uid.
func LookupUID(uid uint32) (User, error) {
	id := strconv.FormatUint(uint64(uid), 10)
	return lookup("uid", id, func() (User, error) {
		u, err := user.LookupId(id)
		if err != nil {
			return User{}, err
		}
		return fromFiles(u)
	}, parsePasswd, "passwd")
}

func groupFromFiles(g *user.Group) (Group, error) {
	gid, err := parseID(g.Gid)
	if err != nil {
		return Group{}, fmt.Errorf("group %s: %w", g.Name, err)
	}
	return Group{Name: g.Name, GID: gid}, nil
}

// LookupGroup finds the group called name.
func LookupGroup(name string) (Group, error) {
	return lookup("group", name, func() (Group, error) {
		g, err := user.LookupGroup(name)
		if err != nil {
			return Group{}, err
		}
		return groupFromFiles(g)
	}, parseGroup, "group")
}

// LookupGID finds the group with gid.
func LookupGID(gid uint32) (Group, error) {
	id := strconv.FormatUint(uint64(gid), 10)
	return lookup("gid", id, func() (Group, error) {
		g, err := user.LookupGroupId(id)
		if err != nil {
			return Group{}, err
		}
		return groupFromFiles(g)
	}, parseGroup, "group")
}

// Groups returns u's groups: its primary group first, then the
// supplementary ones of the files and of NSS (getent initgroups, which
// lists a local user's directory groups too), each once.
func Groups(u User) ([]uint32, error) {
	out := []uint32{u.GID}
	var errs []error
	if fu, err := user.Lookup(u.Name); err == nil {
		ids, err := fu.GroupIds()
		if err != nil {
			errs = append(errs, fmt.Errorf("groups of %s in the files: %w", u.Name, err))
		}
		for _, s := range ids {
			if g, err := parseID(s); err == nil {
				out = append(out, g)
			}
		}
	}
	lines, err := getent("initgroups", u.Name)
	switch {
	case errors.Is(err, errNoGetent), errors.Is(err, ErrUnknown):
	case err != nil:
		errs = append(errs, fmt.Errorf("groups of %s: %w", u.Name, err))
	default:
		// "NAME gid gid ...", the name padded with spaces.
		for _, line := range lines {
			f := strings.Fields(line)
			for _, s := range f[min(1, len(f)):] {
				if g, err := parseID(s); err == nil {
					out = append(out, g)
				}
			}
		}
	}
	if len(out) == 1 && len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	slices.Sort(out[1:])
	out = slices.Compact(out)
	if i := slices.Index(out[1:], u.GID); i >= 0 {
		out = slices.Delete(out, i+1, i+2)
	}
	return out, nil
}

// passwdFile is the files' user list, read when getent cannot enumerate.
var passwdFile = "/etc/passwd"

// WithPrimaryGroup lists the users whose primary group is gid, as far as
// the user database can be enumerated: every source NSS enumerates
// (getent passwd), or /etc/passwd without getent. A directory that
// refuses enumeration (sssd's default, enumerate = false) is not listed.
func WithPrimaryGroup(gid uint32) ([]string, error) {
	lines, err := getent("passwd")
	if errors.Is(err, errNoGetent) {
		var data []byte
		if data, err = os.ReadFile(passwdFile); err == nil {
			lines = strings.Split(string(data), "\n")
		}
	}
	if err != nil {
		return nil, fmt.Errorf("list users: %w", err)
	}
	var names []string
	for _, line := range lines {
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, "+") || strings.HasPrefix(line, "-") {
			continue
		}
		u, err := parsePasswd(line)
		if err == nil && u.GID == gid && !slices.Contains(names, u.Name) {
			names = append(names, u.Name)
		}
	}
	return names, nil
}

// AddSystemGroup creates the system group name with groupadd(8) and
// returns it. Another process creating it at the same moment is fine.
func AddSystemGroup(name string) (Group, error) {
	path, err := exec.LookPath("groupadd")
	if err != nil {
		return Group{}, fmt.Errorf("create group %s: groupadd is not installed (Debian: package passwd; or create the group by other means): %w", name, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), getentTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--system", "--", name).CombinedOutput()
	if err != nil {
		if g, lerr := LookupGroup(name); lerr == nil {
			return g, nil // made by someone else meanwhile
		}
		return Group{}, fmt.Errorf("create group %s: groupadd --system %s: %w: %s", name, name, err, strings.TrimSpace(string(out)))
	}
	return LookupGroup(name)
}
