package replica

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/store"
)

// aeCluster is owner a and replicas over fakePeers, R = len(nodes), W = 1,
// with catch-up and anti-entropy (rounds run by the test).
type aeCluster struct {
	peers  *fakePeers
	h      map[string]*harness
	reps   map[string]*PeerReplicator
	mu     sync.Mutex
	extras []string
}

func newAECluster(t *testing.T, active []string, ids ...string) *aeCluster {
	return newRepCluster(t, 1, active, ids...)
}

// newRepCluster is nodes ids over fakePeers, R = len(ids), write quorum
// w, with catch-up and anti-entropy (rounds run by the test).
func newRepCluster(t *testing.T, w int, active []string, ids ...string) *aeCluster {
	c := &aeCluster{
		peers: &fakePeers{nodes: map[string]*harness{}, down: map[string]bool{}, epoch: map[string]cluster.EpochID{}, active: active},
		h:     map[string]*harness{}, reps: map[string]*PeerReplicator{},
	}
	for _, id := range ids {
		c.peers.epoch[id] = cluster.EpochID{Counter: 1}
		cfg := smallWindow()
		cfg.NodeID = id
		h := &harness{t: t, dir: t.TempDir(), cfg: cfg}
		h.prepSt = func(n *Node, st *store.Store) {
			r := NewPeerReplicator(len(ids), w, c.peers.view(id), c.peers, nil)
			r.EnableCatchUp(st)
			r.EnableAntiEntropy(st, n.AdoptedQueues, time.Hour, func(dest string) {
				c.mu.Lock()
				c.extras = append(c.extras, dest)
				c.mu.Unlock()
			})
			c.reps[id] = r
			n.SetReplicator(r)
		}
		h.start()
		t.Cleanup(h.stop)
		c.h[id] = h
		c.peers.nodes[id] = h
	}
	return c
}

// settle runs a round on a, waits for its checks and any catch-up.
func (c *aeCluster) round(t *testing.T) {
	t.Helper()
	c.reps["a"].AntiEntropyRound()
	c.peers.drain()
	c.reps["a"].Wait()
	c.peers.drain()
}

func (c *aeCluster) begins() int {
	c.peers.mu.Lock()
	defer c.peers.mu.Unlock()
	n := 0
	for _, b := range c.peers.sent {
		if len(b) > 0 && b[0] == wireCatchUpBegin {
			n++
		}
	}
	return n
}

// A queue nobody writes to gets a copy on a member that joins its replica
// set: the round's check finds the new member's copy empty and a catch-up
// copies it; the next round finds it complete. Before anti-entropy, such a
// queue was copied only on its next write.
func TestAntiEntropyRepairsIdleQueue(t *testing.T) {
	c := newAECluster(t, []string{"a"}, "a", "b")
	const q = "/queue/idle"
	if err := c.h["a"].n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, c.h["a"], q, 0, 300)
	if got := len(bucketKeys(t, c.h["b"], q)); got != 0 {
		t.Fatalf("b holds %d messages before it is active", got)
	}
	c.peers.mu.Lock()
	c.peers.active = []string{"a", "b"}
	c.peers.mu.Unlock()
	c.round(t)
	want := bucketKeys(t, c.h["a"], q)
	if got := bucketKeys(t, c.h["b"], q); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after a round b holds %d messages, the owner %d", len(got), len(want))
	}
	c.round(t)
	if !c.reps["a"].Synced("b", q) {
		t.Fatal("the second round did not find b's copy complete")
	}
	if n := c.begins(); n != 1 {
		t.Fatalf("%d catch-ups, want 1", n)
	}
}

// A copy that already matches (the owner restarted, or took the queue
// over, and knows nothing of it) is relied on after one check, without
// copying the bucket again.
func TestAntiEntropyMatchingCopyNotCopied(t *testing.T) {
	c := newAECluster(t, []string{"a", "b"}, "a", "b")
	const q = "/queue/same"
	if err := c.h["a"].n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, c.h["a"], q, 0, 200)
	c.peers.drain()
	c.reps["a"].Wait()
	beforeBegins := c.begins()
	// Forget what a knows of b's copy, as a restarted owner would.
	c.reps["a"].stateMu.Lock()
	delete(c.reps["a"].synced, "b")
	c.reps["a"].stateMu.Unlock()
	c.round(t)
	if !c.reps["a"].Synced("b", q) {
		t.Fatal("a matching copy is not relied on after a check")
	}
	if n := c.begins() - beforeBegins; n != 0 {
		t.Fatalf("a matching copy was copied again (%d catch-ups)", n)
	}
}

// A replica holding a message the owner lacks (and has no tombstone for)
// still differs after a rebuild: the owner is told to merge it.
func TestAntiEntropyExtraMessagesMerged(t *testing.T) {
	c := newAECluster(t, []string{"a", "b"}, "a", "b")
	const q = "/queue/extra"
	if err := c.h["a"].n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, c.h["a"], q, 0, 50)
	c.peers.drain()
	extra := AppendOps(nil, []store.Op{{Kind: store.OpPut, Bucket: q, Key: 1 << 63, Value: (&Message{ID: "only-on-b"}).encode()}})
	ch := make(chan error, 1)
	if err := c.h["b"].n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 1}, extra, func(err error) { ch <- err }); err != nil || <-ch != nil {
		t.Fatal("b's extra message not stored")
	}
	for range 3 {
		c.round(t)
	}
	time.Sleep(50 * time.Millisecond) // onExtra runs on its own goroutine
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.extras) == 0 || c.extras[0] != q {
		t.Fatalf("owner not told to merge b's extra message (calls: %v)", c.extras)
	}
	if got := bucketKeys(t, c.h["b"], q); len(got) != 51 {
		t.Fatalf("b holds %d messages, want the owner's 50 and its own", len(got))
	}
}

// A check that travels with other ops, or does not decode, is refused
// whole.
func TestCheckDecoding(t *testing.T) {
	sum := store.BucketStats{Name: "/queue/x", Count: 3, Bytes: 99, KeyHash: 0xdeadbeef}
	b := appendCheck(nil, "/queue/x", sum)
	w, err := decodeWire(b)
	if err != nil || len(w) != 1 || w[0].sum != sum {
		t.Fatalf("round trip: %+v, %v", w, err)
	}
	for i := 1; i < len(b); i++ {
		if _, err := decodeWire(b[:i]); err == nil {
			t.Fatalf("a check cut at %d bytes decodes", i)
		}
	}
	h := newHarness(t, smallWindow())
	both := append(appendCheck(nil, "/queue/x", sum), appendWire(nil, wireDelete, &store.Op{Bucket: "/queue/x", Key: 1})...)
	if err := h.n.ApplyReplicated(cluster.EpochID{}, cluster.EpochID{}, both, func(error) {}); err == nil {
		t.Fatal("a check with another op is applied")
	}
	if _, err := DecodeOps(b); err == nil {
		t.Fatal("DecodeOps accepts a check as a plain op")
	}
}
