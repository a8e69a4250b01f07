package node

// Hostile review, round 9: order across a retry (retryLoop, waitRetries,
// the owner's not-owner marks). Each test fails on the code it was
// written against; see the report.

import (
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// r9Opts is r6Opts with R = 1 (no replication: only forwarding matters).
func r9Opts(wrap func(stomp.PeerHandler) stomp.PeerHandler) r6Opts {
	return r6Opts{r: 1, w: 1, wrap: wrap}
}

func isNotOwnerReply(r *frame.Frame) bool {
	return r != nil && r.Header.Get(stomp.PeerHeaderCode) == codeNotOwner
}

// ---------------------------------------------------------------------
// 1. One retry blocks every other: a take-over on the retry goroutine.
//
// router.retryLoop runs each retry synchronously. A retry whose queue is
// now owned here runs ensureOwned, i.e. a take-over that pulls from every
// alive peer (up to forwardTimeout per pull, twice per peer: tombstones,
// then messages). Every other retry of the node, of any queue and any
// connection, waits behind it. Here q1's retry takes q1 over while a peer
// (node-h) is slow to answer pulls; q2's retry (its owner node-b is fine)
// waits for that take-over (~10 s with node-h silent: 5 s per pull; the
// test lets node-h answer once SEND 3 is stored). Meanwhile the same
// connection's next SEND to q2 waits in waitRetries for
// failoverBudget+1s, gives up and is stored first: the client sent 2
// then 3, got both RECEIPTs, and consumers get 3 then 2.
func TestReview9RetryLoopHeadOfLine(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	ab := []string{"node-a", "node-b"}
	q1 := pickQueue(t, "r9h1-", func(n string) bool { return ownerIn(n, ab) == "node-a" })
	q2 := pickQueue(t, "r9h2-", func(n string) bool { return ownerIn(n, ab) == "node-b" })
	h := startHolder(t, "node-h", rn) // answers pulls only once opened
	var a, b *r6Member
	var refusals atomic.Int32
	wrap := func(inner stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			inner.HandlePeer(peer, f, func(r *frame.Frame) {
				if isNotOwnerReply(r) && refusals.Add(1) == 2 {
					// Both first attempts refused: the views converge
					// before their retries run.
					a.setView(ab, 2)
					b.setView(ab, 2)
				}
				reply(r)
			})
		})
	}
	// node-a sees node-b as the owner of everything; node-b sees node-a.
	a = startR6(t, "node-a", rn, []string{"node-b"}, []string{"node-b", "node-h"}, r9Opts(nil))
	b = startR6(t, "node-b", rn, []string{"node-a"}, []string{"node-a"}, r9Opts(wrap))
	a.warm(t, "node-b")
	start := time.Now()
	a.fgate.hold() // both first attempts on the link together
	ch1 := a.apply(t, sendBatch(q1, "1"))
	ch2 := a.apply(t, sendBatch(q2, "2"))
	a.fgate.release()
	waitUntil(t, "q2's SEND being retried", func() bool {
		a.rt.gmu.Lock()
		defer a.rt.gmu.Unlock()
		return a.rt.retrying[q2] != nil
	})
	time.Sleep(300 * time.Millisecond)
	// The connection's next SEND to q2.
	ch3 := a.apply(t, sendBatch(q2, "3"))
	if err := waitErr(t, "SEND 3", ch3, 15*time.Second); err != nil {
		t.Fatal(err)
	}
	h.open()
	if err := waitErr(t, "SEND 2", ch2, 15*time.Second); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if err := waitErr(t, "SEND 1", ch1, 15*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(b.bodies(t, q2), ","); got != "2,3" {
		t.Fatalf("one connection sent 2 then 3 to %s (owner node-b, reachable throughout); both receipted; node-b stored %s: SEND 2's retry waited %v behind %s's take-over on the one retry goroutine, and SEND 3 stopped waiting for it",
			q2, got, took.Round(time.Millisecond), q1)
	}
}

// ---------------------------------------------------------------------
// 2. A retry clears the marks although an earlier retry was just refused.
//
// refusedSince deletes the (peer, queue) mark for any SEND with x-retry,
// whatever was refused before it. Retries are pipelined (retryLoop sends
// the next as soon as the previous is queued), so when the owner's view
// changes between two retries of one connection's SENDs, the first is
// refused (not owner yet, marked again) and the second is accepted (the
// mark is cleared): 2 is stored, then 1 at its next retry.
func TestReview9RetryClearsMarkOfRefusedRetry(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	var b *r6Member
	var flipped atomic.Bool
	wrap := func(inner stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			retry := f.Header.Get(hdrRetry) == "1"
			inner.HandlePeer(peer, f, func(r *frame.Frame) {
				if retry && isNotOwnerReply(r) && flipped.CompareAndSwap(false, true) {
					// node-b's view catches up right after it refused
					// the first retry.
					b.setView([]string{"node-b"}, 2)
				}
				reply(r)
			})
		})
	}
	// node-a sees node-b as the owner; node-b does not know yet.
	a := startR6(t, "node-a", rn, []string{"node-b"}, []string{"node-b"}, r9Opts(nil))
	b = startR6(t, "node-b", rn, []string{"node-z"}, []string{"node-a"}, r9Opts(wrap))
	q := "/queue/r9-marks"
	a.warm(t, "node-b")
	// Two SENDs of one connection, both on the link before any answer.
	a.fgate.hold()
	ch1 := a.apply(t, sendBatch(q, "1"))
	ch2 := a.apply(t, sendBatch(q, "2"))
	a.fgate.release()
	if err := waitErr(t, "SEND 1", ch1, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := waitErr(t, "SEND 2", ch2, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(b.bodies(t, q), ","); got != "1,2" {
		t.Fatalf("one connection sent 1 then 2 to %s, both receipted; the owner stored %s (the retry of 2 cleared the mark left by the refused retry of 1)", q, got)
	}
}

// ---------------------------------------------------------------------
// 3. A SEND in flight to the old owner is overtaken by the next SEND,
// sent to the new owner.
//
// waitRetries holds a SEND back only behind SENDs being *retried*. When
// this node's view moves a queue to another owner while an earlier SEND
// of the queue is still on its way to the old owner (not yet answered),
// the next SEND goes to the new owner at once and is stored there; the
// old owner then refuses the earlier one (its view moved too), which is
// retried and stored after it. (The owner-side marks cannot help: the two
// SENDs go to different owners.) The hold below stands for the link's
// latency.
func TestReview9InFlightSendOvertakenAfterViewChange(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	bc := []string{"node-b", "node-c"}
	q := pickQueue(t, "r9f-", func(n string) bool { return ownerIn(n, bc) == "node-c" })
	entered := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	wrap := func(inner stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			if f.Header.Get(stomp.PeerHeaderOp) == opSend && peer == "node-a" {
				held := false
				once.Do(func() { held = true })
				if held {
					close(entered)
					<-release
				}
			}
			inner.HandlePeer(peer, f, reply)
		})
	}
	a := startR6(t, "node-a", rn, []string{"node-b"}, []string{"node-b", "node-c"}, r9Opts(nil))
	b := startR6(t, "node-b", rn, []string{"node-b"}, []string{"node-a", "node-c"}, r9Opts(wrap))
	c := startR6(t, "node-c", rn, bc, []string{"node-a", "node-b"}, r9Opts(nil))
	a.warm(t, "node-b")
	a.warm(t, "node-c")
	ch1 := a.apply(t, sendBatch(q, "1"))
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("SEND 1 did not reach node-b")
	}
	// node-a's view moves q to node-c while SEND 1 is on its way; SEND
	// 2 goes (or waits) while node-b still holds SEND 1, which node-b
	// then refuses (its view moved too).
	a.setView(bc, 2)
	go func() {
		time.Sleep(300 * time.Millisecond)
		b.setView(bc, 2)
		close(release)
	}()
	ch2 := a.apply(t, sendBatch(q, "2")) // waits for SEND 1 (waitFlights)
	if err := waitErr(t, "SEND 2", ch2, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := waitErr(t, "SEND 1", ch1, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(c.bodies(t, q), ",")
	if got != "1,2" {
		t.Fatalf("one connection sent 1 then 2 to %s, both receipted; its new owner stored %s (old owner node-b holds %v)", q, got, b.bodies(t, q))
	}
}

// ---------------------------------------------------------------------
// 4. The owner answers a refusal ahead of earlier SENDs still in its
// per-peer worker.
//
// forwardHandler's first ownership check runs on the link's reader and
// refuses at once; SENDs it passed wait in the peer's worker (behind a
// take-over, for instance). So a later SEND's refusal reaches the sender
// before an earlier SEND's outcome: the sender's retries are not in send
// order ("a link answers and fails requests in order" does not hold), and
// the later SEND is stored first at the new owner. Here node-b's worker
// is busy taking R over (a peer slow to answer pulls) when SEND 1 (q)
// passes the reader's check; node-b's view then moves q to node-c, SEND
// 2 is refused on the reader at once and retried to node-c; SEND 1 is
// refused by the worker later and lands after it.
func TestReview9ReaderRefusalOvertakesWorker(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	bc := []string{"node-b", "node-c"}
	q := pickQueue(t, "r9w-", func(n string) bool { return ownerIn(n, bc) == "node-c" })
	r := pickQueue(t, "r9wr-", func(n string) bool { return ownerIn(n, bc) == "node-b" })
	h := startHolder(t, "node-h", rn)
	var handled atomic.Int32
	wrap := func(inner stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			inner.HandlePeer(peer, f, reply)
			if f.Header.Get(stomp.PeerHeaderOp) == opSend {
				handled.Add(1)
			}
		})
	}
	a := startR6(t, "node-a", rn, []string{"node-b"}, []string{"node-b", "node-c"}, r9Opts(nil))
	b := startR6(t, "node-b", rn, []string{"node-b"}, []string{"node-a", "node-c", "node-h"}, r9Opts(wrap))
	c := startR6(t, "node-c", rn, bc, []string{"node-a", "node-b"}, r9Opts(nil))
	defer h.open()
	a.warm(t, "node-b")
	a.warm(t, "node-c")
	// Another connection's SEND to R: node-b's worker for node-a takes R
	// over and waits for node-h's answer.
	chR := a.apply(t, sendBatch(r, "r"))
	waitUntil(t, "node-b pulling from node-h", func() bool { return h.pulls.Load() > 0 })
	ch1 := a.apply(t, sendBatch(q, "1"))
	waitUntil(t, "SEND 1 past node-b's reader", func() bool { return handled.Load() >= 2 })
	b.setView(bc, 2) // node-b's view moves q to node-c
	ch2 := a.apply(t, sendBatch(q, "2"))
	// SEND 2 is refused on node-b's reader at once (and retried); its
	// view follows.
	for deadline := time.Now().Add(300 * time.Millisecond); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
		a.rt.gmu.Lock()
		retrying := a.rt.retrying[q] != nil
		a.rt.gmu.Unlock()
		if retrying {
			break
		}
	}
	a.setView(bc, 2)
	var err2 error
	got2 := false
	select {
	case err2 = <-ch2:
		// Stored at node-c while SEND 1 waits in node-b's worker.
		got2 = true
	case <-time.After(1500 * time.Millisecond):
	}
	h.open()
	if !got2 {
		err2 = waitErr(t, "SEND 2", ch2, 15*time.Second)
	}
	if err2 != nil {
		t.Fatal(err2)
	}
	if err := waitErr(t, "SEND 1", ch1, 15*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := waitErr(t, "SEND r", chR, 15*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(c.bodies(t, q), ","); got != "1,2" {
		t.Fatalf("one connection sent 1 then 2 to %s, both receipted; node-c stored %s: node-b refused 2 on its reader while 1 waited in its worker, so 2 was retried first", q, got)
	}
}
