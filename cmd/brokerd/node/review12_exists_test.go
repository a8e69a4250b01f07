package node

import (
	"crypto/rand"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/replica"
	gostomp "github.com/go-stomp/stomp/v3"
)

// TestReview12DrainedQueueForgottenByNewOwner: a queue "exists"
// (replica.Node.QueueExists) at its owner when the owner's store has its
// bucket. A drained queue's bucket is empty; a new owner that was not one
// of its replicas pulls the copies of the old replicas, but a pull of an
// empty copy (and of tombstones, which never create a bucket) writes
// nothing, so the new owner has no bucket and the queue no longer exists:
// a producer without configure permission, who could SEND to it a moment
// before, is refused with "access denied: configure" although nobody
// removed the queue (it is not idle-expired).
//
// Scenario: three nodes, M = 2 (one observer), R = 2. alice (all) creates
// a queue whose owner becomes the observer once M = 3, sends one message
// and drains it. bob (read, write) can SEND to it. M becomes 3; bob's
// next SEND must still be accepted.
func TestReview12DrainedQueueForgottenByNewOwner(t *testing.T) {
	if testing.Short() {
		t.Skip("three nodes")
	}
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	keyFile := writeKeyFile(t, key)
	files := newAuthTestFiles(t, "alice", "bob")
	files.write("", "alice all #\nbob read,write /queue/#\n")
	var cfgs []config.Config
	for _, name := range []string{"a", "b", "c"} {
		cfg := clusterTestConfig(t, name, keyFile)
		cfg.Cluster.ActiveMembers = 2
		cfg.Auth.UsersFile = files.users
		cfg.Auth.ACLFile = files.acl
		cfgs = append(cfgs, cfg)
	}
	nodes := startCluster(t, cfgs...)
	waitAgreement(t, 20*time.Second, nodes)
	st := nodes[0].n.Cluster().Status()
	if len(st.ActiveSet) != 2 {
		t.Fatalf("active set %v, want 2 members", st.ActiveSet)
	}
	var all []string
	var observer *Node
	for _, c := range nodes {
		all = append(all, c.n.ID())
		if !slices.Contains(st.ActiveSet, c.n.ID()) {
			observer = c.n
		}
	}
	var q string
	for i := 0; ; i++ {
		q = fmt.Sprintf("/queue/review12-drained.%d", i)
		if replica.ReplicaSet(q, all, 2)[0] == observer.ID() {
			break
		}
	}
	entry := nodes[0].n
	if entry == observer {
		entry = nodes[1].n
	}
	dial := func(user string) *gostomp.Conn {
		c, err := gostomp.Dial("tcp", entry.STOMPAddr(), gostomp.ConnOpt.Login(user, "secret"), gostomp.ConnOpt.HeartBeat(0, 0), gostomp.ConnOpt.Logger(quietLog{}))
		if err != nil {
			t.Fatalf("%s logs in: %v", user, err)
		}
		return c
	}

	// alice creates q and drains it.
	alice := dial("alice")
	if err := alice.Send(q, "text/plain", []byte("by alice"), gostomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	sub, err := alice.Subscribe(q, gostomp.AckClientIndividual)
	if err != nil {
		t.Fatal(err)
	}
	drain := func(n int) {
		for i := 0; i < n; i++ {
			select {
			case m := <-sub.C:
				if m.Err != nil {
					t.Fatal(m.Err)
				}
				if err := alice.Ack(m); err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("not delivered")
			}
		}
	}
	drain(1)
	// bob may SEND to the existing queue.
	bob := dial("bob")
	if err := bob.Send(q, "text/plain", []byte("by bob"), gostomp.SendOpt.Receipt); err != nil {
		t.Fatalf("bob's SEND to the queue alice created: %v", err)
	}
	_ = bob.Disconnect()
	drain(1)
	if err := alice.Disconnect(); err != nil {
		t.Fatal(err)
	}

	// The observer becomes a member, and q's owner.
	if err := nodes[0].n.Cluster().SetActiveMembers(3); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "three active members", func() bool {
		for _, c := range nodes {
			if len(c.n.Cluster().Status().ActiveSet) != 3 || agreement(nodes) != "" {
				return false
			}
		}
		return true
	})
	time.Sleep(500 * time.Millisecond)
	if o := entry.rt.ownerOf(entry.rt.refresh(), q); o != observer.ID() {
		t.Fatalf("owner of %s is %s, want the former observer %s", q, o, observer.ID())
	}

	bob = dial("bob")
	defer bob.Disconnect()
	if err := bob.Send(q, "text/plain", []byte("by bob, after the owner moved"), gostomp.SendOpt.Receipt); err != nil {
		t.Fatalf("bob's SEND to the existing (drained) queue after its owner moved to a node that was not a replica: %v (ERROR %q)", err, errorMessage(err))
	}
}
