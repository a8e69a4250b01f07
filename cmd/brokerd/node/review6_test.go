package node

// Hostile review, round 6: the router (forwarding to queue owners), the
// host and its pollers, take-over and release. Each test fails on the
// code it was written against; see the report.

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
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

// r6Net is the peer-link address of each member.
type r6Net struct {
	mu    sync.Mutex
	addrs map[string]string
}

func (n *r6Net) addr(id string) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.addrs[id]
}

func (n *r6Net) set(id, a string) {
	n.mu.Lock()
	n.addrs[id] = a
	n.mu.Unlock()
}

// r6View is one member's membership view, changed by the tests.
type r6View struct {
	mu      sync.Mutex
	active  []string
	epoch   cluster.EpochID
	members []string // alive, self excluded
}

// gate holds the writes of the connections it wraps while closed.
type gate struct {
	mu   sync.Mutex
	open chan struct{}
}

func newGate() *gate {
	g := &gate{open: make(chan struct{})}
	close(g.open)
	return g
}

func (g *gate) hold() {
	g.mu.Lock()
	g.open = make(chan struct{})
	g.mu.Unlock()
}

func (g *gate) release() {
	g.mu.Lock()
	select {
	case <-g.open:
	default:
		close(g.open)
	}
	g.mu.Unlock()
}

func (g *gate) wait() {
	g.mu.Lock()
	c := g.open
	g.mu.Unlock()
	<-c
}

type gatedConn struct {
	net.Conn
	g *gate
}

func (c gatedConn) Write(b []byte) (int, error) {
	c.g.wait()
	return c.Conn.Write(b)
}

type r6Member struct {
	id    string
	net   *r6Net
	view  *r6View
	st    *store.Store
	rep   *replica.Node
	pr    *replica.PeerReplicator
	links *peerLinks
	fwd   *fwdLinks
	rt    *router
	srv   *stomp.PeerServer
	fgate *gate // the forwarding links' writes
	once  sync.Once
}

type r6Opts struct {
	r, w            int
	maxRedeliveries int
	wrap            func(stomp.PeerHandler) stomp.PeerHandler
	noWatch         bool
	idleDelete      time.Duration // queue.idle_delete_after; 0: the default
}

func (m *r6Member) status() cluster.Status {
	m.view.mu.Lock()
	defer m.view.mu.Unlock()
	st := cluster.Status{NodeID: m.id, ActiveSet: append([]string(nil), m.view.active...), EpochID: m.view.epoch}
	for _, id := range m.view.members {
		st.Members = append(st.Members, cluster.MemberStatus{ID: id, State: "alive", PeerAddr: m.net.addr(id)})
	}
	return st
}

// setView changes m's view and makes its router see it at once.
func (m *r6Member) setView(active []string, epoch uint64) {
	m.view.mu.Lock()
	m.view.active = active
	m.view.epoch = cluster.EpochID{Counter: epoch, Set: epoch}
	m.view.mu.Unlock()
	m.rt.refresh()
}

func startR6(t *testing.T, id string, rn *r6Net, active, members []string, o r6Opts) *r6Member {
	t.Helper()
	if o.r == 0 {
		o.r = 2
	}
	if o.w == 0 {
		o.w = 1
	}
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
	if o.maxRedeliveries > 0 {
		rcfg.MaxRedeliveries = o.maxRedeliveries
	}
	if o.idleDelete > 0 {
		rcfg.IdleDeleteAfter = o.idleDelete
	}
	rep := replica.New(rcfg, st)
	m := &r6Member{id: id, net: rn, st: st, rep: rep, fgate: newGate(),
		view: &r6View{active: active, epoch: cluster.EpochID{Counter: 1, Set: 1}, members: members}}
	ccfg := stomp.DefaultPeerClientConfig()
	ccfg.Secret, ccfg.NodeID, ccfg.Logger = testSecret, id, log
	ccfg.BackoffMax = 100 * time.Millisecond
	var rt *router
	addrOf := func(id string) string { return rt.peerAddr(id) }
	fcfg := ccfg
	var d net.Dialer
	fcfg.Dial = func(ctx context.Context, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		return gatedConn{c, m.fgate}, nil
	}
	m.fwd = newFwdLinks(fcfg, addrOf)
	rt = newRouter(rep, st, o.r, m.status, m.fwd, log, nil)
	m.rt = rt
	m.links = newPeerLinks(ccfg, addrOf, 64<<20, log)
	m.pr = replica.NewPeerReplicator(o.r, o.w, rt.replicaView, m.links, log)
	m.pr.EnableCatchUp(st)
	rt.pr = m.pr
	rep.SetReplicator(m.pr)
	if err := rep.Recover(); err != nil {
		t.Fatal(err)
	}
	rep.Start()
	pcfg := stomp.DefaultPeerServerConfig()
	pcfg.Addr, pcfg.Secret, pcfg.NodeID, pcfg.Logger = "127.0.0.1:0", testSecret, id, log
	appendH := replicationHandler(rep, func() cluster.EpochID { return m.status().EpochID })
	fwdH := forwardHandler(rt, log)
	var h stomp.PeerHandler = stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		if f.Header.Get(stomp.PeerHeaderOp) == opAppend {
			appendH.HandlePeer(peer, f, reply)
			return
		}
		fwdH(peer, f, reply)
	})
	if o.wrap != nil {
		h = o.wrap(h)
	}
	m.srv = stomp.NewPeerServer(pcfg, h)
	if err := m.srv.Start(); err != nil {
		t.Fatal(err)
	}
	rn.set(id, m.srv.Addr().String())
	if !o.noWatch {
		rt.start()
	} else {
		// close waits for the two goroutines start runs.
		rt.wg.Add(2)
		go func() { defer rt.wg.Done(); <-rt.stop }()
		go func() { defer rt.wg.Done(); <-rt.stop }()
	}
	t.Cleanup(m.stop)
	return m
}

// stop shuts m down in stopReplication's order.
func (m *r6Member) stop() {
	m.once.Do(func() {
		m.fgate.release()
		done := make(chan struct{})
		go func() {
			defer close(done)
			// Not stopReplication's order (see TestReview6ShutdownOrder):
			// the peer server first, so that no handler writes after
			// the replicator closed; the forwarding links before it, to
			// fail the pulls a handler may wait for.
			m.fwd.close()
			_ = m.srv.Close()
			m.rt.close()
			m.pr.Close()
			m.links.Close()
			m.rep.Close()
			_ = m.st.Close()
		}()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			panic("r6Member.stop hangs")
		}
	})
}

// crash stops only m's peer server: to the others it is gone.
func (m *r6Member) crash() { _ = m.srv.Close() }

// warm connects m's forwarding link to peer.
func (m *r6Member) warm(t *testing.T, peer string) {
	t.Helper()
	c, err := m.fwd.get(peer)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, m.id+"'s link to "+peer+" up", c.Connected)
}

// apply runs b through m's router and returns a channel with its outcome.
func (m *r6Member) apply(t *testing.T, b *replica.Batch) chan error {
	t.Helper()
	ch := make(chan error, 1)
	if err := m.rt.Apply(b, func(err error) { ch <- err }); err != nil {
		ch <- err
	}
	return ch
}

func sendBatch(dest string, bodies ...string) *replica.Batch {
	b := &replica.Batch{Sync: true}
	for _, s := range bodies {
		b.Sends = append(b.Sends, &replica.Message{Dest: dest, Body: []byte(s)})
	}
	return b
}

func waitErr(t *testing.T, what string, ch chan error, d time.Duration) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(d):
		t.Fatalf("%s: no outcome in %v", what, d)
		return nil
	}
}

// bodies returns the bodies stored in m's bucket dest, in key order.
func (m *r6Member) bodies(t *testing.T, dest string) []string {
	t.Helper()
	ch := make(chan error, 1)
	m.st.Barrier(func(err error) { ch <- err })
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	var out []string
	if err := m.st.Scan(dest, 0, 0, 0, func(k uint64, v []byte) error {
		msg, err := replica.DecodeMessage(dest, v)
		if err != nil {
			return err
		}
		out = append(out, string(msg.Body))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// pickQueue returns a queue name whose replica sets satisfy ok.
func pickQueue(t *testing.T, prefix string, ok func(name string) bool) string {
	t.Helper()
	for i := 0; i < 100000; i++ {
		n := "/queue/" + prefix + strconv.Itoa(i)
		if ok(n) {
			return n
		}
	}
	t.Fatal("no queue name fits")
	return ""
}

func ownerIn(dest string, active []string) string {
	return replica.ReplicaSet(dest, active, 1)[0]
}

// holder is a peer server that answers pulls with nothing, but only once
// released; it counts the pulls it received.
type holder struct {
	srv     *stomp.PeerServer
	pulls   atomic.Int32
	release chan struct{}
}

func startHolder(t *testing.T, id string, rn *r6Net) *holder {
	t.Helper()
	h := &holder{release: make(chan struct{})}
	pcfg := stomp.DefaultPeerServerConfig()
	pcfg.Addr, pcfg.Secret, pcfg.NodeID, pcfg.Logger = "127.0.0.1:0", testSecret, id, slog.New(slog.DiscardHandler)
	h.srv = stomp.NewPeerServer(pcfg, stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		if f.Header.Get(stomp.PeerHeaderOp) != opPull {
			reply(stomp.PeerOK())
			return
		}
		h.pulls.Add(1)
		after := f.Header.Get(hdrAfter)
		go func() {
			<-h.release
			reply(stomp.PeerOK(hdrCount, "0", hdrAfter, after, hdrMore, "0"))
		}()
	}))
	if err := h.srv.Start(); err != nil {
		t.Fatal(err)
	}
	rn.set(id, h.srv.Addr().String())
	t.Cleanup(func() {
		h.open()
		_ = h.srv.Close()
	})
	return h
}

func (h *holder) open() {
	select {
	case <-h.release:
	default:
		close(h.release)
	}
}

// recorder is a session's Deliver: it records and marks each delivery
// written, as a session's writer does.
type recorder struct {
	mu   sync.Mutex
	got  []replica.Delivery
	hook func(replica.Delivery)
}

func (r *recorder) deliver(d replica.Delivery) {
	r.mu.Lock()
	r.got = append(r.got, d)
	hook := r.hook
	r.mu.Unlock()
	if hook != nil {
		hook(d)
	}
	if _, local := d.Sub.(*replica.Subscription); local {
		go d.Sub.Written(d.Tag) // called under the queue's lock
		return
	}
	d.Sub.Written(d.Tag)
}

func (r *recorder) bodies() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, d := range r.got {
		out = append(out, string(d.Msg.Body))
	}
	return out
}

func (r *recorder) waitN(n int, d time.Duration) []string {
	deadline := time.Now().Add(d)
	for {
		b := r.bodies()
		if len(b) >= n || time.Now().After(deadline) {
			return b
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// ---------------------------------------------------------------------
// 1. Two nodes taking over queues at the same time deadlock their links.
//
// forwardHandler runs ensureOwned in line on the peer connection's reader
// goroutine (router.go takeOver pulls from every peer and waits for each
// answer without a deadline). A's reader of B's link is blocked taking
// over q1 and waits for B to answer a pull on A's link to B; B's reader
// of A's link is blocked taking over q2 and waits for A's answer on B's
// link to A. Neither reader reads again: both SENDs, and every later
// forwarded SEND, ACK, poll and subscribe between the two nodes, hang for
// ever.
func TestReview6MutualTakeOverDeadlocksLinks(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	active := []string{"node-a", "node-b"}
	h := startHolder(t, "node-c", rn)
	a := startR6(t, "node-a", rn, active, []string{"node-b", "node-c"}, r6Opts{})
	b := startR6(t, "node-b", rn, active, []string{"node-a", "node-c"}, r6Opts{})
	q1 := pickQueue(t, "dl1-", func(n string) bool { return ownerIn(n, active) == "node-a" })
	q2 := pickQueue(t, "dl2-", func(n string) bool { return ownerIn(n, active) == "node-b" })
	a.warm(t, "node-b")
	b.warm(t, "node-a")
	// Both SENDs are on the wire before either node pulls.
	a.fgate.hold()
	b.fgate.hold()
	toB := a.apply(t, sendBatch(q2, "to b")) // A forwards to B
	toA := b.apply(t, sendBatch(q1, "to a")) // B forwards to A
	a.fgate.release()
	b.fgate.release()
	waitUntil(t, "both nodes taking over", func() bool { return h.pulls.Load() >= 2 })
	h.open() // the third node answers
	for _, c := range []struct {
		what string
		ch   chan error
	}{{"SEND forwarded A->B", toB}, {"SEND forwarded B->A", toA}} {
		select {
		case err := <-c.ch:
			if err != nil {
				t.Errorf("%s: %v", c.what, err)
			}
		case <-time.After(4 * time.Second):
			t.Errorf("%s: no outcome 4 s after the third node answered: the two take-overs wait for each other's link reader (deadlock)", c.what)
		}
	}
}

// ---------------------------------------------------------------------
// 2. watch never releases a queue whose take-over straddled an epoch
// change.
//
// watch skips a queue whose take-over is in progress ("checked next
// time") but records the new epoch as seen, and only looks again when
// the epoch changes. The queue stays adopted here, this node keeps
// serving it (host subscriptions, deliveries) beside the real owner, and
// refuses the owner's replication of it (ErrOwnedHere) for good.
func TestReview6WatchForgetsQueueTakenOverDuringEpochChange(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	h := startHolder(t, "node-c", rn)
	a := startR6(t, "node-a", rn, []string{"node-a"}, []string{"node-c"}, r6Opts{})
	q := "/queue/straddle"
	a.warm(t, "node-c")
	sent := make(chan error, 1)
	go func() { // Apply takes the queue over in line
		if err := a.rt.Apply(sendBatch(q, "m"), func(err error) { sent <- err }); err != nil {
			sent <- err
		}
	}()
	waitUntil(t, "take-over pulling", func() bool { return h.pulls.Load() >= 1 })
	// Ownership moves to node-z (a new epoch) while the take-over runs.
	a.setView([]string{"node-z"}, 2)
	time.Sleep(350 * time.Millisecond) // several watch ticks
	h.open()
	_ = waitErr(t, "SEND", sent, 10*time.Second)
	time.Sleep(500 * time.Millisecond) // several more watch ticks
	if a.rep.Adopted(q) {
		t.Fatalf("%s is owned by node-z since epoch 2, yet node-a still serves it (adopted) 0.5 s later: watch marked the epoch seen while the take-over ran and never looks again", q)
	}
}

// ---------------------------------------------------------------------
// 3. A SEND to a topic blocks the session for 5 s per peer that is down.
//
// broadcastTopics runs on the session's reader goroutine and calls
// PeerClient.Request with a 5 s context for each alive (or suspect) peer
// in turn; Request waits while the link is down. One unreachable member
// stalls every topic publisher of every node for 5 s per SEND.
func TestReview6TopicSendBlocksOnDownPeer(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rn.set("node-x", ln.Addr().String())
	ln.Close() // node-x: suspect, refusing connections
	a := startR6(t, "node-a", rn, []string{"node-a"}, []string{"node-x"}, r6Opts{})
	start := time.Now()
	ch := a.apply(t, &replica.Batch{Sends: []*replica.Message{{Dest: "/topic/t", Body: []byte("x")}}})
	took := time.Since(start)
	_ = waitErr(t, "topic SEND", ch, 10*time.Second)
	if took > time.Second {
		t.Fatalf("Apply of one topic SEND held the session's reader for %v (a peer is down)", took.Round(time.Millisecond))
	}
}

// ---------------------------------------------------------------------
// 4. A retried forward lands after the connection's next SEND.
//
// forwardSends retries a refused or failed forward 100 ms later on a
// timer (reroute), while the session goes on: its next SEND to the same
// queue is forwarded at once and stored first. The client sent 1 then 2,
// got both RECEIPTs in order, and consumers get 2 then 1. (Fixed: a SEND
// to a queue with a SEND being retried waits for it, waitRetries. A SEND
// already on its way when the refusal of an earlier one arrives can still
// land first: docs/DESIGN.md, Not built yet.)
func TestReview6RetriedForwardReordersSends(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	notOwner := make(chan struct{}, 16)
	wrap := func(inner stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			inner.HandlePeer(peer, f, func(r *frame.Frame) {
				if r != nil && r.Header.Get(stomp.PeerHeaderCode) == codeNotOwner {
					notOwner <- struct{}{}
				}
				reply(r)
			})
		})
	}
	// A sees B as the owner; B does not know yet (its view names node-z).
	a := startR6(t, "node-a", rn, []string{"node-b"}, []string{"node-b"}, r6Opts{})
	b := startR6(t, "node-b", rn, []string{"node-z"}, []string{"node-a"}, r6Opts{wrap: wrap})
	q := "/queue/order"
	a.warm(t, "node-b")
	first := a.apply(t, sendBatch(q, "1"))
	select {
	case <-notOwner:
	case <-time.After(5 * time.Second):
		t.Fatal("B did not refuse the first SEND")
	}
	b.setView([]string{"node-b"}, 2) // B's view catches up
	waitUntil(t, "A retrying SEND 1", func() bool {
		a.rt.gmu.Lock()
		defer a.rt.gmu.Unlock()
		return a.rt.retrying[q] != nil
	})
	second := a.apply(t, sendBatch(q, "2"))
	if err := waitErr(t, "SEND 1", first, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := waitErr(t, "SEND 2", second, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := b.bodies(t, q); strings.Join(got, ",") != "1,2" {
		t.Fatalf("one connection sent 1 then 2 to %s, both receipted; the owner stored %v", q, got)
	}
}

// The same with the second SEND on its way before the refusal of the
// first reaches its node: the owner refuses it too (an earlier SEND of
// the queue from that node was refused), and the retries, in order, keep
// the order.
func TestReview6RetriedForwardOrderInFlight(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	notOwner := make(chan struct{}, 16)
	wrap := func(inner stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			inner.HandlePeer(peer, f, func(r *frame.Frame) {
				if r != nil && r.Header.Get(stomp.PeerHeaderCode) == codeNotOwner {
					notOwner <- struct{}{}
				}
				reply(r)
			})
		})
	}
	// A sees B as the owner; B does not know yet (its view names node-z).
	a := startR6(t, "node-a", rn, []string{"node-b"}, []string{"node-b"}, r6Opts{})
	b := startR6(t, "node-b", rn, []string{"node-z"}, []string{"node-a"}, r6Opts{wrap: wrap})
	q := "/queue/order"
	a.warm(t, "node-b")
	first := a.apply(t, sendBatch(q, "1"))
	select {
	case <-notOwner:
	case <-time.After(5 * time.Second):
		t.Fatal("B did not refuse the first SEND")
	}
	b.setView([]string{"node-b"}, 2) // B's view catches up
	second := a.apply(t, sendBatch(q, "2"))
	if err := waitErr(t, "SEND 1", first, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := waitErr(t, "SEND 2", second, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := b.bodies(t, q); strings.Join(got, ",") != "1,2" {
		t.Fatalf("one connection sent 1 then 2 to %s, both receipted; the owner stored %v", q, got)
	}
}

// ---------------------------------------------------------------------
// 5. Dead letters stay on the queue's owner, where nobody reads them.
//
// The dead-letter move runs in the replica of the queue's owner, which
// adopts the DLQ queue there on its own (lockDestination), bypassing the
// router's ownership. When another node owns the DLQ (and has taken it
// over already), every consumer of the DLQ is served there and never
// sees the dead-lettered message; the owner of the queue also keeps the
// DLQ adopted, refusing the DLQ owner's replication (ErrOwnedHere).
func TestReview6DeadLetterStrandedOnQueueOwner(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	active := []string{"node-a", "node-b"}
	a := startR6(t, "node-a", rn, active, []string{"node-b"}, r6Opts{maxRedeliveries: 1})
	b := startR6(t, "node-b", rn, active, []string{"node-a"}, r6Opts{maxRedeliveries: 1})
	q := pickQueue(t, "dlq-", func(n string) bool {
		return ownerIn(n, active) == "node-a" && ownerIn("/queue/DLQ."+n[len("/queue/"):], active) == "node-b"
	})
	dlq := "/queue/DLQ." + q[len("/queue/"):]
	a.warm(t, "node-b")
	b.warm(t, "node-a")
	// A consumer of the DLQ (its owner, B, takes it over: empty).
	var dl recorder
	if _, err := a.rt.Subscribe(replica.SubOptions{Dest: dlq, Ack: replica.AckAuto, Deliver: dl.deliver}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "B serves the DLQ", func() bool { return b.rep.Adopted(dlq) })
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "poison")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// A consumer that rejects everything.
	var nacks sync.WaitGroup
	nacks.Add(2)
	var n atomic.Int32
	var rej recorder
	rej.hook = func(d replica.Delivery) {
		if n.Add(1) > 2 {
			return
		}
		go func() {
			defer nacks.Done()
			ch := make(chan error, 1)
			if err := a.rt.Apply(&replica.Batch{Acks: []replica.AckOp{{Sub: d.Sub, Tag: d.Tag, Nack: true}}, Sync: true}, func(err error) { ch <- err }); err != nil {
				ch <- err
			}
			if err := <-ch; err != nil {
				t.Errorf("NACK: %v", err)
			}
		}()
	}
	if _, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Deliver: rej.deliver}); err != nil {
		t.Fatal(err)
	}
	nacks.Wait()
	// The move is released at the watch's next tick and merged by node-b's
	// take-over: a second on an idle machine, more under a loaded CI.
	got := dl.waitN(1, 10*time.Second)
	if len(got) == 0 {
		t.Fatalf("the dead-lettered message never reached the consumer of %s (owner node-b); node-a holds %v in its own %s (adopted there: %v)",
			dlq, a.bodies(t, dlq), dlq, a.rep.Adopted(dlq))
	}
}

// ---------------------------------------------------------------------
// 6. A poll answer naming many gone subscriptions breaks the limits, and
// the auto-ack deliveries handed out in it are lost.
//
// host.poll returns the IDs of every gone subscription in one x-gone
// header; peer headers are limited to 8 KiB, about 200 of this cluster's
// subscription IDs. After a queue with more subscriptions from one node
// moves (closeDest), the answer is replaced by a too-large ERROR. The
// deliveries of other subscriptions in that answer were already marked
// written: in auto mode, acknowledged and deleted, delivered to nobody.
func TestReview6PollGoneHeaderTooLargeLosesDeliveries(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	a := startR6(t, "node-a", rn, []string{"node-a"}, nil, r6Opts{})
	q1, q2 := "/queue/many", "/queue/other"
	ccfg := stomp.DefaultPeerClientConfig()
	ccfg.Secret, ccfg.NodeID, ccfg.Logger = testSecret, "node-p", slog.New(slog.DiscardHandler)
	ccfg.Peer = "node-a"
	ccfg.PeerNodeID = "node-a"
	ccfg.AddrFunc = func() string { return rn.addr("node-a") }
	p := stomp.NewPeerClient(ccfg)
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	req := func(op string, headers []string, body []byte) (*frame.Frame, error) {
		ch := make(chan struct {
			f   *frame.Frame
			err error
		}, 1)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Request(ctx, op, headers, body, func(f *frame.Frame, err error) {
			ch <- struct {
				f   *frame.Frame
				err error
			}{f, err}
		}); err != nil {
			return nil, err
		}
		r := <-ch
		return r.f, r.err
	}
	// Subscription IDs as routedSub makes them: node ID (16 hex), start
	// time, sequence, generation.
	prefix := fmt.Sprintf("%016x-%x", 0x1234567890abcdef, time.Now().UnixNano())
	var body strings.Builder
	const many = 250
	for i := 1; i <= many; i++ {
		id := fmt.Sprintf("%s.%d.1", prefix, i)
		if _, err := req(opSubscribe, []string{frame.Destination, q1, hdrSub, id, frame.Ack, "client", hdrPrefetch, "0"}, nil); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&body, "%s 1\n", id)
	}
	autoID := prefix + ".999.1"
	if _, err := req(opSubscribe, []string{frame.Destination, q2, hdrSub, autoID, frame.Ack, "auto", hdrPrefetch, "0"}, nil); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&body, "%s 10\n", autoID)
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q2, "precious")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	a.rt.host.closeDest(q1) // q1 moved to another owner
	f, err := req(opPoll, nil, []byte(body.String()))
	if err != nil {
		left := a.bodies(t, q2)
		t.Fatalf("poll answer refused (%v); the message it handed out is stored no more (%v left on %s): lost", err, left, q2)
	}
	dels, derr := decodeDeliveries(f.Body)
	if derr != nil || len(dels) != 1 {
		t.Fatalf("poll answer: %d deliveries, %v", len(dels), derr)
	}
}

// ---------------------------------------------------------------------
// 7. Auto-ack deliveries that reach a routed subscription just closed are
// dropped, already acknowledged.
//
// The host counts a delivery written (in auto mode: acknowledged and
// deleted) when it puts it in a poll answer; routedSub.deliver drops the
// deliveries of a subscription closed meanwhile (a client disconnecting
// or unsubscribing while an answer is in flight), and Tried (a write that
// failed) forgets them too. On a single node both return the message to
// the queue.
func TestReview6AutoAckDeliveriesDroppedAfterClose(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	a := startR6(t, "node-a", rn, []string{"node-a"}, nil, r6Opts{})
	q := "/queue/auto"
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "1", "2", "3")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	var rec recorder
	var once sync.Once
	rec.hook = func(d replica.Delivery) {
		// The client disconnects as the first message arrives.
		once.Do(func() {
			done := make(chan struct{})
			go func() { d.Sub.Close(); close(done) }()
			<-done
		})
	}
	if _, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckAuto, Deliver: rec.deliver}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "first delivery", func() bool { return len(rec.bodies()) >= 1 })
	time.Sleep(300 * time.Millisecond)
	got := rec.bodies()
	left := a.bodies(t, q)
	if len(got)+len(left) < 3 {
		t.Fatalf("3 messages; delivered to the client %v, still stored %v: %d acknowledged without reaching anyone",
			got, left, 3-len(got)-len(left))
	}
}

// ---------------------------------------------------------------------
// 8. A receipted SEND accepted by the old owner after the new owner
// pulled is never served.
//
// Take-over pulls the other copies once (ensureOwned), while the old
// owner, whose view lags by a gossip round (or by viewTTL and a watch
// tick), still accepts SENDs and stores them on its write quorum. Nothing
// fences the old owner nor pulls again: the new owner serves the queue
// without the message, which stays on the old owner and its replica.
// R=3, W=2 (the default majority).
func TestReview6OldOwnerAcceptsAfterTakeOverPull(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	all := []string{"node-a", "node-b", "node-c"}
	q := pickQueue(t, "move-", func(n string) bool {
		s := replica.ReplicaSet(n, all, 3)
		return s[0] == "node-a" && s[1] == "node-b"
	})
	o := r6Opts{r: 3, w: 2}
	a := startR6(t, "node-a", rn, all, []string{"node-b", "node-c"}, o)
	b := startR6(t, "node-b", rn, all, []string{"node-a", "node-c"}, o)
	c := startR6(t, "node-c", rn, all, []string{"node-a", "node-b"}, o)
	_ = c
	if err := waitErr(t, "SEND m0", a.apply(t, sendBatch(q, "m0")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// node-a leaves the active set; node-b sees it first.
	b.setView([]string{"node-b", "node-c"}, 2)
	var rec recorder
	if _, err := b.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Deliver: rec.deliver}); err != nil {
		t.Fatal(err)
	}
	rec.waitN(1, 5*time.Second)
	// A client of node-a, whose view has not changed yet.
	if err := waitErr(t, "SEND m1", a.apply(t, sendBatch(q, "m1")), 10*time.Second); err != nil {
		t.Skipf("m1 was refused (%v): not receipted", err)
	}
	a.setView([]string{"node-b", "node-c"}, 2)
	c.setView([]string{"node-b", "node-c"}, 2)
	got := rec.waitN(2, 3*time.Second)
	if len(got) < 2 {
		t.Fatalf("m1 was receipted (stored on node-a %v and node-c %v) but the owner node-b delivers only %v, 3 s on",
			a.bodies(t, q), c.bodies(t, q), got)
	}
}

// ---------------------------------------------------------------------
// 9. Closing a routed subscription whose owner is down blocks 5 s.
//
// routedSub.Close sends the unsubscribe with PeerClient.Request and a 5 s
// context; Request waits while the link is down. The session closes its
// subscriptions one after the other (on disconnect, on Shutdown): 5 s
// each.
func TestReview6CloseBlocksOnDownOwner(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	active := []string{"node-b"}
	a := startR6(t, "node-a", rn, active, []string{"node-b"}, r6Opts{})
	b := startR6(t, "node-b", rn, active, []string{"node-a"}, r6Opts{})
	a.warm(t, "node-b")
	var rec recorder
	rs, err := a.rt.Subscribe(replica.SubOptions{Dest: "/queue/down", Ack: replica.AckClient, Deliver: rec.deliver})
	if err != nil {
		t.Fatal(err)
	}
	b.crash()
	c, _ := a.fwd.get("node-b")
	waitUntil(t, "link down", func() bool { return !c.Connected() })
	start := time.Now()
	rs.Close()
	if took := time.Since(start); took > time.Second {
		t.Fatalf("closing one subscription took %v while its owner is down", took.Round(time.Millisecond))
	}
}

// ---------------------------------------------------------------------
// 10. A topic message gets a different message-id on every node, and the
// ID is written and read concurrently.
//
// Apply hands the topic messages to the local replica, whose fan-out
// assigns m.ID on the store's completion goroutine, and then encodes the
// same *Message for the other nodes (broadcastTopics) on the session's
// goroutine: a data race on m.ID, and the copies usually leave with no
// ID, so each receiving node names the message its own way.
func TestReview6TopicMessageIDDiffersAcrossNodes(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	active := []string{"node-a", "node-b"}
	a := startR6(t, "node-a", rn, active, []string{"node-b"}, r6Opts{})
	b := startR6(t, "node-b", rn, active, []string{"node-a"}, r6Opts{})
	a.warm(t, "node-b")
	var ra, rb recorder
	if _, err := a.rt.Subscribe(replica.SubOptions{Dest: "/topic/ids", Ack: replica.AckAuto, Deliver: ra.deliver}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.rt.Subscribe(replica.SubOptions{Dest: "/topic/ids", Ack: replica.AckAuto, Deliver: rb.deliver}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // the subscriptions start in store order
	if err := waitErr(t, "topic SEND", a.apply(t, &replica.Batch{Sends: []*replica.Message{{Dest: "/topic/ids", Body: []byte("x")}}}), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if len(ra.waitN(1, 3*time.Second)) != 1 || len(rb.waitN(1, 3*time.Second)) != 1 {
		t.Fatalf("deliveries: node-a %v, node-b %v", ra.bodies(), rb.bodies())
	}
	ra.mu.Lock()
	rb.mu.Lock()
	ida, idb := ra.got[0].Msg.ID, rb.got[0].Msg.ID
	rb.mu.Unlock()
	ra.mu.Unlock()
	if ida != idb {
		t.Fatalf("one topic SEND: message-id %q on node-a, %q on node-b", ida, idb)
	}
}
