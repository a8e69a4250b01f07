package node

import (
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// blackHole listens on a port that accepts connections and never
// answers (a peer stuck, or a host whose process hangs): a peer link to
// it never comes up.
func blackHole(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var held []net.Conn
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		_ = l.Close()
		mu.Lock()
		for _, c := range held {
			_ = c.Close()
		}
		mu.Unlock()
	})
	return l.Addr().String()
}

// review16DestOf returns a queue name whose owner in active (R = 1) is
// owner.
func review16DestOf(t *testing.T, prefix, owner string, active []string) string {
	t.Helper()
	for i := range 10000 {
		d := fmt.Sprintf("%s-%d", prefix, i)
		if replica.ReplicaSet(d, active, 1)[0] == owner {
			return d
		}
	}
	t.Fatal("no queue name found")
	return ""
}

// review16Rebinding makes a routed subscription of dest at m that binds
// in the background (as Subscribe leaves one whose first bind failed, and
// lost one whose owner went away).
func review16Rebinding(m *r6Member, dest string) *routedSub {
	rs := &routedSub{
		rt: m.rt, id: m.rt.prefix + ".r16", opts: replica.SubOptions{Dest: dest, Ack: replica.AckClientIndividual, Deliver: func(replica.Delivery) {}},
		inflight: map[uint64]*flight{}, byID: map[string]uint64{},
	}
	rs.rebindLater(0)
	return rs
}

// review16TimedClose closes m's router and returns how long it took, at
// most limit (it then lets the close finish in the background so the
// test's cleanup can unblock it).
func review16TimedClose(m *r6Member, limit time.Duration) (time.Duration, bool) {
	done := make(chan struct{})
	t0 := time.Now()
	go func() {
		m.rt.close()
		close(done)
	}()
	select {
	case <-done:
		return time.Since(t0), true
	case <-time.After(limit):
		return time.Since(t0), false
	}
}

// A subscription re-binding in the background (its owner died, or its
// first bind failed) holds the router's close for forwardTimeout when the
// owner's link does not come up: subscribeAt's request context is
// context.Background(), not rt.ctx, so the close that now ends pulls,
// probes and merge requests at once still waits up to 5 s here. Seen at
// shutdown whenever a client's subscription was at an owner that just
// stopped answering (srv.Shutdown closed the subscription, but its
// rebind goroutine is still in subscribeAt; rs.closed is only looked at
// after subscribeAt returns).
func TestReview16ShutdownDoesNotWaitForRebindToDeadOwner(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	rn.set("node-b", blackHole(t))
	active := []string{"node-a", "node-b"}
	a := startR6(t, "node-a", rn, active, []string{"node-b"}, r6Opts{r: 1, w: 1, noWatch: true})
	dest := review16DestOf(t, "/queue/r16-rebind", "node-b", active)
	rs := review16Rebinding(a, dest)
	time.Sleep(300 * time.Millisecond) // the bind waits for node-b's link
	rs.Return()                        // the session closed, as srv.Shutdown does before the router's close
	d, ok := review16TimedClose(a, 2*time.Second)
	if !ok {
		t.Fatalf("the router's close took more than %v: a rebinding subscription's subscribe to an owner whose link never comes up holds it (poller.go subscribeAt: context.Background())", d.Round(time.Millisecond))
	}
}

// The same one hop further: the subscription's new owner answers the
// subscribe only once its own take-over of the queue is done, and that
// take-over pulls from a peer that does not answer (two pulls of
// forwardTimeout each). The stopping node's rebind waits for the answer
// in subscribeAt (`<-errc`, with no rt.stop case), so its router's close
// waits up to 10 s: the very delay 67774ff removed for this node's own
// take-overs.
func TestReview16ShutdownDoesNotWaitForOwnersTakeOver(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	rn.set("node-b", blackHole(t))
	active := []string{"node-a", "node-c"}
	// node-c sees node-b alive (not active): its take-overs pull from it.
	c := startR6(t, "node-c", rn, active, []string{"node-a", "node-b"}, r6Opts{r: 1, w: 1, noWatch: true})
	a := startR6(t, "node-a", rn, active, []string{"node-c"}, r6Opts{r: 1, w: 1, noWatch: true})
	a.warm(t, "node-c")
	dest := review16DestOf(t, "/queue/r16-owner", "node-c", active)
	rs := review16Rebinding(a, dest)
	time.Sleep(500 * time.Millisecond) // node-c is taking dest over, pulling from node-b
	if st := func() *ownState { c.rt.omu.Lock(); defer c.rt.omu.Unlock(); return c.rt.owned[dest] }(); st == nil {
		t.Fatal("node-c is not taking the queue over: the scenario did not happen")
	}
	rs.Return()
	d, ok := review16TimedClose(a, 2*time.Second)
	if !ok {
		t.Errorf("the router's close took more than %v: a rebinding subscription waits in subscribeAt for an owner whose take-over pulls from a peer that does not answer", d.Round(time.Millisecond))
	}
}

// Coverage for the branch of 67774ff that TestShutdownDoesNotWaitForHungPull
// does not reach: that test's peer never completes the link's handshake,
// so the pull waits in Request and only rt.ctx ends it. Here the link is
// up and the peer takes the pull but never answers: only pull's new
// rt.stop case ends it (before, time.After(forwardTimeout), twice).
// Passes now.
func TestReview16ShutdownDoesNotWaitForUnansweredPull(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	swallow := func(h stomp.PeerHandler) stomp.PeerHandler {
		return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
			if f.Header.Get(stomp.PeerHeaderOp) == opPull {
				return // taken, never answered
			}
			h.HandlePeer(peer, f, reply)
		})
	}
	startR6(t, "node-b", rn, []string{"node-a"}, []string{"node-a"}, r6Opts{r: 1, w: 1, noWatch: true, wrap: swallow})
	a := startR6(t, "node-a", rn, []string{"node-a"}, []string{"node-b"}, r6Opts{r: 1, w: 1, noWatch: true})
	a.warm(t, "node-b")
	a.rt.goBackground(func() { _ = a.rt.ensureOwned("/queue/r16-unanswered") })
	time.Sleep(300 * time.Millisecond) // the pull is at node-b, unanswered
	d, ok := review16TimedClose(a, 2*time.Second)
	if !ok {
		t.Fatalf("the router's close took more than %v: it waited for a pull node-b took and never answered", d.Round(time.Millisecond))
	}
}
