package replica

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"testing"

	"github.com/brokerd/brokerd/store"
)

// fakePeers delivers appends straight to other in-process nodes, in order.
type fakePeers struct {
	mu     sync.Mutex
	nodes  map[string]*harness
	down   map[string]bool
	epoch  map[string]uint64 // each node's own view of the epoch
	sent   [][]byte          // every body sent, for replays
	active []string          // the active members every node sees
	queues map[string]chan func()
}

func (f *fakePeers) view(self string) func() View {
	return func() View {
		f.mu.Lock()
		defer f.mu.Unlock()
		return View{Self: self, Active: append([]string(nil), f.active...), Epoch: f.epoch[self]}
	}
}

// Append hands the batch to peer's goroutine, in order, as a peer link
// would: applying it inline would take the receiver's locks under the
// sender's.
func (f *fakePeers) Append(peer string, epoch uint64, body []byte, done func(error)) {
	f.mu.Lock()
	if f.queues == nil {
		f.queues = map[string]chan func(){}
	}
	q := f.queues[peer]
	if q == nil {
		q = make(chan func(), 1<<16)
		f.queues[peer] = q
		go func() {
			for fn := range q {
				fn()
			}
		}()
	}
	f.sent = append(f.sent, body)
	f.mu.Unlock()
	q <- func() {
		f.mu.Lock()
		h, down, cur := f.nodes[peer], f.down[peer], f.epoch[peer]
		f.mu.Unlock()
		if h == nil || down {
			done(errors.New("peer unreachable"))
			return
		}
		if err := h.n.ApplyReplicated(epoch, cur, body, done); err != nil {
			done(err)
		}
	}
}

// cluster2 is an owner and a replica of every queue (R = 2 on two active
// members), W given.
func cluster2(t *testing.T, w int) (owner, replica *harness, peers *fakePeers) {
	peers = &fakePeers{nodes: map[string]*harness{}, down: map[string]bool{}, epoch: map[string]uint64{"a": 1, "b": 1}, active: []string{"a", "b"}}
	mk := func(id string) *harness {
		cfg := smallWindow()
		cfg.NodeID = id
		h := &harness{t: t, dir: t.TempDir(), cfg: cfg}
		h.prep = func(n *Node) {
			n.SetReplicator(NewPeerReplicator(2, w, peers.view(id), peers, slog.New(slog.DiscardHandler)))
		}
		h.start()
		t.Cleanup(h.stop)
		return h
	}
	owner, replica = mk("a"), mk("b")
	peers.nodes["a"], peers.nodes["b"] = owner, replica
	return owner, replica, peers
}

// A receipted SEND is on both replicas; after the owner is gone the
// replica adopts the queue and delivers every message that was not
// acknowledged, the delivered-but-unacknowledged ones included, and none
// that was.
func TestReplicatedQueueSurvivesOwner(t *testing.T) {
	// W by default: a majority of the replica set, so 2 of 2 while both
	// are active and 1 once the member left is alone.
	owner, replica, peers := cluster2(t, 0)
	const q = "/queue/orders"
	if err := owner.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, owner, q, 0, 200)
	c := newCollector()
	sub, err := owner.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Prefetch: 50, Deliver: c.deliver})
	if err != nil {
		t.Fatal(err)
	}
	got := c.wait(t, 50)
	// Acknowledge the first 30 with a receipt (sync), leave 20 in flight.
	b := &Batch{Sync: true}
	for _, d := range got[:30] {
		b.Acks = append(b.Acks, AckOp{Sub: sub, Tag: d.Tag})
	}
	ch := make(chan error, 1)
	if err := owner.n.Apply(b, func(err error) { ch <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	owner.stop() // the owner is gone: nothing more from it
	peers.mu.Lock()
	peers.down["a"] = true
	peers.active = []string{"b"} // membership saw it go: a new epoch
	peers.epoch["b"] = 2
	peers.mu.Unlock()

	if err := replica.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	if info := replica.info(q); info.Pending != 170 {
		t.Fatalf("replica adopted %d pending messages, want 170", info.Pending)
	}
	c2 := newCollector()
	if _, err := replica.n.Subscribe(SubOptions{Dest: q, Ack: AckAuto, Deliver: c2.deliver}); err != nil {
		t.Fatal(err)
	}
	inherited := c2.wait(t, 170)
	checkNumbered(t, bodies(inherited), 30)
	for _, d := range inherited {
		if !d.Redelivered {
			t.Fatalf("message %s, inherited from the dead owner, delivered without redelivered", d.Msg.Body)
		}
	}
	// New messages on the new owner come after the inherited ones.
	sendNumbered(t, replica, q, 200, 210)
	all := c2.wait(t, 180)
	checkNumbered(t, bodies(all), 30)
	for _, d := range all[170:] {
		if d.Redelivered {
			t.Fatalf("message %s, sent to the new owner, delivered as redelivered", d.Msg.Body)
		}
	}
}

// Without the replica, W = 2 cannot be met: the SEND fails with
// ErrNoQuorum (the client is told), while W = 1 succeeds.
func TestReplicationQuorum(t *testing.T) {
	for _, w := range []int{1, 2} {
		t.Run("W="+strconv.Itoa(w), func(t *testing.T) {
			owner, _, peers := cluster2(t, w)
			peers.down["b"] = true
			err := owner.send("/queue/q", "x")
			if w == 2 && !errors.Is(err, ErrNoQuorum) {
				t.Fatalf("SEND with the only other replica down, W=2: %v, want ErrNoQuorum", err)
			}
			if w == 1 && err != nil {
				t.Fatalf("SEND with W=1: %v", err)
			}
		})
	}
}

// A batch applied twice changes nothing; a stale epoch, a queue served
// here and garbage are refused and change nothing.
func TestApplyReplicatedRefusals(t *testing.T) {
	owner, replica, peers := cluster2(t, 2)
	const q = "/queue/dup"
	if err := owner.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	sendNumbered(t, owner, q, 0, 10)
	peers.mu.Lock()
	sent := append([][]byte(nil), peers.sent...)
	peers.mu.Unlock()
	count := func() int64 {
		bs, err := replica.st.Buckets()
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range bs {
			if b.Name == q {
				return b.Count
			}
		}
		return 0
	}
	if got := count(); got != 10 {
		t.Fatalf("replica holds %d messages, want 10", got)
	}
	for _, body := range sent {
		ch := make(chan error, 1)
		if err := replica.n.ApplyReplicated(1, 1, body, func(err error) { ch <- err }); err != nil {
			t.Fatal(err)
		}
		if err := <-ch; err != nil {
			t.Fatal(err)
		}
	}
	if got := count(); got != 10 {
		t.Fatalf("after replaying every batch the replica holds %d messages, want 10", got)
	}
	never := func(error) { t.Error("done called for a refused append") }
	if err := replica.n.ApplyReplicated(1, 2, sent[0], never); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("stale epoch: %v", err)
	}
	if err := owner.n.ApplyReplicated(1, 1, sent[0], never); !errors.Is(err, ErrOwnedHere) {
		t.Fatalf("append for a queue served here: %v", err)
	}
	bad := [][]byte{
		{9},
		{1, 3, 'a', 'b', 'c', 1, 1, 0},
		AppendOps(nil, []store.Op{{Kind: store.OpPut, Bucket: "/topic/t", Key: 1, Value: (&Message{}).encode()}}),
		AppendOps(nil, []store.Op{{Kind: store.OpPut, Bucket: q, Key: 0, Value: (&Message{}).encode()}}),
		AppendOps(nil, []store.Op{{Kind: store.OpPut, Bucket: q, Key: 99, Value: []byte("not a record")}}),
		append(AppendOps(nil, []store.Op{{Kind: store.OpDelete, Bucket: q, Key: 1}}), 1),
	}
	for i, body := range bad {
		if err := replica.n.ApplyReplicated(1, 1, body, never); !errors.Is(err, ErrBadAppend) {
			t.Fatalf("bad append %d: %v", i, err)
		}
	}
	if got := count(); got != 10 {
		t.Fatalf("after refused appends the replica holds %d messages, want 10", got)
	}
}

// Only queue writes travel, and only to the queue's replicas: with R = 2
// of 3 members, the member outside a queue's replica set gets nothing.
func TestReplicateOnlyToReplicaSet(t *testing.T) {
	active := []string{"a", "b", "c"}
	var got []string
	peers := peersFunc(func(peer string, _ uint64, body []byte, done func(error)) {
		ops, err := DecodeOps(body)
		if err != nil {
			t.Fatal(err)
		}
		for _, op := range ops {
			got = append(got, peer+" "+op.Bucket)
		}
		done(nil)
	})
	r := NewPeerReplicator(2, 0, func() View { return View{Self: "a", Active: active, Epoch: 3} }, peers, nil)
	var want []string
	var ops []store.Op
	for i := 0; i < 30; i++ {
		q := fmt.Sprintf("/queue/q%d", i)
		ops = append(ops, store.Op{Kind: store.OpPut, Bucket: q, Key: uint64(i + 1), Value: (&Message{}).encode()})
		for _, id := range ReplicaSet(q, active, 2) {
			if id != "a" {
				want = append(want, id+" "+q)
			}
		}
	}
	ops = append(ops, store.Op{Kind: store.OpPutMeta, Name: "seq", Value: []byte("9")})
	quorum := make(chan error, 1)
	r.Replicate(ops, true, func(err error) { quorum <- err })
	if err := <-quorum; err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("sent %d ops, want %d: %v", len(got), len(want), got)
	}
	seen := map[string]bool{}
	for _, g := range got {
		seen[g] = true
	}
	for _, w := range want {
		if !seen[w] {
			t.Fatalf("%s not sent; sent %v", w, got)
		}
	}
}

type peersFunc func(peer string, epoch uint64, body []byte, done func(error))

func (f peersFunc) Append(peer string, epoch uint64, body []byte, done func(error)) {
	f(peer, epoch, body, done)
}

func FuzzDecodeOps(f *testing.F) {
	f.Add(AppendOps(nil, []store.Op{
		{Kind: store.OpPut, Bucket: "/queue/a", Key: 1, Value: (&Message{ID: "x", Body: []byte("b")}).encode()},
		{Kind: store.OpDelete, Bucket: "/queue/a", Key: 1},
		{Kind: store.OpDeleteBucket, Bucket: "/queue/a"},
	}))
	f.Add([]byte{1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		ops, err := DecodeOps(b)
		if err != nil {
			return
		}
		// What decodes survives a round trip unchanged.
		again, err := DecodeOps(AppendOps(nil, ops))
		if err != nil {
			t.Fatalf("re-encoded ops do not decode: %v", err)
		}
		if len(again) != len(ops) {
			t.Fatalf("%d ops after a round trip, want %d", len(again), len(ops))
		}
		for i := range ops {
			a, b := ops[i], again[i]
			if a.Kind != b.Kind || a.Bucket != b.Bucket || a.Key != b.Key || string(a.Value) != string(b.Value) {
				t.Fatalf("op %d: %+v after a round trip, want %+v", i, b, a)
			}
		}
	})
}
