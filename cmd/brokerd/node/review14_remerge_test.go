package node

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// ---------------------------------------------------------------------
// 4. A take-over that missed a peer whose link stayed up never merges it.
//
// 264a87c records the peers whose copy a take-over could not read
// (ownState.missed) but acts on them only when the forwarding link to one
// comes up (linkState -> linkUp -> remergeMissed). A pull fails with the
// link up too: the peer answers with an error (a store read error,
// PeerFail "store") or not within forwardTimeout (a slow scan, a stalled
// disk), or the local ApplyReplicated refuses the copy. Such a peer stays
// in missed for good: its link never goes down and up, it never joins,
// and the receipted messages only it holds are never served. Here node-b
// answers the take-over's pulls with a store error for the 2 s
// pullRetry spends on it, then recovers; nothing ever reads its copy.
func TestReview14MissedPeerWithLinkUpNeverMerged(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	q := "/queue/r14missedup"
	var sick atomic.Bool
	sick.Store(true)
	var failed atomic.Int32
	ob := r6Opts{r: 2, w: 1, wrap: func(h stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			if f.Header.Get(stomp.PeerHeaderOp) == opPull && sick.Load() {
				failed.Add(1)
				reply(stomp.PeerFail("store", "read error"))
				return
			}
			h.HandlePeer(peer, f, reply)
		})
	}}
	// node-b alone (its side of a partition) owns q and stores a
	// receipted message.
	b := startR6(t, "node-b", rn, []string{"node-b"}, nil, ob)
	if err := waitErr(t, "SEND at node-b", b.apply(t, sendBatch(q, "from-b")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	a := startR6(t, "node-a", rn, []string{"node-a"}, nil, r6Opts{r: 2, w: 1})
	a.fwd.mu.Lock()
	a.fwd.onState = a.rt.linkState // as the node's wiring does
	a.fwd.mu.Unlock()
	a.view.mu.Lock()
	a.view.members = []string{"node-b"}
	a.view.mu.Unlock()
	a.rt.refresh()
	a.warm(t, "node-b") // the link is up, and stays up
	var rec recorder
	if _, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Deliver: rec.deliver}); err != nil {
		t.Fatal(err)
	}
	if failed.Load() == 0 {
		t.Fatal("the take-over did not pull from node-b")
	}
	a.rt.omu.Lock()
	st := a.rt.owned[q]
	a.rt.omu.Unlock()
	if st == nil {
		t.Fatal("q not taken over")
	}
	<-st.done
	t.Logf("missed: %v", st.missed)
	// node-b recovers; its link never went down.
	sick.Store(false)
	// retryMissed takes the queue over again missedRetry after the
	// take-over ended (the watch looks every second).
	if got := rec.waitN(1, missedRetry+8*time.Second); len(got) == 0 {
		t.Fatalf("the take-over of %s missed node-b (pull refused with a store error, link up: missed=%v); node-b recovered, yet its receipted message was never merged: the subscriber got nothing in 13 s (node-a holds %v, node-b %v)",
			q, st.missed, a.bodies(t, q), b.bodies(t, q))
	}
}
