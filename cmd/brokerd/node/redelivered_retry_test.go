package node

import (
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
)

// A SEND whose first attempt left a copy (its write quorum failed) and
// that was then stored again by its retry exists twice; either copy may be
// a second delivery of the same message, so both must go out marked
// redelivered (the chaos suite saw such duplicates arrive unmarked).
func TestRetriedSendCopyMarkedRedelivered(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	q := pickQueue(t, "rd-", func(n string) bool { return ownerIn(n, both) == "node-a" })
	a := startR6(t, "node-a", rn, both, []string{"node-b"}, r6Opts{r: 2, w: 2})
	b := startR6(t, "node-b", rn, both, []string{"node-a"}, r6Opts{r: 2, w: 2})
	a.warm(t, "node-b")
	// node-b is on a newer epoch: it refuses node-a's appends, so the
	// first attempt stores a copy at node-a without its quorum.
	b.setView(both, 5)
	errc := a.apply(t, sendBatch(q, "m"))
	deadline := time.Now().Add(5 * time.Second)
	for len(a.bodies(t, q)) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the first attempt stored nothing at the owner")
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(150 * time.Millisecond)
	// node-a catches up with the epoch: the retry reaches its quorum.
	a.setView(both, 5)
	if err := waitErr(t, "SEND", errc, 15*time.Second); err != nil {
		t.Fatalf("the retried SEND failed: %v", err)
	}
	fresh, marked := storedCopies(t, a, q)
	t.Logf("copies at the owner: %d unmarked, %d marked as possibly delivered", fresh, marked)
	if fresh+marked < 2 {
		t.Skipf("the retry did not store a second copy (%d): nothing to check", fresh+marked)
	}
	// The retry's copy is marked (router: maybeDelivered), and so is the
	// first attempt's, still pending when its quorum failed (replica:
	// unconfirmed): whichever is delivered first, the other is marked.
	if fresh != 0 {
		t.Fatalf("%d copies would be delivered as first deliveries; want none (both copies of a SEND whose first attempt failed its quorum are marked)", fresh)
	}
}

// storedCopies counts the copies of q's messages in m's store: unmarked
// (they go out as first deliveries) and marked possibly delivered.
func storedCopies(t *testing.T, m *r6Member, q string) (fresh, marked int) {
	t.Helper()
	if err := m.st.Scan(q, 0, 0, 0, func(k uint64, v []byte) error {
		msg, err := replica.DecodeMessage(q, v)
		if err != nil {
			return err
		}
		if msg.Deliveries > 0 {
			marked++
		} else {
			fresh++
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return fresh, marked
}
