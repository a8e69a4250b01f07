package node

// An ACK of a former binding's delivery is redirected to the current
// binding's delivery of the same message-id (client-individual mode), or
// takes no effect; never an ERROR, never an acknowledgement of another
// message. From a hostile review of the first version of the redirect,
// which refused with an ERROR and redirected in client mode too.

import (
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
)

func r10aSingle(t *testing.T) *r6Member {
	rn := &r6Net{addrs: map[string]string{}}
	return startR6(t, "node-a", rn, []string{"node-a"}, nil, r6Opts{r: 1, w: 1})
}

func r10aTag(rec *recorder, i int) (uint64, string, bool) {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	d := rec.got[i]
	return d.Tag, string(d.Msg.Body), d.Redelivered
}

// 1. Client (cumulative) mode: the redirected ACK goes to the owner as a
// cumulative ACK of the new delivery's owner tag, so it acknowledges every
// delivery the new binding handed out before it, which the client never
// acknowledged (nor, maybe, received). Message loss.
//
// The new binding hands out m2 before m1 comes back whenever the former
// owner-side subscription still holds m1 when the new one starts: lost()
// unsubscribes a remote owner in the background (and, if that request is
// lost, the owner keeps it until subIdle, 10 s) while rebind() runs. Here
// the same thing is done by hand, at one node.
func TestAckRedirectClientModeRedirectAcksOthers(t *testing.T) {
	a := r10aSingle(t)
	q := "/queue/r10a-client"
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "m1")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	var rec recorder
	sub, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClient, Prefetch: 1, Deliver: rec.deliver})
	if err != nil {
		t.Fatal(err)
	}
	if got := rec.waitN(1, 5*time.Second); len(got) != 1 {
		t.Fatalf("first delivery: %v", got)
	}
	tag1, _, _ := r10aTag(&rec, 0)
	rs := sub.(*routedSub)

	// What lost() does, with the former binding's unsubscribe late.
	rs.mu.Lock()
	old, p := rs.gen, rs.p
	rs.p = nil
	rs.opts.Prefetch = 32 // only so that the new binding can take both
	rs.mu.Unlock()
	p.remove(rs)
	if err := rs.bind(); err != nil {
		t.Fatal(err)
	}
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "m2")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := rec.waitN(2, 5*time.Second); len(got) != 2 || got[1] != "m2" {
		t.Fatalf("m2 on the new binding: %v", got)
	}
	rs.unsubscribeAt("node-a", old, nil) // m1 comes back, after m2
	if got := rec.waitN(3, 5*time.Second); len(got) != 3 || got[2] != "m1" {
		t.Fatalf("m1 redelivered on the new binding: %v", got)
	}

	// The client acknowledges m1 (client mode: m1 and earlier, i.e. m1).
	if err := ackOf(t, a, sub, tag1); err != nil {
		t.Fatalf("ACK of m1: %v", err)
	}
	// It never acknowledged m2, and stops.
	sub.Close()

	var rec2 recorder
	sub2, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Deliver: rec2.deliver})
	if err != nil {
		t.Fatal(err)
	}
	defer sub2.Close()
	if got := rec2.waitN(1, 3*time.Second); len(got) == 0 {
		t.Fatalf("m2 was never acknowledged, yet it is gone (stored: %v): the redirected ACK of m1 was sent as a cumulative ACK of the new binding's owner tag", a.bodies(t, q))
	}
}

// r10aRebound subscribes in client-individual mode to q holding bodies,
// and makes the owner take q over again so that they are all redelivered
// under new tags. It returns the old and new deliveries' tags.
func r10aRebound(t *testing.T, a *r6Member, q string, msgs ...*replica.Message) (replica.Sub, *recorder, []uint64, []uint64) {
	t.Helper()
	if err := waitErr(t, "SEND", a.apply(t, &replica.Batch{Sync: true, Sends: msgs}), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	sub, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Prefetch: 32, Deliver: rec.deliver})
	if err != nil {
		t.Fatal(err)
	}
	n := len(msgs)
	if got := rec.waitN(n, 5*time.Second); len(got) != n {
		t.Fatalf("first deliveries: %v", got)
	}
	a.rt.merge(q)
	if got := rec.waitN(2*n, 10*time.Second); len(got) != 2*n {
		t.Fatalf("redeliveries: %v", got)
	}
	var olds, news []uint64
	for i := 0; i < 2*n; i++ {
		tag, _, _ := r10aTag(rec, i)
		if i < n {
			olds = append(olds, tag)
		} else {
			news = append(news, tag)
		}
	}
	return sub, rec, olds, news
}

// 2. The client acknowledges the redelivery first, then the original
// (pipelined ACKs, or a consumer that handles them on two threads): the
// message is acknowledged, yet the second ACK gets an ERROR saying "the
// message will be delivered again" (it will not), and the connection is
// closed, returning every other message in flight. It used to succeed.
func TestAckRedirectOriginalAfterRedeliveryIsRefused(t *testing.T) {
	a := r10aSingle(t)
	q := "/queue/r10a-order"
	sub, _, olds, news := r10aRebound(t, a, q, &replica.Message{Dest: q, Body: []byte("m1")})
	defer sub.Close()
	if err := ackOf(t, a, sub, news[0]); err != nil {
		t.Fatalf("ACK of the redelivery: %v", err)
	}
	if err := sub.Check(olds[0]); err != nil {
		t.Fatalf("Check of the original: %v", err)
	}
	err := ackOf(t, a, sub, olds[0])
	if err != nil {
		t.Fatalf("m1 is acknowledged (stored: %v), yet the ACK of its first delivery gets: %v", a.bodies(t, q), err)
	}
}

// 3. Two copies of one message-id (a retried SEND stored twice: both
// carry the message-id forwardSends assigned) in flight under both
// bindings. byID keeps one tag per id: the first redirected ACK forgets
// it, and the ACK of the other former delivery is refused although the
// other copy is in flight on the current binding (for a 1.0/1.1 client,
// whose ACK names the message-id, that copy cannot be acknowledged at
// all: TagOf no longer finds it).
func TestAckRedirectDuplicateIDSecondRedirectRefused(t *testing.T) {
	a := r10aSingle(t)
	q := "/queue/r10a-dup"
	sub, _, olds, news := r10aRebound(t, a, q,
		&replica.Message{Dest: q, ID: "dup-1", Body: []byte("copy-a")},
		&replica.Message{Dest: q, ID: "dup-1", Body: []byte("copy-b")})
	defer sub.Close()
	if err := ackOf(t, a, sub, olds[0]); err != nil {
		t.Fatalf("ACK of the first copy's former delivery: %v", err)
	}
	if _, ok := sub.TagOf("dup-1"); !ok {
		t.Errorf("a copy of dup-1 is still in flight (tags %v), but TagOf no longer finds it", news)
	}
	if err := ackOf(t, a, sub, olds[1]); err != nil {
		t.Fatalf("the other copy of dup-1 is in flight on the current binding, yet the ACK of its former delivery gets: %v", err)
	}
}

// 4. A transaction's ACK of a former delivery is refused only after the
// COMMIT's other effects were stored: Check (called at the frame and again
// by Apply before anything is stored) passes, ack fails afterwards. The
// client gets an ERROR for a COMMIT whose SEND was stored. Check should
// refuse what ack will refuse (a former binding's delivery with no current
// delivery of its message-id), so that the COMMIT is refused whole.
func TestAckRedirectTransactionErrorAfterSendStored(t *testing.T) {
	a := r10aSingle(t)
	q := "/queue/r10a-tx"
	other := "/queue/r10a-tx-other"
	if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "m1")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	var rec recorder
	sub, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Prefetch: 1, Deliver: rec.deliver})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if got := rec.waitN(1, 5*time.Second); len(got) != 1 {
		t.Fatalf("first delivery: %v", got)
	}
	tag1, _, _ := r10aTag(&rec, 0)
	rs := sub.(*routedSub)
	// A new binding that does not (yet) have m1.
	rs.mu.Lock()
	old, p := rs.gen, rs.p
	rs.p = nil
	rs.mu.Unlock()
	p.remove(rs)
	if err := rs.bind(); err != nil {
		t.Fatal(err)
	}
	defer rs.unsubscribeAt("node-a", old, nil)

	if err := sub.Check(tag1); err != nil {
		return // refused at the frame: nothing stored, fine
	}
	b := &replica.Batch{Sync: true,
		Sends: []*replica.Message{{Dest: other, Body: []byte("tx-send")}},
		Acks:  []replica.AckOp{{Sub: sub, Tag: tag1}}}
	err = waitErr(t, "COMMIT", a.apply(t, b), 10*time.Second)
	if err != nil {
		if got := a.bodies(t, other); len(got) > 0 {
			t.Fatalf("the COMMIT got an ERROR (%v), yet its SEND was stored: %v", err, got)
		}
	}
}
