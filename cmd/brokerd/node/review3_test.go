package node

// Hostile review, round 3: peerLinks and replication over real peer
// links with catch-up. Each test fails on the code it was written
// against; see the report.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/brokerd/brokerd/store"
	"github.com/go-stomp/stomp/v3/frame"
)

// r3Member is repMember with options: catch-up on, a wrapped handler,
// and the client-side connections its links dialed (to break them).
type r3Member struct {
	repMember
	rep *replica.PeerReplicator

	mu    sync.Mutex
	conns []net.Conn
}

type r3Opts struct {
	catchUp   bool
	w         int
	maxQueued int
	wrap      func(stomp.PeerHandler) stomp.PeerHandler
}

func startR3Member(t *testing.T, id string, rn *repNet, o r3Opts) *r3Member {
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
	n := replica.New(rcfg, st)
	m := &r3Member{}
	ccfg := stomp.DefaultPeerClientConfig()
	ccfg.Secret, ccfg.NodeID, ccfg.Logger = testSecret, id, log
	ccfg.BackoffMax = 100 * time.Millisecond
	var d net.Dialer
	ccfg.Dial = func(ctx context.Context, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			m.mu.Lock()
			m.conns = append(m.conns, c)
			m.mu.Unlock()
		}
		return c, err
	}
	if o.maxQueued == 0 {
		o.maxQueued = 64 << 20
	}
	links := newPeerLinks(ccfg, rn.addr, o.maxQueued, log)
	rep := replica.NewPeerReplicator(2, o.w, rn.view(id), links, log)
	if o.catchUp {
		rep.EnableCatchUp(st)
	}
	n.SetReplicator(rep)
	if err := n.Recover(); err != nil {
		t.Fatal(err)
	}
	n.Start()
	pcfg := stomp.DefaultPeerServerConfig()
	pcfg.Addr, pcfg.Secret, pcfg.NodeID, pcfg.Logger = "127.0.0.1:0", testSecret, id, log
	var h stomp.PeerHandler = replicationHandler(n, func() cluster.EpochID { return rn.view(id)().Epoch })
	if o.wrap != nil {
		h = o.wrap(h)
	}
	srv := stomp.NewPeerServer(pcfg, h)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	rn.mu.Lock()
	rn.addrs[id] = srv.Addr().String()
	rn.mu.Unlock()
	m.repMember = repMember{id: id, st: st, n: n, srv: srv, links: links, open: true}
	m.rep = rep
	t.Cleanup(m.stop)
	return m
}

// breakLinks closes every connection m's links dialed, as a network
// fault (or a write timeout) would on m's side.
func (m *r3Member) breakLinks() {
	m.mu.Lock()
	cs := m.conns
	m.conns = nil
	m.mu.Unlock()
	for _, c := range cs {
		_ = c.Close()
	}
}

func keysOf(t *testing.T, st *store.Store, dest string) []uint64 {
	t.Helper()
	var keys []uint64
	if err := st.Scan(dest, 0, 0, 0, func(k uint64, _ []byte) error {
		keys = append(keys, k)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return keys
}

func waitUntil(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal(what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func waitStack3(t *testing.T, parts ...string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	buf := make([]byte, 8<<20)
	for {
		n := runtime.Stack(buf, true)
		for _, g := range strings.Split(string(buf[:n]), "\n\n") {
			all := true
			for _, p := range parts {
				if !strings.Contains(g, p) {
					all = false
					break
				}
			}
			if all {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no goroutine parked at %q", parts)
		}
		time.Sleep(time.Millisecond)
	}
}

// ---------------------------------------------------------------------
// 1. FIFO does not survive a reconnect.
//
// The design relies on "a peer link is FIFO". PeerServer serves each
// connection on its own reader goroutine, concurrently, and nothing
// fences an old connection of the same peer when a new one arrives. When
// the owner's side of a link breaks (write timeout against a replica
// whose disk stalls, a heart-beat timeout) while the replica still has
// its requests buffered or waiting for wmu, the owner fails them (outcome
// unknown), reconnects and sends the next batches, which the replica may
// apply BEFORE the old connection's. Catch-up does not save it: the old
// request is a live put, which tombstones do not filter, and it lands
// after the begin and the delete that followed it. The copy ends marked
// synced with a message the owner acknowledged.
type holdNext struct {
	mu      sync.Mutex
	armed   bool
	held    chan struct{}
	release chan struct{}
	applied chan struct{}
}

func (h *holdNext) arm() {
	h.mu.Lock()
	h.armed = true
	h.held, h.release, h.applied = make(chan struct{}), make(chan struct{}), make(chan struct{})
	h.mu.Unlock()
}

func (h *holdNext) wrap(inner stomp.PeerHandler) stomp.PeerHandler {
	return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		h.mu.Lock()
		hold := h.armed
		h.armed = false
		held, release, applied := h.held, h.release, h.applied
		h.mu.Unlock()
		if !hold {
			inner.HandlePeer(peer, f, reply)
			return
		}
		// This connection's reader is busy (behind wmu, a stalled Submit):
		// the request is applied later.
		close(held)
		<-release
		inner.HandlePeer(peer, f, func(r *frame.Frame) {
			reply(r)
			close(applied)
		})
	})
}

func TestReview3ReconnectReordersAppends(t *testing.T) {
	rn := &repNet{active: []string{"a", "b"}, epoch: cluster.EpochID{Counter: 1, Set: 1}, addrs: map[string]string{}}
	var hold holdNext
	b := startR3Member(t, "b", rn, r3Opts{wrap: hold.wrap})
	a := startR3Member(t, "a", rn, r3Opts{catchUp: true, w: 1})
	const q = "/queue/r3-reorder"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	if err := a.send(t, q, "m0"); err != nil {
		t.Fatal(err)
	}
	a.rep.Wait()
	waitUntil(t, "b never synced", func() bool { return a.rep.Synced("b", q) })

	hold.arm()
	if err := a.send(t, q, "m1"); err != nil { // W = 1: answered at the local commit
		t.Fatal(err)
	}
	<-hold.held
	a.breakLinks() // m1's append fails on a (outcome unknown): b's copy unknown
	waitUntil(t, "b still synced after a failed batch", func() bool { return !a.rep.Synced("b", q) })

	var c deliveries
	sub, err := a.n.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Prefetch: 10, Deliver: c.deliver})
	if err != nil {
		t.Fatal(err)
	}
	got := c.wait(t, 2)
	ch := make(chan error, 1)
	if err := a.n.Apply(&replica.Batch{Sync: true, Acks: []replica.AckOp{{Sub: sub, Tag: got[1].Tag}}}, func(err error) { ch <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	// The ACK's batch carries a begin over the new link; the catch-up ends.
	a.rep.Wait()
	waitUntil(t, "catch-up never ended", func() bool { return a.rep.Synced("b", q) })

	close(hold.release) // the old connection's request is applied now
	select {
	case <-hold.applied:
	case <-time.After(10 * time.Second):
		t.Fatal("held append never applied")
	}
	want, have := keysOf(t, a.st, q), keysOf(t, b.st, q)
	if a.rep.Synced("b", q) && fmt.Sprint(want) != fmt.Sprint(have) {
		t.Fatalf("the owner has b synced; b holds %v, the owner %v: an append from the broken connection was applied after the new connection's begin and delete", have, want)
	}
}

// ---------------------------------------------------------------------
// 2. peerLinks.Append racing Close: done is never called.
//
// Append takes o from get() and only then o.mu; Close cancels o and
// waits for run, whose failQueued empties the queue and returns. An
// Append between the two queues its batch on a peerOut nobody drains: its
// done never runs, so the write's tally never settles, a barrier after it
// never answers, and a catch-up waiting in send() blocks for ever
// (PeerReplicator.Wait hangs at shutdown).
//
// Forced with GOMAXPROCS(1): run and Append both wait for o.mu, run
// first; once run has it, run also takes it again for failQueued before
// the woken Append goroutine runs.
func TestReview3AppendRacingCloseNeverDone(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	cfg := stomp.DefaultPeerClientConfig()
	cfg.Secret, cfg.NodeID, cfg.Logger = testSecret, "a", log
	pl := newPeerLinks(cfg, func(string) string { return "" }, 0, log)
	o, err := pl.get("b")
	if err != nil {
		t.Fatal(err)
	}
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	o.mu.Lock()
	o.signal <- struct{}{}
	waitStack3(t, "(*peerLinks).run", "sync.(*Mutex).Lock")
	done := make(chan error, 1)
	go pl.Append("b", cluster.EpochID{Counter: 1}, []byte("x"), func(err error) { done <- err })
	waitStack3(t, "(*peerLinks).Append", "sync.(*Mutex).Lock")
	closed := make(chan struct{})
	go func() { pl.Close(); close(closed) }()
	waitStack3(t, "(*peerLinks).Close", "sync.(*WaitGroup).Wait")
	o.mu.Unlock()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hung")
	}
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("an Append racing Close was queued after the sender goroutine ended: its done never ran")
	}
}

// ---------------------------------------------------------------------
// 3. A merged request is refused whole.
//
// run merges consecutive appends into one request; the replica applies a
// request whole or refuses it whole. One append the replica refuses (a
// queue it now owns, a catch-up put after it restarted, a tombstone
// overflow) fails every write merged with it, for unrelated queues: their
// SENDs get ERROR (ErrNoQuorum) and their copies are marked unknown (a
// full re-copy each, dropping the replica's copy at begin).
func TestReview3MergedRequestRefusedWhole(t *testing.T) {
	rn := &repNet{active: []string{"a", "b"}, epoch: cluster.EpochID{Counter: 1, Set: 1}, addrs: map[string]string{}}
	b := startR3Member(t, "b", rn, r3Opts{})
	a := startR3Member(t, "a", rn, r3Opts{})
	const q0, q1, q2 = "/queue/r3-m0", "/queue/r3-m1", "/queue/r3-m2"
	if err := b.n.Adopt(q2); err != nil { // b serves q2: a's append for it is refused
		t.Fatal(err)
	}
	bAddr := rn.addr("b")
	rn.mu.Lock()
	rn.addrs["b"] = "" // the link is down for a moment
	rn.mu.Unlock()
	ep := rn.view("a")().Epoch
	body := func(q string) []byte {
		return replica.AppendOps(nil, []store.Op{{Kind: store.OpDelete, Bucket: q, Key: 1}})
	}
	errs := make([]chan error, 3)
	for i := range errs {
		errs[i] = make(chan error, 1)
	}
	a.links.Append("b", ep, body(q0), func(err error) { errs[0] <- err })
	waitStack3(t, "(*peerLinks).run", "(*PeerClient).Request")
	a.links.Append("b", ep, body(q1), func(err error) { errs[1] <- err })
	a.links.Append("b", ep, body(q2), func(err error) { errs[2] <- err })
	rn.mu.Lock()
	rn.addrs["b"] = bAddr
	rn.mu.Unlock()
	var got [3]error
	for i := range errs {
		select {
		case got[i] = <-errs[i]:
		case <-time.After(10 * time.Second):
			t.Fatalf("append %d not answered", i)
		}
	}
	if got[0] != nil {
		t.Fatalf("append for q0: %v", got[0])
	}
	if got[2] == nil {
		t.Fatal("append for q2, which b owns, was applied")
	}
	if got[1] != nil {
		t.Fatalf("a write for %s failed because an append for %s was merged into the same request and refused: %v", q1, q2, got[1])
	}
}

// ---------------------------------------------------------------------
// 4. A commit bigger than the peer link's body limit never replicates.
//
// A transaction may hold limits.max_transaction_bytes (64 MiB by
// default) and a message limits.max_body_size (configurable above 16
// MiB); the whole commit is one append, and a request body over the
// peer link's 16 MiB is refused by Request before it is sent. run
// reports it as errPeerDown: the COMMIT fails with ErrNoQuorum every
// time, however healthy the replica, and the replica's copy is marked
// unknown (with catch-up: dropped and re-copied).
func TestReview3LargeCommitNeverReplicates(t *testing.T) {
	rn := &repNet{active: []string{"a", "b"}, epoch: cluster.EpochID{Counter: 1, Set: 1}, addrs: map[string]string{}}
	startR3Member(t, "b", rn, r3Opts{})
	a := startR3Member(t, "a", rn, r3Opts{})
	const q = "/queue/r3-big"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, 1<<20)
	bt := &replica.Batch{Sync: true}
	for range 20 { // a 20 MiB transaction: within max_transaction_bytes
		bt.Sends = append(bt.Sends, &replica.Message{Dest: q, Body: body})
	}
	ch := make(chan error, 1)
	if err := a.n.Apply(bt, func(err error) { ch <- err }); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ch:
		if err != nil {
			t.Fatalf("a 20 MiB COMMIT with both replicas up: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("COMMIT not answered")
	}
}

// ---------------------------------------------------------------------
// 5. The per-peer byte bound covers only the queue, not what is in
// flight.
//
// run hands batches to PeerClient.Request, which returns once the request
// is queued for the writer; up to MaxInFlight (256) requests, each up to
// maxBatchBody (4 MiB) merged, stay in memory until answered. Against a
// replica that stops answering (its disk stalls: ApplyReplicated's done
// waits for fdatasync) the owner holds up to 1 GiB per peer while the
// configured bound (maxQueued) says 4 MiB.
func TestReview3InFlightBytesUnbounded(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	var mu sync.Mutex
	var replies []func(*frame.Frame)
	pcfg := stomp.DefaultPeerServerConfig()
	pcfg.Addr, pcfg.Secret, pcfg.NodeID, pcfg.Logger = "127.0.0.1:0", testSecret, "b", log
	srv := stomp.NewPeerServer(pcfg, stomp.PeerHandlerFunc(func(_ string, _ *frame.Frame, reply func(*frame.Frame)) {
		mu.Lock()
		replies = append(replies, reply)
		mu.Unlock()
	}))
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	cfg := stomp.DefaultPeerClientConfig()
	cfg.Secret, cfg.NodeID, cfg.Logger = testSecret, "a", log
	addr := srv.Addr().String()
	pl := newPeerLinks(cfg, func(string) string { return addr }, 0, log) // bound: maxBatchBody, 4 MiB
	defer pl.Close()
	defer func() {
		mu.Lock()
		for _, r := range replies {
			r(stomp.PeerFail("test", "done"))
		}
		mu.Unlock()
	}()
	ep := cluster.EpochID{Counter: 1}
	chunk := make([]byte, 64<<10)
	accepted := 0
	for i := 0; i < 1000; i++ {
		var refused atomic.Bool
		pl.Append("b", ep, chunk, func(err error) {
			if errors.Is(err, errPeerBacklog) {
				refused.Store(true)
			}
		})
		if !refused.Load() {
			accepted += len(chunk)
		}
		time.Sleep(200 * time.Microsecond)
	}
	if limit := pl.maxQueued + maxAppendBody; accepted > limit {
		t.Fatalf("peerLinks with a %d-byte bound accepted %d bytes for a peer that answers nothing (held in flight by PeerClient)", pl.maxQueued, accepted)
	}
}
