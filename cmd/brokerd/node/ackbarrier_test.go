package node

import (
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// ackWatch records, at an owner, the ACK and ack-keys requests it gets,
// and can hold the answers to ack-keys until released.
type ackWatch struct {
	mu      sync.Mutex
	acks    []string // x-sync of each ack request
	barrier []string // destination of each ack-keys request with no keys
	hold    chan struct{}
}

func (w *ackWatch) wrap(h stomp.PeerHandler) stomp.PeerHandler {
	return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		switch f.Header.Get(stomp.PeerHeaderOp) {
		case opAck:
			w.mu.Lock()
			w.acks = append(w.acks, f.Header.Get(hdrSync))
			w.mu.Unlock()
		case opAckKeys:
			if len(f.Body) == 0 {
				w.mu.Lock()
				w.barrier = append(w.barrier, f.Header.Get(frame.Destination))
				hold := w.hold
				w.mu.Unlock()
				if hold != nil {
					inner := reply
					reply = func(r *frame.Frame) { go func() { <-hold; inner(r) }() }
				}
			}
		}
		h.HandlePeer(peer, f, reply)
	})
}

func (w *ackWatch) counts() (acks []string, barriers int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.acks...), len(w.barrier)
}

// ackSetup: node-a owns q, node-b's subscriber got n messages.
func ackSetup(t *testing.T, n int) (a, b *r6Member, w *ackWatch, q string, ds []replica.Delivery) {
	t.Helper()
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	q = pickQueue(t, "ackbar", func(name string) bool { return ownerIn(name, both) == "node-a" })
	w = &ackWatch{}
	a = startR6(t, "node-a", rn, both, []string{"node-b"}, r6Opts{r: 2, w: 1, wrap: w.wrap})
	b = startR6(t, "node-b", rn, both, []string{"node-a"}, r6Opts{r: 2, w: 1})
	for i := 0; i < n; i++ {
		if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "m")), 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	var rec recorder
	if _, err := b.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Deliver: rec.deliver}); err != nil {
		t.Fatal(err)
	}
	if got := rec.waitN(n, 10*time.Second); len(got) < n {
		t.Fatalf("%d deliveries at node-b, want %d", len(got), n)
	}
	rec.mu.Lock()
	ds = append(ds, rec.got...)
	rec.mu.Unlock()
	for _, d := range ds {
		if _, routed := d.Sub.(*routedSub); !routed {
			t.Fatal("node-b's subscription is not routed to node-a")
		}
	}
	return a, b, w, q, ds
}

func ackBatchOf(d replica.Delivery, sync bool) *replica.Batch {
	return &replica.Batch{Acks: []replica.AckOp{{Sub: d.Sub, Tag: d.Tag}}, Sync: sync}
}

// ACKs without a receipt are not synced at the owner one by one (an
// fdatasync at the owner and at each of its replicas per ACK); the next
// barrier of the consumer's node (the RECEIPT of a later frame) has the
// owner sync them, and waits for it.
func TestRoutedAckUnsyncedUntilBarrier(t *testing.T) {
	_, b, w, q, ds := ackSetup(t, 3)
	for _, d := range ds {
		if err := waitErr(t, "ACK", b.apply(t, ackBatchOf(d, false)), 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	acks, barriers := w.counts()
	if len(acks) != 3 {
		t.Fatalf("owner got %d ack requests, want 3", len(acks))
	}
	for i, s := range acks {
		if s != "0" {
			t.Fatalf("ACK %d without a receipt sent with x-sync %q: synced at the owner", i, s)
		}
	}
	if barriers != 0 {
		t.Fatalf("%d barriers before any receipt", barriers)
	}

	// A RECEIPT waits for the owner's sync.
	hold := make(chan struct{})
	w.mu.Lock()
	w.hold = hold
	w.mu.Unlock()
	done := make(chan error, 1)
	b.rt.Barrier(func(err error) { done <- err })
	select {
	case err := <-done:
		t.Fatalf("the barrier ended (%v) before the owner synced the ACKs", err)
	case <-time.After(300 * time.Millisecond):
	}
	w.mu.Lock()
	if len(w.barrier) != 1 || w.barrier[0] != q {
		t.Fatalf("owner barriers %v, want one for %s", w.barrier, q)
	}
	w.hold = nil
	w.mu.Unlock()
	close(hold)
	if err := waitErr(t, "barrier", done, 5*time.Second); err != nil {
		t.Fatal(err)
	}

	// Nothing unsynced any more: the next barrier asks nothing of the owner.
	if err := waitErr(t, "second barrier", func() chan error {
		ch := make(chan error, 1)
		b.rt.Barrier(func(err error) { ch <- err })
		return ch
	}(), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, n := w.counts(); n != 1 {
		t.Fatalf("%d owner barriers after a barrier with nothing to sync, want 1", n)
	}
}

// A receipted ACK is synced at the owner itself; a synced frame after
// unsynced ACKs (a receipted SEND here) waits for the owner's sync too.
func TestRoutedAckReceiptedSyncedAndSyncedBatchWaits(t *testing.T) {
	_, b, w, q, ds := ackSetup(t, 2)
	if err := waitErr(t, "ACK", b.apply(t, ackBatchOf(ds[0], true)), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if acks, _ := w.counts(); len(acks) != 1 || acks[0] != "1" {
		t.Fatalf("receipted ACK sent with x-sync %v, want [1]", acks)
	}
	if err := waitErr(t, "ACK", b.apply(t, ackBatchOf(ds[1], false)), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	hold := make(chan struct{})
	w.mu.Lock()
	w.hold = hold
	w.mu.Unlock()
	ch := b.apply(t, sendBatch("/queue/ackbar-other", "x"))
	select {
	case err := <-ch:
		t.Fatalf("a receipted SEND after an unsynced ACK was answered (%v) before the owner synced the ACK", err)
	case <-time.After(300 * time.Millisecond):
	}
	w.mu.Lock()
	got := append([]string(nil), w.barrier...)
	w.hold = nil
	w.mu.Unlock()
	close(hold)
	if len(got) != 1 || got[0] != q {
		t.Fatalf("owner barriers %v, want one for %s", got, q)
	}
	if err := waitErr(t, "SEND", ch, 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// Two connections of one node: the first one's barrier took the pair;
// the second one's barrier, which finds no pair left, still waits for
// that barrier in flight (its own ACK may be among those it covers).
func TestAckBarrierWaitsForBarrierInFlight(t *testing.T) {
	_, b, w, _, ds := ackSetup(t, 1)
	if err := waitErr(t, "ACK", b.apply(t, ackBatchOf(ds[0], false)), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	hold := make(chan struct{})
	w.mu.Lock()
	w.hold = hold
	w.mu.Unlock()
	first, second := make(chan error, 1), make(chan error, 1)
	b.rt.Barrier(func(err error) { first <- err })
	b.rt.Barrier(func(err error) { second <- err })
	select {
	case err := <-second:
		t.Fatalf("the second barrier ended (%v) while the first one's sync at the owner was in flight", err)
	case <-time.After(300 * time.Millisecond):
	}
	close(hold)
	for _, ch := range []chan error{first, second} {
		if err := waitErr(t, "barrier", ch, 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if _, n := w.counts(); n != 1 {
		t.Fatalf("%d owner barriers, want 1", n)
	}
}
