package node

import (
	"bytes"
	"net/http"
	"testing"
	"time"
)

// TestReview12KeyRotationStrandsAbsentMember: the admin API's key
// operations ask only the alive (and suspect) members. A member that is
// down (restarting, partitioned, paused) is listed under not_reached, but
// the answer still says ok (GossipKeys.OK counts only the nodes asked, so
// `brokerd gossip-keys` exits 0 although its help promises status 1 "for
// an operation that did not reach every node"); use and remove are not
// refused for it either (keyPrecheck looks at the alive nodes only). So
// install, use, remove run while one member is away leave that member
// with only the removed key: when it comes back it can neither gossip nor
// open a peer link, and the cluster has lost it until an operator copies
// a keyring file by hand.
func TestReview12KeyRotationStrandsAbsentMember(t *testing.T) {
	if testing.Short() {
		t.Skip("three nodes")
	}
	k1, k2 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	keyFile := writeKeyFile(t, k1)
	nodes := startCluster(t,
		clusterTestConfig(t, "a", keyFile),
		clusterTestConfig(t, "b", keyFile),
		clusterTestConfig(t, "c", keyFile))
	waitAgreement(t, 20*time.Second, nodes)
	a, c := nodes[0].n, nodes[2]

	c.stop() // away for a while (a restart, a partition)
	waitAgreement(t, 20*time.Second, nodes[:2])

	var oks []bool
	for _, step := range []struct {
		op  string
		key []byte
	}{{keyOpInstall, k2}, {keyOpUse, k2}, {keyOpRemove, k1}} {
		var res GossipKeys
		code, body := keysCall(t, a, http.MethodPost, "/v1/gossip-keys/"+step.op, step.key, &res)
		t.Logf("%s with c away: %d ok=%v not_reached=%d", step.op, code, res.OK, len(res.NotReached))
		if code == http.StatusOK {
			oks = append(oks, res.OK)
		} else {
			t.Logf("refused: %s", body)
		}
	}

	c.cfg.Cluster.Join = []string{a.Cluster().GossipAddr()}
	c.start()
	deadline := time.Now().Add(15 * time.Second)
	for agreement(nodes) != "" {
		if time.Now().After(deadline) {
			t.Fatalf("the key operations answered ok=%v while c was away (listed as not reached, yet ok), and removed the only key c has: c cannot rejoin (%s)", oks, agreement(nodes))
		}
		time.Sleep(50 * time.Millisecond)
	}
}
