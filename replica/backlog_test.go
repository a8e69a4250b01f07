package replica

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/store"
)

// harness is a Node over a store in a directory that outlives a restart.
type harness struct {
	t    *testing.T
	dir  string
	cfg  Config
	st   *store.Store
	n    *Node
	open bool
	prep func(n *Node) // before Recover, on every start
	// prepSt, if set, runs instead of prep with the store as well.
	prepSt func(n *Node, st *store.Store)
}

func newHarness(t *testing.T, cfg Config) *harness {
	h := &harness{t: t, dir: t.TempDir(), cfg: cfg}
	h.start()
	t.Cleanup(h.stop)
	return h
}

func (h *harness) start() {
	h.t.Helper()
	scfg := store.DefaultConfig(filepath.Join(h.dir, "r.db"))
	scfg.Sync = store.SyncNone
	scfg.WALSize = 1 << 20
	scfg.Weigh = StoredBodyLen
	st, err := store.Open(scfg)
	if err != nil {
		h.t.Fatal(err)
	}
	st.Start()
	cfg := h.cfg
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	n := New(cfg, st)
	if h.prepSt != nil {
		h.prepSt(n, st)
	} else if h.prep != nil {
		h.prep(n)
	}
	if err := n.Recover(); err != nil {
		h.t.Fatal(err)
	}
	n.Start()
	h.st, h.n, h.open = st, n, true
}

func (h *harness) stop() {
	if !h.open {
		return
	}
	h.open = false
	h.n.Close()
	if err := h.st.Close(); err != nil {
		h.t.Errorf("store close: %v", err)
	}
}

func (h *harness) restart() { h.stop(); h.start() }

func (h *harness) send(dest string, bodies ...string) error {
	h.t.Helper()
	b := &Batch{Sync: true}
	for _, body := range bodies {
		b.Sends = append(b.Sends, &Message{Dest: dest, Body: []byte(body)})
	}
	ch := make(chan error, 1)
	if err := h.n.Apply(b, func(err error) { ch <- err }); err != nil {
		return err
	}
	return <-ch
}

func (h *harness) info(dest string) DestinationInfo {
	for _, d := range h.n.Destinations() {
		if d.Name == dest {
			return d
		}
	}
	return DestinationInfo{Name: dest}
}

// collector records deliveries and reports them written.
type collector struct {
	mu   sync.Mutex
	got  []Delivery
	cond *sync.Cond
}

func newCollector() *collector {
	c := &collector{}
	c.cond = sync.NewCond(&c.mu)
	return c
}

func (c *collector) deliver(d Delivery) {
	c.mu.Lock()
	c.got = append(c.got, d)
	c.cond.Broadcast()
	c.mu.Unlock()
	// Written must not be called under the destination lock.
	go d.Sub.Written(d.Tag)
}

// wait returns the first n deliveries, failing after a deadline.
func (c *collector) wait(t *testing.T, n int) []Delivery {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.got) < n {
		if time.Now().After(deadline) {
			t.Fatalf("got %d deliveries, want %d", len(c.got), n)
		}
		c.mu.Unlock()
		time.Sleep(2 * time.Millisecond)
		c.mu.Lock()
	}
	out := append([]Delivery(nil), c.got[:n]...)
	c.mu.Unlock()
	// Written is idempotent: make sure these are recorded as written
	// before the test goes on (the goroutines of deliver may lag).
	for _, d := range out {
		d.Sub.Written(d.Tag)
	}
	c.mu.Lock()
	return out
}

func bodies(ds []Delivery) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = string(d.Msg.Body)
	}
	return out
}

func smallWindow() Config {
	cfg := DefaultConfig()
	cfg.ReadAheadMessages = 50
	cfg.ReadAheadBytes = 1 << 20
	return cfg
}

func sendNumbered(t *testing.T, h *harness, dest string, from, to int) {
	t.Helper()
	for i := from; i < to; i += 100 {
		var bs []string
		for j := i; j < min(i+100, to); j++ {
			bs = append(bs, strconv.Itoa(j))
		}
		if err := h.send(dest, bs...); err != nil {
			t.Fatal(err)
		}
	}
}

func checkNumbered(t *testing.T, got []string, from int) {
	t.Helper()
	for i, b := range got {
		if b != strconv.Itoa(from+i) {
			t.Fatalf("delivery %d is %q, want %d (in order, no gap, no duplicate)", i, b, from+i)
		}
	}
}

// A backlog far larger than the read-ahead window is held on disk, not in
// memory, and is delivered in full, in order, exactly once.
func TestBacklogOnDisk(t *testing.T) {
	h := newHarness(t, smallWindow())
	const n = 3000
	sendNumbered(t, h, "/queue/big", 0, n)
	info := h.info("/queue/big")
	if info.Pending != n {
		t.Fatalf("pending %d, want %d", info.Pending, n)
	}
	if info.InMemory > 50 {
		t.Fatalf("%d messages in memory with a window of 50: the backlog is not on disk", info.InMemory)
	}
	c := newCollector()
	if _, err := h.n.Subscribe(SubOptions{Dest: "/queue/big", Ack: AckAuto, Deliver: c.deliver}); err != nil {
		t.Fatal(err)
	}
	// Producers keep sending while the backlog drains.
	sendNumbered(t, h, "/queue/big", n, n+500)
	checkNumbered(t, bodies(c.wait(t, n+500)), 0)
}

// A restart reads no message: the queue comes back with its counts, and
// its messages (with their delivery counts) are read when a subscriber
// comes.
func TestBacklogRestartReadsNothing(t *testing.T) {
	h := newHarness(t, smallWindow())
	sendNumbered(t, h, "/queue/r", 0, 1000)
	// Deliver the first one and NACK it, so its delivery count is stored.
	c := newCollector()
	sub, _ := h.n.Subscribe(SubOptions{Dest: "/queue/r", Ack: AckClientIndividual, Prefetch: 1, Deliver: c.deliver})
	d := c.wait(t, 1)[0]
	ch := make(chan error, 1)
	if err := h.n.Apply(&Batch{Acks: []AckOp{{Sub: sub, Tag: d.Tag, Nack: true}}, Sync: true}, func(err error) { ch <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	c.wait(t, 2) // redelivered to the same subscriber, and written
	sub.Close()  // returned again: two deliveries without an ACK
	h.restart()
	info := h.info("/queue/r")
	if info.Pending != 1000 || info.InMemory != 0 {
		t.Fatalf("after restart: pending %d, in memory %d; want 1000 and 0", info.Pending, info.InMemory)
	}
	c2 := newCollector()
	if _, err := h.n.Subscribe(SubOptions{Dest: "/queue/r", Ack: AckAuto, Deliver: c2.deliver}); err != nil {
		t.Fatal(err)
	}
	got := c2.wait(t, 1000)
	checkNumbered(t, bodies(got), 0)
	if !got[0].Redelivered || got[0].Count != 2 || got[1].Redelivered {
		t.Fatalf("first message: redelivered %v count %d, second redelivered %v; want true, 2, false (count kept across restart)",
			got[0].Redelivered, got[0].Count, got[1].Redelivered)
	}
}

// Messages returned by NACK go out before newer ones, while the rest of
// the queue is still on disk.
func TestBacklogNackedFirst(t *testing.T) {
	h := newHarness(t, smallWindow())
	sendNumbered(t, h, "/queue/n", 0, 500)
	c := newCollector()
	sub, _ := h.n.Subscribe(SubOptions{Dest: "/queue/n", Ack: AckClientIndividual, Prefetch: 3, Deliver: c.deliver})
	first := c.wait(t, 3)
	checkNumbered(t, bodies(first), 0)
	// NACK message 1, ACK 0 and 2: 1 comes back before 3.
	for _, a := range []AckOp{{Sub: sub, Tag: first[1].Tag, Nack: true}, {Sub: sub, Tag: first[0].Tag}, {Sub: sub, Tag: first[2].Tag}} {
		if err := h.n.Apply(&Batch{Acks: []AckOp{a}}, nil); err != nil {
			t.Fatal(err)
		}
	}
	next := c.wait(t, 5)[3:]
	if got := bodies(next); got[0] != "1" || got[1] != "3" || !next[0].Redelivered {
		t.Fatalf("after NACK of 1: %v (redelivered %v), want [1 3] with 1 redelivered", got, next[0].Redelivered)
	}
}

// A window read in for a subscriber is given back when the queue has no
// subscriber, and read again when one comes.
func TestBacklogWindowReleased(t *testing.T) {
	h := newHarness(t, smallWindow())
	sendNumbered(t, h, "/queue/w", 0, 400)
	c := newCollector()
	sub, _ := h.n.Subscribe(SubOptions{Dest: "/queue/w", Ack: AckClientIndividual, Prefetch: 10, Deliver: c.deliver})
	got := c.wait(t, 10)
	sub.Close() // the 10 come back, redelivered
	h.n.sweep()
	if info := h.info("/queue/w"); info.InMemory > 10 || info.Pending != 400 {
		t.Fatalf("after the last subscriber left: %d in memory, %d pending; want at most the 10 returned, 400", info.InMemory, info.Pending)
	}
	c2 := newCollector()
	h.n.Subscribe(SubOptions{Dest: "/queue/w", Ack: AckAuto, Deliver: c2.deliver})
	all := c2.wait(t, 400)
	checkNumbered(t, bodies(all), 0)
	for i := range all {
		if all[i].Redelivered != (i < len(got)) {
			t.Fatalf("delivery %d redelivered=%v", i, all[i].Redelivered)
		}
	}
}

func TestQueueMaxLengthRejectPublish(t *testing.T) {
	cfg := smallWindow()
	cfg.MaxLength = 100
	h := newHarness(t, cfg)
	sendNumbered(t, h, "/queue/l", 0, 100)
	err := h.send("/queue/l", "too many")
	if !errors.Is(err, ErrQueueFull) {
		t.Fatalf("101st message: %v, want ErrQueueFull", err)
	}
	// A batch that does not fit is refused whole.
	if err := h.send("/queue/other", "a"); err != nil {
		t.Fatal(err)
	}
	b := &Batch{Sends: []*Message{{Dest: "/queue/other", Body: []byte("b")}, {Dest: "/queue/l", Body: []byte("c")}}}
	if err := h.n.Apply(b, nil); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("batch into a full queue: %v", err)
	}
	if p := h.info("/queue/other").Pending; p != 1 {
		t.Fatalf("/queue/other has %d messages after a refused batch; want 1", p)
	}
	h.restart()
	if p := h.info("/queue/l").Pending; p != 100 {
		t.Fatalf("after restart %d pending; want 100", p)
	}
	if err := h.send("/queue/l", "x"); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("after restart: %v, want ErrQueueFull (count recovered)", err)
	}
	c := newCollector()
	h.n.Subscribe(SubOptions{Dest: "/queue/l", Ack: AckAuto, Deliver: c.deliver})
	checkNumbered(t, bodies(c.wait(t, 100)), 0)
}

func TestQueueMaxBytesRejectPublish(t *testing.T) {
	cfg := smallWindow()
	cfg.MaxBytes = 1000
	h := newHarness(t, cfg)
	big := string(make([]byte, 400))
	if err := h.send("/queue/b", big, big); err != nil {
		t.Fatal(err)
	}
	if err := h.send("/queue/b", big); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("1200 bytes into a 1000-byte queue: %v", err)
	}
	if err := h.send("/queue/b", string(make([]byte, 200))); err != nil {
		t.Fatalf("exactly 1000 bytes: %v", err)
	}
}

func TestQueueDropHead(t *testing.T) {
	cfg := smallWindow()
	cfg.MaxLength = 100
	cfg.Overflow = OverflowDropHead
	h := newHarness(t, cfg)
	sendNumbered(t, h, "/queue/d", 0, 1000)
	// The head is dropped as soon as it is in memory; the loader reads
	// a head that is on disk.
	waitFor(t, func() bool { return h.info("/queue/d").Pending == 100 }, func() string {
		return fmt.Sprintf("pending %d after 1000 sends with max_length 100 drop-head; want 100", h.info("/queue/d").Pending)
	})
	c := newCollector()
	h.n.Subscribe(SubOptions{Dest: "/queue/d", Ack: AckAuto, Deliver: c.deliver})
	checkNumbered(t, bodies(c.wait(t, 100)), 900)
	h.restart()
	if p := h.info("/queue/d").Pending; p != 0 {
		t.Fatalf("after restart %d pending; dropped messages came back", p)
	}
}

func TestQueueIdleDelete(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(1_000_000, 0)
	cfg := smallWindow()
	cfg.IdleDeleteAfter = time.Hour
	cfg.Now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	h := newHarness(t, cfg)
	if err := h.send("/queue/idle", "x"); err != nil {
		t.Fatal(err)
	}
	c := newCollector()
	sub, _ := h.n.Subscribe(SubOptions{Dest: "/queue/idle", Ack: AckAuto, Deliver: c.deliver})
	c.wait(t, 1)
	h.n.sweep()
	advance(2 * time.Hour)
	h.n.sweep()
	if len(h.n.Destinations()) != 1 {
		t.Fatal("a queue with a subscriber was removed")
	}
	sub.Close()
	h.n.sweep() // idle from now
	advance(59 * time.Minute)
	h.n.sweep()
	if len(h.n.Destinations()) != 1 {
		t.Fatal("queue removed before queue.idle_delete_after")
	}
	advance(2 * time.Minute)
	h.n.sweep()
	if ds := h.n.Destinations(); len(ds) != 0 {
		t.Fatalf("idle queue not removed: %+v", ds)
	}
	ch := make(chan error, 1)
	h.n.Barrier(func(err error) { ch <- err })
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	bs, err := h.st.Buckets()
	if err != nil {
		t.Fatal(err)
	}
	if len(bs) != 0 {
		t.Fatalf("store buckets after idle removal: %+v", bs)
	}
	// The name is usable again.
	if err := h.send("/queue/idle", "again"); err != nil {
		t.Fatal(err)
	}
	c2 := newCollector()
	h.n.Subscribe(SubOptions{Dest: "/queue/idle", Ack: AckAuto, Deliver: c2.deliver})
	if b := bodies(c2.wait(t, 1)); b[0] != "again" {
		t.Fatal(b)
	}
}

// Frames of one connection take effect in order on a topic too: a SEND
// with a receipt (synced) followed by one without reaches subscribers in
// that order.
func TestTopicOrderAfterSyncedSend(t *testing.T) {
	h := newHarness(t, DefaultConfig())
	c := newCollector()
	h.n.Subscribe(SubOptions{Dest: "/topic/o", Ack: AckAuto, Deliver: c.deliver})
	for i := 0; i < 200; i++ {
		a := &Batch{Sends: []*Message{{Dest: "/queue/q", Body: []byte("q")}, {Dest: "/topic/o", Body: []byte(fmt.Sprint(2 * i))}}, Sync: true}
		b := &Batch{Sends: []*Message{{Dest: "/topic/o", Body: []byte(fmt.Sprint(2*i + 1))}}}
		if err := h.n.Apply(a, nil); err != nil {
			t.Fatal(err)
		}
		if err := h.n.Apply(b, nil); err != nil {
			t.Fatal(err)
		}
	}
	checkNumbered(t, bodies(c.wait(t, 400)), 0)
}

func waitFor(t *testing.T, ok func() bool, what func() string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal(what())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// A subscription without prefetch-count holds at most MaxUnackedBytes of
// unacknowledged bodies (at least one message), so a consumer of large
// messages cannot pull a backlog into memory.
func TestUnackedBytesBound(t *testing.T) {
	cfg := DefaultConfig()
	cfg.MaxUnackedBytes = 10000
	h := newHarness(t, cfg)
	big := string(make([]byte, 4000))
	for i := 0; i < 10; i++ {
		if err := h.send("/queue/big", big); err != nil {
			t.Fatal(err)
		}
	}
	c := newCollector()
	sub, err := h.n.Subscribe(SubOptions{Dest: "/queue/big", Ack: AckClientIndividual, Deliver: c.deliver})
	if err != nil {
		t.Fatal(err)
	}
	got := c.wait(t, 3)
	if info := h.info("/queue/big"); info.InFlight != 3 || info.Pending != 7 {
		t.Fatalf("in flight %d, pending %d; want 3 (12000 bytes, the third crossing 10000) and 7", info.InFlight, info.Pending)
	}
	if err := h.n.Apply(&Batch{Acks: []AckOp{{Sub: sub, Tag: got[0].Tag}}}, nil); err != nil {
		t.Fatal(err)
	}
	c.wait(t, 4)
	if info := h.info("/queue/big"); info.InFlight != 3 {
		t.Fatalf("after one ACK: %d in flight, want 3", info.InFlight)
	}
}

// A topic SUBSCRIBE takes effect in the order of the connection's frames:
// it does not receive a message whose SEND came before it, even while that
// SEND's store commit is still in flight.
func TestTopicSubscribeAfterSend(t *testing.T) {
	h := newHarness(t, DefaultConfig())
	for i := 0; i < 200; i++ {
		dest := fmt.Sprintf("/topic/s%d", i)
		// Keep a subscriber so the destination exists.
		keep, _ := h.n.Subscribe(SubOptions{Dest: dest, Deliver: func(d Delivery) { go d.Sub.Written(d.Tag) }})
		if err := h.n.Apply(&Batch{Sends: []*Message{{Dest: "/queue/side", Body: []byte("x")}, {Dest: dest, Body: []byte("before")}}, Sync: true}, nil); err != nil {
			t.Fatal(err)
		}
		c := newCollector()
		sub, _ := h.n.Subscribe(SubOptions{Dest: dest, Deliver: c.deliver})
		if err := h.n.Apply(&Batch{Sends: []*Message{{Dest: dest, Body: []byte("after")}}}, nil); err != nil {
			t.Fatal(err)
		}
		if got := bodies(c.wait(t, 1)); got[0] != "after" {
			t.Fatalf("iteration %d: a subscriber that came after the SEND received %q", i, got[0])
		}
		sub.Close()
		keep.Close()
	}
}
