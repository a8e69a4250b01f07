package stomp

import (
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// formatRule writes r as an ACL file line that parses back to r.
func formatRule(r aclRule) string {
	var subject string
	switch r.kind {
	case subjectAny:
		subject = "*"
	case subjectGroup:
		subject = groupPrefix + r.name
	default:
		subject = strconv.Quote(r.name)
	}
	return subject + " " + r.perms.String() + " " + r.pattern.p
}

// FuzzParseACL: any input parses or fails with an error naming a line,
// never panics; what parses prints back to the same rules, and the
// rules answer any question without panicking.
func FuzzParseACL(f *testing.F) {
	for _, s := range []string{
		"alice read,write /queue/orders.*\n",
		"# c\n\ngroup:ops all #\n* read /topic/public.#\n",
		`"Order Service" write,configure /queue/orders.#` + "\n",
		"bob configure /queue/a*b#c\r\n",
		"alice read\n",
		`"al\"ice" read /q`,
		"group:a,b read /queue/a\n",
	} {
		f.Add([]byte(s), "alice", "/queue/orders.eu")
	}
	f.Fuzz(func(t *testing.T, in []byte, user, dest string) {
		a, err := ParseACL(in)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "line ") {
				t.Fatalf("error without a line number: %v", err)
			}
			return
		}
		var lines []string
		for _, r := range a.rules {
			if r.perms == 0 || r.perms&^permAll != 0 {
				t.Fatalf("rule with permissions %v", r.perms)
			}
			if !strings.HasPrefix(r.pattern.p, "/") && !strings.HasPrefix(r.pattern.p, "#") {
				t.Fatalf("rule with pattern %q", r.pattern.p)
			}
			lines = append(lines, formatRule(r))
		}
		b, err := ParseACL([]byte(strings.Join(lines, "\n")))
		if err != nil {
			t.Fatalf("printed rules %q do not parse: %v", lines, err)
		}
		if !slices.EqualFunc(a.rules, b.rules, func(x, y aclRule) bool { return x == y }) {
			t.Fatalf("rules %+v printed as %q parse as %+v", a.rules, lines, b.rules)
		}
		a = a.WithGroups(groupMap{user: {"ops", user}})
		for _, p := range []Permission{PermRead, PermWrite, PermConfigure, permAll} {
			if a.Allowed(user, p, dest) != (a.Authorize(user, p, dest) == nil) {
				t.Fatalf("Allowed and Authorize disagree on %q %v %q", user, p, dest)
			}
		}
	})
}

// refByte maps each byte to its own valid rune, so that a regexp (which
// reads UTF-8) sees every byte, valid UTF-8 or not, as one character.
func refByte(b byte) string { return string(rune(0x4E00 + int(b))) }

// refMatch is the reference for pattern.match: the pattern as an RE2
// regexp, which has no backtracking.
func refMatch(t *testing.T, pat, name string) bool {
	var re strings.Builder
	re.WriteString(`(?s)^`)
	notSep := "[^" + refByte('.') + refByte('/') + "]*"
	for i := 0; i < len(pat); i++ {
		switch pat[i] {
		case '*':
			re.WriteString(notSep)
		case '#':
			re.WriteString(".*")
		default:
			re.WriteString(regexp.QuoteMeta(refByte(pat[i])))
		}
	}
	re.WriteString("$")
	rx, err := regexp.Compile(re.String())
	if err != nil {
		t.Skipf("reference regexp: %v", err)
	}
	var s strings.Builder
	for i := 0; i < len(name); i++ {
		s.WriteString(refByte(name[i]))
	}
	return rx.MatchString(s.String())
}

// FuzzACLMatch: pattern.match agrees with a regexp for any pattern and
// name, valid UTF-8 or not.
func FuzzACLMatch(f *testing.F) {
	for _, s := range [][2]string{
		{"/queue/orders.*", "/queue/orders.eu"},
		{"/queue/orders.*", "/queue/orders.eu.x"},
		{"/topic/#", "/topic/a.b/c"},
		{"#a#a#a#a", "aaaaaaaaaaaaaaaaaaaaaaaaab"},
		{"/queue/*#*.x", "/queue/a/b.x"},
		{"**##*", ""},
		{"/queue/\xff*", "/queue/\xff\xfe"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pat, name string) {
		if len(pat) > 256 || len(name) > 1024 {
			return
		}
		p := compilePattern(pat)
		if got, want := p.match(name), refMatch(t, pat, name); got != want {
			t.Fatalf("match(%q, %q) = %v, reference says %v", pat, name, got, want)
		}
	})
}

// FuzzParseUsers: any input parses or fails with an error naming a line,
// never panics; a parsed file's groups agree with InGroup.
func FuzzParseUsers(f *testing.F) {
	h := testHash(f)
	for _, s := range []string{
		"alice:" + h + "\n",
		"# c\nalice:" + h + "\ngroup:ops:alice,bob\ngroup:empty:\n",
		"group:ops:alice,,bob\n",
		"group:" + h + "\n",
		"alice:notahash\n",
		"bob : " + h + "\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		u, err := ParseUsers(in)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "line ") {
				t.Fatalf("error without a line number: %v", err)
			}
			return
		}
		if _, ok := u.hashes["group"]; ok {
			t.Fatal(`a user named "group"`)
		}
		for user, groups := range u.members {
			if !slices.IsSorted(groups) {
				t.Fatalf("groups of %q not sorted: %q", user, groups)
			}
			for _, g := range groups {
				if !u.InGroup(user, g) {
					t.Fatalf("%q lists %q as a group but InGroup says no", user, g)
				}
			}
		}
		for g, set := range u.groups {
			if checkGroupName(g) != nil {
				t.Fatalf("group named %q", g)
			}
			for m := range set {
				if m == "" || strings.Contains(m, ":") || !slices.Contains(u.Groups(m), g) {
					t.Fatalf("member %q of %q", m, g)
				}
			}
		}
	})
}
