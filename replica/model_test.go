package replica

import (
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
)

// TestQueueModel drives one queue with a random mix of sends, subscribers
// with small prefetch, ACKs, NACKs, closes, window releases and restarts,
// with a window much smaller than the backlog, and checks that every sent
// message is acknowledged exactly once or still pending at the end: none
// lost, none duplicated. BROKERD_SEED replays a run.
func TestQueueModel(t *testing.T) {
	seed := uint64(rand.Int64())
	if s := os.Getenv("BROKERD_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (BROKERD_SEED=%d replays)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	cfg := DefaultConfig()
	cfg.ReadAheadMessages = 7
	cfg.ReadAheadBytes = 1 << 20
	cfg.MaxRedeliveries = 0 // no dead-lettering: every message stays in the queue
	h := newHarness(t, cfg)
	const dest = "/queue/model"

	type live struct {
		sub *Subscription
		c   *collector
		// next is the index in c.got of the first delivery not yet
		// settled or dropped by the test.
		next int
		open []Delivery
	}
	var subs []*live
	sent := 0
	acked := map[string]int{}
	closeAll := func() {
		for _, l := range subs {
			l.sub.Close()
		}
		subs = nil
	}
	// pull moves new deliveries of l into open (and marks them written).
	pull := func(l *live) {
		l.c.mu.Lock()
		n := len(l.c.got)
		l.c.mu.Unlock()
		if n > l.next {
			l.open = append(l.open, l.c.wait(t, n)[l.next:]...)
			l.next = n
		}
	}
	steps := 400
	if testing.Short() {
		steps = 100
	}
	for step := 0; step < steps; step++ {
		switch r := rng.IntN(100); {
		case r < 30:
			k := 1 + rng.IntN(20)
			var bs []string
			for i := 0; i < k; i++ {
				bs = append(bs, strconv.Itoa(sent))
				sent++
			}
			if err := h.send(dest, bs...); err != nil {
				t.Fatal(err)
			}
		case r < 40 && len(subs) < 3:
			l := &live{c: newCollector()}
			sub, err := h.n.Subscribe(SubOptions{Dest: dest, Ack: AckClientIndividual, Prefetch: 1 + rng.IntN(5), Deliver: l.c.deliver})
			if err != nil {
				t.Fatal(err)
			}
			l.sub = sub
			subs = append(subs, l)
		case r < 75 && len(subs) > 0:
			l := subs[rng.IntN(len(subs))]
			pull(l)
			if len(l.open) == 0 {
				continue
			}
			i := rng.IntN(len(l.open))
			d := l.open[i]
			l.open = append(l.open[:i], l.open[i+1:]...)
			nack := rng.IntN(4) == 0
			if err := h.n.Apply(&Batch{Acks: []AckOp{{Sub: l.sub, Tag: d.Tag, Nack: nack}}}, nil); err != nil {
				t.Fatal(err)
			}
			if !nack {
				acked[string(d.Msg.Body)]++
			}
		case r < 85 && len(subs) > 0:
			i := rng.IntN(len(subs))
			subs[i].sub.Close()
			subs = append(subs[:i], subs[i+1:]...)
		case r < 92:
			h.n.sweep()
		case r < 95:
			closeAll()
			h.restart()
		}
	}
	closeAll()
	if rng.IntN(2) == 0 {
		h.restart()
	}
	want := sent
	for b, n := range acked {
		if n != 1 {
			t.Fatalf("message %s acknowledged %d times", b, n)
		}
		want--
	}
	waitFor(t, func() bool { return h.info(dest).Pending == want }, func() string {
		return "pending " + strconv.Itoa(h.info(dest).Pending) + ", want " + strconv.Itoa(want)
	})
	c := newCollector()
	if _, err := h.n.Subscribe(SubOptions{Dest: dest, Ack: AckAuto, Deliver: c.deliver}); err != nil {
		t.Fatal(err)
	}
	rest := c.wait(t, want)
	seen := map[string]bool{}
	for _, d := range rest {
		b := string(d.Msg.Body)
		if seen[b] || acked[b] > 0 {
			t.Fatalf("message %s delivered again after it was acknowledged or drained", b)
		}
		seen[b] = true
	}
	if len(seen)+len(acked) != sent {
		t.Fatalf("%d drained + %d acknowledged != %d sent", len(seen), len(acked), sent)
	}
	// Nothing more than that arrives: a sentinel sent now comes next.
	if err := h.send(dest, "sentinel"); err != nil {
		t.Fatal(err)
	}
	if last := c.wait(t, want+1)[want]; string(last.Msg.Body) != "sentinel" {
		t.Fatalf("after the drain got %q, want the sentinel", last.Msg.Body)
	}
}
