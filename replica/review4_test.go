package replica

// Hostile review, round 4: catch-up range reconciliation (wire kind 8,
// ApplyReplicated's range deletes), reviewed at 337f9d6, where this test
// fails; it passes on 78f7b48 and on the revert (453be0d), and guards
// against range reconciliation coming back without a safe owner.
// (A second test, of maxRangeScan truncation, needs 337f9d6's symbols:
// /tmp/rev4/replica/review4_test.go.)

import (
	"slices"
	"testing"
)

// ---------------------------------------------------------------------
// 1. A new owner's catch-up deletes the only surviving copy of a
// receipted message.
//
// R = 3, W = 2 on a, b, c; a owns q. While b is unreachable, a SEND is
// receipted with a's and c's copies (W = 2). a dies; b adopts q (its copy
// lacks the message: the "union pull" of DESIGN.md is not built). b's
// first write to q begins a catch-up to c, whose ranges say "the owner
// holds exactly these keys" about a bucket that was never complete: c
// removes the receipted message. The only copy left is on a, which is
// gone. Before the change c kept it (DESIGN.md and the begin comment
// still say "the replica keeps its copy (it may hold receipted messages
// the owner's other copies lack)"); a later union pull would have found
// it, now there is nothing left to pull.
func TestReview4NewOwnerCatchUpDeletesReceiptedCopy(t *testing.T) {
	cl := newCUCluster(t, []string{"a", "b", "c"}, []string{"a", "b", "c"}, 3, 2, 0)
	a, b, c := cl.nodes["a"], cl.nodes["b"], cl.nodes["c"]
	const q = "/queue/r4-failover"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, a, q, 0, 10)
	cl.reps["a"].Wait()
	cl.settle()
	if !cl.reps["a"].Synced("b", q) || !cl.reps["a"].Synced("c", q) {
		t.Fatal("setup: b and c not synced")
	}
	before := bucketKeys(t, a, q)

	// b misses one write; it is receipted with a's and c's copies.
	cl.fake.mu.Lock()
	cl.fake.down["b"] = true
	cl.fake.mu.Unlock()
	if err := a.send(q, "receipted-on-a-and-c"); err != nil {
		t.Fatalf("SEND with a and c up, W = 2: %v", err)
	}
	cl.settle()
	var key uint64
	for _, k := range bucketKeys(t, a, q) {
		if !slices.Contains(before, k) {
			key = k
		}
	}
	if key == 0 || !slices.Contains(bucketKeys(t, c, q), key) || slices.Contains(bucketKeys(t, b, q), key) {
		t.Fatalf("setup: receipted key %d not on c only (c %v)", key, bucketKeys(t, c, q))
	}

	// b's own sequence passes that key (it writes a queue of its own
	// meanwhile), so that b's new keys do not reuse it: what follows is
	// the range's doing alone, not a key collision.
	const other = "/queue/r4-failover-other"
	if err := b.n.Adopt(other); err != nil {
		t.Fatal(err)
	}
	if err := b.send(other, "1", "2", "3", "4", "5"); err != nil {
		t.Fatal(err)
	}
	cl.reps["b"].Wait()
	cl.settle()

	// a is gone for good; b and c remain, b takes q over.
	cl.fake.mu.Lock()
	cl.fake.down["a"] = true
	cl.fake.down["b"] = false
	cl.fake.active = []string{"b", "c"}
	cl.fake.mu.Unlock()
	if err := b.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	if err := b.send(q, "first-on-b"); err != nil {
		t.Fatal(err)
	}
	cl.reps["b"].Wait()
	cl.settle()
	if !cl.reps["b"].Synced("c", q) {
		t.Fatal("b's catch-up to c did not end")
	}
	if got := records(t, c, q)[key]; got == "" {
		t.Fatalf("message %d was receipted with W = 2 (a and c); a is gone and b's catch-up removed it from c: no copy is left", key)
	}
}
