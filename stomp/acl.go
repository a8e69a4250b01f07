package stomp

import (
	"errors"
	"fmt"
	"math/bits"
	"os"
	"strconv"
	"strings"
	"unicode"

	"github.com/brokerd/brokerd/replica"
	"github.com/go-stomp/stomp/v3/frame"
)

// Permission is what a frame needs of a destination, in RabbitMQ's model.
// Permissions combine as a bit set.
type Permission uint8

const (
	// PermRead lets a user SUBSCRIBE to a destination.
	PermRead Permission = 1 << iota
	// PermWrite lets a user SEND to a destination.
	PermWrite
	// PermConfigure lets a user create a queue that does not exist yet,
	// by a SEND or a SUBSCRIBE (topics exist without being created).
	PermConfigure

	permAll = PermRead | PermWrite | PermConfigure
)

// String returns "read", "write", "configure", or a comma list of them.
func (p Permission) String() string {
	var names []string
	for _, x := range []struct {
		p    Permission
		name string
	}{{PermRead, "read"}, {PermWrite, "write"}, {PermConfigure, "configure"}} {
		if p&x.p != 0 {
			names = append(names, x.name)
		}
	}
	if rest := p &^ permAll; rest != 0 || p == 0 {
		names = append(names, "Permission("+strconv.Itoa(int(rest))+")")
	}
	return strings.Join(names, ",")
}

// ErrAccessDenied is a frame the Authorizer refused: the user lacks a
// permission on its destination.
var ErrAccessDenied = errors.New("access denied")

// Authorizer decides what a logged-in user may do with a destination. A
// session asks it for write before every SEND (including a transaction's,
// when the SEND arrives) and for read before every SUBSCRIBE, and, for a
// queue, whether the user may create it (configure): if not, the frame is
// refused when the queue does not exist (replica.ErrNoSuchQueue).
//
// Authorize is called concurrently by every session's reader goroutine:
// it must be safe for concurrent use and must not block.
type Authorizer interface {
	// Authorize returns nil if user ("" for an anonymous session) has
	// perm on dest, else an error wrapping ErrAccessDenied.
	Authorize(user string, perm Permission, dest string) error
}

// Grouper tells whether a user belongs to a group; *Users is one.
type Grouper interface {
	InGroup(user, group string) bool
}

// ACL is the access rules of an ACL file, an Authorizer. One rule a line,
// blank lines and lines starting with # ignored:
//
//	SUBJECT PERMISSIONS PATTERN
//
// SUBJECT is a user name, group:NAME (a group of the users file), * (any
// user, anonymous ones included), or a user name in double quotes (Go
// syntax, for a certificate's CN with spaces). PERMISSIONS is a comma
// list of read, write and configure, or all. PATTERN is matched against
// the whole destination: * matches any run of characters other than '.'
// and '/' (within one segment, possibly empty), # any run of characters
// at all; every other character matches itself. So /queue/orders.*
// matches /queue/orders.eu but not /queue/orders.eu.x, and /topic/#
// matches every topic.
//
// A user has a permission on a destination when some rule whose subject
// matches the user and whose pattern matches the destination grants it;
// nothing else is granted. An ACL is not modified after parsing and is
// safe for concurrent use.
type ACL struct {
	rules  []aclRule
	groups Grouper
}

type subjectKind uint8

const (
	subjectUser subjectKind = iota + 1
	subjectGroup
	subjectAny
)

type aclRule struct {
	kind    subjectKind
	name    string // the user or group
	perms   Permission
	pattern pattern
}

// LoadACL reads an ACL file; its errors name the file. Rules naming
// groups match nobody until WithGroups gives the ACL the users file's
// groups.
func LoadACL(path string) (*ACL, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	a, err := ParseACL(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return a, nil
}

// ParseACL parses the content of an ACL file. Errors name the line.
func ParseACL(b []byte) (*ACL, error) {
	a := &ACL{}
	for i, s := range strings.Split(string(b), "\n") {
		line := i + 1
		s = strings.TrimSpace(s)
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		r, err := parseRule(s)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		a.rules = append(a.rules, r)
	}
	return a, nil
}

func parseRule(s string) (aclRule, error) {
	var r aclRule
	var subject string
	if strings.HasPrefix(s, `"`) {
		q, err := strconv.QuotedPrefix(s)
		if err != nil {
			return r, fmt.Errorf("subject %s: unterminated or invalid quoted user name", s)
		}
		subject, _ = strconv.Unquote(q)
		if subject == "" {
			return r, fmt.Errorf("subject %s: empty user name", q)
		}
		r.kind, r.name = subjectUser, subject
		s = s[len(q):]
		if s != "" && !unicode.IsSpace(rune(s[0])) {
			return r, fmt.Errorf("want SUBJECT PERMISSIONS PATTERN, with spaces between them")
		}
	}
	f := strings.Fields(s)
	if r.kind == 0 {
		if len(f) == 0 {
			return r, fmt.Errorf("want SUBJECT PERMISSIONS PATTERN")
		}
		subject, f = f[0], f[1:]
		switch {
		case subject == "*":
			r.kind = subjectAny
		case strings.HasPrefix(subject, groupPrefix):
			r.kind, r.name = subjectGroup, subject[len(groupPrefix):]
			if err := checkGroupName(r.name); err != nil {
				return r, fmt.Errorf("subject %q: %w", subject, err)
			}
		default:
			r.kind, r.name = subjectUser, subject
		}
	}
	if len(f) != 2 {
		return r, fmt.Errorf("want SUBJECT PERMISSIONS PATTERN, got %d fields", len(f)+1)
	}
	for _, p := range strings.Split(f[0], ",") {
		switch p {
		case "read":
			r.perms |= PermRead
		case "write":
			r.perms |= PermWrite
		case "configure":
			r.perms |= PermConfigure
		case "all":
			r.perms |= permAll
		default:
			return r, fmt.Errorf("permission %q: want a comma list of read, write, configure, or all", p)
		}
	}
	pat := f[1]
	if !strings.HasPrefix(pat, "/") && !strings.HasPrefix(pat, "#") {
		return r, fmt.Errorf("pattern %q matches no destination: destinations start with /queue/ or /topic/", pat)
	}
	r.pattern = compilePattern(pat)
	return r, nil
}

// WithGroups returns a copy of a whose group rules match the members of
// g's groups.
func (a *ACL) WithGroups(g Grouper) *ACL {
	c := *a
	c.groups = g
	return &c
}

// GroupsNamed returns the groups a's rules name, each once, in the order
// of the rules (for a check against the users file).
func (a *ACL) GroupsNamed() []string {
	var out []string
	seen := map[string]bool{}
	for _, r := range a.rules {
		if r.kind == subjectGroup && !seen[r.name] {
			seen[r.name] = true
			out = append(out, r.name)
		}
	}
	return out
}

// Len returns the number of rules.
func (a *ACL) Len() int { return len(a.rules) }

// Allowed reports whether user ("" for anonymous) has every permission
// of perm on dest.
func (a *ACL) Allowed(user string, perm Permission, dest string) bool {
	var granted Permission
	for i := range a.rules {
		r := &a.rules[i]
		if r.perms&perm&^granted == 0 {
			continue // grants nothing still missing
		}
		switch r.kind {
		case subjectUser:
			if user == "" || r.name != user {
				continue
			}
		case subjectGroup:
			if user == "" || a.groups == nil || !a.groups.InGroup(user, r.name) {
				continue
			}
		}
		if r.pattern.match(dest) {
			granted |= r.perms & perm
			if granted == perm {
				return true
			}
		}
	}
	return perm == 0
}

// Authorize implements Authorizer.
func (a *ACL) Authorize(user string, perm Permission, dest string) error {
	if a.Allowed(user, perm, dest) {
		return nil
	}
	who := "anonymous"
	if user != "" {
		who = "user " + strconv.Quote(user)
	}
	return fmt.Errorf("%w: %s lacks %s permission on %s", ErrAccessDenied, who, perm, dest)
}

// pattern is a compiled destination pattern: its text with runs of
// wildcards that mean the same folded (## and *# and #* are #, ** is *).
type pattern struct {
	p string
	// literal: p has no wildcard; prefix: p is a literal then one #.
	literal, prefix bool
}

func compilePattern(s string) pattern {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '*' && c != '#' {
			b.WriteByte(c)
			continue
		}
		// A run of wildcards: # if it holds one, else *.
		j := i
		hash := false
		for j < len(s) && (s[j] == '*' || s[j] == '#') {
			hash = hash || s[j] == '#'
			j++
		}
		if hash {
			b.WriteByte('#')
		} else {
			b.WriteByte('*')
		}
		i = j - 1
	}
	p := pattern{p: b.String()}
	wild := strings.IndexAny(p.p, "*#")
	p.literal = wild < 0
	p.prefix = wild >= 0 && wild == len(p.p)-1 && p.p[wild] == '#' // "" has no wildcard
	return p
}

// match reports whether the whole of name matches. It simulates the
// pattern's automaton, one set of positions per character of name, so it
// takes O(len(name) * len(pattern)) time whatever the pattern: no
// backtracking.
func (p *pattern) match(name string) bool {
	switch {
	case p.literal:
		return name == p.p
	case p.prefix:
		return strings.HasPrefix(name, p.p[:len(p.p)-1])
	}
	n := len(p.p) + 1 // positions 0..len(p.p); len(p.p) accepts
	words := (n + 63) / 64
	var buf [8]uint64
	var cur, next []uint64
	if 2*words <= len(buf) {
		cur, next = buf[:words], buf[words:2*words]
	} else {
		cur, next = make([]uint64, words), make([]uint64, words)
	}
	cur[0] = 1
	p.close(cur)
	for i := 0; i < len(name); i++ {
		c := name[i]
		clear(next)
		moved := false
		for w, word := range cur {
			for word != 0 {
				t := bits.TrailingZeros64(word)
				word &= word - 1
				pos := w*64 + t
				if pos == len(p.p) {
					continue // accepting: no transition
				}
				switch pc := p.p[pos]; {
				case pc == '#', pc == '*' && c != '.' && c != '/':
					next[w] |= 1 << t // stay
					moved = true
				case pc == c:
					next[(pos+1)/64] |= 1 << ((pos + 1) % 64)
					moved = true
				}
			}
		}
		if !moved {
			return false
		}
		p.close(next)
		cur, next = next, cur
	}
	last := len(p.p)
	return cur[last/64]&(1<<(last%64)) != 0
}

// close adds to set the positions reachable without a character: past a
// wildcard, which may match nothing. Positions only move forward, so one
// pass in order reaches every chain.
func (p *pattern) close(set []uint64) {
	for pos := 0; pos < len(p.p); pos++ {
		if (p.p[pos] == '*' || p.p[pos] == '#') && set[pos/64]&(1<<(pos%64)) != 0 {
			set[(pos+1)/64] |= 1 << ((pos + 1) % 64)
		}
	}
}

// reasonAccess labels refused frames in brokerd_stomp_errors_total.
const reasonAccess = "access"

// authorize checks that the session's user has perm on dest (write for a
// SEND, read for a SUBSCRIBE) and reports whether the frame must not
// create dest: a queue the user lacks configure on. A refusal is logged
// and returned as the frame's ERROR, naming dest and the permission.
// Without an Authorizer everything is allowed.
func (s *session) authorize(f *frame.Frame, perm Permission, dest string) (noCreate bool, err error) {
	az := s.srv.cfg.Authorizer
	if az == nil {
		return false, nil
	}
	kind, err := replica.ParseDestination(dest)
	if err != nil {
		return false, brokerError(f, err)
	}
	if err := az.Authorize(s.user, perm, dest); err != nil {
		s.logDenied(f.Command, perm, dest, err)
		return false, accessError(f.Command, perm, dest, s.user)
	}
	if kind != replica.KindQueue {
		return false, nil
	}
	if pc, ok := az.(permChecker); ok {
		return !pc.Allowed(s.user, PermConfigure, dest), nil
	}
	return az.Authorize(s.user, PermConfigure, dest) != nil, nil
}

// permChecker is an Authorizer that can answer without building an
// error, as ACL can: a SEND or SUBSCRIBE to a queue by a user without
// configure (most producers and consumers) then costs no allocation.
type permChecker interface {
	Allowed(user string, perm Permission, dest string) bool
}

// refused is brokerError for a frame the broker refused. A queue the
// frame may not create (replica.ErrNoSuchQueue) is an access denial, and
// is logged as one.
func (s *session) refused(f *frame.Frame, err error) error {
	var nq *replica.NoSuchQueueError
	if errors.As(err, &nq) {
		s.logDenied(f.Command, PermConfigure, nq.Dest, err)
		return accessError(f.Command, PermConfigure, nq.Dest, s.user)
	}
	return brokerError(f, err)
}

// asyncRefused is asyncError with the access denial of refused: a
// forwarded SEND, or a COMMIT, refused by the queue's owner.
func (s *session) asyncRefused(err error) *protocolError {
	var nq *replica.NoSuchQueueError
	if errors.As(err, &nq) {
		s.logDenied("", PermConfigure, nq.Dest, err)
		return accessError("", PermConfigure, nq.Dest, s.user)
	}
	return asyncError(err)
}

// logDenied logs a refused frame with who sent it and from where.
func (s *session) logDenied(cmd string, perm Permission, dest string, err error) {
	s.srv.log.Warn("access denied", "session", s.id, "user", s.user, "command", cmd, "dest", dest,
		"permission", perm.String(), "remote", s.conn.RemoteAddr().String(), "err", err)
}

// accessError is the ERROR for a frame refused for want of perm on dest.
// cmd is "" when the frame is not known (a refusal that came late).
func accessError(cmd string, perm Permission, dest, user string) *protocolError {
	who := "anonymous users lack"
	if user != "" {
		who = "user " + strconv.Quote(user) + " lacks"
	}
	d := dest
	if strings.ContainsFunc(d, func(r rune) bool { return !unicode.IsPrint(r) }) {
		d = strconv.Quote(d)
	}
	msg := "access denied: " + perm.String() + " on " + d
	if perm == PermConfigure {
		if cmd != "" {
			return perr(reasonAccess, msg, "%s: %s does not exist, and creating it needs configure permission, which %s", cmd, d, who)
		}
		return perr(reasonAccess, msg, "%s does not exist, and creating it needs configure permission, which %s", d, who)
	}
	return perr(reasonAccess, msg, "%s to %s needs %s permission, which %s", cmd, d, perm, who)
}
