package node

import (
	"crypto/rand"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	gostomp "github.com/go-stomp/stomp/v3"
)

// TestReview13UndrainOneOwnerAtATime: a drain hands a queue over in an
// order that keeps one owner at a time (the drained node releases, then
// gossips). Two defects let an undrain give a queue two owners:
//
//   - Undrain gossiped and at once counted itself undrained: its queues
//     had two owners until every other node heard of it and its router
//     ticked (about 100 ms here), the former owner serving its
//     subscribers from its copy while the undrained node, having pulled
//     that copy, served the same messages to its own; each refused the
//     other's replication ("append for a queue this node owns"), so
//     SENDs failed for want of a write quorum. Undrain now owns again
//     only once every alive peer says it released (opReleased).
//   - The router's watch released queues only when the view's signature
//     (active set, draining members) differed from its last tick's. A
//     drain and an undrain between two ticks (100 ms) left the signature
//     as it was, so the replica that took the queue over in between kept
//     serving it for good beside its owner. Every change of the draining
//     members a view load sees now counts (viewSnap.drainFlips).
//
// Each round: drain a, the other replica x takes q over (a producer on
// x), undrain a at once, a's client uses q; never both serve q, the
// undrain does not wait out its bound, and x lets q go.
func TestReview13UndrainOneOwnerAtATime(t *testing.T) {
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	kf := writeKeyFile(t, key)
	nodes := startCluster(t, clusterTestConfig(t, "a", kf), clusterTestConfig(t, "b", kf), clusterTestConfig(t, "c", kf))
	waitAgreement(t, 20*time.Second, nodes)
	byID := map[string]*clusterNode{}
	for _, c := range nodes {
		byID[c.n.ID()] = c
	}
	a := nodes[0]
	v := a.n.rt.refresh()
	var q string
	var x *clusterNode // the other replica: the owner while a is drained
	for i := 0; ; i++ {
		q = fmt.Sprintf("/queue/review13-undrain.%d", i)
		if set := replica.ReplicaSet(q, v.active, a.n.rt.r); set[0] == a.n.ID() {
			x = byID[set[1]]
			break
		}
	}
	served := func(c *clusterNode) bool { return slices.Contains(c.n.rt.servedQueues(), q) }
	dial := func(c *clusterNode) *gostomp.Conn {
		conn, err := gostomp.Dial("tcp", c.n.STOMPAddr(), gostomp.ConnOpt.HeartBeat(0, 0), gostomp.ConnOpt.Logger(quietLog{}))
		if err != nil {
			t.Fatal(err)
		}
		return conn
	}
	for round := 0; round < 4; round++ {
		if _, err := a.n.Drain(); err != nil {
			t.Fatal(err)
		}
		waitUntil13(t, 10*time.Second, "every node sees a draining", func() bool {
			for _, c := range nodes[1:] {
				if !c.n.rt.refresh().draining[a.n.ID()] {
					return false
				}
			}
			return true
		})
		// A producer on x makes x take q over and keeps it busy.
		xc := dial(x)
		if err := xc.Send(q, "text/plain", []byte("before"), gostomp.SendOpt.Receipt); err != nil {
			t.Fatalf("round %d: SEND at %s while a is drained: %v", round, x.cfg.Node.Name, err)
		}
		waitUntil13(t, 10*time.Second, "x serves q", func() bool { return served(x) })

		var both atomic.Bool
		var stop atomic.Bool
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { // watch for two owners at once
			defer wg.Done()
			for !stop.Load() {
				if served(a) && served(x) {
					both.Store(true)
				}
				time.Sleep(200 * time.Microsecond)
			}
		}()
		go func() { // x's producer goes on
			defer wg.Done()
			for !stop.Load() {
				if xc.Send(q, "text/plain", []byte("x"), gostomp.SendOpt.Receipt) != nil {
					return
				}
			}
		}()
		t0 := time.Now()
		_, uerr := a.n.Undrain()
		took := time.Since(t0)
		var serr error
		if uerr == nil {
			// A client of a uses q at once: a takes it over.
			ac := dial(a)
			serr = ac.Send(q, "text/plain", []byte("a"), gostomp.SendOpt.Receipt)
			_ = ac.Disconnect()
		}
		deadline := time.Now().Add(5 * time.Second)
		for (served(x) || !served(a)) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		time.Sleep(200 * time.Millisecond)
		stop.Store(true)
		wg.Wait()
		_ = xc.Disconnect()
		switch {
		case uerr != nil:
			t.Fatalf("round %d: Undrain: %v", round, uerr)
		case serr != nil:
			t.Fatalf("round %d: SEND at %s right after its undrain: %v", round, a.cfg.Node.Name, serr)
		case both.Load():
			t.Fatalf("round %d: %s had two owners at once after the undrain: %s (undrained) and %s", round, q, a.cfg.Node.Name, x.cfg.Node.Name)
		case served(x):
			t.Fatalf("round %d: %s still serves %s, whose owner is %s again", round, x.cfg.Node.Name, q, a.cfg.Node.Name)
		case took >= undrainHandBackWait:
			t.Fatalf("round %d: Undrain took %v: a peer never said it released the undrained node's queues", round, took)
		}
	}
}

func waitUntil13(t *testing.T, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
