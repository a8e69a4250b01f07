package stomp

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"
)

// testHash is a bcrypt hash of "secret" at the lowest cost (fast under
// -race).
func testHash(t testing.TB) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte("secret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(h)
}

func TestParseUsersGroups(t *testing.T) {
	h := testHash(t)
	u, err := ParseUsers([]byte("# users\n" +
		"alice:" + h + "\n" +
		"\n" +
		"bob : " + h + "\r\n" +
		"group:admins:alice\n" +
		"group:ops: alice , cert-only \n" + // a member without a hash line (a certificate's CN)
		"group:empty:\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		user   string
		groups []string
	}{
		{"alice", []string{"admins", "ops"}},
		{"bob", nil},
		{"cert-only", []string{"ops"}},
		{"nobody", nil},
	} {
		if got := u.Groups(tc.user); !slices.Equal(got, tc.groups) {
			t.Errorf("Groups(%q) = %q, want %q", tc.user, got, tc.groups)
		}
	}
	if !u.InGroup("cert-only", "ops") || u.InGroup("bob", "ops") || u.InGroup("alice", "empty") {
		t.Error("InGroup disagrees with the group lines")
	}
	if err := u.Authenticate("bob", "secret"); err != nil {
		t.Errorf("bob (spaces around the colon, CRLF): %v", err)
	}
	if err := u.Authenticate("cert-only", ""); !errors.Is(err, ErrBadCredentials) {
		t.Errorf("a group member without a hash line logs in with a passcode: %v", err)
	}
	// The caller owns the slice Groups returns.
	g := u.Groups("alice")
	g[0] = "x"
	if u.Groups("alice")[0] != "admins" {
		t.Error("Groups returned the Users' own slice")
	}
}

func TestParseUsersErrors(t *testing.T) {
	h := testHash(t)
	for _, tc := range []struct {
		in, want string
	}{
		{"alice\n", "line 1: want name:bcrypt-hash or group:NAME:user1,user2"},
		{"alice:" + h + "\n:" + h + "\n", "line 2: want name:bcrypt-hash"},
		{"alice:notahash\n", `line 1: user "alice": not a bcrypt hash`},
		{"alice:" + h + "\nalice:" + h + "\n", `line 2: user "alice" listed twice`},
		{"# c\ngroup:" + h + "\n", "line 2: want group:NAME:user1,user2 (no user may be named group)"},
		{"group:admins\n", "line 1: want group:NAME:user1,user2"},
		{"group::alice\n", "line 1: empty group name"},
		{"group:a b:alice\n", `line 1: group name "a b": no ':', ',', '"' or spaces`},
		{"group:admins:alice\ngroup:admins:bob\n", `line 2: group "admins" listed twice`},
		{"group:admins:alice,,bob\n", `line 1: group "admins": empty user name in its list`},
		{"group:admins:alice,\n", `line 1: group "admins": empty user name in its list`},
		{"group:admins:alice,alice\n", `line 1: group "admins": user "alice" listed twice`},
		{"group:admins:alice:x\n", `line 1: group "admins": user name "alice:x": a user name has no ':'`},
		{"group :admins:alice\n", "line 1: want group:NAME:user1,user2 (no user may be named group)"},
	} {
		_, err := ParseUsers([]byte(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseUsers(%q) = %v, want an error containing %q", tc.in, err, tc.want)
		}
	}
}

func TestHashPasswordRefusesGroup(t *testing.T) {
	if _, err := HashPassword("group", "x"); err == nil {
		t.Fatal(`HashPassword("group") made a line the users file reads as a group`)
	}
}
