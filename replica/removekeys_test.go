package replica

import (
	"slices"
	"strconv"
	"testing"
	"time"
)

func removeKeys(t *testing.T, h *harness, dest string, keys ...uint64) {
	t.Helper()
	ch := make(chan error, 1)
	if err := h.n.RemoveKeys(dest, keys, func(err error) { ch <- err }); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ch:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("RemoveKeys: no outcome within 10 s")
	}
}

// RemoveKeys takes a message out of its queue by key wherever it is:
// returned (requeued), in the read-ahead window, on disk beyond it, or in
// flight on a subscription (dropped when that delivery ends instead of
// returned); a key the queue does not hold gets a tombstone. The queue's
// counts stay exact: everything else is delivered once, and the queue
// ends empty.
func TestRemoveKeysWhereverTheMessageIs(t *testing.T) {
	c := newRepCluster(t, 1, []string{"a"}, "a")
	a := c.h["a"]
	const q = "/queue/remove-keys"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, a, q, 0, 200) // window of 50 (smallWindow): most on disk
	keys := bucketKeys(t, a, q)
	if len(keys) != 200 {
		t.Fatalf("%d messages stored, want 200", len(keys))
	}

	// 0-4 handed out, then returned: requeued.
	col := newCollector()
	s1, err := a.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Prefetch: 5, Deliver: col.deliver})
	if err != nil {
		t.Fatal(err)
	}
	col.wait(t, 5)
	s1.Close()

	// Requeued, in the window, on disk, and a key never stored.
	never := keys[199] + 1000
	removeKeys(t, a, q, keys[0], keys[10], keys[150], never)
	if got := a.info(q).Pending; got != 197 {
		t.Fatalf("%d pending after removing 3, want 197", got)
	}

	// In flight: 1, 2, 3 go to s2; 2 is removed; s2 ends without ACKs.
	col2 := newCollector()
	s2, err := a.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Prefetch: 3, Deliver: col2.deliver})
	if err != nil {
		t.Fatal(err)
	}
	var inFlight []string
	for _, d := range col2.wait(t, 3) {
		inFlight = append(inFlight, string(d.Msg.Body))
	}
	if !slices.Equal(inFlight, []string{"1", "2", "3"}) {
		t.Fatalf("s2 got %v, want the returned 1, 2, 3", inFlight)
	}
	removeKeys(t, a, q, keys[2])
	s2.Close()

	// Everything else comes once, and nothing more.
	col3 := newCollector()
	s3, err := a.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Prefetch: 1000, Deliver: col3.deliver})
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	col3.wait(t, 196)
	time.Sleep(200 * time.Millisecond)
	col3.mu.Lock()
	got := append([]Delivery(nil), col3.got...)
	col3.mu.Unlock()
	seen := map[string]int{}
	b := &Batch{Sync: true}
	for _, d := range got {
		seen[string(d.Msg.Body)]++
		b.Acks = append(b.Acks, AckOp{Sub: s3, Tag: d.Tag})
	}
	for i := 0; i < 200; i++ {
		want := 1
		if i == 0 || i == 2 || i == 10 || i == 150 {
			want = 0
		}
		if seen[strconv.Itoa(i)] != want {
			t.Errorf("message %d delivered %d times, want %d", i, seen[strconv.Itoa(i)], want)
		}
	}
	ch := make(chan error, 1)
	if err := a.n.Apply(b, func(err error) { ch <- err }); err != nil || <-ch != nil {
		t.Fatal("ACKs failed")
	}
	if info := a.info(q); info.Pending != 0 || info.InFlight != 0 || info.Bytes != 0 {
		t.Fatalf("queue after everything was consumed: %+v, want empty", info)
	}
	if left := bucketKeys(t, a, q); len(left) != 0 {
		t.Fatalf("%d messages still stored", len(left))
	}
	var tombs []uint64
	if err := a.st.ScanTombstones(q, 0, 0, func(k uint64) error { tombs = append(tombs, k); return nil }); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(tombs, never) {
		t.Fatalf("no tombstone for the key the queue never held")
	}
}

// A load whose read came before a removal of a message on disk committed
// skips it (the removal took it out of the counts already).
func TestRemoveKeysOnDiskWhileLoading(t *testing.T) {
	c := newRepCluster(t, 1, []string{"a"}, "a")
	a := c.h["a"]
	const q = "/queue/remove-keys-load"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, a, q, 0, 120)
	keys := bucketKeys(t, a, q)
	d := a.n.destination(q, KindQueue)
	// As if a load had read keys[60] before the removal committed.
	d.mu.Lock()
	d.loading = true
	loadedTo := d.loadedTo
	d.mu.Unlock()
	if keys[60] <= loadedTo {
		t.Fatalf("keys[60] is in the window (loaded to %d)", loadedTo)
	}
	removeKeys(t, a, q, keys[60])
	d.mu.Lock()
	committed, ok := d.skipLoad[keys[60]]
	d.mu.Unlock()
	if !ok || !committed {
		t.Fatalf("skipLoad entry %v %v, want one marked committed", ok, committed)
	}
	d.mu.Lock()
	d.loading = false
	d.mu.Unlock()
	col := newCollector()
	s, err := a.n.Subscribe(SubOptions{Dest: q, Ack: AckAuto, Deliver: col.deliver})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	col.wait(t, 119)
	time.Sleep(200 * time.Millisecond)
	col.mu.Lock()
	n := len(col.got)
	for _, g := range col.got {
		if string(g.Msg.Body) == "60" {
			t.Errorf("the removed message was delivered")
		}
	}
	col.mu.Unlock()
	if n != 119 {
		t.Fatalf("%d delivered, want 119", n)
	}
	if info := a.info(q); info.Pending != 0 {
		t.Fatalf("queue after everything was consumed: %+v", info)
	}
	d.mu.Lock()
	left := len(d.skipLoad)
	d.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d skipLoad entries left", left)
	}
}
