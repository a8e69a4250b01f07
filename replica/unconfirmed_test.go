package replica

// The owner's marking of a copy stored without its write quorum
// (destination.unconfirmed), in the cases a hostile review found unmarked.

import (
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/store"
)

// r9Peers fails every append after delay (a replica that is down: a real
// peer link fails batches after connectWait, 2 s), recording when each
// was handed over.
type r9Peers struct {
	delay time.Duration
	mu    sync.Mutex
	at    []time.Time
}

func (p *r9Peers) Append(peer string, epoch cluster.EpochID, body []byte, done func(error)) {
	p.mu.Lock()
	p.at = append(p.at, time.Now())
	p.mu.Unlock()
	go func() {
		time.Sleep(p.delay)
		done(errors.New("peer unreachable"))
	}()
}

func (p *r9Peers) since(t time.Time) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, a := range p.at {
		if !a.Before(t) {
			n++
		}
	}
	return n
}

// r9Owner is node a, owner of every queue, with replica b that never
// answers; W = 2, so every SEND fails with ErrNoQuorum after delay.
func r9Owner(t *testing.T, delay, sweep time.Duration) (*harness, *r9Peers) {
	peers := &r9Peers{delay: delay}
	cfg := smallWindow()
	cfg.NodeID = "a"
	cfg.ExpirySweep = sweep
	h := &harness{t: t, dir: t.TempDir(), cfg: cfg}
	view := func() View { return View{Self: "a", Active: []string{"a", "b"}, Epoch: cluster.EpochID{Counter: 1}} }
	h.prep = func(n *Node) {
		n.SetReplicator(NewPeerReplicator(2, 2, view, peers, slog.New(slog.DiscardHandler)))
	}
	h.start()
	t.Cleanup(h.stop)
	return h, peers
}

func r9Records(t *testing.T, h *harness, q string) []*Message {
	t.Helper()
	var out []*Message
	if err := h.st.Scan(q, 0, 0, 0, func(k uint64, v []byte) error {
		m, err := DecodeMessage(q, v)
		if err != nil {
			return err
		}
		out = append(out, m)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// A queue without subscribers gives its read-ahead window back at the next
// sweep (every second). A quorum failure that takes longer than that (a
// peer link that is down fails batches after 2 s) finds the copy on disk
// only, and it goes out unmarked: not the "behind a full read-ahead
// window" case the README admits, but any producer-only queue.
func TestUnconfirmedSweptWindowCopyUnmarked(t *testing.T) {
	h, _ := r9Owner(t, 300*time.Millisecond, 20*time.Millisecond)
	const q = "/queue/r9-swept"
	if err := h.send(q, "unconfirmed"); !errors.Is(err, ErrNoQuorum) {
		t.Fatalf("SEND: %v, want ErrNoQuorum", err)
	}
	c := newCollector()
	if _, err := h.n.Subscribe(SubOptions{Dest: q, Ack: AckAuto, Deliver: c.deliver}); err != nil {
		t.Fatal(err)
	}
	d := c.wait(t, 1)[0]
	if !d.Redelivered {
		t.Fatalf("the copy stored without its quorum (window released by the sweep before the quorum failed) went out redelivered=false")
	}
}

// A copy handed to a subscription (not yet written: the host's buffer,
// waiting for a poll) when its quorum fails is not marked ("one already
// handed out needs no mark: any redelivery is marked"). But a delivery
// that never reached the wire comes back with its count unchanged: the
// subscription ends (a rebind, a poll that failed), the copy is requeued
// unwritten and then goes out unmarked, possibly after the retry's copy.
func TestUnconfirmedHandedOutUnwrittenCopyUnmarked(t *testing.T) {
	h, _ := r9Owner(t, 0, time.Hour)
	const q = "/queue/r9-handed"
	var mu sync.Mutex
	var first []Delivery
	sub1, err := h.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Prefetch: 10, Deliver: func(d Delivery) {
		mu.Lock()
		first = append(first, d) // held, never written (a host buffer)
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.send(q, "unconfirmed"); !errors.Is(err, ErrNoQuorum) {
		t.Fatalf("SEND: %v, want ErrNoQuorum", err)
	}
	mu.Lock()
	n := len(first)
	mu.Unlock()
	if n != 1 {
		t.Fatalf("%d deliveries to the first subscription, want 1", n)
	}
	sub1.Close() // never written: requeued as not delivered
	c := newCollector()
	if _, err := h.n.Subscribe(SubOptions{Dest: q, Ack: AckAuto, Deliver: c.deliver}); err != nil {
		t.Fatal(err)
	}
	d := c.wait(t, 1)[0]
	if !d.Redelivered {
		t.Fatalf("the copy stored without its quorum, handed out unwritten and returned, went out redelivered=false (count %d)", d.Count)
	}
}

// unconfirmed does not look at d.removed: a queue released (ownership
// moved) between the local commit and the quorum's failure still gets its
// rewrite, a put into a bucket that is now a replica's copy, replicated
// from a node that no longer owns the queue (to the new owner, which
// refuses it as owned-here, failing the copy and, with catch-up enabled,
// starting a catch-up of a queue this node does not own).
func TestUnconfirmedReleasedQueueRewritten(t *testing.T) {
	h, peers := r9Owner(t, 300*time.Millisecond, time.Hour)
	const q = "/queue/r9-released"
	errc := make(chan error, 1)
	go func() { errc <- h.send(q, "unconfirmed") }()
	deadline := time.Now().Add(5 * time.Second)
	for h.info(q).Pending != 1 {
		if time.Now().After(deadline) {
			t.Fatal("not committed locally")
		}
		time.Sleep(time.Millisecond)
	}
	h.n.Release(q)
	released := time.Now()
	if err := <-errc; !errors.Is(err, ErrNoQuorum) {
		t.Fatalf("SEND: %v, want ErrNoQuorum", err)
	}
	// Let the rewrite (if any) commit.
	ch := make(chan error, 1)
	h.st.Submit([]store.Op{}, true, func(err error) { ch <- err })
	<-ch
	time.Sleep(50 * time.Millisecond)
	if n := peers.since(released); n > 0 {
		t.Errorf("%d appends replicated after %s was released here", n, q)
	}
	for _, m := range r9Records(t, h, q) {
		if m.Deliveries != 0 {
			t.Errorf("record %d rewritten (deliveries %d) after the queue was released", m.Seq, m.Deliveries)
		}
	}
}

// The quorum's failure can be known before the local commit (a loaded
// disk, a peer link that is down). The client is told of the failure
// once the commit is done, and the copy must be marked by then: a client
// that subscribes as soon as it hears (here, inside the callback) must
// not get the copy unmarked.
func TestUnconfirmedQuorumFailedBeforeLocalCommit(t *testing.T) {
	h, peers := r9Owner(t, 0, time.Hour)
	const q = "/queue/r9-late-commit"
	if err := h.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	// Hold the store's callback goroutine: the SEND's local commit
	// cannot report until released.
	hold, held := make(chan struct{}), make(chan struct{})
	h.st.Submit(nil, false, func(error) { close(held); <-hold })
	<-held
	c := newCollector()
	errc := make(chan error, 1)
	b := &Batch{Sync: true, Sends: []*Message{{Dest: q, Body: []byte("unconfirmed")}}}
	if err := h.n.Apply(b, func(err error) {
		if _, serr := h.n.Subscribe(SubOptions{Dest: q, Ack: AckAuto, Deliver: c.deliver}); serr != nil {
			t.Error(serr)
		}
		errc <- err
	}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for peers.since(time.Time{}) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the append never reached the replica")
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // the append fails at once (delay 0)
	close(hold)
	if err := <-errc; !errors.Is(err, ErrNoQuorum) {
		t.Fatalf("SEND: %v, want ErrNoQuorum", err)
	}
	d := c.wait(t, 1)[0]
	if !d.Redelivered {
		t.Fatalf("the copy whose quorum failed before its local commit went out redelivered=false to a client told of the failure")
	}
}
