package node

import (
	"testing"
	"time"
)

// A SEND whose write quorum cannot be reached is stored at its owner
// anyway (outcome unknown). Retrying it every 100 ms while nothing
// changes stored a copy per attempt: up to 40 in the 4 s budget, each
// delivered. It is now tried again when the view changes or once a
// second: a handful of copies at most.
func TestRetryNoQuorumStoresFewCopies(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	q := pickQueue(t, "nq-", func(n string) bool { return ownerIn(n, both) == "node-a" })
	a := startR6(t, "node-a", rn, both, []string{"node-b"}, r6Opts{r: 2, w: 2})
	b := startR6(t, "node-b", rn, both, []string{"node-a"}, r6Opts{r: 2, w: 2})
	a.warm(t, "node-b")
	// node-b has moved to a newer epoch: it refuses node-a's appends
	// (stale epoch) and node-a's view does not change.
	b.setView(both, 5)
	start := time.Now()
	err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "m")), 15*time.Second)
	if err == nil {
		t.Fatal("a SEND without its write quorum succeeded")
	}
	copies := len(a.bodies(t, q))
	t.Logf("after %v: %v; %d copies stored at the owner", time.Since(start).Round(10*time.Millisecond), err, copies)
	if copies > 6 {
		t.Fatalf("a SEND that could not reach its write quorum for %v was stored %d times", time.Since(start).Round(10*time.Millisecond), copies)
	}
}
