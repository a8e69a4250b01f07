package test

import (
	"bytes"
	"strconv"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	"github.com/go-stomp/stomp/v3"
	"github.com/go-stomp/stomp/v3/frame"
)

func TestBrokerQueueRoundTrip(t *testing.T) {
	b := startBroker(t, nil)
	c := b.dial()
	q := uniqueQueue(t)
	body := []byte("hello\x00world\nwith NUL and newline")
	if err := c.Send(q, "application/octet-stream", body, stomp.SendOpt.Receipt,
		stomp.SendOpt.Header("x-app", "a:b"), stomp.SendOpt.Header("x-app", "second")); err != nil {
		t.Fatalf("send: %v", err)
	}
	sub, err := c.Subscribe(q, stomp.AckAuto)
	if err != nil {
		t.Fatal(err)
	}
	m := recv(t, sub, 5*time.Second)
	if !bytes.Equal(m.Body, body) {
		t.Fatalf("body %q, want %q", m.Body, body)
	}
	if got := m.Header.Get("x-app"); got != "a:b" {
		t.Fatalf("x-app = %q, want the first value a:b", got)
	}
	if m.ContentType != "application/octet-stream" {
		t.Fatalf("content-type %q", m.ContentType)
	}
	if m.Header.Get(frame.MessageId) == "" || m.Header.Get("redelivered") != "" {
		t.Fatalf("headers %v", m.Header)
	}
}

func TestBrokerQueueRoundRobin(t *testing.T) {
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	c1, c2 := b.dial(), b.dial()
	s1, _ := c1.Subscribe(q, stomp.AckClientIndividual)
	s2, _ := c2.Subscribe(q, stomp.AckClientIndividual)
	settle(t, c1)
	settle(t, c2)
	p := b.dial()
	for i := 0; i < 10; i++ {
		if err := p.Send(q, "text/plain", []byte(strconv.Itoa(i)), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	for i := 0; i < 5; i++ {
		for _, s := range []*stomp.Subscription{s1, s2} {
			m := recv(t, s, 5*time.Second)
			if seen[string(m.Body)] {
				t.Fatalf("message %s delivered twice", m.Body)
			}
			seen[string(m.Body)] = true
			if err := m.Conn.Ack(m); err != nil {
				t.Fatal(err)
			}
		}
	}
	recvNone(t, s1, 100*time.Millisecond)
	recvNone(t, s2, 100*time.Millisecond)
}

func TestBrokerTopicFanOut(t *testing.T) {
	b := startBroker(t, nil)
	topic := "/topic/news"
	p := b.dial()
	// Sent before anyone subscribes: nobody gets it.
	if err := p.Send(topic, "text/plain", []byte("early"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	c1, c2 := b.dial(), b.dial()
	s1, _ := c1.Subscribe(topic, stomp.AckAuto)
	s2, _ := c2.Subscribe(topic, stomp.AckClientIndividual)
	settle(t, c1)
	settle(t, c2)
	if err := p.Send(topic, "text/plain", []byte("news"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*stomp.Subscription{s1, s2} {
		if m := recv(t, s, 5*time.Second); string(m.Body) != "news" {
			t.Fatalf("got %q, want news", m.Body)
		}
	}
}

func TestBrokerNackRedelivers(t *testing.T) {
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	c := b.dial()
	if err := c.Send(q, "", []byte("m"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	sub, _ := c.Subscribe(q, stomp.AckClientIndividual)
	m := recv(t, sub, 5*time.Second)
	if err := c.Nack(m); err != nil {
		t.Fatal(err)
	}
	m2 := recv(t, sub, 5*time.Second)
	if m2.Header.Get("redelivered") != "true" || m2.Header.Get("x-delivery-count") != "1" {
		t.Fatalf("redelivery headers %v", m2.Header)
	}
	if m2.Header.Get(frame.MessageId) != m.Header.Get(frame.MessageId) {
		t.Fatalf("message-id changed on redelivery")
	}
	if err := c.Ack(m2); err != nil {
		t.Fatal(err)
	}
	recvNone(t, sub, 200*time.Millisecond)
}

func TestBrokerSessionEndRedelivers(t *testing.T) {
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	c1 := b.dial()
	if err := c1.Send(q, "", []byte("m"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	s1, _ := c1.Subscribe(q, stomp.AckClient)
	recv(t, s1, 5*time.Second)
	if err := c1.Disconnect(); err != nil {
		t.Fatal(err)
	}
	s2, _ := b.dial().Subscribe(q, stomp.AckAuto)
	m := recv(t, s2, 5*time.Second)
	if m.Header.Get("redelivered") != "true" {
		t.Fatalf("want redelivered:true, got %v", m.Header)
	}
}

func TestBrokerDurableAcrossRestart(t *testing.T) {
	b := startBroker(t, func(c *config.Config) { c.Store.Sync = "always" })
	q := uniqueQueue(t)
	c := b.dial()
	for i := 0; i < 3; i++ {
		if err := c.Send(q, "", []byte(strconv.Itoa(i)), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	sub, _ := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "2"))
	m0 := recv(t, sub, 5*time.Second)
	recv(t, sub, 5*time.Second) // in flight, unacknowledged
	if err := c.Ack(m0); err != nil {
		t.Fatal(err)
	}
	_ = c.Disconnect()
	b2 := b.restart()
	sub2, _ := b2.dial().Subscribe(q, stomp.AckAuto)
	got := map[string]bool{}
	for i := 0; i < 2; i++ {
		got[string(recv(t, sub2, 5*time.Second).Body)] = true
	}
	if !got["1"] || !got["2"] {
		t.Fatalf("after restart got %v, want 1 and 2", got)
	}
	recvNone(t, sub2, 200*time.Millisecond)
}

func TestBrokerClientAckIsCumulative(t *testing.T) {
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	c := b.dial()
	for i := 0; i < 3; i++ {
		if err := c.Send(q, "", []byte(strconv.Itoa(i)), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	sub, _ := c.Subscribe(q, stomp.AckClient)
	var last *stomp.Message
	for i := 0; i < 3; i++ {
		last = recv(t, sub, 5*time.Second)
	}
	if err := c.Ack(last); err != nil {
		t.Fatal(err)
	}
	_ = c.Disconnect()
	// All three were acknowledged by the one ACK: nothing comes back.
	s2, _ := b.dial().Subscribe(q, stomp.AckAuto)
	recvNone(t, s2, 300*time.Millisecond)
}

func TestBrokerPrefetchCount(t *testing.T) {
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	c := b.dial()
	for i := 0; i < 5; i++ {
		if err := c.Send(q, "", []byte(strconv.Itoa(i)), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	sub, _ := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "2"))
	m0 := recv(t, sub, 5*time.Second)
	recv(t, sub, 5*time.Second)
	recvNone(t, sub, 300*time.Millisecond) // window full
	if err := c.Ack(m0); err != nil {
		t.Fatal(err)
	}
	if m := recv(t, sub, 5*time.Second); string(m.Body) != "2" {
		t.Fatalf("after ACK got %q, want 2", m.Body)
	}
}

func TestBrokerTransactions(t *testing.T) {
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	p := b.dial()
	sub, _ := b.dial().Subscribe(q, stomp.AckAuto)

	tx := p.Begin()
	_ = tx.Send(q, "", []byte("aborted"))
	if err := tx.Abort(); err != nil {
		t.Fatal(err)
	}
	tx = p.Begin()
	_ = tx.Send(q, "", []byte("one"))
	_ = tx.Send(q, "", []byte("two"))
	recvNone(t, sub, 200*time.Millisecond) // not visible before COMMIT
	if err := tx.CommitWithReceipt(); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"one", "two"} {
		if m := recv(t, sub, 5*time.Second); string(m.Body) != want {
			t.Fatalf("got %q, want %q", m.Body, want)
		}
	}
	recvNone(t, sub, 200*time.Millisecond)
}

func TestBrokerTransactionalAck(t *testing.T) {
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	c := b.dial()
	if err := c.Send(q, "", []byte("m"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	sub, _ := c.Subscribe(q, stomp.AckClientIndividual)
	m := recv(t, sub, 5*time.Second)
	tx := c.Begin()
	if err := tx.Ack(m); err != nil {
		t.Fatal(err)
	}
	if err := tx.Abort(); err != nil {
		t.Fatal(err)
	}
	// The ACK was aborted: the session's end returns the message.
	_ = c.Disconnect()
	c2 := b.dial()
	s2, _ := c2.Subscribe(q, stomp.AckClientIndividual)
	m2 := recv(t, s2, 5*time.Second)
	tx2 := c2.Begin()
	_ = tx2.Ack(m2)
	if err := tx2.CommitWithReceipt(); err != nil {
		t.Fatal(err)
	}
	_ = c2.Disconnect()
	s3, _ := b.dial().Subscribe(q, stomp.AckAuto)
	recvNone(t, s3, 300*time.Millisecond)
}

func TestBrokerOpenTransactionAbortsAtSessionEnd(t *testing.T) {
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	p := b.dial()
	tx := p.Begin()
	_ = tx.Send(q, "", []byte("never"))
	_ = p.Disconnect()
	sub, _ := b.dial().Subscribe(q, stomp.AckAuto)
	recvNone(t, sub, 300*time.Millisecond)
}

func TestBrokerExpiry(t *testing.T) {
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	p := b.dial()
	past := strconv.FormatInt(time.Now().Add(-time.Second).UnixMilli(), 10)
	future := strconv.FormatInt(time.Now().Add(time.Hour).UnixMilli(), 10)
	_ = p.Send(q, "", []byte("expired"), stomp.SendOpt.Header("expires", past), stomp.SendOpt.Receipt)
	_ = p.Send(q, "", []byte("fresh"), stomp.SendOpt.Header("expires", future), stomp.SendOpt.Receipt)
	sub, _ := b.dial().Subscribe(q, stomp.AckAuto)
	if m := recv(t, sub, 5*time.Second); string(m.Body) != "fresh" {
		t.Fatalf("got %q, want fresh", m.Body)
	}
	recvNone(t, sub, 200*time.Millisecond)
}

func TestBrokerDeadLetter(t *testing.T) {
	b := startBroker(t, func(c *config.Config) { c.Queue.MaxRedeliveries = 2 })
	q := "/queue/poison"
	c := b.dial()
	if err := c.Send(q, "", []byte("poison"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	sub, _ := c.Subscribe(q, stomp.AckClientIndividual)
	for i := 0; i < 3; i++ { // first delivery and two redeliveries
		m := recv(t, sub, 5*time.Second)
		if err := c.Nack(m); err != nil {
			t.Fatal(err)
		}
	}
	recvNone(t, sub, 200*time.Millisecond)
	dlq, _ := b.dial().Subscribe("/queue/DLQ.poison", stomp.AckAuto)
	m := recv(t, dlq, 5*time.Second)
	if string(m.Body) != "poison" || m.Header.Get("x-original-destination") != q {
		t.Fatalf("DLQ got %q %v", m.Body, m.Header)
	}
}

func TestBrokerUnsubscribe(t *testing.T) {
	// Raw frames: go-stomp's Subscription.Unsubscribe races with its own
	// receipt handling (go-stomp/stomp#122) and hangs now and then.
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	rc := b.raw()
	rc.connect()
	rc.write("SUBSCRIBE\nid:s1\ndestination:" + q + "\n\n\x00")
	rc.write("UNSUBSCRIBE\nid:s1\nreceipt:u\n\n\x00")
	if f := rc.read(); f.Command != frame.RECEIPT {
		t.Fatalf("want RECEIPT, got %s", f.Command)
	}
	p := b.dial()
	_ = p.Send(q, "", []byte("later"), stomp.SendOpt.Receipt)
	s2, _ := b.dial().Subscribe(q, stomp.AckAuto)
	if m := recv(t, s2, 5*time.Second); string(m.Body) != "later" {
		t.Fatalf("got %q", m.Body)
	}
	rc.write("SEND\ndestination:/topic/x\nreceipt:r\n\n\x00")
	if f := rc.read(); f.Command != frame.RECEIPT {
		t.Fatalf("unsubscribed connection got %s %v, want only the RECEIPT", f.Command, f.Header)
	}
}

// TestBrokerDisconnectReceiptCoversEarlierSends: SENDs without receipts,
// then a DISCONNECT with a receipt: every SEND is stored.
func TestBrokerDisconnectReceiptCoversEarlierSends(t *testing.T) {
	b := startBroker(t, func(c *config.Config) { c.Store.Sync = "always" })
	q := uniqueQueue(t)
	rc := b.raw()
	rc.connect()
	const n = 500
	for i := 0; i < n; i++ {
		rc.write("SEND\ndestination:" + q + "\n\n" + strconv.Itoa(i) + "\x00")
	}
	rc.write("DISCONNECT\nreceipt:bye\n\n\x00")
	if f := rc.read(); f.Command != frame.RECEIPT || f.Header.Get(frame.ReceiptId) != "bye" {
		t.Fatalf("want RECEIPT bye, got %s %v", f.Command, f.Header)
	}
	rc.expectClosed()
	b2 := b.restart()
	sub, _ := b2.dial().Subscribe(q, stomp.AckAuto)
	for i := 0; i < n; i++ {
		if m := recv(t, sub, 5*time.Second); string(m.Body) != strconv.Itoa(i) {
			t.Fatalf("message %d: got %q (order or loss)", i, m.Body)
		}
	}
}
