package node

// The long chaos run's "acked, then delivered again in the drain" (39
// messages, all in the final rolling restart): a client's ACK of a
// delivery whose routed subscription has since been bound again (its
// owner released the queue and took it over again, or ownership moved)
// was answered with success and did nothing; the message, in flight on
// the new binding, came back once that binding ended. Now such an ACK
// acknowledges the current binding's delivery of the same message (and
// the client's later ACK of that delivery is a no-op). When there is none
// yet, the ACK still takes no effect and the message comes back, marked
// (an ERROR would close nearly every acknowledging consumer's connection
// in a failover). Found by a helper from the run's history and logs.

import (
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
)

// ackOf ACKs tag of sub through m's router and returns the outcome the
// session would turn into a RECEIPT (nil) or an ERROR.
func ackOf(t *testing.T, m *r6Member, sub replica.Sub, tag uint64) error {
	t.Helper()
	b := &replica.Batch{Sync: true, Acks: []replica.AckOp{{Sub: sub, Tag: tag}}}
	return waitErr(t, "ACK", m.apply(t, b), 10*time.Second)
}

func resurrectCheck(t *testing.T, owner, subNode *r6Member, q string) {
	t.Helper()
	if err := waitErr(t, "SEND", subNode.apply(t, sendBatch(q, "m1")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	var rec recorder
	sub, err := subNode.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Prefetch: 32, Deliver: rec.deliver})
	if err != nil {
		t.Fatal(err)
	}
	if got := rec.waitN(1, 5*time.Second); len(got) != 1 {
		t.Fatalf("first delivery: %v", got)
	}
	rec.mu.Lock()
	tag1 := rec.got[0].Tag
	rec.mu.Unlock()

	// The owner releases the queue and takes it over again (a node
	// joined the view, or a released copy is merged): the subscription
	// binds again and m1 comes back, redelivered, under a new tag. In
	// the chaos run the client's ACK of the first delivery reached the
	// broker only after this (its session's reader was busy with the
	// SUBSCRIBE of another queue whose take-over took 5.5 s).
	owner.rt.merge(q)
	if got := rec.waitN(2, 10*time.Second); len(got) != 2 {
		t.Fatalf("no redelivery after the owner took the queue over again: %v", got)
	}

	// The client acknowledges m1 (the delivery it received first).
	if err := ackOf(t, subNode, sub, tag1); err != nil {
		t.Fatalf("ACK of the first delivery: %v (it should acknowledge the redelivery)", err)
	}
	// ... and then the redelivery it got meanwhile: not an error.
	rec.mu.Lock()
	tag2 := rec.got[1].Tag
	rec.mu.Unlock()
	if err := sub.Check(tag2); err != nil {
		t.Fatalf("the client's ACK of the redelivery, after its ACK of the first delivery took effect, is refused: %v", err)
	}
	if err := ackOf(t, subNode, sub, tag2); err != nil {
		t.Fatalf("the client's ACK of the redelivery: %v", err)
	}
	// RECEIPTed. The client stops (the chaos consumers were switched
	// off before they acknowledged the second delivery).
	sub.Close()

	var rec2 recorder
	sub2, err := subNode.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Prefetch: 32, Deliver: rec2.deliver})
	if err != nil {
		t.Fatal(err)
	}
	defer sub2.Close()
	if got := rec2.waitN(1, 2*time.Second); len(got) > 0 {
		t.Fatalf("m1's ACK was receipted, yet m1 is delivered again to the next consumer (redelivered=%v); still stored on the owner: %v",
			rec2.got[0].Redelivered, owner.bodies(t, q))
	}
}

// One node: the subscription's owner is its own node.
func TestResurrectAckOfFormerBindingLocal(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	a := startR6(t, "node-a", rn, []string{"node-a"}, nil, r6Opts{r: 1, w: 1})
	resurrectCheck(t, a, a, "/queue/resurrect")
}

// Two nodes, R=2 W=2: the consumer's node is not the owner (the chaos
// run's c2 on n4 with n2 owning /queue/chaos-10510-4).
func TestResurrectAckOfFormerBindingRouted(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	all := []string{"node-a", "node-b"}
	q := pickQueue(t, "resurrect-", func(n string) bool { return ownerIn(n, all) == "node-a" })
	o := r6Opts{r: 2, w: 2}
	a := startR6(t, "node-a", rn, all, []string{"node-b"}, o)
	b := startR6(t, "node-b", rn, all, []string{"node-a"}, o)
	b.warm(t, "node-a")
	a.warm(t, "node-b")
	resurrectCheck(t, a, b, q)
}
