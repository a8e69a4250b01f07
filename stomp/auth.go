package stomp

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"

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

// Users is an Authenticator backed by a users file: one "name:bcrypt-hash"
// per line, blank lines and lines starting with # ignored. `brokerd passwd
// NAME` prints such a line; `htpasswd -nbB NAME PASS` does too.
type Users struct {
	hashes map[string][]byte
}

// LoadUsers reads a users file.
func LoadUsers(path string) (*Users, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseUsers(b)
}

// ParseUsers parses the content of a users file.
func ParseUsers(b []byte) (*Users, error) {
	u := &Users{hashes: make(map[string][]byte)}
	sc := bufio.NewScanner(bytes.NewReader(b))
	line := 0
	for sc.Scan() {
		line++
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		name, hash, ok := strings.Cut(s, ":")
		if !ok || name == "" || hash == "" {
			return nil, fmt.Errorf("line %d: want name:bcrypt-hash", line)
		}
		if _, err := bcrypt.Cost([]byte(hash)); err != nil {
			return nil, fmt.Errorf("line %d: user %q: not a bcrypt hash: %w", line, name, err)
		}
		if _, dup := u.hashes[name]; dup {
			return nil, fmt.Errorf("line %d: user %q listed twice", line, name)
		}
		u.hashes[name] = []byte(hash)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return u, nil
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
	if name == "" || strings.ContainsAny(name, ":\n") {
		return "", fmt.Errorf("user name %q: must be non-empty without ':' or newline", name)
	}
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
	if err != nil {
		return "", err
	}
	return name + ":" + string(h), nil
}
