package node

// Hostile review, round 10: retry chains, waitRetries/waitFlights, the
// owner's refusal marks (the "second review" redesign). Each test fails
// on the code it was written against; see the report.

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// ---------------------------------------------------------------------
// 1. A queue's retry chain costs retryDelay per SEND, and the next SEND
// stops waiting for it and overtakes.
//
// runChain sleeps retryDelay (100 ms) before the first attempt of every
// job, even when the job before it was just stored: K SENDs of a queue
// that failed together (the pipelined SENDs of one or many connections
// on the link when the owner refused them or died) take K x 100 ms to
// drain. waitRetries holds a later SEND for failoverBudget+1s only, then
// lets it go (and waitFlights does not hold it: same owner): it is
// stored before the chain's tail. Here 60 SENDs refused together take
// over 6 s to drain; SEND 61 is stored after about 5 s, before 50..60.
func TestReview10ChainDrainsAt100msPerSendAndIsOvertaken(t *testing.T) {
	const n = 60
	rn := &r6Net{addrs: map[string]string{}}
	var b *r6Member
	var refusals atomic.Int32
	wrap := func(inner stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			inner.HandlePeer(peer, f, func(r *frame.Frame) {
				if isNotOwnerReply(r) && refusals.Add(1) == n {
					// node-b's view catches up once it refused them all.
					b.setView([]string{"node-b"}, 2)
				}
				reply(r)
			})
		})
	}
	a := startR6(t, "node-a", rn, []string{"node-b"}, []string{"node-b"}, r9Opts(nil))
	b = startR6(t, "node-b", rn, []string{"node-z"}, []string{"node-a"}, r9Opts(wrap))
	q := "/queue/r10-chain"
	a.warm(t, "node-b")
	a.fgate.hold() // the connection's pipelined SENDs, all on the link
	chs := make([]chan error, 0, n+1)
	for i := 1; i <= n; i++ {
		chs = append(chs, a.apply(t, sendBatch(q, strconv.Itoa(i))))
	}
	a.fgate.release()
	waitUntil(t, "all refused", func() bool { return refusals.Load() >= n })
	start := time.Now()
	chs = append(chs, a.apply(t, sendBatch(q, strconv.Itoa(n+1)))) // waits in waitRetries
	held := time.Since(start)
	for i, ch := range chs {
		if err := waitErr(t, "SEND "+strconv.Itoa(i+1), ch, 15*time.Second); err != nil {
			t.Fatalf("SEND %d: %v", i+1, err)
		}
	}
	drained := time.Since(start)
	want := make([]string, 0, n+1)
	for i := 1; i <= n+1; i++ {
		want = append(want, strconv.Itoa(i))
	}
	if got := b.bodies(t, q); !slices.Equal(got, want) {
		t.Fatalf("one connection sent 1..%d to %s, all receipted; the owner stored %v: the retry chain of %d SENDs took %v (100 ms per SEND), SEND %d waited %v in Apply and went first",
			n+1, q, got, n, drained.Round(time.Millisecond), n+1, held.Round(time.Millisecond))
	}
}

// ---------------------------------------------------------------------
// 2. A retry of several queues runs on its first queue's chain only: it
// overtakes an earlier retry of its other queues.
//
// later keys a job by msgs[0].Dest. A batch (a transaction) with SENDs to
// q1 and q2, refused by their owner, is retried on q1's chain, while an
// earlier SEND to q2 of the same connection waits on q2's chain behind
// another job. q2's SEND of the batch is stored first. (The owner's
// marks do not help: retries are never refused, and the batch's retry,
// once stored, lifts the marks of q2 too.) Here the job ahead on q2's
// chain is a batch with a queue (q4) whose new owner (node-d) is slow to
// answer its first SEND (a take-over); q1 and q2 move to node-c.
func TestReview10MultiQueueRetryOvertakesOnOtherChain(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	cd := []string{"node-c", "node-d"}
	q1 := pickQueue(t, "r10m1-", func(n string) bool { return ownerIn(n, cd) == "node-c" })
	q2 := pickQueue(t, "r10m2-", func(n string) bool { return ownerIn(n, cd) == "node-c" })
	q4 := pickQueue(t, "r10m4-", func(n string) bool { return ownerIn(n, cd) == "node-d" })
	var a *r6Member
	var refusals atomic.Int32
	wrapB := func(inner stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			inner.HandlePeer(peer, f, func(r *frame.Frame) {
				if isNotOwnerReply(r) && refusals.Add(1) == 3 {
					a.setView(cd, 2) // node-a's view follows
				}
				reply(r)
			})
		})
	}
	slow := make(chan struct{})
	var slowOnce sync.Once
	defer slowOnce.Do(func() { close(slow) })
	wrapD := func(inner stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			if f.Header.Get(stomp.PeerHeaderOp) == opSend && peer == "node-a" {
				<-slow // node-d taking q4 over
			}
			inner.HandlePeer(peer, f, reply)
		})
	}
	a = startR6(t, "node-a", rn, []string{"node-b"}, []string{"node-b", "node-c", "node-d"}, r9Opts(nil))
	startR6(t, "node-b", rn, cd, []string{"node-a", "node-c", "node-d"}, r9Opts(wrapB))
	c := startR6(t, "node-c", rn, cd, []string{"node-a", "node-b", "node-d"}, r9Opts(nil))
	startR6(t, "node-d", rn, cd, []string{"node-a", "node-b", "node-c"}, r9Opts(wrapD))
	for _, p := range []string{"node-b", "node-c", "node-d"} {
		a.warm(t, p)
	}
	a.fgate.hold()
	ch0 := a.apply(t, &replica.Batch{Sync: true, Sends: []*replica.Message{
		{Dest: q2, Body: []byte("0")}, {Dest: q4, Body: []byte("0")},
	}})
	ch1 := a.apply(t, sendBatch(q2, "1"))
	ch2 := a.apply(t, &replica.Batch{Sync: true, Sends: []*replica.Message{
		{Dest: q1, Body: []byte("x")}, {Dest: q2, Body: []byte("2")},
	}})
	a.fgate.release()
	// Give the chains time to run (q2's is held by node-d for this long).
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) && !slices.Contains(c.bodies(t, q2), "2") {
		time.Sleep(20 * time.Millisecond)
	}
	slowOnce.Do(func() { close(slow) })
	for i, ch := range []chan error{ch0, ch1, ch2} {
		if err := waitErr(t, fmt.Sprint("batch ", i), ch, 15*time.Second); err != nil {
			t.Fatalf("batch %d: %v", i, err)
		}
	}
	got := c.bodies(t, q2)
	i1, i2 := slices.Index(got, "1"), slices.Index(got, "2")
	if i1 < 0 || i2 < 0 || i2 < i1 {
		t.Fatalf("one connection sent 0, 1, 2 to %s, all receipted; its new owner stored %v: the retry of the batch {%s, %s} ran on %s's chain and overtook SEND 1, which waited on %s's chain",
			q2, got, q1, q2, q1, q2)
	}
}

// ---------------------------------------------------------------------
// 3. A retry spanning owners stores its stored parts again at every
// attempt.
//
// applyOnce applies the whole job and reports the first error; runChain
// then retries the whole job. A job whose queues now have different
// owners (a batch to queues of one owner that died, spread over the
// survivors) is stored again at the owners that took their part every
// 100 ms, while one owner refuses (its view lags, its take-over is slow,
// no quorum yet), for up to the 4 s budget: here node-c holds one copy
// per attempt of a message the client sent once and got one RECEIPT
// for. (reroute, before, retried each owner's part on its own.)
func TestReview10MultiOwnerRetryStoresAgainPerAttempt(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	cd := []string{"node-c", "node-d"}
	q2 := pickQueue(t, "r10d2-", func(n string) bool { return ownerIn(n, cd) == "node-c" })
	q4 := pickQueue(t, "r10d4-", func(n string) bool { return ownerIn(n, cd) == "node-d" })
	var a, d *r6Member
	var flipped atomic.Bool
	wrapB := func(inner stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			inner.HandlePeer(peer, f, func(r *frame.Frame) {
				if isNotOwnerReply(r) && flipped.CompareAndSwap(false, true) {
					a.setView(cd, 2)
				}
				reply(r)
			})
		})
	}
	var dRefusals atomic.Int32
	wrapD := func(inner stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			inner.HandlePeer(peer, f, func(r *frame.Frame) {
				if isNotOwnerReply(r) && dRefusals.Add(1) == 5 {
					d.setView(cd, 2) // node-d's view catches up
				}
				reply(r)
			})
		})
	}
	a = startR6(t, "node-a", rn, []string{"node-b"}, []string{"node-b", "node-c", "node-d"}, r9Opts(nil))
	startR6(t, "node-b", rn, cd, []string{"node-a", "node-c", "node-d"}, r9Opts(wrapB))
	c := startR6(t, "node-c", rn, cd, []string{"node-a", "node-b", "node-d"}, r9Opts(nil))
	d = startR6(t, "node-d", rn, []string{"node-c"}, []string{"node-a", "node-b", "node-c"}, r9Opts(wrapD))
	for _, p := range []string{"node-b", "node-c", "node-d"} {
		a.warm(t, p)
	}
	ch := a.apply(t, &replica.Batch{Sync: true, Sends: []*replica.Message{
		{Dest: q2, Body: []byte("m")}, {Dest: q4, Body: []byte("n")},
	}})
	if err := waitErr(t, "batch", ch, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := c.bodies(t, q2); len(got) != 1 {
		t.Fatalf("one SEND to %s, one RECEIPT; its owner node-c holds %d copies (%s): the retry was applied whole at each of node-d's %d refusals",
			q2, len(got), strings.Join(got, ","), dRefusals.Load())
	}
}
