package node

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
)

// tlsFiles is a certificate with its key and, optionally, a bundle of CA
// certificates, read from PEM files at start and again by every reload.
// The tls.Configs it makes read the current material on every handshake,
// so a reload takes effect for new connections without a restart and
// existing ones keep theirs.
type tlsFiles struct {
	prefix            string // config key prefix, e.g. "stomp.tls", for errors
	certFile, keyFile string
	caFile, caKey     string // caKey names caFile's key in errors: "client_ca_file"
	cur               atomic.Pointer[tlsMaterial]
}

type tlsMaterial struct {
	cert *tls.Certificate
	pool *x509.CertPool // nil without a CA file
}

// newTLSFiles reads the files; caFile may be "". caKey is the name of the
// CA file's key under prefix ("ca_file" or "client_ca_file").
func newTLSFiles(prefix, certFile, keyFile, caFile, caKey string) (*tlsFiles, error) {
	t := &tlsFiles{prefix: prefix, certFile: certFile, keyFile: keyFile, caFile: caFile, caKey: caKey}
	if err := t.reload(); err != nil {
		return nil, err
	}
	return t, nil
}

// reload rereads the files; on error the material in use is kept.
func (t *tlsFiles) reload() error {
	var m tlsMaterial
	if t.certFile != "" {
		c, err := tls.LoadX509KeyPair(t.certFile, t.keyFile)
		if err != nil {
			return fmt.Errorf("%s.cert_file %s, %s.key_file %s: %w", t.prefix, t.certFile, t.prefix, t.keyFile, err)
		}
		if c.Leaf == nil && len(c.Certificate) > 0 {
			c.Leaf, _ = x509.ParseCertificate(c.Certificate[0])
		}
		m.cert = &c
	}
	if t.caFile != "" {
		b, err := os.ReadFile(t.caFile)
		if err != nil {
			return fmt.Errorf("%s.%s: %w", t.prefix, t.caKey, err)
		}
		p := x509.NewCertPool()
		if !p.AppendCertsFromPEM(b) {
			return fmt.Errorf("%s.%s: %s holds no PEM certificate", t.prefix, t.caKey, t.caFile)
		}
		m.pool = p
	}
	t.cur.Store(&m)
	return nil
}

// clientAuthType maps stomp.tls.client_auth to Go's setting: request
// verifies a certificate when the client offers one, require refuses a
// client without one.
func clientAuthType(s string) tls.ClientAuthType {
	switch s {
	case "request":
		return tls.VerifyClientCertIfGiven
	case "require":
		return tls.RequireAndVerifyClientCert
	}
	return tls.NoClientCert
}

// serverConfig returns a server tls.Config presenting the current
// certificate and, with a CA file, verifying client certificates as auth
// says (tls.NoClientCert, VerifyClientCertIfGiven or
// RequireAndVerifyClientCert).
func (t *tlsFiles) serverConfig(auth tls.ClientAuthType) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			m := t.cur.Load()
			c := &tls.Config{
				MinVersion:   tls.VersionTLS12,
				Certificates: []tls.Certificate{*m.cert},
				ClientAuth:   auth,
				// No session tickets: a resumed session keeps the client
				// certificate verified before a reload (a dropped CA would
				// still log in with auth.x509_login), and a TLS 1.3
				// ticket arriving while a client's reader thread and its
				// CONNECT writer share one OpenSSL connection (stomp.py)
				// can lose that CONNECT. STOMP connections are long-lived:
				// a full handshake per connection costs little.
				SessionTicketsDisabled: true,
			}
			if m.pool != nil && auth != tls.NoClientCert {
				c.ClientCAs = m.pool
			}
			return c, nil
		},
	}
}

// peerVerify checks a peer's certificate chain against the current CA
// bundle, for either end of a link. Host names are not checked: a
// certificate the cluster's CA signed is what makes a node a member.
func (t *tlsFiles) peerVerify(rawCerts [][]byte) error {
	m := t.cur.Load()
	if len(rawCerts) == 0 {
		return errors.New("no certificate")
	}
	certs := make([]*x509.Certificate, len(rawCerts))
	for i, raw := range rawCerts {
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			return fmt.Errorf("bad certificate: %w", err)
		}
		certs[i] = c
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{
		Roots:         m.pool,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("certificate of %q not signed by %s.%s: %w", certs[0].Subject.CommonName, t.prefix, t.caKey, err)
	}
	return nil
}

// mutualServerConfig is the peer server's side of mutual TLS: it presents
// the current certificate and requires one from the client that the CA
// signed.
func (t *tlsFiles) mutualServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			m := t.cur.Load()
			return &tls.Config{
				MinVersion:   tls.VersionTLS12,
				Certificates: []tls.Certificate{*m.cert},
				// Chain checked by peerVerify against the current CA.
				ClientAuth: tls.RequireAnyClientCert,
				// Go does not call VerifyPeerCertificate on a resumed
				// session: without tickets every link is verified
				// against the current CA (a reload may have dropped one).
				SessionTicketsDisabled: true,
				VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
					return t.peerVerify(raw)
				},
			}, nil
		},
	}
}

// mutualClientConfig is the dialling side of mutual TLS on peer links.
func (t *tlsFiles) mutualClientConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return t.cur.Load().cert, nil
		},
		// The chain is verified by peerVerify against the current CA;
		// host names are not checked (see peerVerify).
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			return t.peerVerify(raw)
		},
	}
}
