package node

// Hostile review, round 15 (0c0f9d3..2078a87). Each test fails on the
// code it was written against; see the report.

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// r15Peer is a raw forwarding client of node m, posing as node id.
func r15Peer(t *testing.T, m *r6Member, id string) func(op string, headers []string, body []byte) (*frame.Frame, error) {
	t.Helper()
	ccfg := stomp.DefaultPeerClientConfig()
	ccfg.Secret, ccfg.NodeID, ccfg.Logger = testSecret, id, slog.New(slog.DiscardHandler)
	ccfg.Peer, ccfg.PeerNodeID = m.id, m.id
	ccfg.AddrFunc = func() string { return m.net.addr(m.id) }
	p := stomp.NewPeerClient(ccfg)
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return func(op string, headers []string, body []byte) (*frame.Frame, error) {
		type res struct {
			f   *frame.Frame
			err error
		}
		ch := make(chan res, 1)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Request(ctx, op, headers, body, func(f *frame.Frame, err error) { ch <- res{f, err} }); err != nil {
			return nil, err
		}
		r := <-ch
		return r.f, r.err
	}
}

// ---------------------------------------------------------------------
// 1. An idle removal deletes a replica's copy that the take-over could
// not read: receipted messages are lost.
//
// A take-over that missed an alive peer (its pull failed with the link
// up: a store error, a scan slower than forwardTimeout) records it in
// ownState.missed; retryMissed (cf87fad) is meant to merge that copy
// later. But the queue, empty at the new owner because the copy was not
// read, is removed as idle (queue.idle_delete_after) before the retry:
// replica.Node.removeIdle writes OpDeleteBucket, which the replicator
// sends to every replica of the queue, the missed peer included. Its
// copy, holding the only copy of a receipted message, is deleted; then
// forgetRemoved (0c0f9d3) drops owned[q] with its missed list, so nothing
// would retry anyway. The retry interval (5 s doubling to 5 min) and
// idle_delete_after are independent settings: with idle_delete_after
// below the current back-off, the removal always wins the race. Fixed:
// the replica asks the router before removing an idle queue
// (replica.Node.SetKeepIdle, router.unmerged), which keeps one whose
// take-over missed a copy.
func TestReview15IdleRemovalDeletesUnmergedCopy(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-c"}
	q := pickQueue(t, "r15unmerged", func(n string) bool { return ownerIn(n, both) == "node-a" })
	var sick atomic.Bool
	oc := r6Opts{r: 2, w: 1, wrap: func(h stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			if f.Header.Get(stomp.PeerHeaderOp) == opPull && sick.Load() {
				reply(stomp.PeerFail("store", "read error"))
				return
			}
			h.HandlePeer(peer, f, reply)
		})
	}}
	// node-c alone (its side of a partition) owns q and stores a
	// receipted message.
	c := startR6(t, "node-c", rn, []string{"node-c"}, nil, oc)
	if err := waitErr(t, "SEND at node-c", c.apply(t, sendBatch(q, "only-c")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// The partition heals: q's owner is node-a, node-c its replica.
	a := startR6(t, "node-a", rn, both, []string{"node-c"}, r6Opts{r: 2, w: 1, idleDelete: 200 * time.Millisecond})
	a.setView(both, 2)
	c.view.mu.Lock()
	c.view.members = []string{"node-a"}
	c.view.mu.Unlock()
	c.setView(both, 2)
	waitUntil(t, "node-c releases q", func() bool { return !c.rep.Adopted(q) })
	a.warm(t, "node-c")
	// node-c's store answers pulls with an error for now (link up).
	sick.Store(true)
	// A consumer comes and goes at node-a: node-a takes q over, missing
	// node-c's copy.
	var rec recorder
	sub, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Deliver: rec.deliver})
	if err != nil {
		t.Fatal(err)
	}
	a.rt.omu.Lock()
	st := a.rt.owned[q]
	a.rt.omu.Unlock()
	if st == nil {
		t.Fatal("q not taken over at node-a")
	}
	<-st.done
	if !slices.Contains(st.missed, "node-c") {
		t.Fatalf("the take-over did not miss node-c (missed %v): the test's premise failed", st.missed)
	}
	sub.Return()
	// node-a's queue is empty and idle, but its take-over missed a copy:
	// it is not removed (several sweeps pass: idle_delete_after is
	// 200 ms, the sweeper runs every second).
	time.Sleep(2500 * time.Millisecond)
	if !a.rep.Adopted(q) {
		t.Fatalf("node-a removed %s as idle although its take-over missed node-c's copy (missed=%v)", q, st.missed)
	}
	sick.Store(false) // node-c's store recovers
	if got := c.bodies(t, q); !slices.Contains(got, "only-c") {
		t.Fatalf("node-a's take-over of %s missed node-c's copy (pull failed, link up; missed=%v), then removed the queue as idle: "+
			"the bucket delete was replicated to node-c and deleted the only copy of the receipted message \"only-c\" (node-c now holds %v, node-a %v)",
			q, st.missed, got, a.bodies(t, q))
	}
	// And it is eventually served.
	var rec2 recorder
	sub2, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Deliver: rec2.deliver})
	if err != nil {
		t.Fatal(err)
	}
	defer sub2.Return()
	if got := rec2.waitN(1, 10*time.Second); !slices.Contains(got, "only-c") {
		t.Fatalf("the receipted message held by node-c was never delivered: got %v", got)
	}
}

// ---------------------------------------------------------------------
// 2. A queue removed as idle comes back to life from a stale copy.
//
// 6446d11: a take-over marks the queue created (AdoptExisting) when any
// peer's store has its bucket, even empty. An idle removal deletes the
// bucket only on the queue's replica set (the replicator sends
// OpDeleteBucket to the replicas), never on a former owner that is no
// longer a replica, which keeps its (empty) bucket. 0c0f9d3 makes the
// router forget the removed queue, so its next use is a fresh take-over,
// which pulls that stale copy, gets x-exists:1, and adopts the removed
// queue as existing: a producer without the configure permission may
// SEND to (re-create) a queue that was removed. Before, the owned entry
// stayed, the re-adoption read only the local store, and the SEND was
// refused (DESIGN: a queue exists "until removed as idle").
func TestReview15IdleRemovedQueueResurrectedByStaleCopy(t *testing.T) {
	t.Skip("known gap: a former owner outside the replica set keeps the empty bucket of a queue removed as idle, and a later take-over's pull of it says the queue exists; taking only replicas' word would lose the existence of a drained queue whose owner moved to a non-replica (TestReview12DrainedQueueForgottenByNewOwner); fix: remove empty copies on every alive node, or carry a removal marker")
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	q := pickQueue(t, "r15stale", func(n string) bool { return ownerIn(n, both) == "node-a" })
	// node-b owns q alone (R = 1): a message is stored and consumed; the
	// bucket stays, empty.
	b := startR6(t, "node-b", rn, []string{"node-b"}, nil, r6Opts{r: 1, w: 1})
	if err := waitErr(t, "SEND at node-b", b.apply(t, sendBatch(q, "m")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	got := make(chan replica.Delivery, 4)
	sub, err := b.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual,
		Deliver: func(d replica.Delivery) { d.Sub.Written(d.Tag); got <- d }})
	if err != nil {
		t.Fatal(err)
	}
	d := r14Wait(t, "node-b's consumer", got, 5*time.Second)
	if err := waitErr(t, "ACK", b.apply(t, &replica.Batch{Acks: []replica.AckOp{{Sub: d.Sub, Tag: d.Tag}}, Sync: true}), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	sub.Return()
	if ok, err := b.st.HasBucket(q); err != nil || !ok {
		t.Fatalf("node-b's empty bucket: %v %v", ok, err)
	}
	// node-a joins and becomes q's owner (and only replica).
	a := startR6(t, "node-a", rn, both, []string{"node-b"}, r6Opts{r: 1, w: 1, idleDelete: 200 * time.Millisecond})
	a.setView(both, 2)
	b.view.mu.Lock()
	b.view.members = []string{"node-a"}
	b.view.mu.Unlock()
	b.setView(both, 2)
	waitUntil(t, "node-b releases q", func() bool { return !b.rep.Adopted(q) })
	// node-a takes q over and knows it exists (6446d11's purpose).
	if ok, err := a.rt.queueExists(q); err != nil || !ok {
		t.Fatalf("q at its new owner: exists %v, %v", ok, err)
	}
	// Nobody uses q: node-a removes it as idle, and its router forgets it.
	waitUntil(t, "node-a removes q as idle", func() bool {
		a.rt.omu.Lock()
		defer a.rt.omu.Unlock()
		return !a.rep.Adopted(q) && a.rt.owned[q] == nil
	})
	if ok, _ := a.st.HasBucket(q); ok {
		t.Fatal("node-a still has a bucket of q: the test's premise failed")
	}
	if ok, _ := b.st.HasBucket(q); !ok {
		t.Fatal("node-b's stale bucket is gone: the test's premise failed")
	}
	// A producer without configure: q no longer exists.
	m := &replica.Message{Dest: q, Body: []byte("by a user who may not create queues"), NoCreate: true}
	err = waitErr(t, "SEND without configure", a.apply(t, &replica.Batch{Sends: []*replica.Message{m}, Sync: true}), 10*time.Second)
	var nsq *replica.NoSuchQueueError
	if !errors.As(err, &nsq) {
		t.Fatalf("%s was removed as idle at its owner node-a, yet a SEND that may not create it was accepted (err %v): "+
			"the take-over that followed forgetRemoved read x-exists from node-b's stale empty bucket (node-b is no longer a replica; the idle delete never reached it) "+
			"and adopted the removed queue as existing (AdoptExisting)", q, err)
	}
}

// ---------------------------------------------------------------------
// 3. Mixed versions: a failed unsubscribe from a node of the previous
// version no longer counts anything.
//
// 48116d7 sends x-failed:1 with no body for a client that failed; 3a93c35
// reads the body as the failed deliveries' tags, and an empty list makes
// host.end call Return: no failure is counted. During a rolling upgrade
// from 48116d7, a consumer that crashes on a poison message through an
// old node gets it back for ever, never dead-lettered (before the
// upgrade, and with new nodes, the same crash counts). A new node never
// sends x-failed:1 without tags, so the owner can tell the two apart.
func TestReview15OldNodeFailedUnsubscribeNotCounted(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	a := startR6(t, "node-a", rn, []string{"node-a"}, nil, r6Opts{maxRedeliveries: 1})
	q := "/queue/r15oldfailed"
	dlq := "/queue/DLQ.r15oldfailed"
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "poison")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	req := r15Peer(t, a, "node-old")
	for i, id := range []string{"r15-old.1", "r15-old.2"} {
		if _, err := req(opSubscribe, []string{frame.Destination, q, hdrSub, id, frame.Ack, "client-individual", hdrPrefetch, "1"}, nil); err != nil {
			t.Fatal(err)
		}
		var dels []wireDelivery
		deadline := time.Now().Add(5 * time.Second)
		for len(dels) == 0 && time.Now().Before(deadline) {
			f, err := req(opPoll, []string{hdrKeys, "1"}, []byte(id+" 1\n"))
			if err != nil {
				t.Fatal(err)
			}
			if dels, err = decodeKeyedDeliveries(f.Body, true); err != nil {
				t.Fatal(err)
			}
		}
		if len(dels) != 1 {
			t.Fatalf("round %d: %d deliveries (DLQ holds %v)", i, len(dels), a.bodies(t, dlq))
		}
		// The client's connection is lost: the old node's unsubscribe
		// (48116d7: x-failed 1, no body).
		if _, err := req(opUnsubscribe, []string{hdrSub, id, hdrFailed, "1"}, nil); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(300 * time.Millisecond)
	if dl := a.bodies(t, dlq); !slices.Contains(dl, "poison") {
		t.Fatalf("two failed deliveries reported by a node of the previous version (x-failed:1, no tags), queue.max_redeliveries 1: "+
			"the message should be dead-lettered, but the failures were taken as returns (queue holds %v, DLQ %v)", a.bodies(t, q), dl)
	}
}

// ---------------------------------------------------------------------
// 4. A failed unsubscribe naming more than 65,536 deliveries drops the
// forwarding link, and the subscription stays at the owner.
//
// routedSub.close(true) puts the owner tag of every written delivery of
// the current binding in the unsubscribe's body, without bound; the
// owner's decodeKeys refuses more than maxForwardMessages (65,536) and
// the handler answers PeerDrop: the owner closes the whole forwarding
// connection (every poll, SEND and ACK in flight on it fails with an
// unknown outcome, every subscription of that node re-binds), the
// unsubscribe is lost, and the subscription with its in-flight messages
// stays until subIdle. A client holds that many written, unacknowledged
// deliveries when limits.max_unacked is set above 65,536 (only > 0 is
// validated) and it subscribes in a client mode without a smaller
// prefetch. Here the routedSub holds one real delivery and 65,536 more
// flights standing for the rest.
func TestReview15FailedUnsubscribeTagsOverLimitDropsLink(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	q := pickQueue(t, "r15manytags", func(n string) bool { return ownerIn(n, both) == "node-b" })
	b := startR6(t, "node-b", rn, both, []string{"node-a"}, r6Opts{r: 1, w: 1})
	a := startR6(t, "node-a", rn, both, []string{"node-b"}, r6Opts{r: 1, w: 1})
	a.warm(t, "node-b")
	b.warm(t, "node-a")
	if err := waitErr(t, "SEND", b.apply(t, sendBatch(q, "m")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	const id = "r15big"
	oid := id + ".1"
	if err := b.rt.host.subscribe("node-a", oid, q, replica.AckClientIndividual, 1, false); err != nil {
		t.Fatal(err)
	}
	var tag uint64
	deadline := time.Now().Add(5 * time.Second)
	for tag == 0 && time.Now().Before(deadline) {
		res := b.rt.host.poll("node-a", []pollItem{{oid, 1}}, true)
		dels, err := decodeKeyedDeliveries(res.body, true)
		if err != nil {
			t.Fatal(err)
		}
		if len(dels) > 0 {
			tag = dels[0].tag
		}
	}
	if tag == 0 {
		t.Fatal("no delivery")
	}
	rs := &routedSub{rt: a.rt, id: id, opts: replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual},
		owner: "node-b", gen: 1, bound: true, inflight: map[uint64]*flight{}}
	rs.inflight[1] = &flight{gen: 1, otag: tag, id: "m", write: true}
	for i := uint64(2); i <= maxForwardMessages+1; i++ {
		rs.inflight[i] = &flight{gen: 1, otag: tag + i, id: "other", write: true}
	}
	rs.Close() // the client's connection was lost
	waitUntil13(t, 3*time.Second, "node-b ends the subscription on node-a's failed unsubscribe (it has "+r14HostSubs(b, "node-a")+
		"): its body of 65,537 tags was refused as malformed and node-b dropped the forwarding link instead", func() bool {
		return r14HostSubs(b, "node-a") == ""
	})
}

// ---------------------------------------------------------------------
// 5. retryMissed releases the queue before knowing whether the missed
// peer can be read now: a peer whose pulls keep failing costs every
// queue that missed it a release, a >= 2 s outage (pullRetry) and a
// re-bind of all its subscribers, every 5 s doubling to every 5 min,
// for ever.
//
// cf87fad's retryMissed calls merge (releaseHere: host.closeDest, Release,
// then a full take-over) whenever a missed peer is alive with its link
// up; it never checks that a pull of that peer would now succeed. Here
// node-c's store keeps failing: node-a's consumer, holding a message
// unacknowledged, gets it back (redelivered) at the first retry although
// nothing could be merged. With many queues, those taken over together
// retry together, each release run in line on the watch goroutine.
func TestReview15RetryMissedRebindsWithoutProbing(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-c"}
	q := pickQueue(t, "r15probe", func(n string) bool { return ownerIn(n, both) == "node-a" })
	oc := r6Opts{r: 2, w: 1, wrap: func(h stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			if f.Header.Get(stomp.PeerHeaderOp) == opPull {
				reply(stomp.PeerFail("store", "read error")) // for good
				return
			}
			h.HandlePeer(peer, f, reply)
		})
	}}
	c := startR6(t, "node-c", rn, both, []string{"node-a"}, oc)
	a := startR6(t, "node-a", rn, both, []string{"node-c"}, r6Opts{r: 2, w: 1})
	_ = c
	a.warm(t, "node-c")
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "m")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	var rec recorder
	sub, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Deliver: rec.deliver})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Return()
	if got := rec.waitN(1, 5*time.Second); len(got) != 1 {
		t.Fatalf("first delivery: %v", got)
	}
	// The consumer holds m, unacknowledged; node-c stays unreadable.
	time.Sleep(missedRetry + 3*time.Second)
	if got := rec.bodies(); len(got) > 1 {
		t.Fatalf("node-c's copy still cannot be read, yet retryMissed released %s and took it over again: the consumer's unacknowledged message was redelivered (%v) "+
			"after a release and a >= %v take-over that could merge nothing; this repeats every 5 s doubling up to 5 min, for every queue that missed node-c, for as long as its store fails",
			q, got, pullRetryFor)
	}
}
