package replica

import (
	"context"
	"testing"
)

// TestReview13PurgeKeepsSendsAfterItBegan: a purge removes what is ready
// when it begins, as RabbitMQ's does. A queue longer than one round
// (purgeChunk) is purged in several rounds, and each round took the
// queue's counted bound afresh, so a message sent and receipted after the
// purge began (between two rounds) was removed by a later round: a
// producer's acknowledged SEND, made after the operator's purge started,
// silently gone. The bound is the one the first round read.
func TestReview13PurgeKeepsSendsAfterItBegan(t *testing.T) {
	c := newRepCluster(t, 1, []string{"a"}, "a")
	a := c.h["a"]
	const q = "/queue/review13-purge-race"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	n := 2*purgeChunk + 10
	sendNumbered(t, a, q, 0, n)
	sent := false
	purgeRoundHook = func() {
		if !sent {
			sent = true
			sendNumbered(t, a, q, n, n+1) // after the purge began: it stays
		}
	}
	t.Cleanup(func() { purgeRoundHook = nil })
	removed, err := a.n.Purge(context.Background(), q)
	if err != nil {
		t.Fatal(err)
	}
	if !sent {
		t.Fatal("the purge ran one round only: the test sends between two rounds")
	}
	if removed != n {
		t.Fatalf("Purge removed %d, want the %d ready when it began", removed, n)
	}
	if info := a.info(q); info.Pending != 1 {
		t.Fatalf("queue after the purge: %+v, want the 1 message sent after it began", info)
	}
	if left := bucketKeys(t, a, q); len(left) != 1 {
		t.Fatalf("%d messages stored after the purge, want the 1 sent after it began", len(left))
	}
}
