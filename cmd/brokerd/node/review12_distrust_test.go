package node

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/test/tlstest"
	gostomp "github.com/go-stomp/stomp/v3"
)

// review12Bucket is how many messages node n's store holds for dest (its
// own queue or a replica's copy).
func review12Bucket(t *testing.T, n *Node, dest string) int64 {
	t.Helper()
	bs, err := n.st.Buckets()
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bs {
		if b.Name == dest {
			return b.Count
		}
	}
	return 0
}

// TestReview12DistrustedPeersSplitBrain: linkState counts a peer link
// refused by TLS (or by the HMAC key) as "the peer's process refuses
// connections": out of placement and out of take-over pulls. That is
// sound for ECONNREFUSED (every node sees the same refusal), but a TLS
// refusal is one-sided: the node whose certificate the others refuse (an
// expired certificate, a botched reload, a wrong CA) sees every other
// member as refused, so in its own view it is the only active member and
// the owner of every queue. It takes queues over without pulling from
// anyone and serves its stale replica copies: messages the rest of the
// cluster acknowledged (with a receipt) are delivered again.
//
// Scenario: a, b, c with R = 3; 20 receipted SENDs through a reach every
// copy; c stops; the 20 are consumed and acknowledged through a (receipted
// DISCONNECT); c restarts on its data directory with a certificate the
// cluster's CA did not sign (as an expired one would be refused). A
// consumer on c must not get any of the acknowledged messages.
func TestReview12DistrustedPeersSplitBrain(t *testing.T) {
	if testing.Short() {
		t.Skip("three nodes")
	}
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "cluster")
	foreign := tlstest.NewCA(t, dir, "foreign")
	keyFile := writeKeyFile(t, bytes.Repeat([]byte{5}, 32))
	var cfgs []config.Config
	for _, name := range []string{"a", "b", "c"} {
		cfg := withPeerTLS(clusterTestConfig(t, name, keyFile), ca, ca.Issue(t, "node-"+name, nil))
		cfg.Replica.Factor = 3
		cfg.Replica.WriteQuorum = 2
		cfgs = append(cfgs, cfg)
	}
	nodes := startCluster(t, cfgs...)
	a, c := nodes[0], nodes[2]
	waitAgreement(t, 20*time.Second, nodes)

	const q = "/queue/review12-distrust"
	const n = 20
	conn, err := dialSTOMP(a.n.STOMPAddr())
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		if err := conn.Send(q, "text/plain", []byte(fmt.Sprintf("m%d", i)), gostomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	_ = conn.Disconnect()
	waitUntil(t, "c holds a copy of every message", func() bool { return review12Bucket(t, c.n, q) == n })

	c.stop()
	waitAgreement(t, 20*time.Second, nodes[:2])

	// Consume and acknowledge every message through a; the receipted
	// DISCONNECT covers the ACKs.
	conn, err = dialSTOMP(a.n.STOMPAddr())
	if err != nil {
		t.Fatal(err)
	}
	sub, err := conn.Subscribe(q, gostomp.AckClientIndividual)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		select {
		case m := <-sub.C:
			if m.Err != nil {
				t.Fatal(m.Err)
			}
			if err := conn.Ack(m); err != nil {
				t.Fatal(err)
			}
		case <-time.After(15 * time.Second):
			t.Fatalf("only %d of %d delivered through a", i, n)
		}
	}
	if err := conn.Disconnect(); err != nil {
		t.Fatal(err)
	}

	// c comes back on its data directory with a certificate the
	// cluster's CA did not sign.
	c.cfg = withPeerTLS(c.cfg, ca, foreign.Issue(t, "node-c-bad", nil))
	c.start()
	waitAgreement(t, 20*time.Second, nodes)
	time.Sleep(time.Second) // its links are refused; linkState marks the peers

	vc, va := c.n.rt.refresh(), a.n.rt.refresh()
	t.Logf("owner of %s: in c's view %s (active %v), in a's view %s (active %v)", q,
		c.n.rt.ownerOf(vc, q), vc.active, a.n.rt.ownerOf(va, q), va.active)

	conn, err = dialSTOMP(c.n.STOMPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Disconnect()
	sub, err = conn.Subscribe(q, gostomp.AckAuto)
	if err != nil {
		t.Fatal(err)
	}
	got := 0
	timeout := time.After(5 * time.Second)
loop:
	for {
		select {
		case m := <-sub.C:
			if m.Err != nil {
				t.Logf("consumer on c: %v", m.Err)
				break loop
			}
			got++
		case <-timeout:
			break loop
		}
	}
	if got > 0 {
		t.Fatalf("a node whose certificate the cluster refuses owns %s in its own view and delivered %d of %d messages acknowledged (receipted) through the cluster", q, got, n)
	}
}
