package replica

// Hostile review, round 7 (replica side): the owner's write counters that
// anti-entropy relies on (WriteStarting / Replicate). Each test fails on
// the code it was written against; see the report.

import (
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/store"
)

// r7ChecksOf counts the checks of dest the owner handed to its peers.
func r7ChecksOf(c *aeCluster, dest string) int {
	c.peers.mu.Lock()
	defer c.peers.mu.Unlock()
	n := 0
	for _, b := range c.peers.sent {
		if len(b) == 0 || b[0] != wireCheck {
			continue
		}
		if w, err := decodeWire(b); err == nil && len(w) == 1 && w[0].sum.Name == dest {
			n++
		}
	}
	return n
}

// ---------------------------------------------------------------------
// TestReviewR7InterleavedWriteNeverChecked: WriteStarting counts one
// write per *run* of consecutive ops of a bucket (b != last), Replicate
// counts one per bucket of the write (t.need is a map). A write whose ops
// touch a queue, another queue, then the first again (a transaction
// SEND q1, SEND q2, SEND q1; or ACKs of two subscriptions interleaved)
// makes started[q1] one more than writes[q1], for good: quietLocked is
// never true again, and q1 is never checked while this node serves it
// (its replicas' copies are no longer compared, repaired or merged).
func TestReviewR7InterleavedWriteNeverChecked(t *testing.T) {
	c := newAECluster(t, []string{"a", "b"}, "a", "b")
	const q1, q2 = "/queue/r7-one", "/queue/r7-two"
	for _, q := range []string{q1, q2} {
		if err := c.h["a"].n.Adopt(q); err != nil {
			t.Fatal(err)
		}
		sendNumbered(t, c.h["a"], q, 0, 5)
	}
	c.peers.drain()
	c.reps["a"].Wait()
	c.round(t)
	before := r7ChecksOf(c, q1)
	if before == 0 {
		t.Fatal("q1 not checked even before the test")
	}
	// One batch (a transaction): SEND q1, SEND q2, SEND q1.
	ch := make(chan error, 1)
	if err := c.h["a"].n.Apply(&Batch{Sync: true, Sends: []*Message{
		{Dest: q1, Body: []byte("t1")}, {Dest: q2, Body: []byte("t2")}, {Dest: q1, Body: []byte("t3")},
	}}, func(err error) { ch <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	c.peers.drain()
	c.reps["a"].Wait()
	for range 3 {
		c.round(t)
	}
	if got := r7ChecksOf(c, q1) - before; got == 0 {
		r := c.reps["a"]
		r.cntMu.Lock()
		s, w := r.started[q1], r.writes[q1]
		r.cntMu.Unlock()
		t.Fatalf("3 quiet rounds after one write SEND q1, SEND q2, SEND q1: q1 never checked again (started %d, writes %d: never equal)", s, w)
	}
}

// ---------------------------------------------------------------------
// TestReviewR7RoundForgetsStartedWrite: AntiEntropyRound deletes the
// counters of queues not in its owned() snapshot (taken before sendMu).
// A queue adopted just after the snapshot whose first write has begun
// (WriteStarting, under rmu) but not reached Replicate (it waits for
// sendMu, which the round holds) loses started[q] but then gets
// writes[q]++: writes stays one ahead of started for good, and the queue
// is never checked while this node serves it. The gate only holds the
// write between its two counters to make the interleaving deterministic.
func TestReviewR7RoundForgetsStartedWrite(t *testing.T) {
	c := &aeCluster{
		peers: &fakePeers{nodes: map[string]*harness{}, down: map[string]bool{}, epoch: map[string]cluster.EpochID{}, active: []string{"a", "b"}},
		h:     map[string]*harness{}, reps: map[string]*PeerReplicator{},
	}
	const q = "/queue/r7-new"
	var hookMu sync.Mutex
	var hook func()
	gates := map[string]*gateRep{}
	for _, id := range []string{"a", "b"} {
		c.peers.epoch[id] = cluster.EpochID{Counter: 1}
		cfg := smallWindow()
		cfg.NodeID = id
		h := &harness{t: t, dir: t.TempDir(), cfg: cfg}
		h.prepSt = func(n *Node, st *store.Store) {
			r := NewPeerReplicator(2, 1, c.peers.view(id), c.peers, nil)
			r.EnableCatchUp(st)
			owned := func() []string {
				out := n.AdoptedQueues()
				hookMu.Lock()
				f := hook
				hook = nil
				hookMu.Unlock()
				if f != nil {
					f()
				}
				return out
			}
			r.EnableAntiEntropy(st, owned, time.Hour, nil)
			c.reps[id] = r
			g := &gateRep{inner: r}
			gates[id] = g
			n.SetReplicator(g)
		}
		h.start()
		t.Cleanup(h.stop)
		c.h[id] = h
		c.peers.nodes[id] = h
	}
	g := gates["a"]
	sent := make(chan error, 1)
	hookMu.Lock()
	hook = func() {
		// Right after the round's snapshot: the queue is taken over and
		// its first SEND begins.
		if err := c.h["a"].n.Adopt(q); err != nil {
			t.Error(err)
		}
		g.mu.Lock()
		g.armed, g.entered, g.release = true, make(chan struct{}), make(chan struct{})
		g.mu.Unlock()
		go func() { sent <- c.h["a"].send(q, "first") }()
		<-g.entered // WriteStarting done, Replicate not yet
	}
	hookMu.Unlock()
	c.reps["a"].AntiEntropyRound()
	close(g.release)
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, c.h["a"], q, 0, 5)
	c.peers.drain()
	c.reps["a"].Wait()
	c.peers.drain()
	before := r7ChecksOf(c, q)
	for range 3 {
		c.round(t)
	}
	if got := r7ChecksOf(c, q) - before; got == 0 {
		r := c.reps["a"]
		r.cntMu.Lock()
		s, w := r.started[q], r.writes[q]
		r.cntMu.Unlock()
		t.Fatalf("3 quiet rounds: %s never checked (started %d, writes %d: the round dropped started of a write in progress)", q, s, w)
	}
}
