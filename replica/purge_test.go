package replica

import (
	"context"
	"slices"
	"strconv"
	"testing"
	"time"
)

// Purge removes every ready message, in the read-ahead window, returned
// (requeued) and on disk beyond the window, as tombstones, and keeps the
// ones in flight: those come back when their subscription ends, and
// nothing else does. The queue's counts stay exact.
func TestPurgeKeepsInFlight(t *testing.T) {
	c := newRepCluster(t, 1, []string{"a"}, "a")
	a := c.h["a"]
	const q = "/queue/purge"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, a, q, 0, 300) // window of 50 (smallWindow): most on disk
	// 0-4 handed out and returned (requeued); 5-7 in flight.
	col := newCollector()
	s1, err := a.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Prefetch: 5, Deliver: col.deliver})
	if err != nil {
		t.Fatal(err)
	}
	col.wait(t, 5)
	s1.Close()
	col2 := newCollector()
	s2, err := a.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Prefetch: 3, Deliver: col2.deliver})
	if err != nil {
		t.Fatal(err)
	}
	var held []string
	for _, d := range col2.wait(t, 3) {
		held = append(held, string(d.Msg.Body))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	removed, err := a.n.Purge(ctx, q)
	if err != nil {
		t.Fatal(err)
	}
	if removed != 297 {
		t.Fatalf("Purge removed %d, want 297 (300 less 3 in flight)", removed)
	}
	if info := a.info(q); info.Pending != 0 || info.InFlight != 3 || info.Bytes != 0 {
		t.Fatalf("queue after the purge: %+v, want 0 pending, 3 in flight", info)
	}
	if left := bucketKeys(t, a, q); len(left) != 3 {
		t.Fatalf("%d messages stored after the purge, want the 3 in flight", len(left))
	}
	var tombs []uint64
	if err := a.st.ScanTombstones(q, 0, 0, func(k uint64) error { tombs = append(tombs, k); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(tombs) != 297 {
		t.Fatalf("%d tombstones, want 297 (a purge is replicated and merged as acknowledgements are)", len(tombs))
	}
	// A message sent after the purge is delivered; the in-flight ones
	// come back when their subscription ends; nothing else.
	sendNumbered(t, a, q, 300, 301)
	s2.Close()
	col3 := newCollector()
	s3, err := a.n.Subscribe(SubOptions{Dest: q, Ack: AckAuto, Prefetch: 100, Deliver: col3.deliver})
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	var got []string
	for _, d := range col3.wait(t, 4) {
		got = append(got, string(d.Msg.Body))
	}
	slices.Sort(got)
	want := append(slices.Clone(held), strconv.Itoa(300))
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("after the purge got %v, want %v", got, want)
	}
	// Sentinel: nothing purged arrives before it.
	sendNumbered(t, a, q, 301, 302)
	rest := col3.wait(t, 5)
	if b := string(rest[4].Msg.Body); b != "301" {
		t.Fatalf("delivered %q after the purge, want only the sentinel 301", b)
	}
}

// Purge of a topic or a bad name is refused.
func TestPurgeRefusesTopics(t *testing.T) {
	c := newRepCluster(t, 1, []string{"a"}, "a")
	if _, err := c.h["a"].n.Purge(context.Background(), "/topic/x"); err == nil {
		t.Fatal("purge of a topic: no error")
	}
}

// A queue longer than one round (purgeChunk) is purged whole.
func TestPurgeSeveralRounds(t *testing.T) {
	c := newRepCluster(t, 1, []string{"a"}, "a")
	a := c.h["a"]
	const q = "/queue/purge-rounds"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	n := 2*purgeChunk + 17
	sendNumbered(t, a, q, 0, n)
	removed, err := a.n.Purge(context.Background(), q)
	if err != nil {
		t.Fatal(err)
	}
	if removed != n {
		t.Fatalf("Purge removed %d, want %d", removed, n)
	}
	if info := a.info(q); info.Pending != 0 || info.Bytes != 0 {
		t.Fatalf("queue after the purge: %+v, want empty", info)
	}
	if left := bucketKeys(t, a, q); len(left) != 0 {
		t.Fatalf("%d messages stored after the purge", len(left))
	}
}
