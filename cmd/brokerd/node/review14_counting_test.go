package node

// Hostile review, round 14: queue.max_redeliveries counts failed
// deliveries only (48116d7). Each test fails on the code it was written
// against; see the report.

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/go-stomp/stomp/v3/frame"
)

// r14Wait returns the next delivery on ch, or fails after d.
func r14Wait(t *testing.T, what string, ch chan replica.Delivery, d time.Duration) replica.Delivery {
	t.Helper()
	select {
	case del := <-ch:
		return del
	case <-time.After(d):
		t.Fatalf("%s: no delivery in %v", what, d)
		return replica.Delivery{}
	}
}

// ---------------------------------------------------------------------
// 1. In a cluster, a consumer's lost connection counts messages that
// never reached its wire.
//
// Every queue subscription of a cluster node is a routedSub, even when
// the node owns the queue; the owner's host counts a delivery written
// when it hands it out in a poll answer (host.poll -> rs.Written). When
// the session ends because its client failed, routedSub.Close sends
// x-failed and the owner's replica.Subscription.Close counts every
// handed-out message: also those still in the routedSub's window or the
// session's outgoing queue, which the session's writer never wrote
// (routedSub knows: flight.write is false). On a single node the same
// end counts only what the writer wrote (inflight.written). Here the
// session never writes the message (its connection is lost first), twice:
// with queue.max_redeliveries 1 it is dead-lettered although no client
// ever received it.
func TestReview14RoutedFailedCloseCountsUnwritten(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	a := startR6(t, "node-a", rn, []string{"node-a"}, nil, r6Opts{maxRedeliveries: 1})
	q := "/queue/r14unwritten"
	dlq := "/queue/DLQ.r14unwritten"
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "m")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		got := make(chan replica.Delivery, 16)
		// The session's Deliver: the delivery waits in its outgoing
		// queue; the writer never writes it (Written is not called).
		sub, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Prefetch: 1,
			Deliver: func(d replica.Delivery) { got <- d }})
		if err != nil {
			t.Fatal(err)
		}
		select {
		case d := <-got:
			if d.Count > 1 {
				t.Errorf("round %d: x-delivery-count %d, but no client ever received the message", i, d.Count)
			}
		case <-time.After(3 * time.Second):
			sub.Return()
			t.Fatalf("round %d: the message never reached the consumer: after %d lost connections that never received it, it was dead-lettered (%s holds %v, %s holds %v)",
				i, i, q, a.bodies(t, q), dlq, a.bodies(t, dlq))
		}
		// The client's connection is lost (EOF without DISCONNECT)
		// before the writer wrote the message.
		sub.Close()
	}
}

// ---------------------------------------------------------------------
// 2. The auto-ack republish still counts returns nobody failed.
//
// In auto mode the owner counts a delivery acknowledged when it hands it
// out; routedSub puts back (router.republish) one that never reached the
// wire: its subscription ended first (UNSUBSCRIBE, DISCONNECT, a broker
// ERROR, a shutdown: routedSub.close(false)), or it arrived for a former
// binding (a re-bind: deliver with a stale gen). republish stores the copy
// with Deliveries+1: a count, not the mark (0 -> 1) that Return makes.
// Three such returns and a consumer's single NACK dead-letter the message
// under queue.max_redeliveries 2; its x-delivery-count reads 3 although it
// never reached any client.
func TestReview14AutoRepublishCountsReturns(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	a := startR6(t, "node-a", rn, []string{"node-a"}, nil, r6Opts{maxRedeliveries: 2})
	q := "/queue/r14auto"
	dlq := "/queue/DLQ.r14auto"
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "m")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		got := make(chan replica.Delivery, 16)
		sub, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckAuto,
			Deliver: func(d replica.Delivery) { got <- d }})
		if err != nil {
			t.Fatal(err)
		}
		r14Wait(t, fmt.Sprintf("auto round %d", i), got, 5*time.Second)
		// The client unsubscribes (or disconnects) before the writer
		// wrote the delivery: it comes back.
		sub.Return()
		waitUntil(t, "the message is stored again", func() bool { return slices.Contains(a.bodies(t, q), "m") })
	}
	got := make(chan replica.Delivery, 16)
	if _, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual,
		Deliver: func(d replica.Delivery) { got <- d; d.Sub.Written(d.Tag) }}); err != nil {
		t.Fatal(err)
	}
	d := r14Wait(t, "client-individual consumer", got, 5*time.Second)
	count := d.Count
	// One failure: the consumer rejects it.
	ch := make(chan error, 1)
	if err := a.rt.Apply(&replica.Batch{Acks: []replica.AckOp{{Sub: d.Sub, Tag: d.Tag, Nack: true}}, Sync: true}, func(err error) { ch <- err }); err != nil {
		ch <- err
	}
	if err := waitErr(t, "NACK", ch, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if dl := a.bodies(t, dlq); len(dl) > 0 || count > 1 {
		t.Fatalf("three returns of an auto-ack delivery that reached no client, then one NACK: x-delivery-count was %d (want at most 1: marked, not counted), and with queue.max_redeliveries 2 the dead-letter queue holds %v (want nothing: one failure)",
			count, dl)
	}
}

// ---------------------------------------------------------------------
// 3. A subscription whose unsubscribe is lost stays at the owner for
// ever, holding its messages, and its client's failure is never counted.
//
// unsubscribeAt sends the peer-link unsubscribe (with x-failed for a
// failed client) once, without retry: a link down for longer than
// forwardTimeout, or one that dies with the request queued, drops it.
// Its comment says the owner then ends the subscription itself "once this
// node stops polling for it (subIdle)", but host.sweep ends a peer's
// subscriptions only when the peer stops polling altogether (h.polled is
// per peer). A node that still polls the owner for its other
// subscriptions (here the same subscription's next binding, as after a
// link blip: lost -> unsubscribe fails -> rebind at the same owner) keeps
// the orphan alive: its in-flight message is never redelivered.
func TestReview14LostUnsubscribeOrphansSubscription(t *testing.T) {
	if testing.Short() {
		t.Skip("waits subIdle")
	}
	rn := &r6Net{addrs: map[string]string{}}
	a := startR6(t, "node-a", rn, []string{"node-a"}, nil, r6Opts{})
	q := "/queue/r14orphan"
	req := r15Peer(t, a, "node-p")
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "held")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	sub := func(id string) {
		t.Helper()
		if _, err := req(opSubscribe, []string{frame.Destination, q, hdrSub, id, frame.Ack, "client-individual", hdrPrefetch, "1"}, nil); err != nil {
			t.Fatal(err)
		}
	}
	poll := func(id string) []wireDelivery {
		t.Helper()
		f, err := req(opPoll, []string{hdrKeys, "1"}, []byte(id+" 1\n"))
		if err != nil {
			t.Fatal(err)
		}
		dels, err := decodeKeyedDeliveries(f.Body, true)
		if err != nil {
			t.Fatal(err)
		}
		return dels
	}
	id1, id2 := "r14-sub.1", "r14-sub.2"
	sub(id1)
	if dels := poll(id1); len(dels) != 1 {
		t.Fatalf("first binding: %d deliveries", len(dels))
	}
	// The client fails; its node's unsubscribe of id1 (x-failed) is lost
	// with the link, and the subscription binds again at the same owner
	// (the next generation), which the node goes on polling.
	sub(id2)
	deadline := time.Now().Add(subIdle + 3*time.Second)
	for time.Now().Before(deadline) {
		if dels := poll(id2); len(dels) > 0 {
			return // the owner ended the orphan: the message came back
		}
	}
	t.Fatalf("the owner still holds the first binding %s, which its node stopped polling for %v ago (its unsubscribe was lost): its in-flight message never came back to the next binding; host subscriptions of node-p: %v",
		id1, subIdle+3*time.Second, r14HostSubs(a, "node-p"))
}

func r14HostSubs(m *r6Member, peer string) string {
	h := m.rt.host
	h.mu.Lock()
	defer h.mu.Unlock()
	var ids []string
	for _, hs := range h.subs {
		if hs.peer == peer {
			ids = append(ids, hs.id)
		}
	}
	slices.Sort(ids)
	return strings.Join(ids, ",")
}
