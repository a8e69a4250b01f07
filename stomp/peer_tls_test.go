package stomp

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/test/tlstest"
	"github.com/go-stomp/stomp/v3/frame"
)

// peerTLS is one node's side of mutual TLS on peer links, as a test
// builds it from a CA: its certificate, and the CA it trusts.
func peerTLS(t *testing.T, trust *tlstest.CA, pair tlstest.Pair) (server, client *tls.Config) {
	t.Helper()
	cert := pair.TLS(t)
	server = &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    trust.Pool(),
	}
	// No ServerName: the client verifies the dialled host (127.0.0.1,
	// in the test certificates).
	client = &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		RootCAs:      trust.Pool(),
	}
	return server, client
}

// peerStates collects a client's OnState reports.
type peerStates struct {
	ch chan error
}

func newPeerStates() *peerStates { return &peerStates{ch: make(chan error, 64)} }

func (p *peerStates) on(up bool, err error) {
	if up {
		err = nil
	}
	select {
	case p.ch <- err:
	default:
	}
}

// refusal waits for the first report, which must be a failure.
func (p *peerStates) refusal(t *testing.T) error {
	t.Helper()
	select {
	case err := <-p.ch:
		if err == nil {
			t.Fatal("the link came up")
		}
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("no state change within 5 s")
	}
	return nil
}

// peerLocalAddrs records the local address of every connection a client
// dials, to find its log records on the server.
type peerLocalAddrs struct {
	mu    sync.Mutex
	addrs map[string]bool
}

func (p *peerLocalAddrs) dial(ctx context.Context, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err == nil {
		p.mu.Lock()
		if p.addrs == nil {
			p.addrs = map[string]bool{}
		}
		p.addrs[c.LocalAddr().String()] = true
		p.mu.Unlock()
	}
	return c, err
}

func (p *peerLocalAddrs) has(a any) bool {
	s, _ := a.(string)
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.addrs[s]
}

// TestPeerTLSMutual: with mutual TLS on both ends, requests work, the
// frames are encrypted on the wire (no CONNECT or op in clear), and the
// cluster secret's proof is still checked inside TLS.
func TestPeerTLSMutual(t *testing.T) {
	peerNoLeaks(t)
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "cluster")
	ss, _ := peerTLS(t, ca, ca.Issue(t, "node-s", nil))
	_, cc := peerTLS(t, ca, ca.Issue(t, "node-c", nil))
	secret := []byte("0123456789abcdef")
	h := newPeerHold()
	logs := &syncBuffer{}
	s := startPeerServer(t, h, func(c *PeerServerConfig) {
		c.TLS, c.Secret = ss, secret
		c.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	})
	var wire *countingConn
	var mu sync.Mutex
	c := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
		c.TLS, c.Secret = cc, secret
		c.Dial = func(ctx context.Context, addr string) (net.Conn, error) {
			nc, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			if err != nil {
				return nil, err
			}
			mu.Lock()
			defer mu.Unlock()
			wire = &countingConn{Conn: nc}
			return wire, nil
		}
	})
	for _, op := range []string{"one", "two", "three"} {
		peerMustOK(t, peerRequest(t, c, op, []byte("body of "+op)), op)
	}
	mu.Lock()
	_, b := wire.stats()
	mu.Unlock()
	for _, clear := range []string{"CONNECT", "x-op", "body of one", "x-auth"} {
		if bytes.Contains(b, []byte(clear)) {
			t.Fatalf("%q crossed the wire in clear", clear)
		}
	}

	// Inside TLS, the secret is still required.
	_, cc2 := peerTLS(t, ca, ca.Issue(t, "node-w", nil))
	st := newPeerStates()
	startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
		c.TLS, c.Secret, c.NodeID, c.OnState = cc2, []byte("wrong-secret-0123"), "node-w", st.on
	})
	if err := st.refusal(t); !errors.Is(err, ErrPeerAuth) {
		t.Fatalf("a client with the CA's certificate and a wrong secret: %v, want ErrPeerAuth", err)
	}
}

// TestPeerTLSForeignCertificate: a client whose certificate another CA
// signed is refused by the server, and a server whose certificate another
// CA signed is refused by the client; neither link comes up, the handler
// never runs, and the server logs the failed handshake with the remote
// address and the reason and counts it under reason "tls".
func TestPeerTLSForeignCertificate(t *testing.T) {
	peerNoLeaks(t)
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "cluster")
	foreign := tlstest.NewCA(t, dir, "foreign")
	good := ca.Issue(t, "node-s", nil)

	t.Run("client", func(t *testing.T) {
		ss, _ := peerTLS(t, ca, good)
		h := newPeerHold()
		logs := &syncBuffer{}
		s := startPeerServer(t, h, func(c *PeerServerConfig) {
			c.TLS = ss
			c.Logger = slog.New(slog.NewJSONHandler(logs, nil))
		})
		// The intruder trusts the cluster's CA (it knows whom it calls)
		// but its own certificate is the foreign CA's.
		_, cc := peerTLS(t, ca, foreign.Issue(t, "intruder", nil))
		st := newPeerStates()
		var la peerLocalAddrs
		startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
			c.TLS, c.OnState, c.Dial, c.NodeID = cc, st.on, la.dial, "intruder"
		})
		if err := st.refusal(t); !errors.Is(err, ErrPeerTLS) {
			t.Fatalf("client with a foreign certificate: %v, want ErrPeerTLS", err)
		}
		peerWaitFor(t, "the refusal logged and counted", func() bool {
			for _, r := range logs.records("peer TLS handshake failed") {
				if la.has(r["remote"]) && r["reason"] == peerCodeTLS && r["err"] != "" {
					return peerCounter(t, s.m.dropped.WithLabelValues(peerCodeTLS)) >= 1
				}
			}
			return false
		})
		if h.count() != 0 {
			t.Fatalf("handler called %d times", h.count())
		}
	})

	t.Run("server", func(t *testing.T) {
		// The impostor server trusts the cluster's CA for its clients,
		// but presents a certificate of the foreign CA.
		ss, _ := peerTLS(t, ca, foreign.Issue(t, "impostor", nil))
		h := newPeerHold()
		logs := &syncBuffer{}
		s := startPeerServer(t, h, func(c *PeerServerConfig) {
			c.TLS = ss
			c.Logger = slog.New(slog.NewJSONHandler(logs, nil))
		})
		_, cc := peerTLS(t, ca, ca.Issue(t, "node-c", nil))
		st := newPeerStates()
		var la peerLocalAddrs
		startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
			c.TLS, c.OnState, c.Dial = cc, st.on, la.dial
		})
		err := st.refusal(t)
		var unknown x509.UnknownAuthorityError
		if !errors.Is(err, ErrPeerTLS) || !errors.As(err, &unknown) {
			t.Fatalf("server with a foreign certificate: %v, want ErrPeerTLS for an unknown authority", err)
		}
		// The server sees the client's alert.
		peerWaitFor(t, "the server to log the refusal", func() bool {
			for _, r := range logs.records("peer TLS handshake failed") {
				if la.has(r["remote"]) {
					return true
				}
			}
			return false
		})
		if h.count() != 0 {
			t.Fatalf("handler called %d times", h.count())
		}
	})
}

// TestPeerTLSPlainRefused: plain text to a TLS peer port is refused
// cleanly: a raw STOMP CONNECT gets a plain-text ERROR (x-code tls) and
// the connection closes; a PeerClient without TLS fails with ErrPeerTLS;
// TLS-looking garbage is closed; each is logged with the remote address
// and counted. A TLS client meeting a plain server fails with ErrPeerTLS.
func TestPeerTLSPlainRefused(t *testing.T) {
	peerNoLeaks(t)
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "cluster")
	ss, cc := peerTLS(t, ca, ca.Issue(t, "node-s", nil))
	h := newPeerHold()
	logs := &syncBuffer{}
	s := startPeerServer(t, h, func(c *PeerServerConfig) {
		c.TLS = ss
		c.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	})
	counted := func() float64 { return peerCounter(t, s.m.dropped.WithLabelValues(peerCodeTLS)) }
	logged := func(t *testing.T, remote string) {
		t.Helper()
		peerWaitFor(t, "a log record for "+remote, func() bool {
			for _, r := range logs.records("peer TLS handshake failed") {
				if r["remote"] == remote && r["reason"] == peerCodeTLS {
					return true
				}
			}
			return false
		})
	}

	t.Run("raw CONNECT", func(t *testing.T) {
		before := counted()
		p := peerRawConn(t, s.Addr().String())
		p.write("CONNECT\naccept-version:1.2\nhost:c\nx-node-id:plain\nheart-beat:1000,0\n\n\x00")
		fs := p.untilClosed()
		if len(fs) != 1 || fs[0].Command != frame.ERROR || fs[0].Header.Get(PeerHeaderCode) != peerCodeTLS {
			t.Fatalf("got %v, want one ERROR with x-code %s", fs, peerCodeTLS)
		}
		logged(t, p.c.LocalAddr().String())
		if v := counted(); v != before+1 {
			t.Fatalf("dropped{tls} went from %v to %v", before, v)
		}
	})
	t.Run("PeerClient without TLS", func(t *testing.T) {
		st := newPeerStates()
		var la peerLocalAddrs
		startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) { c.OnState, c.Dial = st.on, la.dial })
		if err := st.refusal(t); !errors.Is(err, ErrPeerTLS) {
			t.Fatalf("plain client: %v, want ErrPeerTLS", err)
		}
	})
	t.Run("garbage", func(t *testing.T) {
		before := counted()
		p := peerRawConn(t, s.Addr().String())
		// A TLS record header announcing a handshake, then nonsense.
		p.write("\x16\x03\x01\x00\x08garbage!")
		if fs := p.untilClosed(); len(fs) != 0 {
			t.Fatalf("got frames %v", fs)
		}
		logged(t, p.c.LocalAddr().String())
		if v := counted(); v != before+1 {
			t.Fatalf("dropped{tls} went from %v to %v", before, v)
		}
	})
	t.Run("TLS client, plain server", func(t *testing.T) {
		plain := startPeerServer(t, h, nil)
		st := newPeerStates()
		startPeerClient(t, plain.Addr().String(), func(c *PeerClientConfig) { c.TLS, c.OnState = cc, st.on })
		if err := st.refusal(t); !errors.Is(err, ErrPeerTLS) {
			t.Fatalf("TLS client to a plain server: %v, want ErrPeerTLS", err)
		}
	})
	if h.count() != 0 {
		t.Fatalf("handler called %d times", h.count())
	}
}

// TestPeerTLSHandshakeTimeout: a client that connects and says nothing is
// cut off after HandshakeTimeout, on its own goroutine: meanwhile the
// server accepts and serves other links.
func TestPeerTLSHandshakeTimeout(t *testing.T) {
	peerNoLeaks(t)
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "cluster")
	ss, cc := peerTLS(t, ca, ca.Issue(t, "node-s", nil))
	h := newPeerHold()
	s := startPeerServer(t, h, func(c *PeerServerConfig) { c.TLS, c.HandshakeTimeout = ss, 300*time.Millisecond })
	silent := peerRawConn(t, s.Addr().String())
	c := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) { c.TLS = cc })
	peerMustOK(t, peerRequest(t, c, "ping", nil), "ping")
	if fs := silent.untilClosed(); len(fs) != 0 {
		t.Fatalf("silent client got %v", fs)
	}
	if v := peerCounter(t, s.m.dropped.WithLabelValues(peerCodeTimeout)); v != 1 {
		t.Fatalf("dropped{timeout} = %v, want 1", v)
	}
}

// TestPeerKeyring: with keyrings (SecretKeys), a client proves with its
// primary key and the server accepts any key of its ring and proves back
// with it; the client accepts a server proof made with any key of its
// own ring. So the steps of a rotation (install a new key everywhere, make
// it primary node by node, remove the old one) never refuse a link
// between two nodes at different steps, and a key removed from the ring
// is refused at the next handshake while links made before stay up.
func TestPeerKeyring(t *testing.T) {
	peerNoLeaks(t)
	k1, k2, k3 := []byte("key-one-0123456789abcdef"), []byte("key-two-0123456789abcdef"), []byte("key-three-0123456789abcd")
	ring := func(keys ...[]byte) func() [][]byte { return func() [][]byte { return keys } }
	tests := []struct {
		name           string
		server, client func() [][]byte
		ok             bool
	}{
		{"same ring", ring(k1), ring(k1), true},
		{"client installed the new key", ring(k1), ring(k1, k2), true},
		{"client uses the new key, server has it", ring(k1, k2), ring(k2, k1), true},
		{"server uses the new key, client still the old", ring(k2, k1), ring(k1, k2), true},
		{"server uses the new key, client has only the old", ring(k2, k1), ring(k1), true},
		{"both removed the old key", ring(k2), ring(k2), true},
		{"client still proves with a removed key", ring(k2), ring(k1, k2), false},
		{"server lacks the client's only key", ring(k1, k2), ring(k3), false},
		{"client keyring, server without a secret", nil, ring(k1), false},
		{"server keyring, client without a secret", ring(k1), nil, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newPeerHold()
			s := startPeerServer(t, h, func(c *PeerServerConfig) { c.SecretKeys = tc.server })
			st := newPeerStates()
			c := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) { c.SecretKeys, c.OnState = tc.client, st.on })
			if tc.ok {
				peerMustOK(t, peerRequest(t, c, "ping", nil), "ping")
				return
			}
			if err := st.refusal(t); !errors.Is(err, ErrPeerAuth) {
				t.Fatalf("got %v, want ErrPeerAuth", err)
			}
		})
	}

	t.Run("ring changes at run time", func(t *testing.T) {
		var cur atomic.Pointer[[][]byte]
		set := func(keys ...[]byte) { cur.Store(&keys) }
		set(k1)
		s := startPeerServer(t, newPeerHold(), func(c *PeerServerConfig) {
			c.SecretKeys = func() [][]byte { return *cur.Load() }
			c.Secret = k3 // SecretKeys replaces it
		})
		old := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) { c.SecretKeys = ring(k1) })
		peerMustOK(t, peerRequest(t, old, "before", nil), "before")
		set(k2, k1)
		set(k2)
		// The link made with the removed key stays up...
		peerMustOK(t, peerRequest(t, old, "after", nil), "after")
		// ... a new one with it is refused, one with the new key works.
		st := newPeerStates()
		startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) { c.SecretKeys, c.OnState = ring(k1), st.on })
		if err := st.refusal(t); !errors.Is(err, ErrPeerAuth) {
			t.Fatalf("client with the removed key: %v, want ErrPeerAuth", err)
		}
		st3 := newPeerStates()
		startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) { c.Secret, c.OnState = k3, st3.on })
		if err := st3.refusal(t); !errors.Is(err, ErrPeerAuth) {
			t.Fatalf("client with the replaced Secret: %v, want ErrPeerAuth", err)
		}
		nw := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) { c.SecretKeys = ring(k2) })
		peerMustOK(t, peerRequest(t, nw, "new", nil), "new")
	})
}
