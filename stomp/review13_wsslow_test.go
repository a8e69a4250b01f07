package stomp

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/go-stomp/stomp/v3/frame"
)

// slowReader reads at most 32 KiB every 40 ms (800 KB/s).
type slowReader struct{ r io.Reader }

func (s slowReader) Read(p []byte) (int, error) {
	if len(p) > 32<<10 {
		p = p[:32<<10]
	}
	time.Sleep(40 * time.Millisecond)
	return s.r.Read(p)
}

// TestReview13WSPingWhileSlowWrite: a subscriber on a slow link (a 12 MiB
// MESSAGE takes about 15 s to reach it) that pings meanwhile, as many
// WebSocket libraries do on their own, gets its pong and keeps its
// session. A pong waits for the message being written and coder/websocket
// fails the read side after 5 s: written as one 12 MiB message, the MESSAGE
// made the session end with ERROR "heart-beat timeout" (heart-beats off).
func TestReview13WSPingWhileSlowWrite(t *testing.T) {
	if testing.Short() {
		t.Skip("about 16 s")
	}
	srv := wsServer(t, func(c *Config) {
		c.WriteTimeout = 30 * time.Second
		c.Limits.MaxBodySize = 16 << 20
		c.Limits.MaxFrameSize = 16<<20 + 64<<10
	})
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err == nil {
			_ = c.(*net.TCPConn).SetReadBuffer(64 << 10)
		}
		return c, err
	}}}
	w := wsDial(t, wsURL(srv), &websocket.DialOptions{Subprotocols: []string{"v12.stomp"}, HTTPClient: hc})
	w.send(websocket.MessageText, wsConnect)
	w.expect(frame.CONNECTED)
	w.send(websocket.MessageText, "SUBSCRIBE\nid:0\ndestination:/queue/slow\nreceipt:s\n\n\x00")
	w.expect(frame.RECEIPT, "s")
	w.r = frame.NewReader(bufio.NewReaderSize(slowReader{wsMessages{w}}, 32<<10))

	body := strings.Repeat("x", 12<<20)
	tc := tdial(t, srv.Addr().String())
	tc.connect()
	tc.write(tframe(frame.SEND, body, "destination:/queue/slow", "receipt:p"))
	tc.receipt("p")

	time.Sleep(time.Second) // the server is writing the MESSAGE
	pinged := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		pinged <- w.c.Ping(ctx) // the pong is read by the reads below
	}()
	got := make(chan *frame.Frame, 1)
	go func() {
		for {
			f, err := w.r.Read()
			if err != nil {
				close(got)
				return
			}
			if f != nil {
				got <- f
				return
			}
		}
	}()
	select {
	case f, ok := <-got:
		if !ok || f.Command != frame.MESSAGE || len(f.Body) != len(body) {
			t.Fatalf("want the MESSAGE, got %v", f)
		}
	case <-time.After(30 * time.Second):
		w.c.CloseNow()
		t.Fatal("no MESSAGE within 30 s")
	}
	// The session goes on, and the ping was answered.
	w.send(websocket.MessageText, "SEND\ndestination:/queue/other\nreceipt:after\n\n\x00")
	w.expect(frame.RECEIPT, "after")
	select {
	case err := <-pinged:
		if err != nil {
			t.Errorf("ping: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("no pong")
	}
}
