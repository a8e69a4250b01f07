package test

import (
	"bufio"
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/replica"
	"github.com/go-stomp/stomp/v3/frame"
)

// queue.max_redeliveries counts failed deliveries only: a NACK, or a
// consumer whose connection was lost while it held the message (it
// crashed: the poison-message case). A consumer that prefetched the
// message and left cleanly (UNSUBSCRIBE, DISCONNECT) did not fail it:
// the message comes back marked redelivered, but however often that
// happens it is not dead-lettered. Before, every return counted, so a
// consumer that connects, takes one message of a prefetched batch and
// disconnects, a consumer whose connection the broker ended with an
// ERROR for a frame it refused, or a cluster whose subscriptions were re-bound by
// fail-overs and merges, dead-lettered messages nobody had failed.

// redeliveryRound subscribes on a raw connection to addr, reads one
// MESSAGE of q, and ends as end says: "crash" closes the socket without
// a frame, "disconnect" sends a receipted DISCONNECT, "unsubscribe" a
// receipted UNSUBSCRIBE then DISCONNECT, "refused" a SEND to the full
// queue full, which the broker answers with an ERROR and a close. It
// returns the MESSAGE.
func redeliveryRound(t *testing.T, addr, q, end, full string) *frame.Frame {
	t.Helper()
	rc := dialRaw(t, addr)
	defer rc.c.Close()
	rc.frame("SUBSCRIBE", "", "id", "s", "destination", q, "ack", "client-individual", "prefetch-count", "10")
	m := rc.read()
	if m.Command != frame.MESSAGE {
		t.Fatalf("want MESSAGE of %s, got %s %v %q", q, m.Command, m.Header, m.Body)
	}
	switch end {
	case "refused":
		// A SEND the broker refuses (full is at queue.max_length): its
		// ERROR ends the connection, the broker's doing.
		rc.frame("SEND", "over", "destination", full, "receipt", "over")
		if f := rc.read(); f.Command != frame.ERROR {
			t.Fatalf("SEND to the full queue: got %s %v, want ERROR", f.Command, f.Header)
		}
		rc.expectClosed()
	case "crash":
		_ = rc.c.(*net.TCPConn).SetLinger(0) // a reset, as a killed process's socket
	case "unsubscribe":
		rc.frame("UNSUBSCRIBE", "", "id", "s", "receipt", "u")
		rc.awaitReceipt("u")
		fallthrough
	case "disconnect":
		rc.frame("DISCONNECT", "", "receipt", "d")
		rc.awaitReceipt("d")
	}
	return m
}

// dialRaw connects a raw STOMP 1.2 connection to addr.
func dialRaw(t *testing.T, addr string) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	rc := &rawConn{t: t, c: c, r: frame.NewReader(br), br: br}
	rc.connect()
	return rc
}

// sendRaw sends body to q on addr with a receipt.
func sendRaw(t *testing.T, addr, q, body string) {
	t.Helper()
	rc := dialRaw(t, addr)
	defer rc.c.Close()
	rc.frame("SEND", body, "destination", q, "receipt", "r")
	rc.awaitReceipt("r")
	rc.frame("DISCONNECT", "", "receipt", "d")
	rc.awaitReceipt("d")
}

// checkRedeliveryCounting runs the rounds against addr with
// queue.max_redeliveries 2 and queue.max_length 1. ok says whether the queues (kept, poison
// and poison's dead-letter queue) may be used: a cluster test picks
// names owned by other nodes than addr's.
func checkRedeliveryCounting(t *testing.T, addr string, ok func(kept, poison, dlq string) bool) {
	var kept, poison, dlq, full string
	for i := 0; ; i++ {
		if i == 10000 {
			t.Fatal("no usable queue names")
		}
		base := fmt.Sprintf("/queue/redelivery-%d-%d", time.Now().UnixNano(), i)
		kept, poison, full = base+"-kept", base+"-poison", base+"-full"
		dlq = "/queue/DLQ." + poison[len("/queue/"):]
		if ok(kept, poison, dlq) && ok(full, full, full) {
			break
		}
	}
	sendRaw(t, addr, kept, "kept")
	sendRaw(t, addr, poison, "poison")
	sendRaw(t, addr, full, "filler")

	// Six leaves that are no failure of the client, three times the
	// limit: never dead-lettered.
	for i := 0; i < 6; i++ {
		end := [...]string{"disconnect", "unsubscribe", "refused"}[i%3]
		m := redeliveryRound(t, addr, kept, end, full)
		if string(m.Body) != "kept" {
			t.Fatalf("round %d: got %q", i, m.Body)
		}
		wantRedelivered := i > 0
		if got := m.Header.Get("redelivered") == "true"; got != wantRedelivered {
			t.Fatalf("round %d (after %d clean leaves): redelivered %v, want %v (%v)", i, i, got, wantRedelivered, m.Header)
		}
		if i > 0 && m.Header.Get("x-delivery-count") != "1" {
			t.Fatalf("round %d: x-delivery-count %q after only clean leaves, want 1 (possibly delivered, never failed)", i, m.Header.Get("x-delivery-count"))
		}
	}

	// Three crashes with the message in hand: the third exceeds the
	// limit of 2 and the message moves to the dead-letter queue.
	for i := 0; i < 3; i++ {
		m := redeliveryRound(t, addr, poison, "crash", full)
		if got, want := m.Header.Get("x-delivery-count"), strconv.Itoa(i); i > 0 && got != want {
			t.Fatalf("crash round %d: x-delivery-count %q, want %s", i, got, want)
		}
	}
	m := redeliveryRound(t, addr, dlq, "disconnect", full)
	if string(m.Body) != "poison" || m.Header.Get("x-original-destination") != poison {
		t.Fatalf("dead-letter queue got %q %v", m.Body, m.Header)
	}
	// The kept message is still there, after the poison one left.
	if m := redeliveryRound(t, addr, kept, "disconnect", full); string(m.Body) != "kept" {
		t.Fatalf("kept queue got %q", m.Body)
	}
}

func TestRedeliveryCountsOnlyFailures(t *testing.T) {
	b := startBroker(t, func(c *config.Config) { c.Queue.MaxRedeliveries, c.Queue.MaxLength = 2, 1 })
	checkRedeliveryCounting(t, b.addr(), func(_, _, _ string) bool { return true })
}

// The same through a node that owns none of the queues: the subscriber's
// node tells the owner whether its client failed (x-failed on the peer
// link's unsubscribe).
func TestClusterRedeliveryCountsOnlyFailures(t *testing.T) {
	if testing.Short() {
		t.Skip("in-process cluster")
	}
	base := config.Default()
	base.Queue.MaxRedeliveries, base.Queue.MaxLength = 2, 1
	mb := newMemBrokersConfig(t, base, 3, 2, "a", "b", "c")
	mb.waitConverged(15*time.Second, mb.names)
	st := mb.brokers["a"].Cluster().Status()
	elsewhere := func(q string) bool { return replica.ReplicaSet(q, st.ActiveSet, 2)[0] != st.NodeID }
	checkRedeliveryCounting(t, mb.brokers["a"].STOMPAddr(), func(kept, poison, dlq string) bool {
		return elsewhere(kept) && elsewhere(poison) && elsewhere(dlq)
	})
}
