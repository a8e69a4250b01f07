package replica

// Hostile review (tombstones, anti-entropy, no-sync removals). Each test
// fails on the code it was written against; see the report.

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/store"
)

// r6Peers is fakePeers with a hook run (on its own goroutine) after a
// check is handed to a peer.
type r6Peers struct {
	*fakePeers
	mu      sync.Mutex
	onCheck func(peer string)
}

func (p *r6Peers) Append(peer string, epoch cluster.EpochID, body []byte, done func(error)) {
	p.fakePeers.Append(peer, epoch, body, done)
	if len(body) > 0 && body[0] == wireCheck {
		p.mu.Lock()
		f := p.onCheck
		p.mu.Unlock()
		if f != nil {
			go f(peer)
		}
	}
}

// r6AECluster is newAECluster over r6Peers.
func r6AECluster(t *testing.T, ids ...string) (*aeCluster, *r6Peers) {
	c := &aeCluster{
		peers: &fakePeers{nodes: map[string]*harness{}, down: map[string]bool{}, epoch: map[string]cluster.EpochID{}, active: ids},
		h:     map[string]*harness{}, reps: map[string]*PeerReplicator{},
	}
	hp := &r6Peers{fakePeers: c.peers}
	for _, id := range ids {
		c.peers.epoch[id] = cluster.EpochID{Counter: 1}
		cfg := smallWindow()
		cfg.NodeID = id
		h := &harness{t: t, dir: t.TempDir(), cfg: cfg}
		h.prepSt = func(n *Node, st *store.Store) {
			r := NewPeerReplicator(len(ids), 1, c.peers.view(id), hp, nil)
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
	return c, hp
}

// TestReviewR6CheckRacesNextWrite: the replica compares the owner's
// summary with its copy "as of the same writes", but it reads its copy
// (Node.check: a Barrier, then a goroutine calling store.Bucket) after it
// has gone on applying the batches that follow the check on the FIFO
// link: the read sees writes the owner sent after the summary. Under
// normal load (a queue written a little after each check) a complete copy
// is reported diverged, the owner copies the whole bucket (and every
// tombstone) again, and two such checks in a row make the owner "merge"
// the queue (onExtra: a take-over again, every subscriber rebinds and
// every unacknowledged message is redelivered), though nothing differs.
//
// Here every round is followed by one SEND to the queue (sent the moment
// the check is on the link, as a producer would). Copies match
// throughout; no check may report a divergence.
func TestReviewR6CheckRacesNextWrite(t *testing.T) {
	c, hp := r6AECluster(t, "a", "b")
	const q = "/queue/ae-race"
	if err := c.h["a"].n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, c.h["a"], q, 0, 20)
	c.peers.drain()
	c.reps["a"].Wait()
	c.round(t) // b's copy is relied on
	if !c.reps["a"].Synced("b", q) {
		t.Fatal("b's copy is not synced before the test")
	}
	base := c.reps["a"].checks[1].Load()
	var wg sync.WaitGroup
	i := 0
	hp.mu.Lock()
	hp.onCheck = func(peer string) {
		defer wg.Done()
		i++
		if err := c.h["a"].send(q, fmt.Sprint("late-", i)); err != nil {
			t.Error(err)
		}
	}
	hp.mu.Unlock()
	const rounds = 40
	for r := 0; r < rounds; r++ {
		wg.Add(1)
		c.reps["a"].AntiEntropyRound()
		wg.Wait()
		c.peers.drain()
		c.reps["a"].Wait()
		c.peers.drain()
		if d := c.reps["a"].checks[1].Load() - base; d > 0 {
			a, b := bucketKeys(t, c.h["a"], q), bucketKeys(t, c.h["b"], q)
			c.mu.Lock()
			extras := len(c.extras)
			c.mu.Unlock()
			t.Fatalf("after %d rounds: %d checks found b's copy diverged (a full catch-up each; onExtra merges so far: %d), though b holds the owner's keys (a %d, b %d, equal %v): the replica read its copy after applying the SEND that followed the check",
				r+1, d, extras, len(a), len(b), fmt.Sprint(a) == fmt.Sprint(b))
		}
	}
}

// TestReviewR6FalseMergeUnderLoad: the consequence of the race above over
// a few rounds. diverged[(peer, queue)] is reset only by a matching check,
// so two false divergences in a row (the catch-up between them changes
// nothing) call onExtra: the owner takes the queue over again (router
// merge), its subscribers bind again and every unacknowledged message
// comes back redelivered, though the replica holds nothing the owner
// lacks.
func TestReviewR6FalseMergeUnderLoad(t *testing.T) {
	c, hp := r6AECluster(t, "a", "b")
	const q = "/queue/ae-merge"
	if err := c.h["a"].n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, c.h["a"], q, 0, 20)
	c.peers.drain()
	c.reps["a"].Wait()
	c.round(t)
	var wg sync.WaitGroup
	i := 0
	hp.mu.Lock()
	hp.onCheck = func(peer string) {
		defer wg.Done()
		i++
		if err := c.h["a"].send(q, fmt.Sprint("late-", i)); err != nil {
			t.Error(err)
		}
	}
	hp.mu.Unlock()
	for r := 0; r < 40; r++ {
		wg.Add(1)
		c.reps["a"].AntiEntropyRound()
		wg.Wait()
		c.peers.drain()
		c.reps["a"].Wait()
		c.peers.drain()
		time.Sleep(5 * time.Millisecond) // onExtra runs on its own goroutine
		c.mu.Lock()
		extras := append([]string(nil), c.extras...)
		c.mu.Unlock()
		if len(extras) > 0 {
			a, b := bucketKeys(t, c.h["a"], q), bucketKeys(t, c.h["b"], q)
			t.Fatalf("after %d rounds the owner was told to merge %v (a take-over again, all unacknowledged messages redelivered); b's copy is the owner's (a %d keys, b %d, equal %v)",
				r+1, extras, len(a), len(b), fmt.Sprint(a) == fmt.Sprint(b))
		}
	}
}

// gateRep is a Replicator that can hold one Replicate call (the moment
// between Node.write's local Submit and the replicator taking sendMu).
type gateRep struct {
	inner   *PeerReplicator
	mu      sync.Mutex
	armed   bool
	entered chan struct{}
	release chan struct{}
}

func (g *gateRep) Replicate(ops []store.Op, sync bool, quorum func(error)) {
	g.mu.Lock()
	armed := g.armed
	g.armed = false
	g.mu.Unlock()
	if armed {
		close(g.entered)
		<-g.release
	}
	g.inner.Replicate(ops, sync, quorum)
}

// TestReviewR6SummaryIncludesUnsentWrite: the owner's side of the same
// race. AntiEntropyRound skips a queue written "between the two" by
// comparing p.writes, which Replicate increments under sendMu; but
// Node.write submits to the local store first and calls Replicate after
// (replica/node.go write: Submit, then Replicate). A write whose Submit
// is before the round's Barrier/Bucket and whose Replicate takes sendMu
// after the check was appended (sendMu is contended: the round itself
// holds it per peer, catch-ups hold it per chunk) is in the summary and
// behind the check on the link: a complete copy is reported diverged.
// The gate below only widens that window to make the test deterministic.
func TestReviewR6SummaryIncludesUnsentWrite(t *testing.T) {
	c := &aeCluster{
		peers: &fakePeers{nodes: map[string]*harness{}, down: map[string]bool{}, epoch: map[string]cluster.EpochID{}, active: []string{"a", "b"}},
		h:     map[string]*harness{}, reps: map[string]*PeerReplicator{},
	}
	gates := map[string]*gateRep{}
	for _, id := range []string{"a", "b"} {
		c.peers.epoch[id] = cluster.EpochID{Counter: 1}
		cfg := smallWindow()
		cfg.NodeID = id
		h := &harness{t: t, dir: t.TempDir(), cfg: cfg}
		h.prepSt = func(n *Node, st *store.Store) {
			r := NewPeerReplicator(2, 1, c.peers.view(id), c.peers, nil)
			r.EnableCatchUp(st)
			r.EnableAntiEntropy(st, n.AdoptedQueues, time.Hour, nil)
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
	const q = "/queue/ae-unsent"
	if err := c.h["a"].n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, c.h["a"], q, 0, 20)
	c.peers.drain()
	c.reps["a"].Wait()
	c.round(t)
	if !c.reps["a"].Synced("b", q) {
		t.Fatal("b's copy is not synced before the test")
	}
	base := c.reps["a"].checks[1].Load()
	g := gates["a"]
	g.mu.Lock()
	g.armed, g.entered, g.release = true, make(chan struct{}), make(chan struct{})
	g.mu.Unlock()
	sent := make(chan error, 1)
	go func() { sent <- c.h["a"].send(q, "between") }()
	<-g.entered // submitted locally, not yet handed to the replicator
	c.reps["a"].AntiEntropyRound()
	close(g.release)
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	c.peers.drain()
	c.reps["a"].Wait()
	c.peers.drain()
	a, b := bucketKeys(t, c.h["a"], q), bucketKeys(t, c.h["b"], q)
	if d := c.reps["a"].checks[1].Load() - base; d > 0 {
		t.Fatalf("a check found b's copy diverged (a full catch-up begun) though the only difference was a write already on its way (a %d keys, b %d, equal %v)", len(a), len(b), fmt.Sprint(a) == fmt.Sprint(b))
	}
}

// TestReviewR6CatchUpTombstoneBatchOverLinkLimit: a catch-up sends the
// queue's tombstones in batches of catchUpTombstones (8192), bounded by
// count only, each op carrying the queue's name. With a name of 2 KiB (a
// STOMP destination header may be 8 KiB) a batch is over the peer link's
// body limit (16 MiB: stomp.DefaultPeerLimits; the peer client refuses to
// send it), so the catch-up fails at its first batch, every time: the
// replica's copy is never rebuilt (retried every 5 s for ever, each retry
// reading every tombstone again). Messages are chunked by bytes
// (catchUpBytes); tombstones must be too.
func TestReviewR6CatchUpTombstoneBatchOverLinkLimit(t *testing.T) {
	c := newAECluster(t, []string{"a"}, "a", "b")
	q := "/queue/" + strings.Repeat("t", 2100)
	if err := c.h["a"].n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, c.h["a"], q, 0, 1)
	ops := make([]store.Op, 0, catchUpTombstones)
	for k := uint64(1); k <= catchUpTombstones; k++ {
		ops = append(ops, store.Op{Kind: store.OpTombstone, Bucket: q, Key: k})
	}
	if err := c.h["a"].st.Apply(ops); err != nil {
		t.Fatal(err)
	}
	c.peers.mu.Lock()
	c.peers.active = []string{"a", "b"}
	before := len(c.peers.sent)
	c.peers.mu.Unlock()
	c.round(t)
	c.peers.mu.Lock()
	largest := 0
	for _, b := range c.peers.sent[before:] {
		largest = max(largest, len(b))
	}
	c.peers.mu.Unlock()
	const peerBodyLimit = 16 << 20 // stomp.DefaultPeerLimits().MaxBodySize
	if largest > peerBodyLimit {
		t.Fatalf("a catch-up batch of %d bytes (%d tombstones of a %d-byte queue name): over the peer link's %d-byte limit, the catch-up can never complete",
			largest, catchUpTombstones, len(q), peerBodyLimit)
	}
}

// TestReviewR6PeerTombstoneLongNameFailsStore: a peer's batch with one
// tombstone of a queue whose name is just under bbolt's key limit passes
// decodeWire (names up to 64 KiB) and store.validateOp (which checks the
// queue bucket's key, "q:"+name), so the replica submits it; the applier
// then cannot store the tombstone's key (uvarint length + name + 8 bytes
// is over bolt.MaxKeySize) and the store fails for good. The node exits
// (fail-stop) and, the record being in its log, fails again at every
// replay: one crafted append bricks a replica.
func TestReviewR6PeerTombstoneLongNameFailsStore(t *testing.T) {
	scfg := store.DefaultConfig(filepath.Join(t.TempDir(), "r.db"))
	scfg.Weigh = StoredBodyLen
	scfg.Logger = slog.New(slog.DiscardHandler)
	st, err := store.Open(scfg)
	if err != nil {
		t.Fatal(err)
	}
	st.Start()
	defer st.Close()
	cfg := smallWindow()
	cfg.Logger = slog.New(slog.DiscardHandler)
	n := New(cfg, st)
	if err := n.Recover(); err != nil {
		t.Fatal(err)
	}
	n.Start()
	defer n.Close()
	h := &harness{st: st, n: n}
	q := "/queue/" + strings.Repeat("z", 32768-len("q:")-len("/queue/"))
	body := appendWire(nil, wireTombstone, &store.Op{Bucket: q, Key: 1})
	ch := make(chan error, 1)
	if err := h.n.ApplyReplicated(cluster.EpochID{}, cluster.EpochID{}, body, func(err error) { ch <- err }); err != nil {
		return // refused whole: fine
	}
	<-ch
	if _, err := h.st.Buckets(); err != nil || h.st.Err() != nil {
		msg := fmt.Sprint(h.st.Err())
		if len(msg) > 120 {
			msg = msg[:60] + "..." + msg[len(msg)-40:]
		}
		t.Fatalf("one tombstone from a peer failed the replica's store for good: %s", msg)
	}
}

// TestReviewR6CatchUpOutlivesOwnership: a check refused by the replica
// because it serves the queue itself (ErrOwnedHere: views differ during a
// failover or a healed partition) counts as "failed" and starts a
// catch-up (checked). Nothing stops it when this node then releases the
// queue: catchUp only checks that both nodes are still in the queue's
// replica set, so the former owner keeps beginning a copy of its stale
// bucket to the new owner, which refuses it, every few seconds for as
// long as the membership stays the same (a store barrier, a scan of
// every tombstone, a warning each time). Release must end the
// replicator's catch-ups of a queue this node no longer owns.
func TestReviewR6CatchUpOutlivesOwnership(t *testing.T) {
	c := newAECluster(t, []string{"a", "b"}, "a", "b")
	const q = "/queue/moved"
	if err := c.h["a"].n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, c.h["a"], q, 0, 5)
	c.peers.drain()
	c.reps["a"].Wait()
	// b's view moved first: it serves q (its take-over adopted it).
	if err := c.h["b"].n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	c.reps["a"].AntiEntropyRound() // refused by b: owned here
	// a's view catches up: it releases q.
	c.h["a"].n.Release(q)
	time.Sleep(100 * time.Millisecond)
	c.peers.mu.Lock()
	before := len(c.peers.sent)
	c.peers.mu.Unlock()
	time.Sleep(1500 * time.Millisecond)
	c.peers.mu.Lock()
	var begins int
	for _, b := range c.peers.sent[before:] {
		if len(b) > 0 && b[0] == wireCatchUpBegin {
			begins++
		}
	}
	c.peers.mu.Unlock()
	c.reps["a"].stateMu.Lock()
	running := c.reps["a"].running[[2]string{"b", q}]
	c.reps["a"].stateMu.Unlock()
	if running || begins > 0 {
		t.Fatalf("1.5 s after a released %s its replicator still rebuilds b's copy (running %v, %d catch-up begins sent to b, which serves it and refuses each)", q, running, begins)
	}
}

// WriteStarting passes the node's write count through (the replicator
// needs it to tell a queue written during a round).
func (g *gateRep) WriteStarting(ops []store.Op) { g.inner.WriteStarting(ops) }
