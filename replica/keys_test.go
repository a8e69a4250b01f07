package replica

import (
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/store"
)

// Two owners of one queue in turn, with the same clock: the second,
// which never received a message the first stored on a third replica,
// must not store its own message under the same key (it would overwrite
// the receipted message on that replica).
func TestKeysUniqueAcrossOwners(t *testing.T) {
	at := time.Unix(1_800_000_000, 0)
	now := func() time.Time { return at }
	const q = "/queue/k"
	mk := func(id string) *harness {
		cfg := DefaultConfig()
		cfg.NodeID = id
		cfg.Now = now
		return newHarness(t, cfg)
	}
	a, b, c := mk("node-a"), mk("node-b"), mk("node-c")
	if nodeSlot("node-a") == nodeSlot("node-b") {
		t.Fatal("test IDs share a slot; pick others")
	}
	if err := a.send(q, "from a"); err != nil {
		t.Fatal(err)
	}
	ka := bucketKeys(t, a, q)
	// c receives a's message; b does not.
	var ops []store.Op
	if err := a.st.Scan(q, 0, 0, 0, func(k uint64, v []byte) error {
		ops = append(ops, store.Op{Kind: store.OpPut, Bucket: q, Key: k, Value: append([]byte(nil), v...)})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	if err := c.n.ApplyReplicated(cluster.EpochID{}, cluster.EpochID{}, AppendOps(nil, ops), func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := b.send(q, "from b"); err != nil {
		t.Fatal(err)
	}
	kb := bucketKeys(t, b, q)
	if len(ka) != 1 || len(kb) != 1 || ka[0] == kb[0] {
		t.Fatalf("a stored key %v, b (same clock, never saw a's) %v: keys must differ", ka, kb)
	}
	// c, having seen a's key, numbers its own after it, even with a
	// clock that went back an hour.
	at = at.Add(-time.Hour)
	c.n.wmu.Lock()
	kc := c.n.nextKey()
	c.n.wmu.Unlock()
	if kc <= ka[0] {
		t.Fatalf("c's next key %d is not above the key %d it holds", kc, ka[0])
	}
	// A restart with the clock still behind keeps keys growing.
	before := bucketKeys(t, b, q)[0]
	b.restart()
	if err := b.send(q, "again"); err != nil {
		t.Fatal(err)
	}
	if kb2 := bucketKeys(t, b, q); len(kb2) != 2 || kb2[1] <= before {
		t.Fatalf("after a restart with the clock an hour back, keys %v: want a second key above %d", kb2, before)
	}
}
