package replica

// Review of the replication commits (d261e90..4fa1110). Every test here
// demonstrates a suspected defect and fails on the code as reviewed.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/store"
)

// ---------------------------------------------------------------------
// Redelivered marking

// deliverLocked marks a delivery redelivered when m.Seq <= d.inheritedTo.
// Topic messages are never stored: their Seq is 0, and a topic's
// inheritedTo is 0, so 0 <= 0 marks EVERY topic message redelivered, on
// every node, replicated or not.
func TestReview2TopicMessageNotRedelivered(t *testing.T) {
	h := newHarness(t, smallWindow())
	c := newCollector()
	if _, err := h.n.Subscribe(SubOptions{Dest: "/topic/t", Ack: AckAuto, Deliver: c.deliver}); err != nil {
		t.Fatal(err)
	}
	if err := h.send("/topic/t", "hello"); err != nil {
		t.Fatal(err)
	}
	got := c.wait(t, 1)
	if got[0].Redelivered {
		t.Fatalf("a fresh topic message (Seq %d, inheritedTo %d) delivered with Redelivered=true", got[0].Msg.Seq, got[0].Sub.(*Subscription).d.inheritedTo)
	}
}

// ---------------------------------------------------------------------
// A destination that exists on a replica before Adopt

// failOver stops the owner and makes the replica the only active member.
func failOver(owner *harness, peers *fakePeers) {
	owner.stop()
	peers.mu.Lock()
	peers.down["a"] = true
	peers.active = []string{"b"}
	peers.epoch["b"] = cluster.EpochID{Counter: 2}
	peers.mu.Unlock()
}

// Clients of a dead owner reconnect to another node and SUBSCRIBE (or
// SEND) there; that creates an empty destination (onDisk 0). When
// membership then makes this node the owner, Adopt finds the destination
// in n.dests and returns nil having done nothing: the replica's copy is
// never counted or delivered (and Recover, with a Replicator, skips it
// after a restart too).
func TestReview2SubscribeBeforeAdoptHidesInheritedMessages(t *testing.T) {
	owner, replica, peers := cluster2(t, 2)
	const q = "/queue/reconnect"
	if err := owner.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, owner, q, 0, 10)
	failOver(owner, peers)

	c := newCollector()
	if _, err := replica.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Deliver: c.deliver}); err != nil {
		t.Fatal(err)
	}
	if err := replica.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		c.mu.Lock()
		n := len(c.got)
		c.mu.Unlock()
		if n == 10 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	info := replica.info(q)
	t.Fatalf("after Adopt the new owner serves pending=%d in_flight=%d of the 10 messages its store holds", info.Pending, info.InFlight)
}

// A destination created on a replica by a client (SUBSCRIBE then
// UNSUBSCRIBE, no forwarding yet) counts nothing of the replica's copy, so
// it looks idle; the sweeper's removeIdle then deletes the bucket, which is
// the replica's copy of the owner's queue, and replicates that bucket
// delete to the queue's other replicas. After a failover the messages are
// gone although every SEND got its W=2 quorum.
func TestReview2IdleRemovalOnReplicaDeletesReplicaCopy(t *testing.T) {
	owner, replica, peers := cluster2(t, 2)
	const q = "/queue/stray"
	if err := owner.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, owner, q, 0, 10)

	s, err := replica.n.Subscribe(SubOptions{Dest: q, Ack: AckAuto, Deliver: func(Delivery) {}})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	replica.n.mu.Lock()
	d := replica.n.dests[q]
	replica.n.mu.Unlock()
	replica.n.removeIdle(d) // what the sweeper does after queue.idle_delete_after
	ch := make(chan error, 1)
	replica.n.Barrier(func(err error) { ch <- err })
	if err := <-ch; err != nil {
		t.Fatal(err)
	}

	failOver(owner, peers)
	if err := replica.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	if p := replica.info(q).Pending; p != 10 {
		t.Fatalf("the replica's copy holds %d of the 10 quorum-acknowledged messages after its idle sweep", p)
	}
}

// ---------------------------------------------------------------------
// Adopt vs ApplyReplicated

// Adopt reads the store's bucket statistics before it takes wmu; an
// ApplyReplicated that runs in between passes the ErrOwnedHere check (no
// destination yet), commits, and is then not counted by Adopt: the
// destination's onDisk/countedTo stop short of the bucket, so those
// messages are never delivered (and the queue can even look idle and have
// its bucket deleted).
func TestReview2AdoptRacesApplyReplicated(t *testing.T) {
	_, replica, _ := cluster2(t, 2)
	put := func(q string, from, to uint64) []byte {
		var ops []store.Op
		for k := from; k <= to; k++ {
			ops = append(ops, store.Op{Kind: store.OpPut, Bucket: q, Key: k,
				Value: (&Message{ID: fmt.Sprintf("a-%d", k), Body: []byte("x")}).encode()})
		}
		return AppendOps(nil, ops)
	}
	bucketCount := func(q string) int64 {
		bs, err := replica.st.Buckets()
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range bs {
			if b.Name == q {
				return b.Count
			}
		}
		return 0
	}
	accepted, lost := 0, 0
	for i := 0; i < 200 && lost == 0; i++ {
		q := fmt.Sprintf("/queue/adopt%d", i)
		base := uint64(i*100 + 1)
		ch := make(chan error, 1)
		if err := replica.n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 1}, put(q, base, base+4), func(err error) { ch <- err }); err != nil {
			t.Fatal(err)
		}
		if err := <-ch; err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		applied := make(chan error, 1)
		wg.Add(2)
		go func() {
			defer wg.Done()
			if err := replica.n.Adopt(q); err != nil {
				t.Error(err)
			}
		}()
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i%10) * 50 * time.Microsecond)
			if err := replica.n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 1}, put(q, base+5, base+9), func(err error) { applied <- err }); err != nil {
				applied <- err
			}
		}()
		wg.Wait()
		if err := <-applied; errors.Is(err, ErrOwnedHere) {
			continue // refused: correct
		} else if err != nil {
			t.Fatal(err)
		}
		accepted++
		if got, want := int64(replica.info(q).Pending), bucketCount(q); got != want {
			lost++
			t.Errorf("iteration %d: append accepted during Adopt; the adopted queue counts %d pending, its bucket holds %d", i, got, want)
		}
	}
	t.Logf("%d appends accepted concurrently with Adopt", accepted)
}

// ---------------------------------------------------------------------
// Quorum counting

type confirmPeers struct {
	mu   sync.Mutex
	ok   map[string]bool
	sent []string
}

func (p *confirmPeers) Append(peer string, _ cluster.EpochID, _ []byte, done func(error)) {
	p.mu.Lock()
	ok := p.ok[peer]
	p.sent = append(p.sent, peer)
	p.mu.Unlock()
	if ok {
		done(nil)
	} else {
		done(errors.New("peer unreachable"))
	}
}

func replicateOne(t *testing.T, r *PeerReplicator, q string) error {
	t.Helper()
	ch := make(chan error, 1)
	r.Replicate([]store.Op{{Kind: store.OpPut, Bucket: q, Key: 1, Value: (&Message{}).encode()}}, true, func(err error) { ch <- err })
	select {
	case err := <-ch:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("quorum never called")
		return nil
	}
}

// When the writing node is not in the queue's replica set (an observer,
// or an active member R does not pick for this queue: today any node
// serves any queue a client names), "the local copy counts" still lowers
// the need to W-1: with R=2, W=2 one of the two replicas confirming is
// taken as a quorum, so the replica set holds one copy. Once that replica
// fails, the RECEIPTed message is on no replica of its queue.
func TestReview2QuorumCountsSelfOutsideReplicaSet(t *testing.T) {
	active := []string{"a", "b", "c"}
	var q string
	for i := 0; ; i++ {
		q = fmt.Sprintf("/queue/x%d", i)
		set := ReplicaSet(q, active, 2)
		if set[0] != "a" && set[1] != "a" {
			break
		}
	}
	set := ReplicaSet(q, active, 2)
	peers := &confirmPeers{ok: map[string]bool{set[0]: true, set[1]: false}}
	r := NewPeerReplicator(2, 2, func() View { return View{Self: "a", Active: active, Epoch: cluster.EpochID{Counter: 1}} }, peers, nil)
	if err := replicateOne(t, r, q); err == nil {
		t.Fatalf("R=2 W=2, writer %q outside the replica set %v, only %s confirmed: quorum reported met", "a", set, set[0])
	}
}

// ReplicaSet caps R at the active members, and WriteQuorum(len(set), w)
// then replaces an explicit W above that with a majority of the smaller
// set: with W=2 configured and the other replica gone from the active set,
// every write is RECEIPTed with the local copy only.
func TestReview2QuorumLoweredWhenActiveBelowR(t *testing.T) {
	peers := &confirmPeers{ok: map[string]bool{}}
	r := NewPeerReplicator(2, 2, func() View { return View{Self: "a", Active: []string{"a"}, Epoch: cluster.EpochID{Counter: 2}} }, peers, nil)
	if err := replicateOne(t, r, "/queue/q"); err == nil {
		t.Fatal("W=2 configured, one active member: quorum reported met with a single copy")
	}
}

// ---------------------------------------------------------------------
// Barrier and replication

// holdPeers is fakePeers that, while hold is set, keeps appends (neither
// applied nor confirmed) until release.
type holdPeers struct {
	*fakePeers
	hmu  sync.Mutex
	hold bool
	held []func()
}

func (p *holdPeers) Append(peer string, epoch cluster.EpochID, body []byte, done func(error)) {
	p.hmu.Lock()
	if p.hold {
		p.held = append(p.held, func() { p.fakePeers.Append(peer, epoch, body, done) })
		p.hmu.Unlock()
		return
	}
	p.hmu.Unlock()
	p.fakePeers.Append(peer, epoch, body, done)
}

// Node.write documents "With sync and no ops it is a barrier: every
// earlier write is durable here and, replicated, on the replicas it was
// sent to", and the session relies on Barrier for UNSUBSCRIBE (delivery
// counts and dead-letter moves written by Close) and DISCONNECT receipts.
// PeerReplicator.Replicate(nil, ...) calls quorum(nil) at once, so
// Barrier returns while the Close's writes have reached no replica.
func TestReview2BarrierDoesNotWaitForReplication(t *testing.T) {
	fp := &fakePeers{nodes: map[string]*harness{}, down: map[string]bool{}, epoch: map[string]cluster.EpochID{"a": {Counter: 1}, "b": {Counter: 1}}, active: []string{"a", "b"}}
	hp := &holdPeers{fakePeers: fp}
	mk := func(id string) *harness {
		cfg := smallWindow()
		cfg.NodeID = id
		cfg.MaxRedeliveries = 1
		h := &harness{t: t, dir: t.TempDir(), cfg: cfg}
		h.prep = func(n *Node) {
			n.SetReplicator(NewPeerReplicator(2, 2, fp.view(id), hp, slog.New(slog.DiscardHandler)))
		}
		h.start()
		t.Cleanup(h.stop)
		return h
	}
	owner, replica := mk("a"), mk("b")
	fp.nodes["a"], fp.nodes["b"] = owner, replica
	const q = "/queue/unsub"
	if err := owner.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	if err := owner.send(q, "m"); err != nil {
		t.Fatal(err)
	}
	c := newCollector()
	sub, err := owner.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Deliver: c.deliver})
	if err != nil {
		t.Fatal(err)
	}
	c.wait(t, 1) // written, not acknowledged
	hp.hmu.Lock()
	hp.hold = true
	hp.hmu.Unlock()
	sub.Close() // the delivery-count rewrite, replicated without waiting
	ch := make(chan error, 1)
	owner.n.Barrier(func(err error) { ch <- err })
	select {
	case err := <-ch:
		hp.hmu.Lock()
		n := len(hp.held)
		hp.hmu.Unlock()
		if err == nil && n > 0 {
			t.Errorf("Barrier succeeded while %d earlier replicated write(s) were neither applied nor confirmed by the replica", n)
		}
	case <-time.After(500 * time.Millisecond):
		// Waiting is the documented behaviour.
	}
	hp.hmu.Lock()
	hp.hold = false
	held := hp.held
	hp.held = nil
	hp.hmu.Unlock()
	for _, f := range held {
		f()
	}
}

// ---------------------------------------------------------------------
// Callbacks under Node locks

// Before replication, Apply's and Barrier's done ran on the store's
// completion goroutine with no Node lock held (and the store explicitly
// supports Submitting from a callback). Now the quorum half of join2 can
// be the last to run, synchronously inside Replicate, i.e. with Node.rmu
// (and, from commit, Node.wmu) held: whenever the local commit finishes
// before Replicate reaches settle (always for W=1 or an op-less Barrier
// when view() takes a moment), done runs under rmu, and a done that calls
// back into the Node (Barrier, Apply, a subscription's Close) deadlocks.
func TestReview2DoneRunsUnderRmu(t *testing.T) {
	cfg := smallWindow()
	h := &harness{t: t, dir: t.TempDir(), cfg: cfg}
	view := func() View {
		time.Sleep(20 * time.Millisecond) // a membership lookup that takes a moment
		return View{Self: "a", Active: []string{"a"}, Epoch: cluster.EpochID{Counter: 1}}
	}
	h.prep = func(n *Node) {
		n.SetReplicator(NewPeerReplicator(1, 1, view, &confirmPeers{}, nil))
	}
	h.start()
	t.Cleanup(h.stop)

	inner := make(chan error, 1)
	go h.n.Barrier(func(error) {
		h.n.Barrier(func(err error) { inner <- err })
	})
	select {
	case <-inner:
	case <-time.After(5 * time.Second):
		h.open = false // leave the deadlocked goroutine; do not wait on it
		t.Fatal("a Barrier called from a Barrier's done deadlocked: done ran with Node.rmu held")
	}
}

// Store.Submit on a closed store calls done synchronously, i.e. under
// rmu inside Node.write; commit's finish then takes destination.mu
// (unreserve). flushRewritesLocked takes rmu with destination.mu held: a
// lock-order cycle rmu -> d.mu -> rmu (the documented order is wmu,
// destination.mu, rmu). A SEND and a subscription Close racing at
// shutdown (or any Submit after Close) deadlock.
func TestReview2ClosedStoreLockOrderCycle(t *testing.T) {
	owner, _, _ := cluster2(t, 1)
	const q = "/queue/shutdown"
	if err := owner.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	if err := owner.send(q, "m"); err != nil {
		t.Fatal(err)
	}
	c := newCollector()
	sub, err := owner.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Deliver: c.deliver})
	if err != nil {
		t.Fatal(err)
	}
	c.wait(t, 1) // written: Close will rewrite its delivery count
	owner.n.mu.Lock()
	d := owner.n.dests[q]
	owner.n.mu.Unlock()
	if err := owner.st.Close(); err != nil {
		t.Fatal(err)
	}

	n := owner.n
	n.rmu.Lock()
	sendDone := make(chan struct{})
	go func() { // SEND: commit holds wmu, waits for rmu
		defer close(sendDone)
		_ = owner.n.Apply(&Batch{Sends: []*Message{{Dest: q, Body: []byte("x")}}}, func(error) {})
	}()
	waitHeld(t, &n.wmu)
	time.Sleep(50 * time.Millisecond)
	closeDone := make(chan struct{})
	go func() { // Close: holds d.mu, waits for rmu in flushRewritesLocked
		defer close(closeDone)
		sub.Close()
	}()
	waitHeld(t, &d.mu)
	time.Sleep(50 * time.Millisecond)
	n.rmu.Unlock() // the SEND, first in line, gets rmu; its done wants d.mu

	timeout := time.After(5 * time.Second)
	for _, ch := range []chan struct{}{sendDone, closeDone} {
		select {
		case <-ch:
		case <-timeout:
			owner.open = false // deadlocked: do not stop the node
			t.Fatal("SEND and subscription Close deadlocked on a closed store (rmu -> destination.mu -> rmu)")
		}
	}
}

func waitHeld(t *testing.T, mu *sync.Mutex) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for mu.TryLock() {
		mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatal("lock never taken")
		}
		time.Sleep(time.Millisecond)
	}
}

// ---------------------------------------------------------------------
// Decoder

// validRecord accepts any uvarint delivery count, and decodeMessage
// stores it with int(d): from a peer (or a damaged record) a count of
// 2^63 or more becomes negative (on 32-bit, anything above 2^31 wraps),
// so the message is never dead-lettered and reports a negative
// x-delivery-count.
func TestReview2DecodeOpsDeliveriesOverflow(t *testing.T) {
	rec := []byte{codecVersion}
	rec = binary.AppendUvarint(rec, 1<<63) // deliveries
	rec = binary.AppendVarint(rec, 0)      // expires
	rec = binary.AppendUvarint(rec, 1)     // id
	rec = append(rec, 'x')
	rec = binary.AppendUvarint(rec, 0) // headers
	rec = binary.AppendUvarint(rec, 1) // body
	rec = append(rec, 'b')
	body := AppendOps(nil, []store.Op{{Kind: store.OpPut, Bucket: "/queue/q", Key: 1, Value: rec}})
	ops, err := DecodeOps(body)
	if err != nil {
		return // refused: fine
	}
	m, err := decodeMessage("/queue/q", ops[0].Key, ops[0].Value)
	if err != nil {
		t.Fatal(err)
	}
	if m.Deliveries < 0 {
		t.Fatalf("replicated record accepted with a delivery count that decodes to %d", m.Deliveries)
	}
}

// ---------------------------------------------------------------------
// Synchronous Append across two owners

// Peers.Append runs under the sender's wmu (commit), rmu and sendMu. An
// Append that applies inline (this package's fakePeers does; so would a
// peer link whose handler calls ApplyReplicated while its own node is
// blocked handing a batch to the same link) takes the receiver's wmu:
// two nodes that each own a queue the other replicates deadlock
// (a.wmu -> b.wmu and b.wmu -> a.wmu).
func TestReview2SyncAppendCrossOwnerDeadlock(t *testing.T) {
	a, b, _ := cluster2(t, 2)
	if err := a.n.Adopt("/queue/qa"); err != nil {
		t.Fatal(err)
	}
	if err := b.n.Adopt("/queue/qb"); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{}, 2)
	for _, h := range []*harness{a, b} {
		h := h
		q := "/queue/qa"
		if h == b {
			q = "/queue/qb"
		}
		go func() {
			defer func() { done <- struct{}{} }()
			for i := 0; i < 300; i++ {
				ch := make(chan error, 1)
				if err := h.n.Apply(&Batch{Sends: []*Message{{Dest: q, Body: []byte("x")}}}, func(err error) { ch <- err }); err != nil {
					return
				}
				<-ch
			}
		}()
	}
	timeout := time.After(10 * time.Second)
	for i := 0; i < 2; i++ {
		select {
		case <-done:
		case <-timeout:
			a.open, b.open = false, false
			t.Fatal("two owners replicating to each other through a synchronous Append deadlocked")
		}
	}
}

// Adopt logs d.onDisk after releasing d.mu, while the destination is
// already published in n.dests: a subscriber's loader writes it under
// d.mu concurrently (a data race under -race).
func TestReview2AdoptLogsOnDiskUnlocked(t *testing.T) {
	_, replica, _ := cluster2(t, 2)
	for i := 0; i < 100; i++ {
		q := fmt.Sprintf("/queue/log%d", i)
		var ops []store.Op
		for k := uint64(1); k <= 60; k++ {
			ops = append(ops, store.Op{Kind: store.OpPut, Bucket: q, Key: uint64(i*1000) + k, Value: (&Message{ID: "x", Body: []byte("b")}).encode()})
		}
		ch := make(chan error, 1)
		if err := replica.n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 1}, AppendOps(nil, ops), func(err error) { ch <- err }); err != nil {
			t.Fatal(err)
		}
		<-ch
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); _ = replica.n.Adopt(q) }()
		go func() {
			defer wg.Done()
			s, err := replica.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Deliver: func(Delivery) {}})
			if err == nil {
				time.Sleep(time.Millisecond)
				s.Close()
			}
		}()
		wg.Wait()
	}
}

// ---------------------------------------------------------------------
// Dead-letter move across replica sets

// A dead-letter move is one local commit (delete in q, put in DLQ.q), but
// replicated per queue: q's replicas get the delete, DLQ.q's the put. On
// a subscription Close it is an internal write (no quorum awaited), and
// the UNSUBSCRIBE receipt's Barrier does not wait either. With DLQ.q's
// other replica unreachable, q's replica applies the delete and nobody
// but the owner has the dead-lettered message: after the owner fails it
// is gone, though the UNSUBSCRIBE was RECEIPTed.
func TestReview2DeadLetterMoveLostAcrossReplicaSets(t *testing.T) {
	t.Skip("known gap, not fixed yet: a commit that spans queues with different replica sets (a dead-letter move, a transaction) is not atomic across them; docs/DESIGN.md lists it under forwarding (transactions recorded durably first, applied idempotently)")
	active := []string{"a", "b", "c"}
	var q string
	for i := 0; ; i++ {
		q = fmt.Sprintf("/queue/d%d", i)
		s1 := ReplicaSet(q, active, 2)
		s2 := ReplicaSet("/queue/DLQ."+q[len("/queue/"):], active, 2)
		if s1[0] == "a" && s1[1] == "b" && s2[0] == "a" && s2[1] == "c" {
			break
		}
	}
	fp := &fakePeers{nodes: map[string]*harness{}, down: map[string]bool{}, epoch: map[string]cluster.EpochID{"a": {Counter: 1}, "b": {Counter: 1}, "c": {Counter: 1}}, active: active}
	mk := func(id string) *harness {
		cfg := smallWindow()
		cfg.NodeID = id
		cfg.MaxRedeliveries = 1
		h := &harness{t: t, dir: t.TempDir(), cfg: cfg}
		h.prep = func(n *Node) {
			n.SetReplicator(NewPeerReplicator(2, 2, fp.view(id), fp, slog.New(slog.DiscardHandler)))
		}
		h.start()
		t.Cleanup(h.stop)
		return h
	}
	owner, replica := mk("a"), mk("b")
	fp.nodes["a"], fp.nodes["b"] = owner, replica // c is unreachable
	if err := owner.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	if err := owner.send(q, "m"); err != nil { // q's set {a,b}: quorum met
		t.Fatal(err)
	}
	c := newCollector()
	sub, err := owner.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Deliver: c.deliver})
	if err != nil {
		t.Fatal(err)
	}
	got := c.wait(t, 1)
	ch := make(chan error, 1)
	if err := owner.n.Apply(&Batch{Acks: []AckOp{{Sub: sub, Tag: got[0].Tag, Nack: true}}}, func(err error) { ch <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	c.wait(t, 2) // redelivered, written
	sub.Close()  // Deliveries 2 > 1: dead-lettered
	owner.n.Barrier(func(err error) { ch <- err })
	if err := <-ch; err != nil {
		return // the UNSUBSCRIBE receipt would be an ERROR: acceptable
	}
	// The owner fails; b holds q's copy, nobody else holds DLQ.q's.
	owner.stop()
	bs, err := replica.st.Buckets()
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, b := range bs {
		total += b.Count
	}
	if total == 0 {
		t.Fatalf("UNSUBSCRIBE's barrier succeeded, yet no surviving replica holds the message (q's replica applied the delete, DLQ's replica never got the put)")
	}
}

// ---------------------------------------------------------------------
// ApplyReplicated keeps the caller's buffer

// DecodeOps' values alias body, and ApplyReplicated hands them to
// Store.Submit and returns before the store's writer has encoded them.
// Nothing in ApplyReplicated's contract says body must stay untouched
// until done: a peer link that reuses its read buffer after the call
// returns (the usual frame-reader pattern) stores garbage, or under -race
// a data race is reported between the writer and the caller.
func TestReview2ApplyReplicatedRetainsBody(t *testing.T) {
	_, replica, _ := cluster2(t, 2)
	const q = "/queue/buf"
	want := (&Message{ID: "a-1", Body: []byte("payload")}).encode()
	for i := 0; i < 50; i++ {
		key := uint64(i + 1)
		body := AppendOps(nil, []store.Op{{Kind: store.OpPut, Bucket: q, Key: key, Value: want}})
		ch := make(chan error, 1)
		if err := replica.n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 1}, body, func(err error) { ch <- err }); err != nil {
			t.Fatal(err)
		}
		for j := range body { // the link reads its next frame into the same buffer
			body[j] = 0xff
		}
		if err := <-ch; err != nil {
			t.Fatal(err)
		}
		var got []byte
		if err := replica.st.Scan(q, key-1, 1, 0, func(k uint64, v []byte) error {
			got = append([]byte(nil), v...)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if string(got) != string(want) {
			t.Fatalf("record %d stored as %x, want %x: the store read the caller's buffer after ApplyReplicated returned", key, got, want)
		}
	}
}
