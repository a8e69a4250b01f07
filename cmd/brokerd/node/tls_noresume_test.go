package node

import (
	"crypto/tls"
	"net"
	"testing"
	"time"

	"github.com/brokerd/brokerd/test/tlstest"
)

// TestClientTLSNoResumption: the STOMP and admin TLS listeners
// (tlsFiles.serverConfig) issue no session tickets, so a client that
// keeps a session cache still gets a full handshake, with its certificate
// checked against the CA file in force, every time.
func TestClientTLSNoResumption(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "ca")
	server := ca.Issue(t, "broker", nil)
	client := ca.Issue(t, "alice", nil)
	tf, err := newTLSFiles("stomp.tls", server.CertFile, server.KeyFile, ca.CertFile, "client_ca_file")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", tf.serverConfig(tls.RequireAndVerifyClientCert))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	resumed := make(chan bool, 4)
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
				if tc.Handshake() != nil {
					resumed <- false
					return
				}
				resumed <- tc.ConnectionState().DidResume
				_, _ = tc.Write([]byte("x")) // after any session ticket
				buf := make([]byte, 1)
				_, _ = tc.Read(buf)
			}()
		}
	}()
	cache := tls.NewLRUClientSessionCache(4)
	for i := range 2 {
		cfg := &tls.Config{Certificates: []tls.Certificate{client.TLS(t)}, InsecureSkipVerify: true, ClientSessionCache: cache}
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(), cfg)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 1)
		_, _ = c.Read(buf) // processes any session ticket
		c.Close()
		if r := <-resumed; r {
			t.Fatalf("connection %d resumed a TLS session: tickets are on", i)
		}
	}
}
