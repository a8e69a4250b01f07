package node

// Each failed part of a retry is marked by its own error, not by the
// job's first one (a hostile review found the first error decided).

import (
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// A retry job of two queues whose owners now differ: q1's owner (node-a,
// its view lagging) refuses it not-owner, fast; q2's part, applied here at
// node-b, is stored without its quorum (node-a is at a newer epoch and
// refuses the append, slowly). q2's later attempts must store marked
// copies, and be throttled like any attempt that left a copy.
func TestRetryMarksEachPartByItsOwnError(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	q1 := pickQueue(t, "r9m1-", func(n string) bool { return ownerIn(n, both) == "node-a" })
	q2 := pickQueue(t, "r9m2-", func(n string) bool { return ownerIn(n, both) == "node-b" })
	slowAppends := func(inner stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			if f.Header.Get(stomp.PeerHeaderOp) == opAppend {
				time.Sleep(300 * time.Millisecond)
			}
			inner.HandlePeer(peer, f, reply)
		})
	}
	// node-a sees only node-b active: it refuses both queues as not its own.
	a := startR6(t, "node-a", rn, []string{"node-b"}, []string{"node-b"}, r6Opts{r: 2, w: 2, wrap: slowAppends})
	// node-b sees only node-a active: it forwards both to node-a.
	b := startR6(t, "node-b", rn, []string{"node-a"}, []string{"node-a"}, r6Opts{r: 2, w: 2})
	b.warm(t, "node-a")
	a.warm(t, "node-b")
	a.setView([]string{"node-b"}, 9) // b's appends (epoch 5) will be stale there
	errc := b.apply(t, &replica.Batch{Sync: true, Sends: []*replica.Message{
		{Dest: q1, Body: []byte("m1")}, {Dest: q2, Body: []byte("m2")},
	}})
	b.setView(both, 5) // the retry: q1 to node-a (refused), q2 here (no quorum)

	// Hold what node-b hands out of q2 (a subscriber's buffer, never
	// written), so that the owner's own marking (destination.unconfirmed,
	// pending copies only) does not hide the router's.
	waitUntil(t, "a copy of q2 stored at node-b", func() bool { return len(b.bodies(t, q2)) > 0 })
	var mu sync.Mutex
	held := 0
	if _, err := b.rep.Subscribe(replica.SubOptions{Dest: q2, Ack: replica.AckClientIndividual, Prefetch: 1000, Deliver: func(replica.Delivery) {
		mu.Lock()
		held++
		mu.Unlock()
	}}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	a.setView(both, 9)
	b.setView(both, 9)
	if err := waitErr(t, "batch", errc, 15*time.Second); err != nil {
		t.Logf("batch: %v", err)
	}
	ch := make(chan error, 1)
	b.st.Barrier(func(err error) { ch <- err })
	<-ch
	fresh, marked := storedCopies(t, b, q2)
	t.Logf("q2 at node-b: %d unmarked, %d marked copies", fresh, marked)
	if fresh > 1 {
		t.Fatalf("one SEND to %s stored %d times unmarked at its owner: the attempts after the first no-quorum copy were not marked because another part's not-owner refusal came first", q2, fresh)
	}
}
