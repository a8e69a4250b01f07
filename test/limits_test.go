package test

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	"github.com/go-stomp/stomp/v3/frame"
)

// TestProtocolNack10: STOMP 1.0 has no NACK, but RabbitMQ accepts one (by
// message-id, subscription optional) and clients rely on it: the message
// comes back marked redelivered.
func TestProtocolNack10(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	for _, withSub := range []bool{false, true} {
		t.Run(fmt.Sprintf("subscription=%v", withSub), func(t *testing.T) {
			q := uniqueQueue(t)
			rc := protoRaw(t, b)
			rc.protoConnectVersion("1.0", "1.0")
			rc.write(protoFrame(frame.SEND, "m", "destination:"+q))
			rc.write(protoFrame(frame.SUBSCRIBE, "", "destination:"+q, "ack:client"))
			m := rc.protoMessage()
			if m.Header.Get("redelivered") != "" {
				t.Fatalf("first delivery: %v", m.Header)
			}
			hdr := []string{"message-id:" + m.Header.Get(frame.MessageId), "receipt:n"}
			if withSub {
				hdr = append(hdr, "subscription:"+m.Header.Get(frame.Subscription))
			}
			rc.write(protoFrame(frame.NACK, "", hdr...))
			msgs := rc.protoReceipt("n")
			if len(msgs) == 0 {
				msgs = append(msgs, rc.protoMessage())
			}
			m2 := msgs[0]
			if string(m2.Body) != "m" || m2.Header.Get("redelivered") != "true" || m2.Header.Get("x-delivery-count") != "1" {
				t.Fatalf("after NACK got %q %v", m2.Body, m2.Header)
			}
			rc.write(protoFrame(frame.ACK, "", "message-id:"+m2.Header.Get(frame.MessageId), "receipt:a"))
			rc.protoReceipt("a")
			rc.write(protoFrame(frame.DISCONNECT, "", "receipt:bye"))
			rc.protoReceipt("bye")
			rc.expectClosed()
			protoAckedNotRedelivered(t, b, q)
		})
	}
}

// TestSlowConsumerDoesNotStallProducer: a client-ack consumer that stops
// reading does not slow a producer flooding its queue (every SEND is
// receipted promptly); the consumer is disconnected once the server's
// writes to it stall for stomp.write_timeout, and every message, including
// those written to it, is delivered to the next consumer.
func TestSlowConsumerDoesNotStallProducer(t *testing.T) {
	t.Parallel()
	b := startBroker(t, func(c *config.Config) { c.STOMP.WriteTimeout = time.Second })
	q := uniqueQueue(t)
	cons := protoRaw(t, b)
	cons.connect()
	cons.write(protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+q, "ack:client-individual", "receipt:s"))
	cons.protoReceipt("s")
	// From now on cons reads nothing.

	const n, size = 600, 16 << 10 // more than the socket buffers hold
	body := strings.Repeat("b", size)
	prod := protoRaw(t, b)
	prod.connect()
	for i := 0; i < n; i++ {
		prod.write(protoFrame(frame.SEND, fmt.Sprintf("%04d", i)+body, "destination:"+q, "receipt:"+strconv.Itoa(i)))
		prod.protoReceipt(strconv.Itoa(i)) // read within 5 s each
	}

	// cons is disconnected: a heart-beat written to it eventually fails.
	deadline := time.Now().Add(20 * time.Second)
	for {
		_ = cons.c.SetWriteDeadline(time.Now().Add(time.Second))
		if _, err := cons.c.Write([]byte("\n")); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the consumer that reads nothing is still connected after 20s")
		}
		time.Sleep(50 * time.Millisecond)
	}

	next := protoRaw(t, b)
	next.connect()
	next.write(protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+q, "ack:auto"))
	seen := map[string]bool{}
	redelivered := 0
	for len(seen) < n {
		m := next.protoMessage()
		if len(m.Body) != 4+size {
			t.Fatalf("message of %d bytes", len(m.Body))
		}
		seen[string(m.Body[:4])] = true
		if m.Header.Get("redelivered") == "true" {
			redelivered++
		}
	}
	t.Logf("%d messages, %d of them redelivered", n, redelivered)
}
