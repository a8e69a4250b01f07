package stomp

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"unicode"

	"golang.org/x/crypto/bcrypt"
)

// ErrBadCredentials is a CONNECT whose login and passcode do not match.
var ErrBadCredentials = errors.New("bad credentials")

// Authenticator checks a CONNECT's login and passcode.
type Authenticator interface {
	// Authenticate returns nil if login/passcode may connect. It is called
	// concurrently from many sessions.
	Authenticate(login, passcode string) error
}

// Users is an Authenticator backed by a users file, one entry per line,
// blank lines and lines starting with # ignored:
//
//	name:bcrypt-hash
//	group:NAME:user1,user2,...
//
// `brokerd passwd NAME` prints a user's line; `htpasswd -nbB NAME PASS`
// does too. A group line names the group's members, which need no line
// of their own (a user who logs in by certificate, auth.x509_login, has no
// hash); rules of the ACL file apply to a group's members (see ACL). So
// no user may be named "group". A Users is not modified after parsing
// and is safe for concurrent use.
type Users struct {
	hashes map[string][]byte
	// groups maps a group to its members, members a member to its
	// groups, sorted.
	groups  map[string]map[string]struct{}
	members map[string][]string
}

// groupPrefix starts a group line of the users file, and an ACL subject
// naming a group.
const groupPrefix = "group:"

// LoadUsers reads a users file. Its errors name the file.
func LoadUsers(path string) (*Users, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	u, err := ParseUsers(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return u, nil
}

// ParseUsers parses the content of a users file. Errors name the line.
func ParseUsers(b []byte) (*Users, error) {
	u := &Users{hashes: make(map[string][]byte), groups: make(map[string]map[string]struct{}), members: make(map[string][]string)}
	for i, s := range strings.Split(string(b), "\n") {
		line := i + 1
		s = strings.TrimSpace(s)
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		if rest, ok := strings.CutPrefix(s, groupPrefix); ok {
			if err := u.parseGroup(rest); err != nil {
				return nil, fmt.Errorf("line %d: %w", line, err)
			}
			continue
		}
		name, hash, ok := strings.Cut(s, ":")
		name, hash = strings.TrimSpace(name), strings.TrimSpace(hash)
		if !ok || name == "" || hash == "" {
			return nil, fmt.Errorf("line %d: want name:bcrypt-hash or group:NAME:user1,user2", line)
		}
		if name == "group" {
			return nil, fmt.Errorf("line %d: want group:NAME:user1,user2 (no user may be named group)", line)
		}
		if _, err := bcrypt.Cost([]byte(hash)); err != nil {
			return nil, fmt.Errorf("line %d: user %q: not a bcrypt hash: %w", line, name, err)
		}
		if _, dup := u.hashes[name]; dup {
			return nil, fmt.Errorf("line %d: user %q listed twice", line, name)
		}
		u.hashes[name] = []byte(hash)
	}
	for m := range u.members {
		sort.Strings(u.members[m])
	}
	return u, nil
}

// parseGroup parses what follows "group:" on a group line.
func (u *Users) parseGroup(s string) error {
	name, list, ok := strings.Cut(s, ":")
	name = strings.TrimSpace(name)
	if !ok {
		return fmt.Errorf("want group:NAME:user1,user2 (no user may be named group)")
	}
	if err := checkGroupName(name); err != nil {
		return err
	}
	if _, dup := u.groups[name]; dup {
		return fmt.Errorf("group %q listed twice", name)
	}
	set := make(map[string]struct{})
	u.groups[name] = set
	if strings.TrimSpace(list) == "" {
		return nil // a group without members
	}
	for _, m := range strings.Split(list, ",") {
		m = strings.TrimSpace(m)
		switch {
		case m == "":
			return fmt.Errorf("group %q: empty user name in its list", name)
		case strings.ContainsAny(m, ":"):
			return fmt.Errorf("group %q: user name %q: a user name has no ':'", name, m)
		}
		if _, dup := set[m]; dup {
			return fmt.Errorf("group %q: user %q listed twice", name, m)
		}
		set[m] = struct{}{}
		u.members[m] = append(u.members[m], name)
	}
	return nil
}

// checkGroupName accepts a group name of the users file and the ACL file.
func checkGroupName(name string) error {
	if name == "" {
		return fmt.Errorf("empty group name")
	}
	if strings.ContainsFunc(name, func(r rune) bool { return r == ':' || r == ',' || r == '"' || unicode.IsSpace(r) }) {
		return fmt.Errorf("group name %q: no ':', ',', '\"' or spaces", name)
	}
	return nil
}

// Groups returns the groups user belongs to, sorted; nil for none. The
// slice is the caller's.
func (u *Users) Groups(user string) []string {
	return slices.Clone(u.members[user])
}

// HasGroup reports whether the users file defines group.
func (u *Users) HasGroup(group string) bool {
	_, ok := u.groups[group]
	return ok
}

// Len returns the number of users with a passcode and of groups.
func (u *Users) Len() (users, groups int) { return len(u.hashes), len(u.groups) }

// InGroup reports whether user is a member of group.
func (u *Users) InGroup(user, group string) bool {
	_, ok := u.groups[group][user]
	return ok
}

// dummyHash is compared against for unknown users so that a missing user
// takes as long as a wrong passcode.
var dummyHash = sync.OnceValue(func() []byte {
	h, _ := bcrypt.GenerateFromPassword([]byte("brokerd"), bcrypt.DefaultCost)
	return h
})

// Authenticate implements Authenticator.
func (u *Users) Authenticate(login, passcode string) error {
	h, ok := u.hashes[login]
	if !ok {
		_ = bcrypt.CompareHashAndPassword(dummyHash(), []byte(passcode))
		return ErrBadCredentials
	}
	if bcrypt.CompareHashAndPassword(h, []byte(passcode)) != nil {
		return ErrBadCredentials
	}
	return nil
}

// HashPassword returns a users-file line for name.
func HashPassword(name, password string) (string, error) {
	if name == "" || strings.ContainsAny(name, ":\n") || strings.TrimSpace(name) != name {
		return "", fmt.Errorf("user name %q: must be non-empty without ':', newline or surrounding spaces", name)
	}
	if name == "group" {
		return "", fmt.Errorf("user name %q: reserved for group lines", name)
	}
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
	if err != nil {
		return "", err
	}
	return name + ":" + string(h), nil
}
