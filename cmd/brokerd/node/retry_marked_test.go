package node

// Retries mark their copies from the first attempt that may have stored
// one, whichever attempt that is.

import (
	"testing"
	"time"
)

// A SEND whose first attempt is refused (not-owner: the views differ while
// gossip catches up) and whose next attempt leaves a copy without its
// quorum (the replicas already on a newer epoch) is stored again by a later
// attempt: that copy must be marked, or both go out as first deliveries.
// This is the failover sequence the chaos suite provokes (views differ,
// then epochs differ); a hostile review found it.
func TestRetryAfterNotOwnerThenNoQuorumMarked(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	q := pickQueue(t, "rtm-", func(n string) bool { return ownerIn(n, both) == "node-a" })
	// node-a thinks node-b owns q (its view has only node-b active):
	// node-b's forward is refused not-owner, nothing stored.
	a := startR6(t, "node-a", rn, []string{"node-b"}, []string{"node-b"}, r6Opts{r: 2, w: 2})
	b := startR6(t, "node-b", rn, both, []string{"node-a"}, r6Opts{r: 2, w: 2})
	b.warm(t, "node-a")
	a.warm(t, "node-b")
	errc := b.apply(t, sendBatch(q, "m"))
	time.Sleep(300 * time.Millisecond) // a few not-owner refusals
	if n := len(a.bodies(t, q)); n != 0 {
		t.Fatalf("a refused attempt stored %d copies", n)
	}
	// node-b moves to a newer epoch (it will refuse node-a's appends),
	// then node-a takes its seat at the older one: the next attempt is
	// stored at node-a without its write quorum.
	b.setView(both, 5)
	a.setView(both, 1)
	deadline := time.Now().Add(3 * time.Second)
	for len(a.bodies(t, q)) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no attempt stored a copy at node-a")
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	// node-a catches up: the next retry reaches its quorum.
	a.setView(both, 5)
	if err := waitErr(t, "SEND", errc, 15*time.Second); err != nil {
		t.Fatalf("the retried SEND failed: %v", err)
	}
	fresh, marked := storedCopies(t, a, q)
	t.Logf("copies at the owner: %d unmarked, %d marked", fresh, marked)
	if fresh+marked < 2 {
		t.Skipf("only %d copy stored: nothing to check", fresh+marked)
	}
	// The no-quorum attempt's copy is marked by the owner (still pending
	// when its quorum failed), the last attempt's by the router.
	if fresh != 0 {
		t.Fatalf("%d copies of one SEND stored unmarked (first failure not-owner, a later one no-quorum): each goes out as a first delivery", fresh)
	}
}
