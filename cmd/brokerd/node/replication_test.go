package node

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/brokerd/brokerd/store"
)

// repMember is one node of an in-process replicated pair: a store, a
// replica.Node replicating through real peer links, and a peer server.
type repMember struct {
	id    string
	st    *store.Store
	n     *replica.Node
	srv   *stomp.PeerServer
	links *peerLinks
	open  bool
}

// repNet is the membership both members see: active set, epoch, and the
// peer-link address of each.
type repNet struct {
	mu     sync.Mutex
	active []string
	epoch  cluster.EpochID
	addrs  map[string]string
}

func (r *repNet) view(self string) func() replica.View {
	return func() replica.View {
		r.mu.Lock()
		defer r.mu.Unlock()
		return replica.View{Self: self, Active: append([]string(nil), r.active...), Epoch: r.epoch}
	}
}

func (r *repNet) addr(id string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.addrs[id]
}

var testSecret = []byte("0123456789abcdef0123456789abcdef")

func startRepMember(t testing.TB, id string, net *repNet) *repMember {
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
	ccfg := stomp.DefaultPeerClientConfig()
	ccfg.Secret, ccfg.NodeID, ccfg.Logger = testSecret, id, log
	ccfg.BackoffMax = 100 * time.Millisecond
	links := newPeerLinks(ccfg, net.addr, 64<<20, log)
	n.SetReplicator(replica.NewPeerReplicator(2, 0, net.view(id), links, log))
	if err := n.Recover(); err != nil {
		t.Fatal(err)
	}
	n.Start()
	pcfg := stomp.DefaultPeerServerConfig()
	pcfg.Addr, pcfg.Secret, pcfg.NodeID, pcfg.Logger = "127.0.0.1:0", testSecret, id, log
	srv := stomp.NewPeerServer(pcfg, replicationHandler(n, func() cluster.EpochID { return net.view(id)().Epoch }))
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	net.mu.Lock()
	net.addrs[id] = srv.Addr().String()
	net.mu.Unlock()
	m := &repMember{id: id, st: st, n: n, srv: srv, links: links, open: true}
	t.Cleanup(m.stop)
	return m
}

// stop ends the member as a crash would, as far as the other one can
// tell: its links close and it answers nothing more.
func (m *repMember) stop() {
	if !m.open {
		return
	}
	m.open = false
	_ = m.srv.Close()
	m.links.Close()
	m.n.Close()
	_ = m.st.Close()
}

func (m *repMember) send(t *testing.T, dest string, bodies ...string) error {
	t.Helper()
	b := &replica.Batch{Sync: true}
	for _, body := range bodies {
		b.Sends = append(b.Sends, &replica.Message{Dest: dest, Body: []byte(body)})
	}
	ch := make(chan error, 1)
	if err := m.n.Apply(b, func(err error) { ch <- err }); err != nil {
		return err
	}
	select {
	case err := <-ch:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("SEND not answered in 10 s")
		return nil
	}
}

func (m *repMember) stored(t *testing.T, dest string) int64 {
	t.Helper()
	bs, err := m.st.Buckets()
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bs {
		if b.Name == dest {
			return b.Count
		}
	}
	return 0
}

type deliveries struct {
	mu  sync.Mutex
	got []replica.Delivery
}

func (d *deliveries) deliver(x replica.Delivery) {
	d.mu.Lock()
	d.got = append(d.got, x)
	d.mu.Unlock()
	go x.Sub.Written(x.Tag)
}

func (d *deliveries) wait(t *testing.T, n int) []replica.Delivery {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		d.mu.Lock()
		if len(d.got) >= n {
			out := append([]replica.Delivery(nil), d.got[:n]...)
			d.mu.Unlock()
			return out
		}
		have := len(d.got)
		d.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("%d deliveries, want %d", have, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Over real peer links (authenticated, pipelined): every receipted SEND is
// on both members' disks; the owner dies with 20 messages delivered and
// not acknowledged; the other member adopts the queue and delivers every
// message that was not acknowledged, each inherited one marked
// redelivered; new SENDs then need only the member left (R capped at 1).
func TestReplicationOverPeerLinks(t *testing.T) {
	net := &repNet{active: []string{"a", "b"}, epoch: cluster.EpochID{Counter: 1, Set: 1}, addrs: map[string]string{}}
	a, b := startRepMember(t, "a", net), startRepMember(t, "b", net)
	const q = "/queue/orders"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 300; i += 50 {
		var bs []string
		for j := i; j < i+50; j++ {
			bs = append(bs, strconv.Itoa(j))
		}
		if err := a.send(t, q, bs...); err != nil {
			t.Fatal(err)
		}
	}
	if got := b.stored(t, q); got != 300 {
		t.Fatalf("the replica holds %d of 300 receipted messages", got)
	}
	var c deliveries
	sub, err := a.n.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Prefetch: 50, Deliver: c.deliver})
	if err != nil {
		t.Fatal(err)
	}
	got := c.wait(t, 50)
	ack := &replica.Batch{Sync: true}
	for _, d := range got[:30] {
		ack.Acks = append(ack.Acks, replica.AckOp{Sub: sub, Tag: d.Tag})
	}
	ch := make(chan error, 1)
	if err := a.n.Apply(ack, func(err error) { ch <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	if got := b.stored(t, q); got != 270 {
		t.Fatalf("after 30 receipted ACKs the replica holds %d messages, want 270", got)
	}

	a.stop()
	net.mu.Lock()
	net.active, net.epoch = []string{"b"}, cluster.EpochID{Counter: 2, Set: 2}
	net.mu.Unlock()
	if err := b.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	var c2 deliveries
	if _, err := b.n.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckAuto, Deliver: c2.deliver}); err != nil {
		t.Fatal(err)
	}
	inherited := c2.wait(t, 270)
	for i, d := range inherited {
		if want := strconv.Itoa(30 + i); string(d.Msg.Body) != want || !d.Redelivered {
			t.Fatalf("delivery %d: %q redelivered=%v, want %s redelivered", i, d.Msg.Body, d.Redelivered, want)
		}
	}
	if err := b.send(t, q, "after"); err != nil {
		t.Fatalf("SEND to the member left: %v", err)
	}
	if d := c2.wait(t, 271)[270]; string(d.Msg.Body) != "after" || d.Redelivered {
		t.Fatalf("new message %q redelivered=%v", d.Msg.Body, d.Redelivered)
	}
}

// With the other replica unreachable, W = 2 cannot be met: the SEND fails
// with ErrNoQuorum, never a silent success.
func TestReplicationNoQuorum(t *testing.T) {
	net := &repNet{active: []string{"a", "b"}, epoch: cluster.EpochID{Counter: 1, Set: 1}, addrs: map[string]string{}}
	a, b := startRepMember(t, "a", net), startRepMember(t, "b", net)
	const q = "/queue/q"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	if err := a.send(t, q, "one"); err != nil {
		t.Fatal(err)
	}
	b.stop()
	err := a.send(t, q, "two")
	if !errors.Is(err, replica.ErrNoQuorum) {
		t.Fatalf("SEND with the replica gone: %v, want ErrNoQuorum", err)
	}
}

// A replica refuses an owner's append under an older epoch than its own,
// and the owner's SEND fails rather than counting that copy.
func TestReplicationStaleEpochRefused(t *testing.T) {
	net := &repNet{active: []string{"a", "b"}, epoch: cluster.EpochID{Counter: 5, Set: 1}, addrs: map[string]string{}}
	a := startRepMember(t, "a", net)
	// b sees a newer epoch than a advertises.
	bnet := &repNet{active: []string{"a", "b"}, epoch: cluster.EpochID{Counter: 6, Set: 1}, addrs: net.addrs}
	b := startRepMember(t, "b", bnet)
	net.mu.Lock()
	net.addrs["b"] = b.srv.Addr().String()
	net.mu.Unlock()
	const q = "/queue/fenced"
	if err := a.n.Adopt(q); err != nil {
		t.Fatal(err)
	}
	err := a.send(t, q, "x")
	if !errors.Is(err, replica.ErrNoQuorum) {
		t.Fatalf("SEND under a stale epoch: %v, want ErrNoQuorum", err)
	}
	if got := b.stored(t, q); got != 0 {
		t.Fatalf("the replica applied %d messages from a stale owner", got)
	}
}

var _ = fmt.Sprint
