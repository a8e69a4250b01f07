package node

import (
	"fmt"
	"log/slog"
	"sync/atomic"

	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/stomp"
)

// authFiles is the users file and the ACL file, read at start and again
// by every reload. It is the STOMP server's Authenticator and Authorizer:
// each login and each SEND or SUBSCRIBE reads the rules in force through
// one atomic pointer, so a reload applies to new connections and to the
// next frames of existing ones, which keep their sessions, and the users
// and the rules always come from the same reload.
type authFiles struct {
	usersFile, aclFile string
	log                *slog.Logger
	cur                atomic.Pointer[authRules]
}

// authRules is what one load read.
type authRules struct {
	users *stomp.Users // nil without a users file
	acl   *stomp.ACL   // nil without an ACL file: everything is allowed
}

var (
	_ stomp.Authenticator = (*authFiles)(nil)
	_ stomp.Authorizer    = (*authFiles)(nil)
)

// newAuthFiles reads auth.users_file and auth.acl_file (either may be
// ""). Errors name the key, the file and the line.
func newAuthFiles(cfg config.Auth, log *slog.Logger) (*authFiles, error) {
	a := &authFiles{usersFile: cfg.UsersFile, aclFile: cfg.ACLFile, log: log.With("component", "auth")}
	if err := a.reload(); err != nil {
		return nil, err
	}
	return a, nil
}

// reload rereads both files and puts them in force together; if either
// fails to load, the rules in force stay and the error says why.
func (a *authFiles) reload() error {
	var r authRules
	if a.usersFile != "" {
		u, err := stomp.LoadUsers(a.usersFile)
		if err != nil {
			return fmt.Errorf("auth.users_file: %w", err)
		}
		r.users = u
	}
	if a.aclFile != "" {
		acl, err := stomp.LoadACL(a.aclFile)
		if err != nil {
			return fmt.Errorf("auth.acl_file: %w", err)
		}
		if r.users != nil {
			acl = acl.WithGroups(r.users)
		}
		r.acl = acl
	}
	a.cur.Store(&r)
	a.describe(&r)
	return nil
}

// describe logs what is in force, and rules that can never match.
func (a *authFiles) describe(r *authRules) {
	attrs := []any{}
	if r.users != nil {
		users, groups := r.users.Len()
		attrs = append(attrs, "users", users, "groups", groups)
	}
	if r.acl == nil {
		a.log.Info("auth rules in force", append(attrs, "acl", "none: every user may do everything")...)
		return
	}
	a.log.Info("auth rules in force", append(attrs, "acl_rules", r.acl.Len())...)
	if r.acl.Len() == 0 {
		a.log.Warn("the ACL file has no rules: every SEND and SUBSCRIBE is refused", "file", a.aclFile)
	}
	for _, g := range r.acl.GroupsNamed() {
		if r.users == nil || !r.users.HasGroup(g) {
			a.log.Warn("an ACL rule names a group the users file does not define; it matches nobody", "group", g, "file", a.aclFile)
		}
	}
}

// Authenticate implements stomp.Authenticator. Without a users file (an
// ACL file with logins by certificate only, or anonymous clients), only
// an empty login and passcode pass: a name no file or certificate
// verified must not get that user's rules.
func (a *authFiles) Authenticate(login, passcode string) error {
	r := a.cur.Load()
	if r.users == nil {
		if login == "" && passcode == "" {
			return nil
		}
		return stomp.ErrBadCredentials
	}
	return r.users.Authenticate(login, passcode)
}

// Allowed reports whether user has perm on dest (the fast path of
// Authorize, without an error to build).
func (a *authFiles) Allowed(user string, perm stomp.Permission, dest string) bool {
	r := a.cur.Load()
	return r.acl == nil || r.acl.Allowed(user, perm, dest)
}

// Authorize implements stomp.Authorizer.
func (a *authFiles) Authorize(user string, perm stomp.Permission, dest string) error {
	r := a.cur.Load()
	if r.acl == nil {
		return nil
	}
	return r.acl.Authorize(user, perm, dest)
}
