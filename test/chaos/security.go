//go:build linux

package chaos

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/test/tlstest"
)

// security is what the run's nodes need to run secured, made at the
// start of the run in its directory (outside the nodes' data
// directories, which the lose nemesis deletes):
//
//   - always, an admin token file: admin.addr listens beyond loopback, so
//     brokerd requires admin.token_file, and every admin call of the
//     suite sends the token;
//   - with -chaos.tls (the default), a CA and a certificate per node
//     for mutual TLS on peer links (cluster.tls.*), and a gossip key
//     (cluster.secret_key_file) instead of --allow-plaintext-gossip.
type security struct {
	token     string
	tokenFile string
	tls       bool
	caFile    string
	keyFile   string
	certs     map[int]tlstest.Pair
}

func newSecurity(t *testing.T, dir string, nodes int, withTLS bool) (*security, error) {
	sdir := filepath.Join(dir, "security")
	if err := os.MkdirAll(sdir, 0o700); err != nil {
		return nil, err
	}
	var tok [16]byte
	if _, err := rand.Read(tok[:]); err != nil {
		return nil, err
	}
	s := &security{token: hex.EncodeToString(tok[:]), tokenFile: filepath.Join(sdir, "admin.token"), tls: withTLS}
	if err := os.WriteFile(s.tokenFile, []byte(s.token+"\n"), 0o600); err != nil {
		return nil, err
	}
	if !withTLS {
		return s, nil
	}
	ca := tlstest.NewCA(t, sdir, "chaos-cluster")
	s.caFile = ca.CertFile
	s.certs = map[int]tlstest.Pair{}
	for i := 1; i <= nodes; i++ {
		s.certs[i] = ca.Issue(t, fmt.Sprintf("n%d", i), []string{nodeIP(i)})
	}
	var key [32]byte
	if _, err := rand.Read(key[:]); err != nil {
		return nil, err
	}
	s.keyFile = filepath.Join(sdir, "gossip.key")
	if err := os.WriteFile(s.keyFile, []byte(base64.StdEncoding.EncodeToString(key[:])+"\n"), 0o600); err != nil {
		return nil, err
	}
	return s, nil
}

// args are node i's command-line flags for security.
func (s *security) args() []string {
	a := []string{"--admin-token-file", s.tokenFile}
	if !s.tls {
		a = append(a, "--allow-plaintext-gossip")
	}
	return a
}

// env is node i's configuration for security that has no flag, as
// BROKERD_ variables.
func (s *security) env(i int) []string {
	if !s.tls {
		return nil
	}
	p := s.certs[i]
	return []string{
		"BROKERD_CLUSTER_TLS_CERT_FILE=" + p.CertFile,
		"BROKERD_CLUSTER_TLS_KEY_FILE=" + p.KeyFile,
		"BROKERD_CLUSTER_TLS_CA_FILE=" + s.caFile,
		"BROKERD_CLUSTER_SECRET_KEY_FILE=" + s.keyFile,
	}
}

func (s *security) String() string {
	if !s.tls {
		return "admin token; peer links in plain TCP, gossip in clear (-chaos.tls=false)"
	}
	return "admin token; mutual TLS on peer links (a CA made for the run, a certificate per node), gossip encrypted"
}

// checkPeerTLS shows that node nd's peer port speaks only TLS: a plain
// STOMP CONNECT gets the plain-text ERROR with x-code tls.
func checkPeerTLS(nd *node) error {
	addr := net.JoinHostPort(nodeIP(nd.i), strconv.Itoa(peerPort))
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("CONNECT\naccept-version:1.2\nhost:chaos\nx-node-id:chaos-probe\nheart-beat:1000,0\n\n\x00")); err != nil {
		return err
	}
	var got strings.Builder
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		got.WriteString(line)
		if strings.TrimSpace(line) == "x-code:tls" {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s's peer port %s answered a plain CONNECT with %q, not an ERROR with x-code:tls (%v)", nd.name(), addr, got.String(), err)
		}
	}
}
