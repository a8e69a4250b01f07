package node

// A release (closeDest, then rep.Release) holds its queue's place in
// owned until it is done, so that a take-over started meanwhile (a
// subscriber rebinding at once after closeDest) is neither undone by the
// Release (its subscriptions closed, its adoption dropped: the queue
// counted owned here but served by nobody) nor done at a node that no
// longer owns the queue.

import (
	"errors"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
)

// A take-over asked for during a release waits for it, then adopts the
// queue, and its subscription is served.
func TestReleaseTakeOverWaitsForRelease(t *testing.T) {
	a := r10aSingle(t)
	q := "/queue/release-race"
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "m1")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	a.rt.omu.Lock()
	rel := a.rt.markReleasing(q)
	a.rt.omu.Unlock()

	owned := make(chan error, 1)
	go func() { owned <- a.rt.ensureOwned(q) }()
	select {
	case err := <-owned:
		t.Fatalf("ensureOwned returned (%v) while the queue was being released", err)
	case <-time.After(300 * time.Millisecond):
	}
	a.rt.releaseHere(q, rel)
	select {
	case err := <-owned:
		if err != nil {
			t.Fatalf("ensureOwned after the release: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ensureOwned still waits 10 s after the release ended")
	}
	if !a.rep.Adopted(q) {
		t.Fatal("the take-over that waited for the release did not adopt the queue")
	}
	var rec recorder
	sub, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Prefetch: 8, Deliver: rec.deliver})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	got := rec.waitN(1, 5*time.Second)
	if len(got) != 1 || got[0] != "m1" {
		t.Fatalf("deliveries after the release and take-over: %v", got)
	}
	rec.mu.Lock()
	tag := rec.got[0].Tag
	rec.mu.Unlock()
	if err := ackOf(t, a, sub, tag); err != nil {
		t.Fatalf("ACK of a delivery of the new take-over: %v", err)
	}
}

// Merge after merge while a subscriber acknowledges: every ACK of a
// current delivery is accepted (the CI flake this fixes: "subscription
// closed", when a rebind's take-over ran before the merge's Release).
func TestReleaseMergeStormAcksAccepted(t *testing.T) {
	a := r10aSingle(t)
	q := "/queue/release-storm"
	var bodies []string
	for i := 0; i < 20; i++ {
		bodies = append(bodies, "m")
	}
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, bodies...)), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	var rec recorder
	sub, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Prefetch: 1, Deliver: rec.deliver})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	acked := 0
	deadline := time.Now().Add(30 * time.Second)
	for seen := 0; acked < 20 && time.Now().Before(deadline); {
		got := rec.waitN(seen+1, 5*time.Second)
		if len(got) <= seen {
			t.Fatalf("no delivery after %d acknowledged (stored: %v)", acked, a.bodies(t, q))
		}
		rec.mu.Lock()
		tag := rec.got[seen].Tag
		rec.mu.Unlock()
		seen++
		a.rt.merge(q) // the owner takes the queue over again
		if err := sub.Check(tag); err != nil {
			continue // a former binding's delivery that came back: skipped
		}
		if err := ackOf(t, a, sub, tag); err != nil && !errors.Is(err, replica.ErrUnknownAck) {
			t.Fatalf("ACK %d after a merge: %v", acked+1, err)
		}
		acked++
	}
	if acked < 20 {
		t.Fatalf("%d of 20 messages acknowledged in 30 s of merges (stored: %v)", acked, a.bodies(t, q))
	}
}

// A caller that waited for a release of a queue that moved to another
// node gets a not-owner error (it retries at the new owner); it does not
// take the queue over here, where nobody would release it until the
// next view change.
func TestReleaseMovedQueueNotTakenOverHere(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	active := []string{"node-a", "node-b"}
	q := pickQueue(t, "release-moved-", func(n string) bool { return ownerIn(n, active) == "node-a" })
	a := startR6(t, "node-a", rn, active, []string{"node-b"}, r6Opts{r: 1, w: 1, noWatch: true})

	a.rt.omu.Lock()
	rel := a.rt.markReleasing(q)
	a.rt.omu.Unlock()
	owned := make(chan error, 1)
	go func() { owned <- a.rt.ensureOwned(q) }()
	time.Sleep(100 * time.Millisecond)
	a.setView([]string{"node-b"}, 2) // the queue moves to node-b
	a.rt.releaseHere(q, rel)
	select {
	case err := <-owned:
		if !errors.Is(err, errNotOwner) {
			t.Fatalf("ensureOwned of a queue that moved to node-b: %v, want a not-owner error", err)
		}
		if got := failCode(err); got != codeNotOwner {
			t.Fatalf("a peer asking gets code %q, want %q", got, codeNotOwner)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ensureOwned still waits 10 s after the release ended")
	}
	if a.rep.Adopted(q) {
		t.Fatal("node-a took over a queue node-b owns")
	}
}

// A local SEND whose queue moved since this node's cached view (the
// take-over finds, in a fresh view, another owner) goes to the new owner:
// no ERROR for the client, and no copy served here.
func TestReleaseMovedQueueSendGoesToNewOwner(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	q := pickQueue(t, "release-moved-send-", func(n string) bool { return ownerIn(n, both) == "node-a" })
	a := startR6(t, "node-a", rn, both, []string{"node-b"}, r6Opts{r: 1, w: 1, noWatch: true})
	b := startR6(t, "node-b", rn, []string{"node-b"}, []string{"node-a"}, r6Opts{r: 1, w: 1, noWatch: true})
	a.warm(t, "node-b")
	a.rt.refresh() // cached: node-a owns q

	// node-a leaves the active set; its router's cached view (viewTTL)
	// still says otherwise.
	a.view.mu.Lock()
	a.view.active = []string{"node-b"}
	a.view.epoch.Counter, a.view.epoch.Set = 2, 2
	a.view.mu.Unlock()
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "moved")), 10*time.Second); err != nil {
		t.Fatalf("SEND to a queue that moved under the cached view: %v", err)
	}
	if a.rep.Adopted(q) {
		t.Fatal("node-a took over a queue node-b owns")
	}
	if got := b.bodies(t, q); len(got) != 1 || got[0] != "moved" {
		t.Fatalf("node-b (the owner) holds %v, want [moved]", got)
	}
}
