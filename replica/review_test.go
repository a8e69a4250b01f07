package replica

import (
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"
)

// removeIdle takes the queue out of Node.dests, releases every lock, then
// takes wmu to submit OpDeleteBucket. A SEND that arrives in between makes a
// new destination, takes wmu first, and its put is then deleted by the
// bucket delete: a receipted message is lost.
func TestRegressionIdleRemovalDeletesNewMessage(t *testing.T) {
	h := newHarness(t, smallWindow())
	lost := 0
	for i := 0; i < 3000 && lost == 0; i++ {
		q := fmt.Sprintf("/queue/i%d", i)
		s, _ := h.n.Subscribe(SubOptions{Dest: q, Ack: AckAuto, Deliver: func(Delivery) {}})
		s.Close()
		h.n.mu.Lock()
		d := h.n.dests[q]
		h.n.mu.Unlock()
		var wg sync.WaitGroup
		var sendErr error
		wg.Add(2)
		go func() { defer wg.Done(); h.n.removeIdle(d) }()
		go func() { defer wg.Done(); sendErr = h.send(q, "x") }()
		wg.Wait()
		if sendErr != nil {
			t.Fatal(sendErr)
		}
		ch := make(chan error, 1)
		h.n.Barrier(func(err error) { ch <- err })
		<-ch
		n := 0
		h.st.Scan(q, 0, 0, 0, func(uint64, []byte) error { n++; return nil })
		if n == 0 {
			lost++
			t.Errorf("iteration %d: SEND to %s succeeded (synced) but the store holds nothing; node says pending=%d",
				i, q, h.info(q).Pending)
		}
	}
}

// Subscription.Close (and settle on NACK) decides a requeue under d.mu and
// hands the message to another subscriber in the same critical section,
// but submits the delivery-count rewrite (OpPut) only after unlocking. The
// other subscriber's ACK (auto: Written) submits its OpDelete independently;
// if it reaches the store first, the later OpPut resurrects an acknowledged
// message. Here the Put is held back deterministically by wmu (taken by
// commit because the same Close dead-letters another message); under load
// the same reordering happens on the store's request channel.
func TestRegressionAckedMessageResurrected(t *testing.T) {
	cfg := smallWindow()
	cfg.MaxRedeliveries = 1
	h := newHarness(t, cfg)
	if err := h.send("/queue/r", "m1", "m2"); err != nil {
		t.Fatal(err)
	}
	c1 := newCollector()
	sub1, _ := h.n.Subscribe(SubOptions{Dest: "/queue/r", Ack: AckClientIndividual, Prefetch: 2, Deliver: c1.deliver})
	first := c1.wait(t, 2)
	ch := make(chan error, 1)
	if err := h.n.Apply(&Batch{Acks: []AckOp{{Sub: sub1, Tag: first[0].Tag, Nack: true}}, Sync: true}, func(err error) { ch <- err }); err != nil {
		t.Fatal(err)
	}
	<-ch
	c1.wait(t, 3) // m1 again, Deliveries=1

	c2 := newCollector()
	h.n.Subscribe(SubOptions{Dest: "/queue/r", Ack: AckAuto, Deliver: c2.deliver})

	h.n.wmu.Lock()
	closed := make(chan struct{})
	go func() { sub1.Close(); close(closed) }()
	got := c2.wait(t, 1) // m2 handed to sub2 and written: auto-acked, delete submitted
	if string(got[0].Msg.Body) != "m2" {
		t.Fatalf("sub2 got %q", got[0].Msg.Body)
	}
	h.n.Barrier(func(err error) { ch <- err })
	<-ch
	time.Sleep(50 * time.Millisecond)
	h.n.wmu.Unlock()
	<-closed
	h.n.Barrier(func(err error) { ch <- err })
	<-ch
	h.restart()
	if p := h.info("/queue/r").Pending; p != 0 {
		t.Fatalf("m2 was acknowledged (auto) but after restart /queue/r has %d pending: the requeue's OpPut landed after the ACK's OpDelete", p)
	}
}

// sweep() does expireLocked + releaseLocked under d.mu, unlocks, and only
// then submits the expired messages' deletes. A subscriber arriving in
// that gap makes the loader Scan the released window, which still holds
// the expired record: the loader decrements onDisk for a message that was
// not counted, so onDisk ends one below the real backlog. Once a bounded
// read brings onDisk to 0, the last real message is stranded: a later
// SEND joins the window directly past it (skipped, out of order), and the
// queue looks empty, so idle removal deletes its bucket with it.
func TestRegressionExpireReleaseRaceStrandsMessage(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(1_000_000, 0)
	cfg := DefaultConfig()
	cfg.ReadAheadMessages = 10
	cfg.ReadAheadBytes = 1 << 20
	cfg.IdleDeleteAfter = time.Minute
	cfg.ExpirySweep = time.Hour // the test runs the sweep steps itself
	cfg.Now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	h := newHarness(t, cfg)
	q := "/queue/x"
	b := &Batch{Sync: true}
	for i := 0; i <= 20; i++ {
		m := &Message{Dest: q, Body: []byte(strconv.Itoa(i))}
		if i == 5 {
			m.Expires = now.Add(time.Second).UnixMilli()
		}
		b.Sends = append(b.Sends, m)
	}
	ch := make(chan error, 1)
	h.n.Apply(b, func(err error) { ch <- err })
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	now = now.Add(2 * time.Second)
	mu.Unlock()

	// sweep(), with the subscriber arriving between its unlock and submit.
	h.n.mu.Lock()
	d := h.n.dests[q]
	h.n.mu.Unlock()
	d.mu.Lock()
	ops := d.expireLocked(cfg.Now())
	d.releaseLocked()
	d.mu.Unlock()
	c := newCollector()
	sub, _ := h.n.Subscribe(SubOptions{Dest: q, Ack: AckAuto, Deliver: c.deliver})
	c.wait(t, 19) // 0..20 without 5
	h.n.submit(ops)

	time.Sleep(100 * time.Millisecond)
	c.mu.Lock()
	got := bodies(c.got)
	c.mu.Unlock()
	t.Logf("delivered %d: %v; node says pending %d", len(got), got, h.info(q).Pending)
	stored := 0
	h.st.Scan(q, 0, 0, 0, func(uint64, []byte) error { stored++; return nil })
	t.Logf("store holds %d message(s) of %s", stored, q)

	sub.Close()
	h.n.sweep()
	mu.Lock()
	now = now.Add(2 * time.Minute)
	mu.Unlock()
	h.n.sweep()
	h.n.Barrier(func(err error) { ch <- err })
	<-ch
	stored2 := 0
	h.st.Scan(q, 0, 0, 0, func(uint64, []byte) error { stored2++; return nil })
	if len(got) != 20 || stored2 != 0 && stored != 0 {
		t.Fatalf("delivered %d of 20 live messages; store held %d undelivered, after idle removal %d", len(got), stored, stored2)
	}
	if len(got) != 20 {
		t.Fatalf("delivered %d of 20 live messages; the stranded one was deleted with the bucket (store had %d, now %d)", len(got), stored, stored2)
	}
}

// No artificial blocking: producers publish without waiting while a
// consumer drains a backlog through a small window. Count duplicates and
// losses.
func TestRegressionStressExactlyOnce(t *testing.T) {
	cfg := smallWindow()
	cfg.ReadAheadMessages = 20
	h := newHarness(t, cfg)
	const producers, per = 4, 5000
	var mu sync.Mutex
	seen := map[string]int{}
	dups := 0
	var total int
	_, err := h.n.Subscribe(SubOptions{Dest: "/queue/s", Ack: AckAuto, Deliver: func(d Delivery) {
		mu.Lock()
		seen[string(d.Msg.Body)]++
		if seen[string(d.Msg.Body)] > 1 {
			dups++
		}
		total++
		mu.Unlock()
		go d.Sub.Written(d.Tag)
	}})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for p := 0; p < producers; p++ {
		wg.Add(1)
		go func(p int) {
			defer wg.Done()
			for i := 0; i < per; i++ {
				b := &Batch{Sends: []*Message{{Dest: "/queue/s", Body: []byte(strconv.Itoa(p*per + i))}}}
				if err := h.n.Apply(b, nil); err != nil {
					t.Error(err)
					return
				}
			}
		}(p)
	}
	wg.Wait()
	deadline := time.Now().Add(20 * time.Second)
	for {
		mu.Lock()
		n := len(seen)
		mu.Unlock()
		if n == producers*per || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	info := h.info("/queue/s")
	if dups > 0 || len(seen) != producers*per {
		t.Fatalf("distinct %d of %d, duplicates %d, total deliveries %d; queue info %+v", len(seen), producers*per, dups, total, info)
	}
}

// The loader's Scan sees a commit that is in bbolt but whose completion
// callback (committed) has not run yet. The loader puts it in the window
// (and decrements onDisk below zero, clamped); committed then runs, finds
// m.Seq <= loadedTo and inserts it a second time. Delivered twice, the
// second time without redelivered.
func TestRegressionLoaderDuplicatesUncallbackedCommit(t *testing.T) {
	h := newHarness(t, smallWindow())       // read-ahead 50
	sendNumbered(t, h, "/queue/dup", 0, 70) // 50 in the window, 20 on disk

	// Hold the store's completion goroutine (as any slow callback does).
	block := make(chan struct{})
	h.st.Submit(nil, false, func(error) { <-block })
	// A SEND commits (into bbolt, SyncNone) but its callback waits.
	if err := h.n.Apply(&Batch{Sends: []*Message{{Dest: "/queue/dup", Body: []byte("70")}}}, nil); err != nil {
		t.Fatal(err)
	}
	// Wait until it is visible to Scan.
	deadline := time.Now().Add(5 * time.Second)
	for {
		seen := false
		h.st.Scan("/queue/dup", 70, 0, 0, func(k uint64, v []byte) error { seen = true; return nil })
		if seen {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("commit never visible")
		}
		time.Sleep(time.Millisecond)
	}
	c := newCollector()
	if _, err := h.n.Subscribe(SubOptions{Dest: "/queue/dup", Ack: AckAuto, Deliver: c.deliver}); err != nil {
		t.Fatal(err)
	}
	checkNumbered(t, bodies(c.wait(t, 70)), 0)
	close(block)
	// "70" arrives once its commit is counted; then a sentinel, and
	// nothing in between: no second copy.
	if err := h.send("/queue/dup", "71"); err != nil {
		t.Fatal(err)
	}
	checkNumbered(t, bodies(c.wait(t, 72)), 0)
	c.mu.Lock()
	n := len(c.got)
	c.mu.Unlock()
	if n != 72 {
		t.Fatalf("got %d deliveries, want 72 (exactly once)", n)
	}
}
