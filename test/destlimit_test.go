package test

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	"github.com/go-stomp/stomp/v3"
	"github.com/go-stomp/stomp/v3/frame"
)

// limits.max_destinations: a client cannot make a node hold more
// destinations than the limit by naming new ones; a SEND or SUBSCRIBE
// that would create one more gets an ERROR with its receipt-id, and
// nothing is stored. Destinations that exist keep working.
func TestLimitsMaxDestinations(t *testing.T) {
	const limit = 3
	b := startBroker(t, func(c *config.Config) { c.Limits.MaxDestinations = limit })
	cluster := os.Getenv("BROKERD_TEST_CLUSTER") != ""
	base := uniqueQueue(t)
	var accepted, refused []string
	// In a cluster each queue's owner counts its own: 3 nodes hold at
	// most 3 x limit between them.
	for i := 0; i < 3*limit+1; i++ {
		q := fmt.Sprintf("%s-%d", base, i)
		rc := b.raw()
		rc.connect()
		rc.write(fmt.Sprintf("SEND\ndestination:%s\nreceipt:r%d\n\nm\x00", q, i))
		f := rc.read()
		switch f.Command {
		case frame.RECEIPT:
			accepted = append(accepted, q)
		case frame.ERROR:
			if msg := f.Header.Get(frame.Message); !strings.Contains(msg, "too many destinations") {
				t.Fatalf("SEND to new queue %d: ERROR %q (body %q), want too many destinations", i, msg, f.Body)
			}
			if f.Header.Get(frame.ReceiptId) != fmt.Sprintf("r%d", i) {
				t.Fatalf("ERROR without the SEND's receipt-id: %v", f.Header)
			}
			if !strings.Contains(string(f.Body), "limits.max_destinations") {
				t.Fatalf("ERROR body %q does not name limits.max_destinations", f.Body)
			}
			refused = append(refused, q)
		default:
			t.Fatalf("SEND %d: %s %v", i, f.Command, f.Header)
		}
	}
	if len(refused) == 0 {
		t.Fatalf("%d new queues accepted with limits.max_destinations %d", len(accepted), limit)
	}
	if !cluster && len(accepted) != limit {
		t.Fatalf("accepted %d new queues, want %d (the limit)", len(accepted), limit)
	}

	// The queues that exist take more messages, and deliver them all.
	c := b.dial()
	for _, q := range accepted {
		if err := c.Send(q, "", []byte("again"), stomp.SendOpt.Receipt); err != nil {
			t.Fatalf("SEND to existing %s at the limit: %v", q, err)
		}
	}
	for _, q := range accepted {
		sub, err := c.Subscribe(q, stomp.AckAuto)
		if err != nil {
			t.Fatalf("SUBSCRIBE to existing %s at the limit: %v", q, err)
		}
		for _, want := range []string{"m", "again"} {
			if m := recv(t, sub, 5*time.Second); string(m.Body) != want {
				t.Fatalf("%s: got %q, want %q", q, m.Body, want)
			}
		}
	}
	if cluster {
		return // the rest counts this node's destinations only
	}
	// Nothing of the refused queues is stored.
	ds := b.destinations(t)
	for _, q := range refused {
		if _, ok := ds[q]; ok {
			t.Fatalf("refused queue %s is listed: %v", q, ds[q])
		}
	}
	// A new topic subscription is refused too, with its receipt-id.
	rc := b.raw()
	rc.connect()
	rc.write("SUBSCRIBE\ndestination:/topic/" + strings.TrimPrefix(base, "/queue/") + "\nid:0\nreceipt:s\n\n\x00")
	f := rc.expectError("too many destinations")
	if f.Header.Get(frame.ReceiptId) != "s" {
		t.Fatalf("ERROR without the SUBSCRIBE's receipt-id: %v", f.Header)
	}
}

// Queues that exist are never refused: a node restarted with a limit
// below the queues it holds serves them all.
func TestLimitsMaxDestinationsExistingKept(t *testing.T) {
	b := startBroker(t, nil)
	base := uniqueQueue(t)
	c := b.dial()
	for i := 0; i < 5; i++ {
		if err := c.Send(fmt.Sprintf("%s-%d", base, i), "", []byte("kept"), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	b.cfg.Limits.MaxDestinations = 2
	b = b.restart()
	c = b.dial()
	for i := 0; i < 5; i++ {
		q := fmt.Sprintf("%s-%d", base, i)
		if err := c.Send(q, "", []byte("more"), stomp.SendOpt.Receipt); err != nil {
			t.Fatalf("SEND to %s, which existed before the restart: %v", q, err)
		}
		sub, err := c.Subscribe(q, stomp.AckAuto)
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"kept", "more"} {
			if m := recv(t, sub, 5*time.Second); string(m.Body) != want {
				t.Fatalf("%s: got %q, want %q", q, m.Body, want)
			}
		}
	}
}
