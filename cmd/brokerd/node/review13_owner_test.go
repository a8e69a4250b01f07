package node

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/test/netsim"
	gostomp "github.com/go-stomp/stomp/v3"
	"github.com/hashicorp/memberlist"
)

// TestReview13OwnerJoinDuringTakeOver: a node joins while a take-over
// of a queue is in progress, after the take-over read its view (so it
// does not pull the newcomer's copy). The watch notices the join on a
// tick where the take-over still runs (it skips the queue and looks
// again next tick), but on the next tick the join is no longer "new"
// (joined is false), and the watch released a queue for a join only
// when joined && staleIn: the stale queue stayed served. Its first user
// (here the subscriber whose bind started the take-over) is served
// from a copy without the newcomer's messages, and nothing takes it
// over again until the next use of the queue: a receipted message held
// only by the newcomer is not delivered to the bound consumer.
func TestReview13OwnerJoinDuringTakeOver(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	h := startHolder(t, "node-c", rn)
	ac := []string{"node-a", "node-c"}
	q := pickQueue(t, "r13join-", func(n string) bool { return replica.ReplicaSet(n, ac, 2)[0] == "node-a" })
	o := r6Opts{r: 2, w: 1}
	// node-b, on the other side of a partition, alone: it owns q there
	// and stores a receipted message node-a lacks.
	b := startR6(t, "node-b", rn, []string{"node-b"}, nil, o)
	if err := waitErr(t, "SEND at node-b", b.apply(t, sendBatch(q, "from-b")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	a := startR6(t, "node-a", rn, ac, []string{"node-c"}, o)
	a.warm(t, "node-c")
	var rec recorder
	subbed := make(chan error, 1)
	go func() { // the bind takes q over; its pull from node-c is held
		_, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Deliver: rec.deliver})
		subbed <- err
	}()
	waitUntil(t, "take-over pulling", func() bool { return h.pulls.Load() >= 1 })
	// The partition heals: node-b appears in node-a's view while the
	// take-over runs (its view, read before, has no node-b).
	a.view.mu.Lock()
	a.view.members = []string{"node-c", "node-b"}
	a.view.mu.Unlock()
	a.rt.refresh()
	time.Sleep(350 * time.Millisecond) // the watch notices the join mid take-over
	h.open()
	if err := waitErr(t, "SUBSCRIBE", subbed, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := rec.waitN(1, 5*time.Second); len(got) == 0 {
		t.Fatalf("node-b joined node-a's view during node-a's take-over of %s; node-b's receipted message was never pulled: the subscriber at the owner got nothing in 5 s (node-a holds %v, node-b %v)",
			q, a.bodies(t, q), b.bodies(t, q))
	}
}

// TestReview13OwnerFailedPullCountedMerged: a take-over counts every
// peer of its view as merged (ownState.joins) even when reading that
// peer's copy failed. A peer alive in the view all along whose link is
// down (a peer-port partition, a TLS or key refusal: the link never
// comes up within the pull's 5 s) holds a receipted message the owner
// lacks; once its link is up, no join is counted (it never left the
// view), so nothing takes the queue over again: the message stays on
// that peer, undelivered, until some other node joins. The take-over
// now records the peers it missed and takes the queue over again when
// the link to one of them comes up.
func TestReview13OwnerFailedPullCountedMerged(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	q := "/queue/r13missed"
	o := r6Opts{r: 2, w: 1}
	// node-b alone (its side of a partition) owns q and stores a
	// receipted message.
	b := startR6(t, "node-b", rn, []string{"node-b"}, nil, o)
	if err := waitErr(t, "SEND at node-b", b.apply(t, sendBatch(q, "from-b")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// node-b's peer port, as node-a reaches it, is a black hole: the
	// connection is accepted and never answered.
	bh, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var cmu sync.Mutex
	var held []net.Conn
	go func() {
		for {
			c, err := bh.Accept()
			if err != nil {
				return
			}
			cmu.Lock()
			held = append(held, c)
			cmu.Unlock()
		}
	}()
	heal := func() {
		_ = bh.Close()
		cmu.Lock()
		for _, c := range held {
			_ = c.Close()
		}
		held = nil
		cmu.Unlock()
	}
	t.Cleanup(heal)
	realB := rn.addr("node-b")
	rn.set("node-b", bh.Addr().String())

	a := startR6(t, "node-a", rn, []string{"node-a"}, nil, o)
	a.fwd.mu.Lock()
	a.fwd.onState = a.rt.linkState // as the node's wiring does
	a.fwd.mu.Unlock()
	a.view.mu.Lock()
	a.view.members = []string{"node-b"} // alive by gossip
	a.view.mu.Unlock()
	a.rt.refresh()
	var rec recorder
	// The bind takes q over: node-b's copy cannot be read.
	if _, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Deliver: rec.deliver}); err != nil {
		t.Fatal(err)
	}
	if got := rec.bodies(); len(got) != 0 {
		t.Fatalf("delivered %v before node-b's link was up", got)
	}
	// The peer port heals; node-b never left node-a's view.
	rn.set("node-b", realB)
	heal()
	if got := rec.waitN(1, 8*time.Second); len(got) == 0 {
		t.Fatalf("node-b's link is up again, yet its receipted message in %s was never merged: the subscriber at the owner node-a got nothing in 8 s (node-a holds %v, node-b %v)",
			q, a.bodies(t, q), b.bodies(t, q))
	}
}

// TestReview13UndrainPeerLinkCut: an undrain waits for every alive peer
// to answer opReleased, up to undrainHandBackWait (it was 5 s). Meanwhile the
// undrained node still counts itself draining and refuses the queues it
// owns again as not its own, while the others, which see the undrain,
// forward them to it: a SEND is retried for failoverBudget (4 s) and
// then fails. One peer the undrained node cannot reach over its peer
// link (gossip says alive) makes the undrain wait its whole bound, and
// every client SEND to the node's queues elsewhere fails with an ERROR.
// The bound is now a second under failoverBudget.
func TestReview13UndrainPeerLinkCut(t *testing.T) {
	if testing.Short() {
		t.Skip("a 3-node cluster")
	}
	netw := netsim.New()
	var mu sync.Mutex
	byPeer := map[string]string{}
	cut := map[[2]string]bool{{"a", "c"}: true} // a's peer links to c never come up
	nodes := map[string]*Node{}
	names := []string{"a", "b", "c"}
	for i, name := range names {
		h := netw.Host(name)
		cfg := config.Default()
		cfg.Node.Name = name
		cfg.Node.DataDir = t.TempDir()
		cfg.STOMP.Addr = "127.0.0.1:0"
		cfg.Admin.Addr = "127.0.0.1:0"
		cfg.Store.Sync = "none"
		cfg.Cluster.GossipAddr = h.Addr()
		cfg.Cluster.AllowPlaintextGossip = true
		cfg.Cluster.PeerAddr = "127.0.0.1:0"
		cfg.Cluster.ActiveMembers = 3
		cfg.Cluster.PromotionDelay = 200 * time.Millisecond
		cfg.Replica.Factor = 2
		if i > 0 {
			cfg.Cluster.Join = []string{netw.Host(names[0]).Addr()}
		}
		from := name
		n, err := NewWithOptions(cfg, slog.New(slog.DiscardHandler), Options{
			Cluster: func(c *cluster.Config) {
				c.Transport = h.Transport()
				c.RejoinInterval = 300 * time.Millisecond
				c.Tick = 20 * time.Millisecond
				c.Memberlist = func(mc *memberlist.Config) {
					mc.ProbeInterval = 100 * time.Millisecond
					mc.ProbeTimeout = 50 * time.Millisecond
					mc.GossipInterval = 20 * time.Millisecond
					mc.SuspicionMult = 2
					mc.PushPullInterval = time.Second
					mc.TCPTimeout = 200 * time.Millisecond
					mc.GossipToTheDeadTime = 2 * time.Second
				}
			},
			PeerDial: func(ctx context.Context, addr string) (net.Conn, error) {
				mu.Lock()
				to := byPeer[addr]
				blocked := cut[[2]string{from, to}]
				mu.Unlock()
				if blocked {
					return nil, fmt.Errorf("dial %s (%s): no route", addr, to)
				}
				var d net.Dialer
				return d.DialContext(ctx, "tcp", addr)
			},
		})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := n.Start(); err != nil {
			t.Fatalf("%s: start: %v", name, err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = n.Shutdown(ctx)
		})
		mu.Lock()
		byPeer[n.PeerAddr()] = name
		mu.Unlock()
		nodes[name] = n
	}
	waitFor(t, 15*time.Second, "the cluster agrees", func() string {
		for _, name := range names {
			st := nodes[name].Cluster().Status()
			alive := 0
			for _, m := range st.Members {
				if m.State == "alive" && m.Role == "active" {
					alive++
				}
			}
			if !st.Converged || alive != len(names) {
				return fmt.Sprintf("%s: converged %v, %d active alive", name, st.Converged, alive)
			}
		}
		return ""
	})
	a, b := nodes["a"], nodes["b"]
	v := a.rt.refresh()
	if len(v.active) != 3 {
		t.Fatalf("active %v", v.active)
	}
	q := pickQueue(t, "r13undrain-", func(n string) bool {
		set := replica.ReplicaSet(n, v.active, 2)
		return set[0] == a.ID() && set[1] == b.ID()
	})
	if _, err := a.Drain(); err != nil {
		t.Fatal(err)
	}
	waitUntil13(t, 10*time.Second, "b sees a draining", func() bool { return b.rt.refresh().draining[a.ID()] })
	conn, err := gostomp.Dial("tcp", b.STOMPAddr(), gostomp.ConnOpt.HeartBeat(0, 0), gostomp.ConnOpt.Logger(quietLog{}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Disconnect()
	if err := conn.Send(q, "text/plain", []byte("before"), gostomp.SendOpt.Receipt); err != nil {
		t.Fatalf("SEND at b while a drains: %v", err)
	}
	var stop sync.WaitGroup
	done := make(chan struct{})
	errc := make(chan error, 1)
	stop.Add(1)
	go func() { // b's client goes on sending through the undrain
		defer stop.Done()
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			default:
			}
			t0 := time.Now()
			if err := conn.Send(q, "text/plain", []byte(fmt.Sprint(i)), gostomp.SendOpt.Receipt); err != nil {
				errc <- fmt.Errorf("SEND %d after %v: %w", i, time.Since(t0), err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	t0 := time.Now()
	if _, err := a.Undrain(); err != nil {
		t.Fatal(err)
	}
	took := time.Since(t0)
	time.Sleep(time.Second)
	close(done)
	stop.Wait()
	select {
	case err := <-errc:
		t.Fatalf("undrain of a (took %v, a's peer link to c cut): a SEND at b to a's queue %s failed: %v", took, q, err)
	default:
	}
	t.Logf("undrain took %v", took)
}
