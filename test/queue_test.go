package test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	"github.com/go-stomp/stomp/v3"
	"github.com/go-stomp/stomp/v3/frame"
)

// destinations reads the node's /v1/destinations.
func (b *broker) destinations(t *testing.T) map[string]map[string]any {
	t.Helper()
	resp, err := http.Get("http://" + b.node.AdminAddr() + "/v1/destinations")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var ds []map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&ds); err != nil {
		t.Fatal(err)
	}
	out := map[string]map[string]any{}
	for _, d := range ds {
		out[d["name"].(string)] = d
	}
	return out
}

// A backlog much larger than the read-ahead window survives a restart,
// is held on disk (the admin API shows how much is in memory), and is
// delivered in order.
func TestBrokerBacklogOnDisk(t *testing.T) {
	b := startBroker(t, func(c *config.Config) {
		c.Queue.ReadAheadMessages = 20
	})
	q := uniqueQueue(t)
	c := b.dial()
	const n = 2000
	for i := 0; i < n; i++ {
		var opts []func(*frame.Frame) error
		if i == n-1 {
			opts = append(opts, stomp.SendOpt.Receipt)
		}
		if err := c.Send(q, "text/plain", []byte(strconv.Itoa(i)), opts...); err != nil {
			t.Fatal(err)
		}
	}
	b = b.restart()
	d := b.destinations(t)[q]
	if d == nil || d["pending"].(float64) != n || d["in_memory"].(float64) != 0 {
		t.Fatalf("after restart /v1/destinations says %v; want %d pending, 0 in memory", d, n)
	}
	c = b.dial()
	// At most 16 in flight: go-stomp's client buffers about 33 messages per
	// subscription and stops reading while they are full and the test
	// blocks in Ack (one loop dispatches and writes), a deadlock.
	sub, err := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "16"))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		m := recv(t, sub, 5*time.Second)
		if string(m.Body) != strconv.Itoa(i) {
			t.Fatalf("message %d is %q", i, m.Body)
		}
		if err := c.Ack(m); err != nil {
			t.Fatal(err)
		}
		if i == n/2 {
			if d := b.destinations(t)[q]; d["in_memory"].(float64) > 20 {
				t.Fatalf("half way: %v in memory with a window of 20", d["in_memory"])
			}
		}
	}
	settle(t, c)
}

func TestBrokerQueueMaxLengthRejectPublish(t *testing.T) {
	b := startBroker(t, func(c *config.Config) { c.Queue.MaxLength = 3 })
	q := uniqueQueue(t)
	rc := b.raw()
	rc.connect()
	for i := 0; i < 3; i++ {
		rc.write(fmt.Sprintf("SEND\ndestination:%s\nreceipt:r%d\n\n%d\x00", q, i, i))
		if f := rc.read(); f.Command != frame.RECEIPT {
			t.Fatalf("SEND %d: %s %v", i, f.Command, f.Header)
		}
	}
	rc.write("SEND\ndestination:" + q + "\nreceipt:r3\n\nextra\x00")
	f := rc.expectError("queue full")
	if f.Header.Get(frame.ReceiptId) != "r3" {
		t.Fatalf("ERROR without the SEND's receipt-id: %v", f.Header)
	}
	if d := b.destinations(t)[q]; d["pending"].(float64) != 3 {
		t.Fatalf("pending %v after a refused SEND; want 3", d["pending"])
	}
	c := b.dial()
	sub, _ := c.Subscribe(q, stomp.AckAuto)
	for i := 0; i < 3; i++ {
		if m := recv(t, sub, 5*time.Second); string(m.Body) != strconv.Itoa(i) {
			t.Fatalf("got %q", m.Body)
		}
	}
	// The refused message is not there: a sentinel comes next.
	if err := c.Send(q, "", []byte("sentinel"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	if m := recv(t, sub, 5*time.Second); string(m.Body) != "sentinel" {
		t.Fatalf("after the three: %q, want the sentinel", m.Body)
	}
}

func TestBrokerQueueDropHead(t *testing.T) {
	b := startBroker(t, func(c *config.Config) {
		c.Queue.MaxLength = 3
		c.Queue.Overflow = "drop-head"
	})
	q := uniqueQueue(t)
	c := b.dial()
	for i := 0; i < 10; i++ {
		if err := c.Send(q, "", []byte(strconv.Itoa(i)), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	sub, _ := c.Subscribe(q, stomp.AckAuto)
	for i := 7; i < 10; i++ {
		if m := recv(t, sub, 5*time.Second); string(m.Body) != strconv.Itoa(i) {
			t.Fatalf("got %q, want %d (the oldest dropped)", m.Body, i)
		}
	}
	if err := c.Send(q, "", []byte("sentinel"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	if m := recv(t, sub, 5*time.Second); string(m.Body) != "sentinel" {
		t.Fatalf("got %q, want the sentinel", m.Body)
	}
}

// Frames of one connection take effect in order on a topic: a SEND with a
// receipt, then one without, reach a subscriber in that order.
func TestBrokerTopicOrderReceiptThenNone(t *testing.T) {
	b := startBroker(t, func(c *config.Config) { c.Store.Sync = "always" })
	topic := "/topic/order-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	sc := b.dial()
	sub, err := sc.Subscribe(topic, stomp.AckAuto)
	if err != nil {
		t.Fatal(err)
	}
	settle(t, sc)
	rc := b.raw()
	rc.connect()
	const n = 100
	for i := 0; i < n; i += 2 {
		// Give the receipted SEND a store write to wait for: a queue
		// message in the same transaction would do too; a plain queue
		// SEND without receipt before it leaves the connection dirty.
		rc.write(fmt.Sprintf("SEND\ndestination:/queue/order-side\n\nx\x00SEND\ndestination:%s\nreceipt:r%d\n\n%d\x00SEND\ndestination:%s\n\n%d\x00", topic, i, i, topic, i+1))
	}
	for i := 0; i < n; i++ {
		m := recv(t, sub, 5*time.Second)
		if string(m.Body) != strconv.Itoa(i) {
			t.Fatalf("topic message %d is %q: frames of one connection reordered", i, m.Body)
		}
	}
}
