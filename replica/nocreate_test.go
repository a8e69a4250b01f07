package replica

import (
	"errors"
	"sync"
	"testing"
	"time"
)

// noCreateSend sends one message to dest that may not create its queue.
func (h *harness) noCreateSend(dest string) error {
	h.t.Helper()
	ch := make(chan error, 1)
	b := &Batch{Sync: true, Sends: []*Message{{Dest: dest, Body: []byte("x"), NoCreate: true}}}
	if err := h.n.Apply(b, func(err error) { ch <- err }); err != nil {
		return err
	}
	return <-ch
}

// A SEND or SUBSCRIBE that may not create its queue is refused, changing
// nothing, until the queue exists; it exists once created by a message
// or a subscriber, across a restart while its bucket is there (even
// empty), and no longer once the sweeper removed it as idle.
func TestNoCreate(t *testing.T) {
	h := newHarness(t, smallWindow())

	if err := h.noCreateSend("/queue/a"); !errors.Is(err, ErrNoSuchQueue) {
		t.Fatalf("SEND to a new queue with NoCreate: %v, want ErrNoSuchQueue", err)
	}
	if _, err := h.n.Subscribe(SubOptions{Dest: "/queue/a", NoCreate: true, Deliver: func(Delivery) {}}); !errors.Is(err, ErrNoSuchQueue) {
		t.Fatalf("SUBSCRIBE to a new queue with NoCreate: %v, want ErrNoSuchQueue", err)
	}
	if ds := h.n.Destinations(); len(ds) != 0 {
		t.Fatalf("refused frames left destinations: %+v", ds)
	}
	if h.n.QueueExists("/queue/a") || !h.n.QueueExists("/topic/t") {
		t.Fatal("QueueExists: want /queue/a missing, topics existing")
	}
	// A transaction's batch is refused whole.
	ch := make(chan error, 1)
	err := h.n.Apply(&Batch{Sends: []*Message{{Dest: "/queue/b", Body: []byte("1")}, {Dest: "/queue/a", NoCreate: true}}}, func(err error) { ch <- err })
	if !errors.Is(err, ErrNoSuchQueue) {
		t.Fatalf("batch with a refused SEND: %v, want ErrNoSuchQueue", err)
	}
	if p := h.info("/queue/b").Pending; p != 0 || h.n.QueueExists("/queue/b") {
		t.Fatalf("the batch's other SEND took effect (pending %d)", p)
	}

	// Created by a SEND without the flag.
	if err := h.send("/queue/a", "first"); err != nil {
		t.Fatal(err)
	}
	if err := h.noCreateSend("/queue/a"); err != nil {
		t.Fatalf("SEND to an existing queue with NoCreate: %v", err)
	}
	// Created by a subscriber.
	s, err := h.n.Subscribe(SubOptions{Dest: "/queue/s", Deliver: func(Delivery) {}})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := h.noCreateSend("/queue/s"); err != nil {
		t.Fatalf("SEND with NoCreate to a queue created by a subscriber: %v", err)
	}

	// Drained, it still exists, across a restart.
	c := newCollector()
	sub, _ := h.n.Subscribe(SubOptions{Dest: "/queue/a", Ack: AckAuto, NoCreate: true, Deliver: c.deliver})
	c.wait(t, 2)
	sub.Close()
	h.restart()
	if !h.n.QueueExists("/queue/a") {
		t.Fatal("an empty queue does not exist after a restart")
	}
	if _, err := h.n.Subscribe(SubOptions{Dest: "/queue/a", NoCreate: true, Deliver: func(Delivery) {}}); err != nil {
		t.Fatalf("SUBSCRIBE with NoCreate to an empty queue after a restart: %v", err)
	}
}

// Removed as idle, a queue no longer exists.
func TestNoCreateAfterIdleRemoval(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(1_000_000, 0)
	cfg := smallWindow()
	cfg.IdleDeleteAfter = time.Hour
	cfg.Now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	h := newHarness(t, cfg)
	if err := h.send("/queue/idle", "x"); err != nil {
		t.Fatal(err)
	}
	c := newCollector()
	sub, _ := h.n.Subscribe(SubOptions{Dest: "/queue/idle", Ack: AckAuto, Deliver: c.deliver})
	c.wait(t, 1)
	sub.Close()
	h.n.sweep()
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	h.n.sweep()
	if h.n.QueueExists("/queue/idle") {
		t.Fatal("a queue removed as idle still exists")
	}
	if err := h.noCreateSend("/queue/idle"); !errors.Is(err, ErrNoSuchQueue) {
		t.Fatalf("SEND with NoCreate after idle removal: %v, want ErrNoSuchQueue", err)
	}
}
