package replica

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"testing"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/store"
)

// fakePeers delivers appends straight to other in-process nodes, in order.
type fakePeers struct {
	mu     sync.Mutex
	nodes  map[string]*harness
	down   map[string]bool
	epoch  map[string]cluster.EpochID // each node's own view of the epoch
	sent   [][]byte                   // every body sent, for replays
	active []string                   // the active members every node sees
	queues map[string]chan func()
}

func (f *fakePeers) view(self string) func() View {
	return func() View {
		f.mu.Lock()
		defer f.mu.Unlock()
		return View{Self: self, Active: append([]string(nil), f.active...), Epoch: f.epoch[self]}
	}
}

// drain waits until every batch handed to Append so far was applied (or
// refused) by its peer's goroutine.
func (f *fakePeers) drain() {
	f.mu.Lock()
	var qs []chan func()
	for _, q := range f.queues {
		qs = append(qs, q)
	}
	f.mu.Unlock()
	for _, q := range qs {
		done := make(chan struct{})
		q <- func() { close(done) }
		<-done
	}
}

// Append hands the batch to peer's goroutine, in order, as a peer link
// would: applying it inline would take the receiver's locks under the
// sender's.
func (f *fakePeers) Append(peer string, epoch cluster.EpochID, body []byte, done func(error)) {
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
	peers = &fakePeers{nodes: map[string]*harness{}, down: map[string]bool{}, epoch: map[string]cluster.EpochID{"a": {Counter: 1}, "b": {Counter: 1}}, active: []string{"a", "b"}}
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
	peers.epoch["b"] = cluster.EpochID{Counter: 2}
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
		if err := replica.n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 1}, body, func(err error) { ch <- err }); err != nil {
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
	if err := replica.n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 2}, sent[0], never); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("stale epoch: %v", err)
	}
	if err := owner.n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 1}, sent[0], never); !errors.Is(err, ErrOwnedHere) {
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
		if err := replica.n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 1}, body, never); !errors.Is(err, ErrBadAppend) {
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
	peers := peersFunc(func(peer string, _ cluster.EpochID, body []byte, done func(error)) {
		ops, err := DecodeOps(body)
		if err != nil {
			t.Fatal(err)
		}
		for _, op := range ops {
			got = append(got, peer+" "+op.Bucket)
		}
		done(nil)
	})
	r := NewPeerReplicator(2, 0, func() View { return View{Self: "a", Active: active, Epoch: cluster.EpochID{Counter: 3}} }, peers, nil)
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

type peersFunc func(peer string, epoch cluster.EpochID, body []byte, done func(error))

func (f peersFunc) Append(peer string, epoch cluster.EpochID, body []byte, done func(error)) {
	f(peer, epoch, body, done)
}

func FuzzDecodeOps(f *testing.F) {
	f.Add(AppendOps(nil, []store.Op{
		{Kind: store.OpPut, Bucket: "/queue/a", Key: 1, Value: (&Message{ID: "x", Body: []byte("b")}).encode()},
		{Kind: store.OpDelete, Bucket: "/queue/a", Key: 1},
		{Kind: store.OpDeleteBucket, Bucket: "/queue/a"},
	}))
	f.Add(appendWire(appendWire(nil, wireCatchUpBegin, &store.Op{Bucket: "/queue/b"}), wireCatchUpPut,
		&store.Op{Bucket: "/queue/b", Key: 7, Value: (&Message{ID: "y"}).encode()}))
	f.Add([]byte{1, 0})
	f.Add(appendCheck(appendWire(nil, wireTombstone, &store.Op{Bucket: "/queue/c", Key: 3}), "/queue/c", store.BucketStats{Count: 2, Bytes: 10, KeyHash: 99}))
	f.Fuzz(func(t *testing.T, b []byte) {
		ops, err := decodeWire(b)
		if err != nil {
			return
		}
		// What decodes survives a round trip unchanged.
		var enc []byte
		for i := range ops {
			if ops[i].kind == wireCheck {
				enc = appendCheck(enc, ops[i].op.Bucket, ops[i].sum)
				continue
			}
			enc = appendWire(enc, ops[i].kind, &ops[i].op)
		}
		again, err := decodeWire(enc)
		if err != nil {
			t.Fatalf("re-encoded ops do not decode: %v", err)
		}
		if len(again) != len(ops) {
			t.Fatalf("%d ops after a round trip, want %d", len(again), len(ops))
		}
		for i := range ops {
			a, b := ops[i], again[i]
			if a.kind != b.kind || a.op.Kind != b.op.Kind || a.op.Bucket != b.op.Bucket || a.op.Key != b.op.Key || string(a.op.Value) != string(b.op.Value) || a.sum != b.sum {
				t.Fatalf("op %d: %+v after a round trip, want %+v", i, b, a)
			}
		}
		// DecodeOps takes exactly the batches without catch-up ops.
		plain := true
		for _, o := range ops {
			plain = plain && o.kind == wireKind(o.op.Kind)
		}
		if _, err := DecodeOps(b); (err == nil) != plain {
			t.Fatalf("DecodeOps: %v for a batch with catch-up ops: %v", err, !plain)
		}
	})
}

// bucketKeys lists the keys of dest in h's store.
func bucketKeys(t *testing.T, h *harness, dest string) []uint64 {
	t.Helper()
	var keys []uint64
	if err := h.st.Scan(dest, 0, 0, 0, func(k uint64, _ []byte) error {
		keys = append(keys, k)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return keys
}

// A member that becomes active joins the queue's replica set with
// nothing: the owner's next write to it begins a catch-up, which copies
// the bucket in chunks while SENDs and ACKs go on; at the end the new
// replica holds exactly the owner's messages (none acknowledged during
// the copy comes back, none sent during it is missing). A key it held
// from an older copy stays (a catch-up fills in, it does not drop what
// may be the only other copy of a receipted message).
func TestCatchUpNewReplica(t *testing.T) {
	peers := &fakePeers{nodes: map[string]*harness{}, down: map[string]bool{}, epoch: map[string]cluster.EpochID{"a": {Counter: 1}, "b": {Counter: 1}, "c": {Counter: 1}}, active: []string{"a", "b"}}
	reps := map[string]*PeerReplicator{}
	mk := func(id string) *harness {
		cfg := smallWindow()
		cfg.NodeID = id
		h := &harness{t: t, dir: t.TempDir(), cfg: cfg}
		h.prepSt = func(n *Node, st *store.Store) {
			r := NewPeerReplicator(3, 1, peers.view(id), peers, nil)
			r.EnableCatchUp(st)
			reps[id] = r
			n.SetReplicator(r)
		}
		h.start()
		t.Cleanup(h.stop)
		return h
	}
	a, b, c := mk("a"), mk("b"), mk("c")
	peers.nodes["a"], peers.nodes["b"], peers.nodes["c"] = a, b, c
	const q = "/queue/grow"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	// c holds a stale copy from some earlier time: keys the owner never had.
	stale := AppendOps(nil, []store.Op{{Kind: store.OpPut, Bucket: q, Key: 1 << 63, Value: (&Message{ID: "old"}).encode()}})
	ch := make(chan error, 1)
	if err := c.n.ApplyReplicated(cluster.EpochID{Counter: 1}, cluster.EpochID{Counter: 1}, stale, func(err error) { ch <- err }); err != nil || <-ch != nil {
		t.Fatal("stale copy not stored")
	}
	sendNumbered(t, a, q, 0, 3000)

	col := newCollector()
	sub, err := a.n.Subscribe(SubOptions{Dest: q, Ack: AckClientIndividual, Prefetch: 100, Deliver: col.deliver})
	if err != nil {
		t.Fatal(err)
	}
	peers.mu.Lock()
	peers.active = []string{"a", "b", "c"}
	peers.mu.Unlock()
	// Writes and acknowledgements while c catches up.
	acked := 0
	for i := 0; i < 10; i++ {
		sendNumbered(t, a, q, 3000+i*50, 3000+(i+1)*50)
		got := col.wait(t, acked+100)
		bt := &Batch{Sync: true}
		for _, d := range got[acked : acked+100] {
			bt.Acks = append(bt.Acks, AckOp{Sub: sub, Tag: d.Tag})
		}
		acked += 100
		done := make(chan error, 1)
		if err := a.n.Apply(bt, func(err error) { done <- err }); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	reps["a"].Wait()
	if !reps["a"].Synced("c", q) {
		t.Fatal("catch-up of c did not complete")
	}
	if c.n.CatchingUp(q) {
		t.Fatal("c still catching up after the owner's catch-up ended")
	}
	// W = 1: the last acknowledgements' deletes may still be on their
	// way to the replicas. Let them arrive and commit.
	peers.drain()
	for _, h := range []*harness{b, c} {
		done := make(chan error, 1)
		h.st.Barrier(func(err error) { done <- err })
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	want := bucketKeys(t, a, q)
	if len(want) != 3500-acked {
		t.Fatalf("owner holds %d messages, want %d", len(want), 3500-acked)
	}
	for _, h := range []*harness{b, c} {
		got := bucketKeys(t, h, q)
		if h == c {
			if len(got) == 0 || got[len(got)-1] != 1<<63 {
				t.Fatalf("c's older key is gone: %v", got[max(0, len(got)-3):])
			}
			got = got[:len(got)-1]
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("%s holds %d keys, the owner %d; first difference near %v", h.cfg.NodeID, len(got), len(want), firstDiff(got, want))
		}
	}
}

func firstDiff(a, b []uint64) string {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return fmt.Sprintf("index %d: %d vs %d", i, a[i], b[i])
		}
	}
	return fmt.Sprintf("lengths %d vs %d", len(a), len(b))
}

// A message stored by its owner without its write quorum (the client is
// told its outcome is unknown, and may send it again) goes out marked
// redelivered when it was still pending: the client's second copy may be
// delivered before it. A message stored with its quorum goes out unmarked,
// and after the missing replica is back, so do new ones.
func TestNoQuorumCopyMarkedPossiblyDelivered(t *testing.T) {
	owner, _, peers := cluster2(t, 2)
	const q = "/queue/unconfirmed"
	if err := owner.send(q, "confirmed"); err != nil {
		t.Fatal(err)
	}
	peers.mu.Lock()
	peers.down["b"] = true
	peers.mu.Unlock()
	if err := owner.send(q, "unconfirmed"); !errors.Is(err, ErrNoQuorum) {
		t.Fatalf("SEND with the replica down: %v, want ErrNoQuorum", err)
	}
	c := newCollector()
	if _, err := owner.n.Subscribe(SubOptions{Dest: q, Ack: AckAuto, Deliver: c.deliver}); err != nil {
		t.Fatal(err)
	}
	got := c.wait(t, 2)
	for _, d := range got {
		want := string(d.Msg.Body) == "unconfirmed"
		if d.Redelivered != want {
			t.Errorf("%s delivered with redelivered=%v, want %v", d.Msg.Body, d.Redelivered, want)
		}
	}
}
