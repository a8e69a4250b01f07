package test

import (
	"context"
	"net/http"
	"syscall"
	"testing"
	"time"

	bstomp "github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3"
)

// TestProcessWebSocket: brokerd started with --stomp-ws-addr serves STOMP
// over WebSocket at /ws: a go-stomp client over it sends and receives what
// a TCP client sent, the session shows as transport ws in the metrics, a
// foreign Origin gets 403, and SIGTERM ends the WebSocket session with the
// shutdown ERROR.
func TestProcessWebSocket(t *testing.T) {
	wsAddr := freeAddr(t)
	p := startProc(t, t.TempDir(), procOpts{args: []string{"--stomp-ws-addr", wsAddr}})
	url := "ws://" + wsAddr + bstomp.WSPath
	q := uniqueQueue(t)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := bstomp.DialWebSocket(ctx, url, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ws, err := stomp.Connect(conn, stomp.ConnOpt.HeartBeat(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	sub, err := ws.Subscribe(q, stomp.AckClientIndividual)
	if err != nil {
		t.Fatal(err)
	}
	c := p.dial()
	if err := c.Send(q, "text/plain", []byte("to the browser"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-sub.C:
		if m.Err != nil || string(m.Body) != "to the browser" {
			t.Fatalf("got %v %q", m.Err, m.Body)
		}
		if err := ws.Ack(m); err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no message over the WebSocket")
	}
	p.waitMetric(eq(1), "brokerd_stomp_connections", "transport", "ws")
	p.waitMetric(eq(1), "brokerd_stomp_connections", "transport", "tcp")

	h := http.Header{}
	h.Set("Origin", "https://evil.example.net")
	if _, err := bstomp.DialWebSocket(ctx, url, nil, h); err == nil {
		t.Fatal("a foreign Origin was served")
	}
	p.waitMetric(eq(1), "brokerd_stomp_connections_refused_total", "reason", "origin")

	// SIGTERM: the WebSocket session ends with the shutdown ERROR.
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case m, ok := <-sub.C:
		if ok && (m.Err == nil || m.Err.Error() != "server shutting down") {
			t.Fatalf("after SIGTERM: %v %q, want the shutdown ERROR", m.Err, m.Body)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the WebSocket session did not end after SIGTERM")
	}
	if code, ok := p.wait(15 * time.Second); !ok || code != 0 {
		t.Fatalf("exit %d (exited %v)", code, ok)
	}
}
