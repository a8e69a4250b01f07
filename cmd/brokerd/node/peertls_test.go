package node

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/test/tlstest"
	gostomp "github.com/go-stomp/stomp/v3"
)

// withPeerTLS sets cluster.tls.* to pair and the CA file ca.
func withPeerTLS(cfg config.Config, ca *tlstest.CA, pair tlstest.Pair) config.Config {
	cfg.Cluster.TLS = config.ClusterTLS{CertFile: pair.CertFile, KeyFile: pair.KeyFile, CAFile: ca.CertFile}
	return cfg
}

// logRecords returns the JSON log records whose msg is msg.
func logRecords(b *lockedBuffer, msg string) []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(b.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// TestClusterPeerTLSForeignCertificate: three nodes with certificates the
// cluster's CA signed replicate and forward over mutual TLS (receipted
// SENDs through one node are consumed through another). A fourth node
// gossips with the right key and trusts the cluster's CA, but presents a
// certificate another CA signed: it is a member, but none of its peer
// links comes up, a SEND through it fails instead of being stored, the
// others log the refused handshakes naming its certificate (as servers
// and as clients), it logs the refusals it meets, and the cluster goes on
// serving without it (its copies are not waited for).
func TestClusterPeerTLSForeignCertificate(t *testing.T) {
	if testing.Short() {
		t.Skip("four nodes")
	}
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "cluster")
	foreign := tlstest.NewCA(t, dir, "foreign")
	keyFile := writeKeyFile(t, bytes.Repeat([]byte{7}, 32))
	var cfgs []config.Config
	for _, name := range []string{"a", "b", "c"} {
		cfgs = append(cfgs, withPeerTLS(clusterTestConfig(t, name, keyFile), ca, ca.Issue(t, "node-"+name, nil)))
	}
	nodes := startCluster(t, cfgs...)
	waitAgreement(t, 20*time.Second, nodes)

	// Over mutual TLS: receipted SENDs through a, consumed through c.
	var queues []string
	for _, q := range []string{"tls-0", "tls-1", "tls-2", "tls-3"} {
		queues = append(queues, "/queue/"+q)
	}
	load := startRotationLoad(t, nodes[0].n, nodes[2].n, queues)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if s, r, _ := load.counts(); s >= 50 && r >= 50 {
			break
		}
		if time.Now().After(deadline) {
			s, r, _ := load.counts()
			t.Fatalf("over mutual TLS: %d sent, %d received in 10 s; %v", s, r, load.errs)
		}
		time.Sleep(20 * time.Millisecond)
	}
	load.halt()
	drainAll(t, nodes[1].n, load)
	if lost := load.lost(); len(lost) > 0 {
		t.Fatalf("over mutual TLS, %d receipted messages lost: %v", len(lost), lost[:min(len(lost), 20)])
	}
	for _, c := range nodes {
		if down := peerLinksDown(t, c.n); len(down) > 0 {
			t.Fatalf("%s's peer links down: %v", c.cfg.Node.Name, down)
		}
	}

	// The intruder: the gossip key and the cluster's CA certificate
	// (public), but a certificate another CA signed.
	xcfg := withPeerTLS(clusterTestConfig(t, "x", keyFile), ca, foreign.Issue(t, "intruder", nil))
	xcfg.Cluster.Join = []string{nodes[0].n.Cluster().GossipAddr()}
	x := &clusterNode{t: t, cfg: xcfg}
	x.start()
	t.Cleanup(x.stop)
	all := append(append([]*clusterNode(nil), nodes...), x)
	waitAgreement(t, 20*time.Second, all)

	conn, err := dialSTOMP(x.n.STOMPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Disconnect()
	sent := make(chan error, 1)
	go func() {
		sent <- conn.Send(queues[0], "text/plain", []byte("through the intruder"), gostomp.SendOpt.Receipt)
	}()
	select {
	case err := <-sent:
		if err == nil {
			t.Fatal("a SEND through the node with a foreign certificate got a RECEIPT")
		}
		t.Logf("SEND through the intruder: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("a SEND through the node with a foreign certificate got no answer in 30 s")
	}
	if down := peerLinksDown(t, x.n); len(down) == 0 {
		t.Fatal("the intruder reports no peer link down")
	}
	mfs, err := x.n.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "brokerd_peer_link_up" {
			for _, m := range mf.GetMetric() {
				if m.GetGauge().GetValue() != 0 {
					t.Fatalf("the intruder has a peer link up: %v", m.GetLabel())
				}
			}
		}
	}

	// Every good node refused it, as a server and as a client, and said
	// why; it heard the refusals.
	for _, c := range nodes {
		names := func(r map[string]any) bool {
			msg, _ := r["err"].(string)
			return strings.Contains(msg, `"intruder"`) && strings.Contains(msg, "not signed by cluster.tls.ca_file")
		}
		server := func() bool {
			return slices.ContainsFunc(logRecords(c.logs, "peer TLS handshake failed"), func(r map[string]any) bool { return names(r) && r["remote"] != nil })
		}
		client := func() bool { return slices.ContainsFunc(logRecords(c.logs, "peer handshake failed"), names) }
		deadline := time.Now().Add(10 * time.Second)
		for !server() || !client() {
			if time.Now().After(deadline) {
				t.Fatalf("%s did not log the refusal of the intruder's certificate within 10 s: as server %v, as client %v", c.cfg.Node.Name, server(), client())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	found := false
	for _, r := range logRecords(x.logs, "peer handshake failed") {
		if msg, _ := r["err"].(string); strings.Contains(msg, "TLS") {
			found = true
		}
	}
	if !found {
		t.Error("the intruder did not log the refusal of the others' certificates")
	}

	// Not checked: that the cluster keeps its throughput while the
	// intruder is an alive gossip member. Its seat in the active set
	// makes the queues placed on it unavailable until it leaves; taking
	// it out of placement on one side's refusal alone gave two owners
	// (TestReview12DistrustedPeersSplitBrain). An agreed exclusion is
	// the fix, not built yet.
}

// peerCertCN dials addr over TLS with client (whose roots are the CA it
// trusts, no host name checked) and returns the common name of the
// certificate the server presented, or the handshake's error.
func peerCertCN(addr string, client tlstest.Pair, ca *tlstest.CA) (string, error) {
	cert, err := tls.X509KeyPair(client.CertPEM, client.KeyPEM)
	if err != nil {
		return "", err
	}
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{
		Certificates: []tls.Certificate{cert},
		RootCAs:      ca.Pool(),
		ServerName:   "localhost",
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	// TLS 1.3: the server checks the client's certificate after the
	// client's handshake; a refusal shows on the first read.
	_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := c.Read(make([]byte, 1)); err != nil && !peerTimeout(err) {
		return "", err
	}
	return c.ConnectionState().PeerCertificates[0].Subject.CommonName, nil
}

func peerTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestPeerTLSReload: a reload (SIGHUP, POST /v1/reload) rereads
// cluster.tls.*: the peer server presents the new certificate to new
// links, and a new CA file decides whom it accepts; a reload whose files
// do not load keeps the material in force.
func TestPeerTLSReload(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "cluster")
	first := ca.Issue(t, "node-a", nil)
	cfg := clusterTestConfig(t, "a", writeKeyFile(t, bytes.Repeat([]byte{9}, 32)))
	cfg.Cluster.ActiveMembers, cfg.Replica.Factor = 1, 1
	// The node's files, rewritten in place as an operator would.
	certFile, keyFile, caFile := filepath.Join(dir, "peer.crt"), filepath.Join(dir, "peer.key"), filepath.Join(dir, "peer-ca.crt")
	install := func(p tlstest.Pair, caPEM []byte) {
		t.Helper()
		for f, b := range map[string][]byte{certFile: p.CertPEM, keyFile: p.KeyPEM, caFile: caPEM} {
			if err := os.WriteFile(f, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	install(first, ca.CertPEM)
	cfg.Cluster.TLS = config.ClusterTLS{CertFile: certFile, KeyFile: keyFile, CAFile: caFile}
	a := startCluster(t, cfg)[0]
	addr := a.n.PeerAddr()
	operator := ca.Issue(t, "operator", nil)
	if cn, err := peerCertCN(addr, operator, ca); err != nil || cn != "node-a" {
		t.Fatalf("before the reload: %q, %v; want node-a", cn, err)
	}

	install(ca.Issue(t, "node-a-renewed", nil), ca.CertPEM)
	if err := a.n.Reload(); err != nil {
		t.Fatal(err)
	}
	if cn, err := peerCertCN(addr, operator, ca); err != nil || cn != "node-a-renewed" {
		t.Fatalf("after the reload: %q, %v; want node-a-renewed", cn, err)
	}

	// A new CA: its certificates are accepted, the old CA's no longer.
	ca2 := tlstest.NewCA(t, dir, "cluster-2")
	install(ca2.Issue(t, "node-a-ca2", nil), ca2.CertPEM)
	if err := a.n.Reload(); err != nil {
		t.Fatal(err)
	}
	if cn, err := peerCertCN(addr, ca2.Issue(t, "operator-2", nil), ca2); err != nil || cn != "node-a-ca2" {
		t.Fatalf("after the CA changed: %q, %v; want node-a-ca2", cn, err)
	}
	if _, err := peerCertCN(addr, operator, ca2); err == nil {
		t.Fatal("a certificate of the old CA was accepted after the CA file changed")
	}

	// A damaged file: the reload fails and names the key; the material in
	// force stays.
	if err := os.WriteFile(certFile, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := a.n.Reload(); err == nil || !strings.Contains(err.Error(), "cluster.tls.cert_file") {
		t.Fatalf("reload with a damaged certificate: %v", err)
	}
	if cn, err := peerCertCN(addr, ca2.Issue(t, "operator-3", nil), ca2); err != nil || cn != "node-a-ca2" {
		t.Fatalf("after a failed reload: %q, %v; want node-a-ca2 still", cn, err)
	}
}
