package replica

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/store"
)

// A replica that misses acknowledgements (it was unreachable while the
// owner's consumers acked) is repaired by the catch-up that follows: the
// owner's tombstones remove the acknowledged messages from its copy, so
// a later take-over there does not deliver them again. A key the replica
// holds that the owner never removed stays (it may be the only copy of a
// receipted message).
func TestCatchUpRemovesMissedAcks(t *testing.T) {
	c := newRepCluster(t, 1, []string{"a", "b"}, "a", "b")
	peers, reps, a, b := c.peers, c.reps, c.h["a"], c.h["b"]
	const q = "/queue/acks"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, a, q, 0, 400)
	peers.drain()
	// b holds a key of its own the owner never had.
	own := AppendOps(nil, []store.Op{{Kind: store.OpPut, Bucket: q, Key: 1 << 63, Value: (&Message{ID: "only-here"}).encode()}})
	ch := make(chan error, 1)
	if err := b.n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 1}, own, func(err error) { ch <- err }); err != nil || <-ch != nil {
		t.Fatal("b's own key not stored")
	}
	if got := len(bucketKeys(t, b, q)); got != 401 {
		t.Fatalf("b holds %d messages before the outage, want 401", got)
	}

	peers.mu.Lock()
	peers.down["b"] = true
	peers.mu.Unlock()
	col := newCollector()
	sub, err := a.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Prefetch: 300, Deliver: col.deliver})
	if err != nil {
		t.Fatal(err)
	}
	bt := &Batch{Sync: true}
	for _, d := range col.wait(t, 300)[:300] {
		bt.Acks = append(bt.Acks, AckOp{Sub: sub, Tag: d.Tag})
	}
	done := make(chan error, 1)
	if err := a.n.Apply(bt, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err) // W = 1: the owner's copy is enough
	}
	peers.drain()
	if got := len(bucketKeys(t, b, q)); got != 401 {
		t.Fatalf("b holds %d messages while down, want the 401 it had", got)
	}

	// b is back; the failed batch made its copy unknown, and the
	// background catch-up repairs it.
	peers.mu.Lock()
	peers.down["b"] = false
	peers.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for !reps["a"].Synced("b", q) {
		if time.Now().After(deadline) {
			t.Fatal("catch-up of b did not complete within 10 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	peers.drain()
	want := bucketKeys(t, a, q)
	if len(want) != 100 {
		t.Fatalf("owner holds %d messages, want 100", len(want))
	}
	got := bucketKeys(t, b, q)
	if len(got) == 0 || got[len(got)-1] != 1<<63 {
		t.Fatalf("b's own key is gone: %v", got[max(0, len(got)-3):])
	}
	got = got[:len(got)-1]
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("b holds %d messages besides its own, the owner %d: the acknowledged ones came through the catch-up? first difference near %v", len(got), len(want), firstDiff(got, want))
	}
}

// Removals the owner did not fsync (ACKs without a receipt) reach the
// replicas marked so, and are committed there without an fdatasync;
// anything with a put (a message) is always synced on the replicas. The
// marker is valid only as a batch's first byte.
func TestNoSyncOnlyForUnsyncedRemovals(t *testing.T) {
	c := newRepCluster(t, 2, []string{"a", "b"}, "a", "b")
	peers, reps, a, b := c.peers, c.reps, c.h["a"], c.h["b"]
	const q = "/queue/ns"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, a, q, 0, 10)
	col := newCollector()
	sub, err := a.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Prefetch: 10, Deliver: col.deliver})
	if err != nil {
		t.Fatal(err)
	}
	got := col.wait(t, 10)
	peers.drain()
	reps["a"].Wait() // the catch-up b's first write began (it sends tombstones too)
	peers.drain()
	peers.mu.Lock()
	before := len(peers.sent)
	peers.mu.Unlock()
	// Unsynced: an ACK without a receipt.
	done := make(chan error, 1)
	if err := a.n.Apply(&Batch{Acks: []AckOp{{Sub: sub, Tag: got[0].Tag}}}, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// A barrier (a RECEIPT after the unsynced ACK) sends b an empty synced
	// batch, so that the ACK is on b's disk before the RECEIPT.
	peers.drain()
	peers.mu.Lock()
	mark := len(peers.sent)
	peers.mu.Unlock()
	a.n.Barrier(func(err error) { done <- err })
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	peers.mu.Lock()
	empties := 0
	for _, body := range peers.sent[mark:] {
		if len(body) == 0 {
			empties++
		}
	}
	peers.mu.Unlock()
	if empties != 1 {
		t.Fatalf("a barrier after an unsynced ACK sent %d empty synced batches to the replica, want 1", empties)
	}
	// Synced: an ACK with a receipt.
	if err := a.n.Apply(&Batch{Sync: true, Acks: []AckOp{{Sub: sub, Tag: got[1].Tag}}}, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	peers.drain()
	peers.mu.Lock()
	sent := slices.Clone(peers.sent[before:])
	peers.mu.Unlock()
	// Count the batches carrying the two ACKs' tombstones (others, such
	// as a catch-up still running, may be on the way too).
	var marked, plain int
	for _, body := range sent {
		m := len(body) > 0 && body[0] == wireNoSync
		if m {
			body = body[1:]
		}
		w, err := decodeWire(body)
		if err != nil {
			t.Fatalf("a batch does not decode: %v", err)
		}
		if !slices.ContainsFunc(w, func(o wireOp) bool { return o.kind == wireTombstone }) {
			if m {
				t.Fatalf("a batch without removals is marked unsynced: %v", w)
			}
			continue
		}
		if m {
			marked++
		} else {
			plain++
		}
	}
	if marked != 1 || plain != 1 {
		t.Fatalf("%d marked and %d plain batches of removals for one unsynced and one synced ACK", marked, plain)
	}
	if got := len(bucketKeys(t, b, q)); got != 8 {
		t.Fatalf("replica holds %d messages after 2 of 10 were acknowledged", got)
	}
	// The marker anywhere but first is refused.
	bad := append(appendWire(nil, wireTombstone, &store.Op{Bucket: q, Key: 1}), wireNoSync)
	if err := b.n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 1}, bad, func(error) {}); err == nil {
		t.Fatal("a no-sync marker after an op is accepted")
	}
	if _, err := DecodeOps([]byte{wireNoSync}); err == nil {
		t.Fatal("DecodeOps accepts the no-sync marker")
	}
	withPut := append([]byte{wireNoSync}, AppendOps(nil, []store.Op{{Kind: store.OpPut, Bucket: q, Key: 1 << 63, Value: (&Message{ID: "x"}).encode()}})...)
	if err := b.n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 1}, withPut, func(error) {}); err == nil {
		t.Fatal("an unsynced batch with a put is accepted")
	}
}
