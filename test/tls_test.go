package test

import (
	"bytes"
	"context"
	"crypto/tls"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/test/tlstest"
	"github.com/go-stomp/stomp/v3"
	"golang.org/x/crypto/bcrypt"
)

// tlsBroker starts a node whose STOMP-over-TLS listener presents a
// certificate ca signed, verifies client certificates against ca when
// offered, logs them in by CN (auth.x509_login), and asks other clients
// for alice/secret.
func tlsBroker(t *testing.T, ca *tlstest.CA, server tlstest.Pair) *broker {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte("secret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	users := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(users, []byte("alice:"+string(h)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return startBroker(t, func(c *config.Config) {
		c.Auth.UsersFile = users
		c.Auth.X509Login = true
		c.STOMP.TLS = config.STOMPTLS{Addr: "127.0.0.1:0", CertFile: server.CertFile, KeyFile: server.KeyFile,
			ClientCAFile: ca.CertFile, ClientAuth: "request"}
	})
}

// TestPythonStompPyTLS: stomp.py over TLS (its set_ssl) with a client
// certificate logs in without a passcode and gets its message back; a
// stomp.py that does not trust the broker's CA cannot connect.
func TestPythonStompPyTLS(t *testing.T) {
	requireStompPy(t)
	ca := tlstest.NewCA(t, t.TempDir(), "ca")
	b := tlsBroker(t, ca, ca.Issue(t, "broker", nil))
	client := ca.Issue(t, "py-client", nil)
	host, port, err := net.SplitHostPort(b.node.STOMPTLSAddr())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, debianPython, "python/tls.py", host, port, ca.CertFile, client.CertFile, client.KeyFile)
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1")
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	t.Logf("tls.py:\n%s", out)
	if err != nil {
		t.Fatalf("tls.py: %v", err)
	}
	if !strings.Contains(string(out), "x509 ok") || !strings.Contains(string(out), "untrusted ok") {
		t.Fatal("tls.py did not report both checks")
	}
}

// requireOpenSSL skips the test, or fails it when CI=true, without the
// openssl command (test/run.sh installs it).
func requireOpenSSL(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("openssl")
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("openssl is missing (test/run.sh installs Debian's openssl)")
	}
	t.Skip("openssl is missing (test/run.sh installs Debian's openssl)")
	return ""
}

// TestTLSOpenSSLClient: `openssl s_client` with a client certificate
// speaks STOMP over the TLS listener: CONNECT without a passcode, a
// receipted SEND and a receipted DISCONNECT.
func TestTLSOpenSSLClient(t *testing.T) {
	openssl := requireOpenSSL(t)
	ca := tlstest.NewCA(t, t.TempDir(), "ca")
	b := tlsBroker(t, ca, ca.Issue(t, "broker", nil))
	client := ca.Issue(t, "ossl", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, openssl, "s_client", "-connect", b.node.STOMPTLSAddr(), "-CAfile", ca.CertFile,
		"-cert", client.CertFile, "-key", client.KeyFile, "-verify_return_error", "-quiet")
	cmd.Stdin = strings.NewReader("CONNECT\naccept-version:1.2\nhost:/\nheart-beat:0,0\n\n\x00" +
		"SEND\ndestination:/queue/openssl\nreceipt:r-send\n\nfrom openssl\x00" +
		"DISCONNECT\nreceipt:r-bye\n\n\x00")
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	t.Logf("openssl s_client:\n%s", out)
	if err != nil && ctx.Err() != nil {
		t.Fatalf("openssl s_client did not end: %v", err)
	}
	for _, want := range []string{"CONNECTED\nversion:1.2", "RECEIPT\nreceipt-id:r-send", "RECEIPT\nreceipt-id:r-bye"} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("no %q in s_client's output", want)
		}
	}
	// The message is there for a plain client.
	c := b.dial(stomp.ConnOpt.Login("alice", "secret"))
	sub, err := c.Subscribe("/queue/openssl", stomp.AckAuto)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-sub.C:
		if m.Err != nil || string(m.Body) != "from openssl" {
			t.Fatalf("got %v %q", m.Err, m.Body)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the message sent through openssl did not arrive")
	}
}

// TestTLSCertificateReload: after the certificate files are replaced and
// the node reloads, new connections get the new certificate, a connection
// made before keeps working, and a reload that cannot read the files keeps
// the old certificate.
func TestTLSCertificateReload(t *testing.T) {
	if os.Getenv("BROKERD_TEST_CLUSTER") != "" {
		t.Skip("one node's files")
	}
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "ca")
	first := ca.Issue(t, "first", nil)
	certFile, keyFile := filepath.Join(dir, "live.crt"), filepath.Join(dir, "live.key")
	put := func(p tlstest.Pair) {
		if err := os.WriteFile(certFile, p.CertPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(keyFile, p.KeyPEM, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	put(first)
	b := tlsBroker(t, ca, tlstest.Pair{CertFile: certFile, KeyFile: keyFile})
	served := func() string {
		t.Helper()
		c, err := tls.Dial("tcp", b.node.STOMPTLSAddr(), &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost"})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	if cn := served(); cn != "first" {
		t.Fatalf("serves %q", cn)
	}
	// A client connected before the reload.
	conn, err := tls.Dial("tcp", b.node.STOMPTLSAddr(), &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	old, err := stomp.Connect(conn, stomp.ConnOpt.Login("alice", "secret"), stomp.ConnOpt.HeartBeat(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer old.Disconnect()

	put(ca.Issue(t, "second", nil))
	if err := b.node.Reload(); err != nil {
		t.Fatal(err)
	}
	if cn := served(); cn != "second" {
		t.Fatalf("after reload serves %q, want second", cn)
	}
	if err := old.Send("/queue/reload", "text/plain", []byte("x"), stomp.SendOpt.Receipt); err != nil {
		t.Fatalf("a connection from before the reload: %v", err)
	}

	if err := os.WriteFile(keyFile, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	err = b.node.Reload()
	if err == nil || !strings.Contains(err.Error(), "stomp.tls") {
		t.Fatalf("reload of a broken key: %v, want an error naming stomp.tls", err)
	}
	if cn := served(); cn != "second" {
		t.Fatalf("after a failed reload serves %q, want second", cn)
	}
}
