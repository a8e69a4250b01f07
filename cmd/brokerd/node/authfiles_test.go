package node

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	gostomp "github.com/go-stomp/stomp/v3"
	"github.com/go-stomp/stomp/v3/frame"
	"golang.org/x/crypto/bcrypt"
)

// authTestFiles writes a users file (users with password "secret",
// plus extra lines) and an ACL file into dir.
type authTestFiles struct {
	t          *testing.T
	users, acl string
	hash       string
	userNames  []string
}

func newAuthTestFiles(t *testing.T, users ...string) *authTestFiles {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte("secret"), bcrypt.MinCost) // fast under -race
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	return &authTestFiles{t: t, users: filepath.Join(dir, "users"), acl: filepath.Join(dir, "acl"), hash: string(h), userNames: users}
}

// write replaces both files: the users, then groups (lines of the users
// file), and the ACL's rules.
func (f *authTestFiles) write(groups, acl string) {
	f.t.Helper()
	var b strings.Builder
	for _, u := range f.userNames {
		b.WriteString(u + ":" + f.hash + "\n")
	}
	b.WriteString(groups)
	if err := os.WriteFile(f.users, []byte(b.String()), 0o600); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(f.acl, []byte(acl), 0o600); err != nil {
		f.t.Fatal(err)
	}
}

// authTestNode starts a single node with cfg's auth files.
func authTestNode(t *testing.T, mutate func(*config.Config)) (*Node, error) {
	t.Helper()
	cfg := config.Default()
	cfg.Node.Name = "auth-test"
	cfg.Node.DataDir = t.TempDir()
	cfg.STOMP.Addr = "127.0.0.1:0"
	cfg.Store.Sync = "none"
	mutate(&cfg)
	n, err := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		return nil, err
	}
	if err := n.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = n.Shutdown(ctx)
	})
	return n, nil
}

// authDial logs in as user (password "secret"; "" connects anonymously).
func authDial(t *testing.T, n *Node, user string) (*gostomp.Conn, error) {
	t.Helper()
	opts := []func(*gostomp.Conn) error{gostomp.ConnOpt.HeartBeat(0, 0)}
	if user != "" {
		opts = append(opts, gostomp.ConnOpt.Login(user, "secret"))
	}
	c, err := gostomp.Dial("tcp", n.STOMPAddr(), opts...)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { _ = c.MustDisconnect() })
	return c, nil
}

func mustDial(t *testing.T, n *Node, user string) *gostomp.Conn {
	t.Helper()
	c, err := authDial(t, n, user)
	if err != nil {
		t.Fatalf("%s logs in: %v", user, err)
	}
	return c
}

// errorMessage is the message header of the ERROR err carries, or "".
// go-stomp returns a SEND's as a gostomp.Error, and hands a
// subscription's to it as a *gostomp.Error.
func errorMessage(err error) string {
	var f *frame.Frame
	var se gostomp.Error
	var pse *gostomp.Error
	switch {
	case errors.As(err, &se):
		f = se.Frame
	case errors.As(err, &pse):
		f = pse.Frame
	}
	if f != nil && f.Command == frame.ERROR {
		return f.Header.Get(frame.Message)
	}
	return ""
}

// TestNodeAuthReload: Reload rereads the users and ACL files; a client
// connected across it keeps its session and its next frames see the new
// rules, new logins see the new users; a file that fails to parse keeps
// the rules in force.
func TestNodeAuthReload(t *testing.T) {
	files := newAuthTestFiles(t, "alice", "bob")
	files.write("", "alice all #\nbob write /queue/a\n")
	n, err := authTestNode(t, func(c *config.Config) {
		c.Auth.UsersFile = files.users
		c.Auth.ACLFile = files.acl
	})
	if err != nil {
		t.Fatal(err)
	}
	receipt := gostomp.SendOpt.Receipt
	alice := mustDial(t, n, "alice")
	for _, d := range []string{"/queue/a", "/queue/b"} {
		if err := alice.Send(d, "text/plain", []byte("x"), receipt); err != nil {
			t.Fatalf("alice creates %s: %v", d, err)
		}
	}
	bob := mustDial(t, n, "bob")
	if err := bob.Send("/queue/a", "text/plain", []byte("x"), receipt); err != nil {
		t.Fatalf("bob writes /queue/a: %v", err)
	}
	if _, err := authDial(t, n, "carol"); err == nil {
		t.Fatal("carol logged in before she was in the users file")
	}

	// bob joins ops, which may write /queue/b; bob loses /queue/a; carol
	// is a new user.
	files.userNames = append(files.userNames, "carol")
	files.write("group:ops:bob,carol\n", "alice all #\ngroup:ops write /queue/b\n")
	if err := n.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if err := bob.Send("/queue/b", "text/plain", []byte("x"), receipt); err != nil {
		t.Fatalf("bob, connected across the reload, writes /queue/b as a member of ops: %v", err)
	}
	carol := mustDial(t, n, "carol")
	if err := carol.Send("/queue/b", "text/plain", []byte("x"), receipt); err != nil {
		t.Fatalf("carol, new after the reload: %v", err)
	}

	// A broken ACL file: the reload fails, naming the key and the line,
	// and the rules in force stay.
	files.write("group:ops:bob,carol\n", "alice all #\ngroup:ops wrte /queue/a\n")
	err = n.Reload()
	if err == nil || !strings.Contains(err.Error(), "auth.acl_file: "+files.acl+": line 2: permission \"wrte\"") {
		t.Fatalf("Reload of a broken ACL file: %v", err)
	}
	if err := bob.Send("/queue/b", "text/plain", []byte("x"), receipt); err != nil {
		t.Fatalf("bob after a failed reload: %v", err)
	}
	// A broken users file too.
	if err := os.WriteFile(files.users, []byte("group:ops:bob,,carol\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := n.Reload(); err == nil || !strings.Contains(err.Error(), "auth.users_file: "+files.users+": line 1:") {
		t.Fatalf("Reload of a broken users file: %v", err)
	}
	mustDial(t, n, "carol")
	err = bob.Send("/queue/a", "text/plain", []byte("x"), gostomp.SendOpt.Header(frame.Receipt, "r1"))
	if got := errorMessage(err); got != "access denied: write on /queue/a" {
		t.Fatalf("bob writes /queue/a, which the reload took away: %v (ERROR %q)", err, got)
	}
}

// TestNodeAuthBadFileAtStart: a file that does not parse stops the
// start with the key, the file and the line.
func TestNodeAuthBadFileAtStart(t *testing.T) {
	files := newAuthTestFiles(t, "alice")
	files.write("", "# rules\nalice all #\nalice read queue/a\n")
	_, err := authTestNode(t, func(c *config.Config) {
		c.Auth.UsersFile = files.users
		c.Auth.ACLFile = files.acl
	})
	if want := "auth.acl_file: " + files.acl + ": line 3: pattern \"queue/a\""; err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("New: %v, want an error containing %q", err, want)
	}
	files.write("group:a:alice\ngroup:a:alice\n", "alice all #\n")
	_, err = authTestNode(t, func(c *config.Config) {
		c.Auth.UsersFile = files.users
		c.Auth.ACLFile = files.acl
	})
	if want := "auth.users_file: " + files.users + ": line 3: group \"a\" listed twice"; err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("New: %v, want an error containing %q", err, want)
	}
}

// TestNodeACLWithoutUsers: an ACL file without a users file applies its
// * rules to anonymous clients and refuses a claimed login, which
// nothing verifies.
func TestNodeACLWithoutUsers(t *testing.T) {
	files := newAuthTestFiles(t)
	files.write("", "* read,write,configure /queue/public.#\nalice all #\n")
	n, err := authTestNode(t, func(c *config.Config) { c.Auth.ACLFile = files.acl })
	if err != nil {
		t.Fatal(err)
	}
	if _, err := authDial(t, n, "alice"); err == nil {
		t.Fatal("a login without a users file or a certificate was accepted")
	}
	anon := mustDial(t, n, "")
	if err := anon.Send("/queue/public.x", "text/plain", []byte("x"), gostomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	if got := errorMessage(anon.Send("/queue/private", "text/plain", []byte("x"), gostomp.SendOpt.Receipt)); got != "access denied: write on /queue/private" {
		t.Fatalf("anonymous SEND outside the * rule: ERROR %q", got)
	}
}
