package stomp

import (
	"context"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/go-stomp/stomp/v3/frame"
)

// wsReadFrames reads w's frames on a goroutine (which Ping needs: the
// pong is read by a Reader call), skipping heart-beats.
func wsReadFrames(w *wsClient) (<-chan *frame.Frame, <-chan error) {
	frames := make(chan *frame.Frame, 16)
	errc := make(chan error, 1)
	go func() {
		for {
			f, err := w.r.Read()
			if err != nil {
				errc <- err
				return
			}
			if f != nil {
				frames <- f
			}
		}
	}()
	return frames, errc
}

// TestReview13WSPingAfterIdle: a client that pings (as many WebSocket
// libraries do on their own) after the session has written nothing for
// longer than WriteTimeout gets its pong and keeps its session: the
// pong is not written under the write deadline of the last STOMP write.
func TestReview13WSPingAfterIdle(t *testing.T) {
	srv := wsServer(t, func(c *Config) { c.WriteTimeout = 300 * time.Millisecond })
	w := wsDial(t, wsURL(srv), nil)
	w.send(websocket.MessageText, wsConnect)
	w.expect(frame.CONNECTED)
	frames, errc := wsReadFrames(w)
	time.Sleep(700 * time.Millisecond) // idle for more than WriteTimeout
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := w.c.Ping(ctx); err != nil {
		t.Fatalf("ping after an idle spell: %v", err)
	}
	w.send(websocket.MessageText, "SEND\ndestination:/queue/ping\nreceipt:r\n\nx\x00")
	select {
	case f := <-frames:
		if f.Command != frame.RECEIPT {
			t.Fatalf("got %s %v %q, want RECEIPT", f.Command, f.Header, f.Body)
		}
	case err := <-errc:
		t.Fatalf("session ended: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("no RECEIPT")
	}
}
