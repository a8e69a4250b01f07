package node

import (
	"bytes"
	"testing"

	"github.com/brokerd/brokerd/replica"
)

// FuzzForwardDecode: the bodies of forwarded SENDs and topic messages,
// of poll requests and of poll answers, and lists of keys or tags
// (ack-keys, a failed unsubscribe) come from other nodes. Whatever
// they hold, decoding returns an error or values that encode back to
// what decodes to the same, and never panics.
func FuzzForwardDecode(f *testing.F) {
	m := &replica.Message{Dest: "/queue/a", ID: "n-1", Headers: []string{"k", "v"}, Body: []byte("body"), Expires: 5}
	f.Add(encodeMessages(nil, []*replica.Message{m, {Dest: "/topic/t", Body: []byte("x")}}))
	f.Add(appendDelivery(nil, "sub.1", 7, replica.Delivery{Msg: m, Redelivered: true, Count: 2}))
	f.Add(appendKeyedDelivery(nil, "sub.1", 7, replica.Delivery{Msg: &replica.Message{Dest: "/queue/a", Seq: 1 << 40, Body: []byte("b")}}))
	f.Add([]byte("sub.1 5\nsub.2 0\n"))
	f.Add(encodeTags(nil, []uint64{1, 300, 1 << 40}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		if msgs, err := decodeMessages(b, 64); err == nil {
			again, err := decodeMessages(encodeMessages(nil, msgs), 64)
			if err != nil || len(again) != len(msgs) {
				t.Fatalf("re-encoded messages do not decode: %v", err)
			}
			for i := range msgs {
				if again[i].Dest != msgs[i].Dest || again[i].ID != msgs[i].ID || !bytes.Equal(again[i].Body, msgs[i].Body) {
					t.Fatalf("message %d changed across a round trip", i)
				}
			}
		}
		if ds, err := decodeDeliveries(b); err == nil {
			for _, d := range ds {
				if d.msg == nil || d.count < 0 {
					t.Fatalf("decoded delivery %+v", d)
				}
			}
		}
		if ds, err := decodeKeyedDeliveries(b, true); err == nil {
			for _, d := range ds {
				if d.msg == nil || d.count < 0 {
					t.Fatalf("decoded keyed delivery %+v", d)
				}
			}
		}
		if keys, err := decodeKeys(b); err == nil {
			if again, err := decodeKeys(encodeTags(nil, keys)); err != nil || len(again) != len(keys) || len(keys) > maxForwardMessages {
				t.Fatalf("%d keys: a round trip gave %d (%v)", len(keys), len(again), err)
			}
		}
		if items, err := parsePoll(b); err == nil {
			for _, it := range items {
				if it.id == "" || it.credit < 0 {
					t.Fatalf("decoded poll item %+v", it)
				}
			}
		}
	})
}
