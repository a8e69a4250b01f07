package stomp

import (
	"bufio"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/test/tlstest"
	gostomp "github.com/go-stomp/stomp/v3"
	"github.com/go-stomp/stomp/v3/frame"
	"golang.org/x/crypto/bcrypt"
)

// tlsServer starts a server with a TLS listener whose certificate ca
// signed; clients' certificates are verified against ca when they offer
// one (auth), and mutate adjusts the rest.
func tlsServer(t *testing.T, ca *tlstest.CA, auth tls.ClientAuthType, mutate func(*Config)) *Server {
	t.Helper()
	pair := ca.Issue(t, "broker", nil)
	_, srv := testServerCfg(t, func(c *Config) {
		c.TLSAddr = "127.0.0.1:0"
		c.TLS = &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{pair.TLS(t)},
			ClientCAs:    ca.Pool(),
			ClientAuth:   auth,
		}
		if mutate != nil {
			mutate(c)
		}
	})
	return srv
}

// tlsClientConfig trusts ca and presents cert, if any.
func tlsClientConfig(ca *tlstest.CA, cert *tls.Certificate) *tls.Config {
	c := &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost"}
	if cert != nil {
		c.Certificates = []tls.Certificate{*cert}
	}
	return c
}

// withUsers is an Authenticator that knows alice/secret.
func withUsers(t *testing.T) Authenticator {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte("secret"), bcrypt.MinCost) // fast under -race
	if err != nil {
		t.Fatal(err)
	}
	u, err := ParseUsers([]byte("alice:" + string(h) + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// TestTLSGoStompClient: the go-stomp client over crypto/tls sends, gets
// its receipt and receives, on the TLS listener, with a passcode login.
func TestTLSGoStompClient(t *testing.T) {
	ca := tlstest.NewCA(t, t.TempDir(), "ca")
	srv := tlsServer(t, ca, tls.NoClientCert, func(c *Config) { c.Auth = withUsers(t) })
	conn, err := tls.Dial("tcp", srv.TLSAddr().String(), tlsClientConfig(ca, nil))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if v := conn.ConnectionState().Version; v < tls.VersionTLS12 {
		t.Fatalf("TLS version %x", v)
	}
	cl, err := gostomp.Connect(conn, gostomp.ConnOpt.Login("alice", "secret"), gostomp.ConnOpt.HeartBeat(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Disconnect()
	sub, err := cl.Subscribe("/queue/tls", gostomp.AckAuto)
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Send("/queue/tls", "text/plain", []byte("over tls"), gostomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-sub.C:
		if m.Err != nil || string(m.Body) != "over tls" {
			t.Fatalf("got %v %q", m.Err, m.Body)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no message over TLS")
	}
	// The plain listener still serves, with the same queues.
	pc := tdial(t, srv.Addr().String())
	pc.connect("accept-version:1.2", "host:/", "login:alice", "passcode:secret", "heart-beat:0,0")
}

// TestTLSOldVersionsRefused: TLS 1.0 and 1.1 are not spoken.
func TestTLSOldVersionsRefused(t *testing.T) {
	ca := tlstest.NewCA(t, t.TempDir(), "ca")
	srv := tlsServer(t, ca, tls.NoClientCert, func(c *Config) { c.TLS.MinVersion = tls.VersionTLS12 })
	cfg := tlsClientConfig(ca, nil)
	cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS10, tls.VersionTLS11
	if c, err := tls.Dial("tcp", srv.TLSAddr().String(), cfg); err == nil {
		c.Close()
		t.Fatal("a TLS 1.1 handshake succeeded")
	}
}

// TestTLSX509Login: with X509Login, a client whose certificate the CA
// signed logs in as its CN without a passcode; without X509Login, or with
// another login, the passcode is checked.
func TestTLSX509Login(t *testing.T) {
	ca := tlstest.NewCA(t, t.TempDir(), "ca")
	cert := ca.Issue(t, "carol", nil).TLS(t)
	for _, tc := range []struct {
		name     string
		x509     bool
		hdr      []string
		wantConn bool
	}{
		{"certificate, no login", true, nil, true},
		{"certificate, its own login", true, []string{"login:carol"}, true},
		{"certificate, another login without passcode", true, []string{"login:alice"}, false},
		{"certificate, another login with its passcode", true, []string{"login:alice", "passcode:secret"}, true},
		{"x509_login off", false, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := tlsServer(t, ca, tls.VerifyClientCertIfGiven, func(c *Config) {
				c.Auth = withUsers(t)
				c.X509Login = tc.x509
			})
			conn, err := tls.Dial("tcp", srv.TLSAddr().String(), tlsClientConfig(ca, &cert))
			if err != nil {
				t.Fatal(err)
			}
			tc2 := &tclient{t: t, c: conn, r: frame.NewReader(bufio.NewReader(conn))}
			defer conn.Close()
			tc2.write(tframe(frame.CONNECT, "", append([]string{"accept-version:1.2", "host:/", "heart-beat:0,0"}, tc.hdr...)...))
			f := tc2.read()
			if tc.wantConn && f.Command != frame.CONNECTED {
				t.Fatalf("want CONNECTED, got %s %v %q", f.Command, f.Header, f.Body)
			}
			if !tc.wantConn && (f.Command != frame.ERROR || f.Header.Get(frame.Message) != "access refused") {
				t.Fatalf("want ERROR access refused, got %s %v %q", f.Command, f.Header, f.Body)
			}
		})
	}
}

// TestTLSUntrustedOrExpiredCertificateRefused: a client certificate
// another CA signed, or an expired one, fails the handshake; so does no
// certificate when one is required.
func TestTLSUntrustedOrExpiredCertificateRefused(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "ca")
	other := tlstest.NewCA(t, dir, "other")
	foreign := other.Issue(t, "mallory", nil).TLS(t)
	expired := ca.Issue(t, "old", nil, tlstest.Expired()).TLS(t)
	good := ca.Issue(t, "carol", nil).TLS(t)
	srv := tlsServer(t, ca, tls.RequireAndVerifyClientCert, func(c *Config) { c.X509Login = true })
	try := func(cert *tls.Certificate) error {
		conn, err := tls.Dial("tcp", srv.TLSAddr().String(), tlsClientConfig(ca, cert))
		if err != nil {
			return err
		}
		defer conn.Close()
		// TLS 1.3: the server checks the client's certificate after the
		// client's handshake is done; the refusal arrives on the first read.
		_, _ = io.WriteString(conn, tframe(frame.CONNECT, "", "accept-version:1.2", "host:/"))
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		f, err := frame.NewReader(bufio.NewReader(conn)).Read()
		if err != nil {
			return err
		}
		if f.Command != frame.CONNECTED {
			return errors.New(f.Command)
		}
		return nil
	}
	for name, cert := range map[string]*tls.Certificate{"foreign CA": &foreign, "expired": &expired, "none": nil} {
		if err := try(cert); err == nil {
			t.Errorf("%s: connected", name)
		}
	}
	if err := try(&good); err != nil {
		t.Fatalf("trusted certificate refused: %v", err)
	}
}

// TestTLSPlainClientOnTLSPort: a plain STOMP client on the TLS port gets a
// plain-text ERROR saying the port speaks TLS, then the connection closes.
func TestTLSPlainClientOnTLSPort(t *testing.T) {
	ca := tlstest.NewCA(t, t.TempDir(), "ca")
	srv := tlsServer(t, ca, tls.NoClientCert, nil)
	c := tdial(t, srv.TLSAddr().String())
	c.write(tframe(frame.CONNECT, "", "accept-version:1.2", "host:/"))
	f := c.expectError("TLS required")
	if !strings.Contains(string(f.Body), "TLS") {
		t.Fatalf("body %q", f.Body)
	}
	// The server is still up for TLS clients.
	conn, err := tls.Dial("tcp", srv.TLSAddr().String(), tlsClientConfig(ca, nil))
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
}

// TestMaxConnectionsPerIP: over the cap, a connection from the same
// address is refused with an ERROR; once one closes, another is served.
func TestMaxConnectionsPerIP(t *testing.T) {
	_, srv := testServerCfg(t, func(c *Config) { c.MaxConnectionsPerIP = 2 })
	addr := srv.Addr().String()
	a := tdial(t, addr)
	a.connect()
	b := tdial(t, addr)
	b.connect()
	c := tdial(t, addr)
	f := c.expectError("too many connections")
	if !strings.Contains(string(f.Body), "from one address") {
		t.Fatalf("body %q", f.Body)
	}
	a.c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		d := tdial(t, addr)
		d.write(tframe(frame.CONNECT, "", "accept-version:1.2", "host:/", "heart-beat:0,0"))
		if f := d.read(); f.Command == frame.CONNECTED {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a slot freed by a closed connection was not reused")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// slowAuth refuses everyone and records how many checks ran at once.
type slowAuth struct {
	cur, peak atomic.Int32
}

func (a *slowAuth) Authenticate(login, passcode string) error {
	n := a.cur.Add(1)
	for {
		p := a.peak.Load()
		if n <= p || a.peak.CompareAndSwap(p, n) {
			break
		}
	}
	time.Sleep(30 * time.Millisecond)
	a.cur.Add(-1)
	return ErrBadCredentials
}

// TestLoginChecksBounded: a flood of CONNECTs runs at most MaxLoginChecks
// password checks at once, and each refused login is answered with an
// ERROR.
func TestLoginChecksBounded(t *testing.T) {
	auth := &slowAuth{}
	_, srv := testServerCfg(t, func(c *Config) {
		c.Auth = auth
		c.MaxLoginChecks = 2
	})
	srv.logins.setDelays(0, 0) // this test is about the checks, not the delays
	var wg sync.WaitGroup
	var refused atomic.Int32
	for range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", srv.Addr().String())
			if err != nil {
				return
			}
			defer c.Close()
			_, _ = io.WriteString(c, tframe(frame.CONNECT, "", "accept-version:1.2", "host:/", "login:x", "passcode:y"))
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			f, err := frame.NewReader(bufio.NewReader(c)).Read()
			if err == nil && f != nil && f.Command == frame.ERROR {
				refused.Add(1)
			}
		}()
	}
	wg.Wait()
	if p := auth.peak.Load(); p > 2 || p < 1 {
		t.Fatalf("peak concurrent password checks %d, want 1..2", p)
	}
	if refused.Load() != 12 {
		t.Fatalf("%d of 12 bad logins got an ERROR", refused.Load())
	}
}

// TestFailedLoginsSlowed: each failed login from one address waits longer
// before its ERROR; the guard forgets an address after a quiet spell and
// never holds more than its bound.
func TestFailedLoginsSlowed(t *testing.T) {
	g := newLoginGuard()
	now := time.Unix(1000, 0)
	g.now = func() time.Time { return now }
	ip := netipFrom(1)
	var prev time.Duration
	for i := range 12 {
		d := g.failed(ip)
		if d < prev || (i > 0 && d == prev && d != loginDelayMax) {
			t.Fatalf("failure %d waits %v after %v", i+1, d, prev)
		}
		prev = d
	}
	if prev != loginDelayMax {
		t.Fatalf("delay capped at %v, want %v", prev, loginDelayMax)
	}
	now = now.Add(loginForget + time.Second)
	if d := g.failed(ip); d != loginDelayBase {
		t.Fatalf("after a quiet spell the first failure waits %v, want %v", d, loginDelayBase)
	}

	// Through a server: the second wrong passcode from one address waits
	// at least twice the first's delay.
	_, srv := testServerCfg(t, func(c *Config) { c.Auth = withUsers(t) })
	var took []time.Duration
	for range 3 {
		c := tdial(t, srv.Addr().String())
		start := time.Now()
		c.write(tframe(frame.CONNECT, "", "accept-version:1.2", "host:/", "login:alice", "passcode:wrong"))
		c.expectError("access refused")
		took = append(took, time.Since(start))
	}
	if took[2] < 4*loginDelayBase {
		t.Fatalf("third failed login answered after %v, want at least %v (delays %v)", took[2], 4*loginDelayBase, took)
	}
}

// TestLoginGuardBounded: addresses beyond the bound evict others.
func TestLoginGuardBounded(t *testing.T) {
	g := newLoginGuard()
	for i := range loginGuardMax + 100 {
		ip := netipFrom(i)
		g.failed(ip)
	}
	if n := g.size(); n > loginGuardMax {
		t.Fatalf("guard holds %d addresses, bound %d", n, loginGuardMax)
	}
}

func netipFrom(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
}

// TestTLSOnly: with no plain address the server serves TLS alone.
func TestTLSOnly(t *testing.T) {
	ca := tlstest.NewCA(t, t.TempDir(), "ca")
	srv := tlsServer(t, ca, tls.NoClientCert, func(c *Config) { c.Addr = "" })
	if srv.Addr() != nil {
		t.Fatalf("plain listener at %v", srv.Addr())
	}
	conn, err := tls.Dial("tcp", srv.TLSAddr().String(), tlsClientConfig(ca, nil))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cl, err := gostomp.Connect(conn, gostomp.ConnOpt.HeartBeat(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Send("/queue/tls-only", "text/plain", []byte("x"), gostomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	_ = cl.Disconnect()
}
