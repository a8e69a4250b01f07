package node

import (
	"crypto/rand"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	gostomp "github.com/go-stomp/stomp/v3"
	"github.com/go-stomp/stomp/v3/frame"
)

// storedAt is the messages queue dest holds at node n (pending or in
// flight), -1 if n does not have it in memory.
func storedAt(n *Node, dest string) int {
	for _, d := range n.rep.Destinations() {
		if d.Name == dest {
			return d.Pending + d.InFlight
		}
	}
	return -1
}

// TestClusterACLCreate: in a three-node cluster, a user without
// configure cannot create a queue whose owner is another node (SEND,
// SUBSCRIBE), nor one this node owns, nor through a transaction over
// queues of two owners; the owner refuses, the ERROR names the queue and
// configure, and nothing is stored. Once another user created the queue,
// the same SEND and SUBSCRIBE pass.
func TestClusterACLCreate(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a three-node cluster")
	}
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	keyFile := writeKeyFile(t, key)
	files := newAuthTestFiles(t, "alice", "bob")
	files.write("", "alice all #\nbob read,write /queue/#\n")
	var cfgs []config.Config
	for _, name := range []string{"a", "b", "c"} {
		cfg := clusterTestConfig(t, name, keyFile)
		cfg.Auth.UsersFile = files.users
		cfg.Auth.ACLFile = files.acl
		cfgs = append(cfgs, cfg)
	}
	nodes := startCluster(t, cfgs...)
	waitAgreement(t, 20*time.Second, nodes)
	entry := nodes[0].n // bob's and alice's node
	byID := map[string]*Node{}
	for _, c := range nodes {
		byID[c.n.ID()] = c.n
	}
	// owned finds a queue name whose owner, in entry's view, is other
	// than entry (remote) or entry itself, and not in skip.
	v := entry.rt.refresh()
	owner := func(dest string) *Node { return byID[entry.rt.ownerOf(v, dest)] }
	pick := func(remote bool, not *Node) string {
		for i := 0; ; i++ {
			d := fmt.Sprintf("/queue/acl.%d", i)
			if o := owner(d); o != nil && (o != entry) == remote && o != not {
				return d
			}
		}
	}
	remoteQ := pick(true, nil)
	otherQ := pick(true, owner(remoteQ)) // a second remote owner, for the transaction
	if owner(otherQ) == owner(remoteQ) {
		otherQ = pick(false, nil)
	}
	localQ := pick(false, nil)
	t.Logf("entry %s; %s owned by %s, %s by %s, %s local", entry.ID(), remoteQ, owner(remoteQ).ID(), otherQ, owner(otherQ).ID(), localQ)

	dial := func(user string) *gostomp.Conn {
		c, err := gostomp.Dial("tcp", entry.STOMPAddr(), gostomp.ConnOpt.Login(user, "secret"), gostomp.ConnOpt.HeartBeat(0, 0), gostomp.ConnOpt.Logger(quietLog{}))
		if err != nil {
			t.Fatalf("%s logs in: %v", user, err)
		}
		t.Cleanup(func() { _ = c.MustDisconnect() })
		return c
	}
	// wantDenied checks that err is the ERROR naming configure on dest,
	// with receipt-id receipt if not "".
	wantDenied := func(err error, dest, receipt string) {
		t.Helper()
		if got := errorMessage(err); got != "access denied: configure on "+dest {
			t.Fatalf("want an ERROR naming configure on %s, got %v (ERROR %q)", dest, err, got)
		}
		var se gostomp.Error
		errors.As(err, &se)
		if got := se.Frame.Header.Get(frame.ReceiptId); receipt != "" && got != receipt {
			t.Errorf("receipt-id %q, want %q", got, receipt)
		}
	}

	// SEND to a queue another node owns, which does not exist.
	for _, dest := range []string{remoteQ, localQ} {
		bob := dial("bob")
		err := bob.Send(dest, "text/plain", []byte("x"), gostomp.SendOpt.Header(frame.Receipt, "r1"))
		wantDenied(err, dest, "r1")
		if n := storedAt(owner(dest), dest); n != -1 {
			t.Fatalf("%s's owner holds it after a refused SEND (%d messages)", dest, n)
		}
	}

	// SUBSCRIBE to it.
	bob := dial("bob")
	sub, err := bob.Subscribe(remoteQ, gostomp.AckAuto)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-sub.C:
		if got := errorMessage(m.Err); got != "access denied: configure on "+remoteQ {
			t.Fatalf("SUBSCRIBE to a queue bob may not create: %v", m.Err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no ERROR for a SUBSCRIBE that would create a queue another node owns")
	}
	if n := storedAt(owner(remoteQ), remoteQ); n != -1 {
		t.Fatalf("%s's owner holds it after a refused SUBSCRIBE", remoteQ)
	}

	// alice creates remoteQ; bob may then use it.
	alice := dial("alice")
	if err := alice.Send(remoteQ, "text/plain", []byte("by alice"), gostomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	bob = dial("bob")
	if err := bob.Send(remoteQ, "text/plain", []byte("by bob"), gostomp.SendOpt.Receipt); err != nil {
		t.Fatalf("bob's SEND to a queue alice created: %v", err)
	}

	// A transaction over queues of two owners, one of which bob may not
	// create: refused at COMMIT, nothing applied.
	before := storedAt(owner(remoteQ), remoteQ)
	tx, err := bob.BeginWithError()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{remoteQ, otherQ} {
		if err := tx.Send(d, "text/plain", []byte("tx"), gostomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	wantDenied(tx.CommitWithReceipt(), otherQ, "")
	if n := storedAt(owner(remoteQ), remoteQ); n != before || storedAt(owner(otherQ), otherQ) != -1 {
		t.Fatalf("a refused transaction changed something: %s holds %d (was %d), %s %d", remoteQ, n, before, otherQ, storedAt(owner(otherQ), otherQ))
	}

	bob = dial("bob")
	sub, err = bob.Subscribe(remoteQ, gostomp.AckAuto)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"by alice", "by bob"} {
		select {
		case m := <-sub.C:
			if m.Err != nil || string(m.Body) != want {
				t.Fatalf("got %v %q, want %q", m.Err, m.Body, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no message %q", want)
		}
	}
}
