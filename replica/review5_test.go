package replica

// Review of 2a6ff7c (replica/replicate.go): the catch-up goroutine also
// repairs after a failed live batch, and Wait polls for copies catching.

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/store"
)

type r5View struct {
	mu sync.Mutex
	v  View
}

func (r *r5View) get() View {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.v
}

func (r *r5View) set(v View) {
	r.mu.Lock()
	r.v = v
	r.mu.Unlock()
}

func r5Put(q string, key uint64) []store.Op {
	rec := (&Message{ID: "x", Body: []byte("x")}).encode()
	return []store.Op{{Kind: store.OpPut, Bucket: q, Key: key, Value: rec}}
}

// ---------------------------------------------------------------------
// 1. The repair goroutine never looks at the view: "tracked" is only
// refreshed by a later Replicate that writes the same queue (or any write,
// for a peer that left Active). On a quiet queue - the case this commit
// is for - a peer that left the queue's replica set (or the cluster) keeps
// receiving catch-up begins and chunks from this node, under the NEW
// epoch, every backoff, for ever (until Close). Under the new epoch the
// replica cannot refuse them as stale: a node that no longer owns the
// queue rewrites the replica's catch-up state (begin resets the touched
// keys of the new owner's catch-up) and puts its stale records there.
func TestReview5RepairOutlivesReplicaSet(t *testing.T) {
	vw := &r5View{v: View{Self: "a", Active: []string{"a", "b"}, Epoch: cluster.EpochID{Counter: 1, Set: 1}}}
	var mu sync.Mutex
	var late []string
	peers := peersFunc(func(peer string, epoch cluster.EpochID, body []byte, done func(error)) {
		if epoch.Counter == 2 {
			mu.Lock()
			late = append(late, fmt.Sprintf("%s:kind%d", peer, body[0]))
			mu.Unlock()
		}
		done(errors.New("peer down"))
	})
	p := NewPeerReplicator(2, 1, vw.get, peers, nil)
	p.EnableCatchUp(emptySrc{})
	defer p.Close()
	q := "/queue/r5-left"
	p.Replicate(r5Put(q, 1), false, nil) // fails: a repair goroutine for (b, q)
	// b leaves the cluster; q is quiet from now on.
	vw.set(View{Self: "a", Active: []string{"a", "c"}, Epoch: cluster.EpochID{Counter: 2, Set: 2}})
	time.Sleep(time.Second)
	mu.Lock()
	got := append([]string(nil), late...)
	mu.Unlock()
	p.stateMu.Lock()
	still := p.running[[2]string{"b", q}]
	p.stateMu.Unlock()
	if len(got) > 0 || still {
		t.Fatalf("b left the cluster (epoch 2) and q was not written since: the repair goroutine is still running (%v) and sent b %d appends under epoch 2: %v", still, len(got), got)
	}
}

// ---------------------------------------------------------------------
// 2. A begin (and a whole catch-up) after Close: the goroutine does not
// look at stop again once its backoff timer fired. Forced by holding
// sendMu across the wake-up and Close.
func TestReview5BeginAfterClose(t *testing.T) {
	view := func() View {
		return View{Self: "a", Active: []string{"a", "b"}, Epoch: cluster.EpochID{Counter: 1, Set: 1}}
	}
	var p *PeerReplicator
	var fail atomic.Bool
	fail.Store(true)
	var afterStop atomic.Int32
	peers := peersFunc(func(peer string, epoch cluster.EpochID, body []byte, done func(error)) {
		select {
		case <-p.stop:
			afterStop.Add(1)
		default:
		}
		if fail.Load() {
			done(errors.New("peer down"))
			return
		}
		done(nil)
	})
	p = NewPeerReplicator(2, 1, view, peers, nil)
	p.EnableCatchUp(emptySrc{})
	q := "/queue/r5-close"
	p.Replicate(r5Put(q, 1), false, nil) // fails: repair after 100 ms
	fail.Store(false)
	p.sendMu.Lock()
	waitStack(t, "(*PeerReplicator).catchUp", "sync.(*Mutex).Lock")
	closed := make(chan struct{})
	go func() { p.Close(); close(closed) }()
	<-p.stop
	p.sendMu.Unlock()
	waitClosed(t, closed, "Close hung")
	if n := afterStop.Load(); n > 0 {
		t.Fatalf("%d appends (a catch-up begin and its end) sent to b after Close had stopped the replicator", n)
	}
}

// ---------------------------------------------------------------------
// 3. Wait returns while a failed live batch's repair is pending: one
// transient failure, a healthy peer; Wait returns at once with the copy
// unknown, and the repair (begin, end) runs after it.
func TestReview5WaitSkipsPendingRepair(t *testing.T) {
	view := func() View {
		return View{Self: "a", Active: []string{"a", "b"}, Epoch: cluster.EpochID{Counter: 1, Set: 1}}
	}
	var calls atomic.Int32
	peers := peersFunc(func(peer string, epoch cluster.EpochID, body []byte, done func(error)) {
		if calls.Add(1) == 1 {
			done(errors.New("transient"))
			return
		}
		done(nil)
	})
	p := NewPeerReplicator(2, 1, view, peers, nil)
	p.EnableCatchUp(emptySrc{})
	defer p.Close()
	q := "/queue/r5-wait"
	p.Replicate(r5Put(q, 1), false, nil)
	p.Wait()
	n1, synced := calls.Load(), p.Synced("b", q)
	time.Sleep(500 * time.Millisecond)
	n2, syncedLater := calls.Load(), p.Synced("b", q)
	if n2 > n1 || synced != syncedLater {
		t.Fatalf("Wait returned with b's copy of q Synced=%v and its repair pending: %d appends after Wait returned, Synced=%v then", synced, n2-n1, syncedLater)
	}
}

// ---------------------------------------------------------------------
// 4. Wait returns while a catch-up is still copying: its chunk is
// unanswered, but a live batch's failure set the copy unknown, and Wait
// only looks at the state. The goroutine then scans the source again
// (the caller may have closed it) before it notices it was superseded.
type r5Src struct{ scans atomic.Int32 }

func (*r5Src) Barrier(done func(error)) { done(nil) }
func (s *r5Src) Scan(_ string, after uint64, _, _ int, fn func(uint64, []byte) error) error {
	s.scans.Add(1)
	if after == 0 {
		return fn(1, (&Message{ID: "x", Body: []byte("x")}).encode())
	}
	return nil
}

func TestReview5WaitReturnsWhileCopying(t *testing.T) {
	view := func() View {
		return View{Self: "a", Active: []string{"a", "b"}, Epoch: cluster.EpochID{Counter: 1, Set: 1}}
	}
	held := make(chan func(error), 1)
	var failLive atomic.Bool
	peers := peersFunc(func(peer string, epoch cluster.EpochID, body []byte, done func(error)) {
		switch {
		case body[0] == wireCatchUpPut:
			held <- done
		case failLive.Load() && body[0] == wirePut:
			done(errors.New("transient"))
		default:
			done(nil)
		}
	})
	p := NewPeerReplicator(2, 1, view, peers, nil)
	src := &r5Src{}
	p.EnableCatchUp(src)
	q := "/queue/r5-copying"
	p.Replicate(r5Put(q, 1), false, nil) // begin + put: catch-up starts
	var chunkDone func(error)
	select {
	case chunkDone = <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("no catch-up chunk")
	}
	defer func() { chunkDone(nil); p.Close() }()
	failLive.Store(true)
	p.Replicate(r5Put(q, 2), false, nil) // fails: the copy is unknown
	waited := make(chan struct{})
	go func() { p.Wait(); close(waited) }()
	select {
	case <-waited:
		t.Fatalf("Wait returned while the catch-up of q to b is still copying (its chunk unanswered; %d scans so far, more follow)", src.scans.Load())
	case <-time.After(300 * time.Millisecond):
	}
}

// ---------------------------------------------------------------------
// 5. wg.Add racing Close's wg.Wait: a live batch's failure reported by
// the transport after Close (nothing orders the transport's goroutine
// after Close) spawns a catch-up goroutine with wg.Add(1) from zero while
// Close's Wait blocked on another catch-up: WaitGroup misuse, reported by
// the race detector (and a "WaitGroup misuse: Add called concurrently
// with Wait" panic when it lands between Done and Wait's wake-up).
func TestReview5LateFailureAddRacesCloseWait(t *testing.T) {
	view := func() View {
		return View{Self: "a", Active: []string{"a", "b"}, Epoch: cluster.EpochID{Counter: 1, Set: 1}}
	}
	q1, q2 := "/queue/r5-late-1", "/queue/r5-late-2"
	var holdLive, holdChunk atomic.Bool
	live := make(chan func(error), 1)
	chunk := make(chan func(error), 1)
	peers := peersFunc(func(peer string, epoch cluster.EpochID, body []byte, done func(error)) {
		switch {
		case holdLive.Load() && body[0] == wirePut:
			holdLive.Store(false)
			live <- done
		case holdChunk.Load() && body[0] == wireCatchUpPut:
			holdChunk.Store(false)
			chunk <- done
		default:
			done(nil)
		}
	})
	p := NewPeerReplicator(2, 1, view, peers, nil)
	p.EnableCatchUp(&r5Src{})
	p.Replicate(r5Put(q1, 1), false, nil) // (b, q1) caught up and synced
	for !p.Synced("b", q1) {
		time.Sleep(time.Millisecond)
	}
	holdLive.Store(true)
	p.Replicate(r5Put(q1, 2), false, nil) // its answer comes late
	liveDone := <-live
	holdChunk.Store(true)
	p.Replicate(r5Put(q2, 1), false, nil) // (b, q2) catch-up: its chunk held
	chunkDone := <-chunk
	closed := make(chan struct{})
	go func() { p.Close(); close(closed) }()
	waitStack(t, "(*PeerReplicator).Close", "(*WaitGroup).Wait")
	chunkDone(nil) // the q2 catch-up ends; Close returns
	for stackHas("(*PeerReplicator).Close") {
		time.Sleep(time.Millisecond)
	}
	liveDone(errors.New("connection lost")) // the transport reports late
	waitClosed(t, closed, "Close hung")
	// Fails under -race (the project's test command): the callback's
	// wg.Add(1) from zero is unordered with Close's blocked wg.Wait.
}

func stackHas(part string) bool {
	buf := make([]byte, 8<<20)
	n := runtime.Stack(buf, true)
	return strings.Contains(string(buf[:n]), part)
}
