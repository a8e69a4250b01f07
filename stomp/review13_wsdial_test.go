package stomp

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	gostomp "github.com/go-stomp/stomp/v3"
)

// TestReview13DialWebSocketRedirect: DialWebSocket follows a redirect
// (an ingress sending ws:// clients elsewhere) and returns the connection
// the WebSocket runs on, not the first one dialed; it used to block on
// recording the second connection until its context ended.
func TestReview13DialWebSocketRedirect(t *testing.T) {
	srv := wsServer(t, nil)
	target := "http://" + srv.WSAddr().String() + WSPath
	redir := httptest.NewServer(http.RedirectHandler(target, http.StatusTemporaryRedirect))
	defer redir.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := DialWebSocket(ctx, "ws://"+strings.TrimPrefix(redir.URL, "http://")+WSPath, nil, nil)
	if err != nil {
		t.Fatalf("dial through a redirect: %v", err)
	}
	defer conn.Close()
	cl, err := gostomp.Connect(conn, gostomp.ConnOpt.HeartBeat(0, 0))
	if err != nil {
		t.Fatalf("CONNECT over the redirected WebSocket: %v", err)
	}
	if err := cl.Send("/queue/redir", "text/plain", []byte("x"), gostomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	_ = cl.Disconnect()
}
