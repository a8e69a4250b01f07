package stomp

import "testing"

// replica's deliverLocked marks Redelivered when m.Seq <= inheritedTo;
// topic messages have Seq 0 and topics inheritedTo 0, so every topic
// MESSAGE carries redelivered:true on the wire.
func TestReview2TopicMessageNotMarkedRedelivered(t *testing.T) {
	_, srv := testServerCfg(t, nil)
	tc := tdial(t, srv.Addr().String())
	tc.connect()
	tc.write(tframe("SUBSCRIBE", "", "id:0", "destination:/topic/news", "receipt:s"))
	tc.receipt("s")
	tc.write(tframe("SEND", "hello", "destination:/topic/news"))
	m := tc.read()
	if m.Command != "MESSAGE" {
		t.Fatalf("got %s, want MESSAGE", m.Command)
	}
	if r := m.Header.Get("redelivered"); r != "" {
		t.Fatalf("first delivery of a fresh topic message has redelivered:%s", r)
	}
}
