package node

// Hostile review, round 7: release/merge, the forwarding worker, auto-ack
// republish, chunking. Each test fails on the code it was written against.

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/brokerd/brokerd/store"
)

// ---------------------------------------------------------------------
// 1. A merge request for a queue served here outside rt.owned is ignored.
//
// A dead-letter move adopts the DLQ on the moving node (lockDestination,
// no pull). When that node owns the DLQ, the stray scan leaves it alone
// (owner == self), the joined-release only looks at rt.owned, merge()
// returns at once ("not served here") and takeOver skips the pull because
// the queue is already adopted. A copy released by another node (here: a
// receipted message stored on the other side of a view split) is never
// merged: it stays on a node nobody reads.
func TestReview7MergeIgnoredForQueueAdoptedOutsideTakeOver(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	q := pickQueue(t, "m7-", func(n string) bool {
		return ownerIn(n, both) == "node-b" && ownerIn("/queue/DLQ."+n[len("/queue/"):], both) == "node-b"
	})
	dlq := "/queue/DLQ." + q[len("/queue/"):]
	// node-a's view lags: it alone is active, it owns everything.
	a := startR6(t, "node-a", rn, []string{"node-a"}, []string{"node-b"}, r6Opts{maxRedeliveries: 1})
	b := startR6(t, "node-b", rn, both, []string{"node-a"}, r6Opts{maxRedeliveries: 1})
	a.warm(t, "node-b")
	b.warm(t, "node-a")
	// A client of node-a sends to the DLQ: receipted, stored on node-a.
	if err := waitErr(t, "SEND old", a.apply(t, sendBatch(dlq, "old")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// On node-b a message of q is dead-lettered into the DLQ (node-b owns
	// both): the DLQ is adopted there by the move, outside the router.
	if err := waitErr(t, "SEND poison", b.apply(t, sendBatch(q, "poison")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	var nacked atomic.Int32
	var rej recorder
	rej.hook = func(d replica.Delivery) {
		if nacked.Add(1) > 2 {
			return
		}
		go func() {
			ch := make(chan error, 1)
			if err := b.rt.Apply(&replica.Batch{Acks: []replica.AckOp{{Sub: d.Sub, Tag: d.Tag, Nack: true}}, Sync: true}, func(err error) { ch <- err }); err != nil {
				ch <- err
			}
			<-ch
		}()
	}
	rs, err := b.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Deliver: rej.deliver})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "poison dead-lettered on node-b", func() bool { return b.rep.Adopted(dlq) && len(b.bodies(t, dlq)) == 1 })
	rs.Close()
	// node-a's view catches up: it releases the DLQ and asks node-b to
	// merge its copy.
	a.setView(both, 2)
	waitUntil(t, "node-a released the DLQ", func() bool { return !a.rep.Adopted(dlq) })
	time.Sleep(500 * time.Millisecond)
	var dl recorder
	if _, err := b.rt.Subscribe(replica.SubOptions{Dest: dlq, Ack: replica.AckAuto, Deliver: dl.deliver}); err != nil {
		t.Fatal(err)
	}
	got := dl.waitN(2, 3*time.Second)
	if len(got) < 2 {
		t.Fatalf("the consumer of %s on its owner node-b gets %v; the receipted \"old\" stays on node-a (%v), which released it and asked for a merge that node-b ignored (the DLQ was adopted by a dead-letter move, not in rt.owned)",
			dlq, got, a.bodies(t, dlq))
	}
}

// r7Bare is a single node's router without the harness's cleanup (a test
// that deadlocks it must not hang in t.Cleanup).
func r7Bare(t *testing.T, id string) *router {
	t.Helper()
	log := slog.New(slog.DiscardHandler)
	scfg := store.DefaultConfig(filepath.Join(t.TempDir(), "r.db"))
	scfg.Weigh = replica.StoredBodyLen
	scfg.Logger = log
	st, err := store.Open(scfg)
	if err != nil {
		t.Fatal(err)
	}
	st.Start()
	rcfg := replica.DefaultConfig()
	rcfg.NodeID = id
	rcfg.Logger = log
	rep := replica.New(rcfg, st)
	status := func() cluster.Status {
		return cluster.Status{NodeID: id, ActiveSet: []string{id}, EpochID: cluster.EpochID{Counter: 1, Set: 1}}
	}
	fwd := newFwdLinks(stompClientCfg(id, log), func(string) string { return "" })
	rt := newRouter(rep, st, 1, status, fwd, log, nil)
	if err := rep.Recover(); err != nil {
		t.Fatal(err)
	}
	rep.Start()
	rt.start()
	return rt
}

// ---------------------------------------------------------------------
// 2. routedSub.Close and router.attach take rs.mu and rt.pmu in opposite
// orders: a deadlock.
//
// Close republishes the auto-ack deliveries that never reached the wire
// while holding rs.mu (republish -> goBackground takes rt.pmu); attach
// (the end of every bind and re-bind) holds rt.pmu and takes rs.mu. A
// client that disconnects while its subscription re-binds (owner moved)
// with unwritten auto-ack deliveries freezes rt.pmu for good: every
// later subscribe, re-bind, background job and the router's close hang.
func TestReview7CloseAttachLockOrderDeadlock(t *testing.T) {
	rt := r7Bare(t, "node-a")
	q := "/queue/lockorder"
	for i := 0; i < 20; i++ {
		rs := &routedSub{rt: rt, id: fmt.Sprintf("x.%d", i), opts: replica.SubOptions{Dest: q, Ack: replica.AckAuto, Deliver: func(replica.Delivery) {}},
			inflight: map[uint64]*flight{}}
		for k := uint64(1); k <= 2000; k++ {
			rs.inflight[k] = &flight{gen: 1, otag: k, id: fmt.Sprint(k), msg: &replica.Message{Dest: q, ID: fmt.Sprintf("m%d-%d", i, k), Body: []byte("x")}}
		}
		rs.unwritten = len(rs.inflight)
		var wg sync.WaitGroup
		wg.Add(2)
		closed := make(chan struct{})
		go func() { defer wg.Done(); rs.Close(); close(closed) }()
		// Close is republishing under rs.mu (before the fix); the re-bind
		// finishes now. After the fix Close may be over already.
	spin:
		for rs.mu.TryLock() {
			rs.mu.Unlock()
			select {
			case <-closed:
				break spin
			default:
			}
		}
		go func() { defer wg.Done(); _ = rt.attach("node-a", rs, 1) }()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("iteration %d: routedSub.Close (holds rs.mu, wants rt.pmu in goBackground) and router.attach (holds rt.pmu, wants rs.mu) deadlocked", i)
		}
	}
	rt.close()
}

// ---------------------------------------------------------------------
// 3. A transaction whose messages carry large headers is never forwarded.
//
// forwardSends splits a batch by the sum of its bodies only (4 MiB); the
// encoded request carries the headers too. 20 SENDs of a transaction
// with 1 MiB of headers each (128 headers of 8 KiB: within the client
// limits, 20 MiB within max_transaction_bytes) make one 20 MiB request,
// over the peer frame limit (16 MiB): PeerClient refuses it, the router
// retries the same request for 4 s and the client gets an ERROR. The
// parts of the transaction owned elsewhere are committed (not atomic).
func TestReview7ChunkIgnoresHeaders(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	a := startR6(t, "node-a", rn, both, []string{"node-b"}, r6Opts{})
	startR6(t, "node-b", rn, both, []string{"node-a"}, r6Opts{})
	q := pickQueue(t, "hdr-", func(n string) bool { return ownerIn(n, both) == "node-b" })
	a.warm(t, "node-b")
	big := strings.Repeat("v", 8000)
	b := &replica.Batch{Sync: true}
	for i := 0; i < 20; i++ {
		m := &replica.Message{Dest: q, Body: []byte(fmt.Sprint(i))}
		for h := 0; h < 128; h++ {
			m.Headers = append(m.Headers, fmt.Sprintf("h%d", h), big)
		}
		b.Sends = append(b.Sends, m)
	}
	if err := waitErr(t, "transaction", a.apply(t, b), 15*time.Second); err != nil {
		t.Fatalf("a transaction of 20 SENDs with 1 MiB of headers each, to a queue node-b owns: %v", err)
	}
}

func stompClientCfg(id string, log *slog.Logger) stomp.PeerClientConfig {
	c := stomp.DefaultPeerClientConfig()
	c.Secret, c.NodeID, c.Logger = testSecret, id, log
	return c
}
