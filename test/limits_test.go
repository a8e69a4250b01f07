package test

import (
	"fmt"
	"testing"

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
