package node

// Hostile review, round 8: tombstones at take-over, anti-entropy wiring,
// transactions over several owners. Each test fails on the code it was
// written against; see the report.

import (
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/brokerd/brokerd/store"
	"github.com/go-stomp/stomp/v3/frame"
)

// ---------------------------------------------------------------------
// 1. A take-over cannot read a peer whose tombstones of the queue do not
// fit one answer, and then skips that peer's messages too.
//
// host.pullTombstones answers up to pullTombstones (16384) tombstones,
// bounded by count only: each is encoded with the queue's name, so a
// queue whose name is about 1 KiB (a destination header may be 8 KiB)
// and that saw 16384 removals within replica.tombstone_ttl gives an
// answer over the peer link's 16 MiB body limit. The peer server turns it
// into an ERROR (too-large), pullRetry retries for 2 s, and the take-over
// goes on without that peer: neither its tombstones nor its messages are
// pulled (messages are pulled only after the tombstones). A receipted
// message only that peer holds is not served by the new owner.
func TestReview8TombstonePullTooLargeSkipsPeersMessages(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	long := strings.Repeat("n", 1100)
	q := pickQueue(t, long+"-", func(n string) bool { return ownerIn(n, both) == "node-b" })
	o := r6Opts{r: 1, w: 1}
	// node-a's view lags: it alone is active and owns q.
	a := startR6(t, "node-a", rn, []string{"node-a"}, []string{"node-b"}, o)
	b := startR6(t, "node-b", rn, both, []string{"node-a"}, o)
	b.warm(t, "node-a")
	if err := waitErr(t, "SEND at node-a", a.apply(t, sendBatch(q, "receipted-on-a")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// 16384 messages of q were acknowledged at node-a within the TTL:
	// their tombstones (keys below any HLC key, so none is the message's).
	ops := make([]store.Op, 0, 16384)
	for k := uint64(1); k <= 16384; k++ {
		ops = append(ops, store.Op{Kind: store.OpTombstone, Bucket: q, Key: k})
	}
	if err := a.st.Apply(ops); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := b.rt.ensureOwned(q); err != nil {
		t.Fatal(err)
	}
	got := b.bodies(t, q)
	if len(got) != 1 {
		t.Fatalf("node-b took %s over in %v and holds %v: node-a's copy (%v) was not pulled, its tombstone answer is over the link's limit",
			"the queue", time.Since(start).Round(time.Millisecond), got, a.bodies(t, q))
	}
}

// ---------------------------------------------------------------------
// 2. A COMMIT over several owners is overtaken by the same connection's
// next SEND.
//
// router.Apply hands a multi-owner transaction to txnLog.commit, which
// first submits the record (an fdatasync) and only from its callback, on
// another goroutine, applies the parts. The session does not wait for a
// frame's outcome before applying the next one, so a SEND that follows
// the COMMIT on the same connection to one of its queues is applied (or
// forwarded) at once, before the transaction's message: one connection's
// SENDs to a queue no longer keep their order (they did before: the parts
// were applied or forwarded in line, in order on the one FIFO link).
func TestReview8TxnOvertakenByNextSend(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	qx := pickQueue(t, "tx8x-", func(n string) bool { return ownerIn(n, both) == "node-a" })
	qy := pickQueue(t, "tx8y-", func(n string) bool { return ownerIn(n, both) == "node-b" })
	o := r6Opts{r: 1, w: 1}
	a := startR6(t, "node-a", rn, both, []string{"node-b"}, o)
	b := startR6(t, "node-b", rn, both, []string{"node-a"}, o)
	a.warm(t, "node-b")
	b.warm(t, "node-a")
	if err := waitErr(t, "warm-up", a.apply(t, sendBatch(qx, "0")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// The session's reader: COMMIT (SEND qx "1", SEND qy "2"), then SEND qx "3".
	commit := a.apply(t, &replica.Batch{Sync: true, Sends: []*replica.Message{
		{Dest: qx, Body: []byte("1")}, {Dest: qy, Body: []byte("2")},
	}})
	next := a.apply(t, sendBatch(qx, "3"))
	if err := waitErr(t, "COMMIT", commit, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := waitErr(t, "SEND 3", next, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(a.bodies(t, qx), ","); got != "0,1,3" {
		t.Fatalf("%s holds %s in delivery (key) order: the SEND after the COMMIT overtook the transaction's message", qx, got)
	}
}

// startR8 is startR6 with the store's configuration changed by scfg.
func startR8(t *testing.T, id string, rn *r6Net, active, members []string, o r6Opts, scfgHook func(*store.Config)) *r6Member {
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
	if scfgHook != nil {
		scfgHook(&scfg)
	}
	st, err := store.Open(scfg)
	if err != nil {
		t.Fatal(err)
	}
	st.Start()
	rcfg := replica.DefaultConfig()
	rcfg.NodeID = id
	rcfg.Logger = log
	rep := replica.New(rcfg, st)
	m := &r6Member{id: id, net: rn, st: st, rep: rep, fgate: newGate(),
		view: &r6View{active: active, epoch: cluster.EpochID{Counter: 1, Set: 1}, members: members}}
	ccfg := stomp.DefaultPeerClientConfig()
	ccfg.Secret, ccfg.NodeID, ccfg.Logger = testSecret, id, log
	ccfg.BackoffMax = 100 * time.Millisecond
	var rt *router
	addrOf := func(id string) string { return rt.peerAddr(id) }
	m.fwd = newFwdLinks(ccfg, addrOf)
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
	m.srv = stomp.NewPeerServer(pcfg, stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		if f.Header.Get(stomp.PeerHeaderOp) == opAppend {
			appendH.HandlePeer(peer, f, reply)
			return
		}
		fwdH(peer, f, reply)
	}))
	if err := m.srv.Start(); err != nil {
		t.Fatal(err)
	}
	rn.set(id, m.srv.Addr().String())
	rt.start()
	t.Cleanup(m.stop)
	return m
}

// ---------------------------------------------------------------------
// 3. A COMMIT refused "nothing stored" has stored its messages.
//
// router.Apply records and starts the transaction (txnLog.commit) before
// it applies the batch's local part (topic SENDs, topic ACKs). When that
// local Apply then fails synchronously (here: the coordinator is low on
// disk, which refuses any SEND; the record itself was written, the alarm
// is not checked for it), Apply returns the error: the session answers
// the COMMIT with an ERROR for a refused frame, "nothing stored", while
// the transaction's queue messages are applied at their owners, and the
// coordinator keeps retrying the rest in the background.
func TestReview8TxnRefusedAfterRecorded(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	both := []string{"node-a", "node-b"}
	qx := pickQueue(t, "tx8lx-", func(n string) bool { return ownerIn(n, both) == "node-a" })
	qy := pickQueue(t, "tx8ly-", func(n string) bool { return ownerIn(n, both) == "node-b" })
	o := r6Opts{r: 1, w: 1}
	a := startR8(t, "node-a", rn, both, []string{"node-b"}, o, func(c *store.Config) { c.MinFreeBytes = 1 << 62 })
	b := startR6(t, "node-b", rn, both, []string{"node-a"}, o)
	a.warm(t, "node-b")
	if !a.st.LowDisk() {
		t.Skip("the low-disk alarm is not on")
	}
	ch := a.apply(t, &replica.Batch{Sync: true, Sends: []*replica.Message{
		{Dest: qx, Body: []byte("1")}, {Dest: qy, Body: []byte("2")}, {Dest: "/topic/t8", Body: []byte("t")},
	}})
	var err error
	select {
	case err = <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("no outcome")
	}
	if err == nil {
		t.Fatal("the COMMIT succeeded on a low-disk coordinator")
	}
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		if got := b.bodies(t, qy); len(got) > 0 {
			t.Fatalf("the COMMIT was refused (%v), yet node-b's %s holds %v and node-a retries the rest (%d transaction(s) pending)",
				err, qy, got, a.rt.txn.incomplete())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
