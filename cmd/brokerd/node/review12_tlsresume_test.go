package node

import (
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/brokerd/brokerd/test/tlstest"
)

// TestReview12PeerTLSResumptionSkipsCAReload: the peer server's mutual
// TLS (tlsFiles.mutualServerConfig) asks for any client certificate
// (RequireAnyClientCert) and checks its chain in VerifyPeerCertificate
// against the CA file in force. Go does not call VerifyPeerCertificate on
// a resumed session (TLS 1.3 PSK from a session ticket; tickets are on by
// default and live for 7 days), so once a reload replaced the CA file (to
// shut out a decommissioned or compromised node: the only revocation the
// design offers), a client that kept a ticket from before still passes
// the peer server's TLS check.
func TestReview12PeerTLSResumptionSkipsCAReload(t *testing.T) {
	dir := t.TempDir()
	oldCA := tlstest.NewCA(t, dir, "old")
	newCA := tlstest.NewCA(t, dir, "new")
	server := newCA.Issue(t, "node-a", nil)
	// The node trusts both CAs at first.
	caFile := filepath.Join(dir, "peer-ca.crt")
	if err := os.WriteFile(caFile, append(append([]byte(nil), oldCA.CertPEM...), newCA.CertPEM...), 0o600); err != nil {
		t.Fatal(err)
	}
	tf, err := newTLSFiles("cluster.tls", server.CertFile, server.KeyFile, caFile, "ca_file")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", tf.mutualServerConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		err     error
		resumed bool
	}
	results := make(chan result, 8)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := c.(*tls.Conn)
				_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
				err := tc.Handshake()
				results <- result{err, tc.ConnectionState().DidResume}
				if err == nil {
					_, _ = tc.Write([]byte("x")) // after the session tickets
					buf := make([]byte, 1)
					_, _ = tc.Read(buf)
				}
			}()
		}
	}()

	intruder := oldCA.Issue(t, "decommissioned", nil)
	cache := tls.NewLRUClientSessionCache(4)
	dial := func(withCache bool) error {
		cfg := &tls.Config{Certificates: []tls.Certificate{intruder.TLS(t)}, InsecureSkipVerify: true}
		if withCache {
			cfg.ClientSessionCache = cache
		}
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(), cfg)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 1)
		_, err = c.Read(buf) // processes the server's session tickets
		return err
	}

	if err := dial(true); err != nil {
		t.Fatalf("while both CAs are trusted: %v", err)
	}
	if r := <-results; r.err != nil {
		t.Fatalf("server: %v", r.err)
	}

	// The operator drops the old CA and reloads.
	if err := os.WriteFile(caFile, newCA.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := tf.reload(); err != nil {
		t.Fatal(err)
	}
	_ = dial(false)
	if r := <-results; r.err == nil {
		t.Fatal("a certificate of the dropped CA was accepted by a full handshake after the reload")
	}
	_ = dial(true)
	if r := <-results; r.err == nil {
		t.Fatalf("after the reload dropped its CA, a peer that kept a session ticket passed mutual TLS (resumed %v): VerifyPeerCertificate is not called on resumption", r.resumed)
	}
}
