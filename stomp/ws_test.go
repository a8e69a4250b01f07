package stomp

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/test/tlstest"
	"github.com/coder/websocket"
	gostomp "github.com/go-stomp/stomp/v3"
	"github.com/go-stomp/stomp/v3/frame"
)

// wsServer starts a server with a plain STOMP and a WebSocket listener.
func wsServer(t *testing.T, mutate func(*Config)) *Server {
	t.Helper()
	_, srv := testServerCfg(t, func(c *Config) {
		c.WSAddr = "127.0.0.1:0"
		if mutate != nil {
			mutate(c)
		}
	})
	return srv
}

func wsURL(srv *Server) string { return "ws://" + srv.WSAddr().String() + WSPath }

// wsClient is a raw WebSocket client: it sends messages of a chosen type
// and reads STOMP frames from the messages it receives, recording their
// types.
type wsClient struct {
	t     *testing.T
	c     *websocket.Conn
	sub   string                  // negotiated subprotocol
	types []websocket.MessageType // of the messages read so far
	cur   io.Reader               // the message being read
	r     *frame.Reader
}

// wsDial opens a WebSocket to url with opts (nil: subprotocol v12.stomp).
func wsDial(t *testing.T, url string, opts *websocket.DialOptions) *wsClient {
	t.Helper()
	wc, resp, err := wsTryDial(url, opts)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial %s: status %d: %v", url, status, err)
	}
	t.Cleanup(func() { wc.CloseNow() })
	w := &wsClient{t: t, c: wc, sub: wc.Subprotocol()}
	w.r = frame.NewReader(bufio.NewReader(wsMessages{w}))
	return w
}

func wsTryDial(url string, opts *websocket.DialOptions) (*websocket.Conn, *http.Response, error) {
	if opts == nil {
		opts = &websocket.DialOptions{Subprotocols: []string{"v12.stomp"}}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	wc, resp, err := websocket.Dial(ctx, url, opts)
	if err == nil {
		wc.SetReadLimit(-1)
	}
	return wc, resp, err
}

// wsMessages reads the bytes of a wsClient's messages, one after the other.
type wsMessages struct{ w *wsClient }

func (m wsMessages) Read(p []byte) (int, error) {
	w := m.w
	for {
		if w.cur == nil {
			typ, r, err := w.c.Reader(context.Background())
			if err != nil {
				if websocket.CloseStatus(err) == websocket.StatusNormalClosure {
					return 0, io.EOF
				}
				return 0, err
			}
			w.types = append(w.types, typ)
			w.cur = r
		}
		n, err := w.cur.Read(p)
		if err == io.EOF {
			w.cur, err = nil, nil
		}
		if n > 0 || err != nil {
			return n, err
		}
	}
}

// send sends s as one message of type typ.
func (w *wsClient) send(typ websocket.MessageType, s string) {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := w.c.Write(ctx, typ, []byte(s)); err != nil {
		w.t.Fatalf("write: %v", err)
	}
}

// frame returns the next frame within 5 s, skipping heart-beats.
func (w *wsClient) frame() *frame.Frame {
	w.t.Helper()
	type res struct {
		f   *frame.Frame
		err error
	}
	ch := make(chan res, 1)
	go func() {
		for {
			f, err := w.r.Read()
			if err != nil || f != nil {
				ch <- res{f, err}
				return
			}
		}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			w.t.Fatalf("read: %v", r.err)
		}
		return r.f
	case <-time.After(5 * time.Second):
		w.c.CloseNow() // ends the reader
		<-ch
		w.t.Fatal("no frame within 5s")
		return nil
	}
}

// expect reads the next frame and checks its command and, for a RECEIPT,
// its receipt-id.
func (w *wsClient) expect(cmd string, receiptID ...string) *frame.Frame {
	w.t.Helper()
	f := w.frame()
	if f.Command != cmd || (len(receiptID) > 0 && f.Header.Get(frame.ReceiptId) != receiptID[0]) {
		w.t.Fatalf("want %s %v, got %s %v %q", cmd, receiptID, f.Command, f.Header, f.Body)
	}
	return f
}

// expectClosed expects the server to close the WebSocket normally within
// 5 s, with no frame before.
func (w *wsClient) expectClosed() {
	w.t.Helper()
	done := make(chan error, 1)
	go func() {
		for {
			f, err := w.r.Read()
			if err != nil {
				done <- err
				return
			}
			if f != nil {
				done <- errors.New("frame " + f.Command)
				return
			}
		}
	}()
	select {
	case err := <-done:
		if err != io.EOF {
			w.t.Fatalf("want a normal close, got %v", err)
		}
	case <-time.After(5 * time.Second):
		w.c.CloseNow()
		w.t.Fatal("the server did not close the WebSocket within 5s")
	}
}

const wsConnect = "CONNECT\naccept-version:1.2\nhost:/\nheart-beat:0,0\n\n\x00"

// TestWSGoStompClient: the go-stomp client over a WebSocket (DialWebSocket)
// subscribes, sends with a receipt and receives; the session counts as a
// ws connection; a TCP client shares the queues.
func TestWSGoStompClient(t *testing.T) {
	srv := wsServer(t, nil)
	conn, err := DialWebSocket(context.Background(), wsURL(srv), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if p := conn.(*wsConn).Subprotocol(); p != "v12.stomp" {
		t.Fatalf("subprotocol %q, want v12.stomp", p)
	}
	cl, err := gostomp.Connect(conn, gostomp.ConnOpt.HeartBeat(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	sub, err := cl.Subscribe("/queue/ws", gostomp.AckClientIndividual)
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Send("/queue/ws", "text/plain", []byte("over websocket"), gostomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-sub.C:
		if m.Err != nil || string(m.Body) != "over websocket" {
			t.Fatalf("got %v %q", m.Err, m.Body)
		}
		if err := cl.Ack(m); err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no message over WebSocket")
	}
	if v := peerCounter(t, srv.m.connections.WithLabelValues("ws")); v != 1 {
		t.Fatalf(`brokerd_stomp_connections{transport="ws"} = %v, want 1`, v)
	}
	if v := peerCounter(t, srv.m.connections.WithLabelValues("tcp")); v != 0 {
		t.Fatalf(`brokerd_stomp_connections{transport="tcp"} = %v, want 0`, v)
	}
	// A TCP client sends to the same queue; the WebSocket client gets it.
	tc := tdial(t, srv.Addr().String())
	tc.connect()
	tc.write(tframe(frame.SEND, "from tcp", "destination:/queue/ws", "receipt:r1"))
	tc.receipt("r1")
	select {
	case m := <-sub.C:
		if m.Err != nil || string(m.Body) != "from tcp" {
			t.Fatalf("got %v %q", m.Err, m.Body)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no message from the TCP client")
	}
	if err := cl.Disconnect(); err != nil {
		t.Fatal(err)
	}
}

// TestWSSeveralFramesInOneMessage: CONNECT, SUBSCRIBE, SEND and a
// heart-beat EOL in one text message are all handled, in order.
func TestWSSeveralFramesInOneMessage(t *testing.T) {
	srv := wsServer(t, nil)
	w := wsDial(t, wsURL(srv), nil)
	w.send(websocket.MessageText, wsConnect+"\n"+
		"SUBSCRIBE\nid:0\ndestination:/queue/many\nreceipt:s\n\n\x00\n"+
		"SEND\ndestination:/queue/many\nreceipt:p\n\nhello\x00")
	w.expect(frame.CONNECTED)
	w.expect(frame.RECEIPT, "s")
	// The MESSAGE and the SEND's RECEIPT, in either order.
	var got []string
	for range 2 {
		f := w.frame()
		got = append(got, f.Command)
		if f.Command == frame.MESSAGE && string(f.Body) != "hello" {
			t.Fatalf("body %q", f.Body)
		}
	}
	if !(got[0] == frame.MESSAGE || got[1] == frame.MESSAGE) || !(got[0] == frame.RECEIPT || got[1] == frame.RECEIPT) {
		t.Fatalf("got %v, want a MESSAGE and a RECEIPT", got)
	}
}

// TestWSFrameSplitOverMessages: frames cut at arbitrary points, in
// messages of both types, are put back together.
func TestWSFrameSplitOverMessages(t *testing.T) {
	srv := wsServer(t, nil)
	w := wsDial(t, wsURL(srv), nil)
	w.send(websocket.MessageText, wsConnect[:9])
	w.send(websocket.MessageBinary, wsConnect[9:20])
	w.send(websocket.MessageText, wsConnect[20:])
	w.expect(frame.CONNECTED)
	sub := "SUBSCRIBE\nid:0\ndestination:/queue/split\nreceipt:s\n\n\x00"
	send := "SEND\ndestination:/queue/split\nreceipt:p\n\nsplit body\x00"
	w.send(websocket.MessageText, sub+send[:30])
	w.send(websocket.MessageText, "")
	w.send(websocket.MessageBinary, send[30:])
	w.expect(frame.RECEIPT, "s")
	for seen := 0; seen < 2; seen++ {
		f := w.frame()
		if f.Command == frame.MESSAGE && string(f.Body) != "split body" {
			t.Fatalf("body %q", f.Body)
		}
	}
}

// TestWSBinaryBody: a body with NUL and invalid UTF-8 bytes (sent with
// content-length, in a binary message) reaches a WebSocket subscriber
// intact, in a binary message, and a go-stomp client over DialWebSocket
// too.
func TestWSBinaryBody(t *testing.T) {
	srv := wsServer(t, nil)
	body := "a\x00b\xff\xfe\xc3(\x80z"
	w := wsDial(t, wsURL(srv), nil)
	w.send(websocket.MessageText, wsConnect)
	w.expect(frame.CONNECTED)
	w.send(websocket.MessageText, "SUBSCRIBE\nid:0\ndestination:/queue/bin\nreceipt:s\n\n\x00")
	w.expect(frame.RECEIPT, "s")

	conn, err := DialWebSocket(context.Background(), wsURL(srv), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cl, err := gostomp.Connect(conn, gostomp.ConnOpt.HeartBeat(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Disconnect()
	sub, err := cl.Subscribe("/queue/bin2", gostomp.AckAuto)
	if err != nil {
		t.Fatal(err)
	}

	p := wsDial(t, wsURL(srv), nil)
	p.send(websocket.MessageText, wsConnect)
	p.expect(frame.CONNECTED)
	for _, dest := range []string{"/queue/bin", "/queue/bin2"} {
		p.send(websocket.MessageBinary, "SEND\ndestination:"+dest+"\ncontent-length:"+strconv.Itoa(len(body))+"\nreceipt:"+dest+"\n\n"+body+"\x00")
		p.expect(frame.RECEIPT, dest)
	}

	n := len(w.types)
	f := w.expect(frame.MESSAGE)
	if string(f.Body) != body {
		t.Fatalf("body %q, want %q", f.Body, body)
	}
	if len(w.types) <= n || w.types[len(w.types)-1] != websocket.MessageBinary {
		t.Fatalf("the MESSAGE came in message types %v, want binary last", w.types[n:])
	}
	// The CONNECTED and RECEIPT frames were text.
	if w.types[0] != websocket.MessageText {
		t.Fatalf("CONNECTED came in a %v message, want text", w.types[0])
	}
	select {
	case m := <-sub.C:
		if m.Err != nil || string(m.Body) != body {
			t.Fatalf("go-stomp got %v %q, want %q", m.Err, m.Body, body)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no message for the go-stomp client")
	}
}

// TestWSSubprotocol: the server picks v12.stomp when it is offered, the
// client's only STOMP version otherwise, and serves a client that offers
// none.
func TestWSSubprotocol(t *testing.T) {
	srv := wsServer(t, nil)
	for _, tc := range []struct {
		offer []string
		want  string
	}{
		{[]string{"v10.stomp", "v11.stomp", "v12.stomp"}, "v12.stomp"},
		{[]string{"v11.stomp"}, "v11.stomp"},
		{[]string{"v10.stomp"}, "v10.stomp"},
		{nil, ""},
	} {
		w := wsDial(t, wsURL(srv), &websocket.DialOptions{Subprotocols: tc.offer})
		if w.sub != tc.want {
			t.Errorf("offered %v: got %q, want %q", tc.offer, w.sub, tc.want)
		}
		w.send(websocket.MessageText, wsConnect)
		w.expect(frame.CONNECTED)
	}
}

// TestWSWrongPath: any other path gets 404, as does a WebSocket
// handshake on one.
func TestWSWrongPath(t *testing.T) {
	srv := wsServer(t, nil)
	for _, path := range []string{"/", "/ws/", "/stomp", "/wsx"} {
		resp, err := http.Get("http://" + srv.WSAddr().String() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s: %d, want 404", path, resp.StatusCode)
		}
	}
	_, resp, err := wsTryDial("ws://"+srv.WSAddr().String()+"/stomp", nil)
	if err == nil || resp == nil || resp.StatusCode != http.StatusNotFound {
		t.Fatalf("handshake on /stomp: %v %v, want 404", resp, err)
	}
	// A plain GET on /ws is not a handshake.
	resp, err = http.Get("http://" + srv.WSAddr().String() + WSPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("GET /ws: %d, want 426", resp.StatusCode)
	}
}

// TestWSOrigin: a page from a foreign origin is refused with 403 (and
// counted); an allowed pattern, the listener's own host and no Origin
// (not a browser) are served.
func TestWSOrigin(t *testing.T) {
	srv := wsServer(t, func(c *Config) { c.WSAllowedOrigins = []string{"*.example.com", "app.example.org:8443"} })
	dial := func(origin string) (int, error) {
		h := http.Header{}
		if origin != "" {
			h.Set("Origin", origin)
		}
		wc, resp, err := wsTryDial(wsURL(srv), &websocket.DialOptions{HTTPHeader: h, Subprotocols: []string{"v12.stomp"}})
		if err != nil {
			if resp != nil {
				return resp.StatusCode, err
			}
			return 0, err
		}
		defer wc.CloseNow()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := wc.Write(ctx, websocket.MessageText, []byte(wsConnect)); err != nil {
			return 0, err
		}
		_, b, err := wc.Read(ctx)
		if err != nil {
			return 0, err
		}
		if !strings.HasPrefix(string(b), "CONNECTED\n") {
			return 0, errors.New("got " + string(b))
		}
		return http.StatusSwitchingProtocols, nil
	}
	for _, tc := range []struct {
		origin string
		want   int
	}{
		{"", http.StatusSwitchingProtocols},
		{"https://app.example.com", http.StatusSwitchingProtocols},
		{"http://deep.sub.example.com", http.StatusSwitchingProtocols}, // path.Match: * spans dots
		{"https://example.com", http.StatusForbidden},
		{"https://app.example.org:8443", http.StatusSwitchingProtocols},
		{"https://app.example.org", http.StatusForbidden},
		{"http://" + srv.WSAddr().String(), http.StatusSwitchingProtocols},
		{"https://evil.example.net", http.StatusForbidden},
		{"null", http.StatusForbidden},
	} {
		got, err := dial(tc.origin)
		if got != tc.want {
			t.Errorf("Origin %q: %d (%v), want %d", tc.origin, got, err, tc.want)
		}
	}
	if v := peerCounter(t, srv.m.refused.WithLabelValues("origin")); v != 4 {
		t.Errorf(`refused{reason="origin"} = %v, want 4`, v)
	}
}

// TestWSMalformedFrame: a malformed frame gets an ERROR, then the server
// closes the WebSocket.
func TestWSMalformedFrame(t *testing.T) {
	srv := wsServer(t, nil)
	w := wsDial(t, wsURL(srv), nil)
	w.send(websocket.MessageText, wsConnect)
	w.expect(frame.CONNECTED)
	w.send(websocket.MessageText, "BOGUS\n\n\x00")
	f := w.expect(frame.ERROR)
	if !strings.Contains(f.Header.Get(frame.Message), "unknown command") {
		t.Fatalf("ERROR message %q", f.Header.Get(frame.Message))
	}
	w.expectClosed()
}

// TestWSLogin: with an Authenticator, a wrong passcode gets ERROR "access
// refused" and a right one CONNECTED, over WebSocket as over TCP.
func TestWSLogin(t *testing.T) {
	srv := wsServer(t, func(c *Config) { c.Auth = withUsers(t) })
	w := wsDial(t, wsURL(srv), nil)
	w.send(websocket.MessageText, "CONNECT\naccept-version:1.2\nhost:/\nlogin:alice\npasscode:wrong\n\n\x00")
	if f := w.expect(frame.ERROR); f.Header.Get(frame.Message) != "access refused" {
		t.Fatalf("ERROR %v", f.Header)
	}
	w.expectClosed()
	w = wsDial(t, wsURL(srv), nil)
	w.send(websocket.MessageText, "CONNECT\naccept-version:1.2\nhost:/\n\n\x00")
	w.expect(frame.ERROR)
	w = wsDial(t, wsURL(srv), nil)
	w.send(websocket.MessageText, "CONNECT\naccept-version:1.2\nhost:/\nlogin:alice\npasscode:secret\n\n\x00")
	w.expect(frame.CONNECTED)
}

// TestWSMaxConnectionsPerIP: WebSocket connections count against the
// per-address cap with TCP ones, from their TCP accept on (before any
// HTTP); one over the cap gets 503, and a closed one frees its slot.
func TestWSMaxConnectionsPerIP(t *testing.T) {
	srv := wsServer(t, func(c *Config) { c.MaxConnectionsPerIP = 2 })
	tc := tdial(t, srv.Addr().String())
	tc.connect()
	// A TCP connection to the WebSocket port that has sent nothing yet.
	idle, err := net.Dial("tcp", srv.WSAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	// The plain STOMP port is full now (once the server has accepted the
	// idle connection).
	waitRefused := func() {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			c := tdial(t, srv.Addr().String())
			c.write(wsConnect)
			f := c.read()
			c.c.Close()
			if f.Command == frame.ERROR && f.Header.Get(frame.Message) == "too many connections" {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("TCP client not refused: %s %v", f.Command, f.Header)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitRefused()
	// So is the WebSocket port.
	_, resp, err := wsTryDial(wsURL(srv), nil)
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("third connection: %v %v, want 503", resp, err)
	}
	// Closing the idle connection frees its slot for a WebSocket session,
	// which then holds it.
	idle.Close()
	var w *wsClient
	deadline := time.Now().Add(5 * time.Second)
	for {
		wc, _, err := wsTryDial(wsURL(srv), nil)
		if err == nil {
			wc.SetReadLimit(-1)
			t.Cleanup(func() { wc.CloseNow() })
			w = &wsClient{t: t, c: wc}
			w.r = frame.NewReader(bufio.NewReader(wsMessages{w}))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the slot of the closed connection was not freed: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	w.send(websocket.MessageText, wsConnect)
	w.expect(frame.CONNECTED)
	waitRefused()
	if v := peerCounter(t, srv.m.refused.WithLabelValues("max_connections_per_ip")); v < 2 {
		t.Fatalf("refused{max_connections_per_ip} = %v", v)
	}
}

// TestWSMaxConnections: MaxConnections counts WebSocket connections.
func TestWSMaxConnections(t *testing.T) {
	srv := wsServer(t, func(c *Config) { c.MaxConnections = 1 })
	w := wsDial(t, wsURL(srv), nil)
	w.send(websocket.MessageText, wsConnect)
	w.expect(frame.CONNECTED)
	c := tdial(t, srv.Addr().String())
	c.expectError("too many connections")
	_, resp, err := wsTryDial(wsURL(srv), nil)
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("second connection: %v %v, want 503", resp, err)
	}
}

// TestWSHeartbeats: the server sends heart-beats (a "\n" message) as
// often as the client asks; "\n" messages from the client keep the
// connection alive; a client that goes silent gets ERROR "heart-beat
// timeout" (a read deadline leaves the WebSocket writable), then the close.
func TestWSHeartbeats(t *testing.T) {
	srv := wsServer(t, func(c *Config) { c.HeartbeatMin = 100 * time.Millisecond })
	w := wsDial(t, wsURL(srv), nil)
	w.send(websocket.MessageText, "CONNECT\naccept-version:1.2\nhost:/\nheart-beat:200,200\n\n\x00")
	// Whole messages here (w.frame reads them later, from the next one on).
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	if _, b, err := w.c.Read(ctx); err != nil || !strings.HasPrefix(string(b), "CONNECTED\n") || !strings.Contains(string(b), "\nheart-beat:200,200\n") {
		t.Fatalf("want CONNECTED with heart-beat:200,200, got %q %v", b, err)
	}
	// Server heart-beats: at least 4 "\n" messages in 1.5 s.
	n := 0
	for n < 4 {
		typ, b, err := w.c.Read(ctx)
		if err != nil {
			t.Fatalf("%d heart-beats, want 4: %v", n, err)
		}
		if typ != websocket.MessageText || string(b) != "\n" {
			t.Fatalf("got %v %q, want a text heart-beat", typ, b)
		}
		n++
	}
	// Client heart-beats for 2 s, longer than the 1.4 s read timeout.
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); {
		w.send(websocket.MessageText, "\n")
		time.Sleep(150 * time.Millisecond)
	}
	w.send(websocket.MessageText, "SEND\ndestination:/queue/hb\nreceipt:alive\n\nx\x00")
	w.expect(frame.RECEIPT, "alive")
	// Silence: ERROR, then the close.
	f := w.expect(frame.ERROR)
	if f.Header.Get(frame.Message) != "heart-beat timeout" {
		t.Fatalf("ERROR %v", f.Header)
	}
	w.expectClosed()
}

// TestWSShutdown: Shutdown sends a WebSocket client the shutdown ERROR,
// closes it, and returns.
func TestWSShutdown(t *testing.T) {
	srv := wsServer(t, nil)
	w := wsDial(t, wsURL(srv), nil)
	w.send(websocket.MessageText, wsConnect)
	w.expect(frame.CONNECTED)
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- srv.Shutdown(ctx)
	}()
	if f := w.expect(frame.ERROR); f.Header.Get(frame.Message) != "server shutting down" {
		t.Fatalf("ERROR %v", f.Header)
	}
	w.expectClosed()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return")
	}
	if _, err := net.Dial("tcp", srv.WSAddr().String()); err == nil {
		t.Fatal("the WebSocket listener still accepts after Shutdown")
	}
}

// TestWSSX509Login: over wss, a client certificate the CA signed logs in
// as its CN with X509Login; the session counts as wss.
func TestWSSX509Login(t *testing.T) {
	ca := tlstest.NewCA(t, t.TempDir(), "ca")
	srv := tlsServer(t, ca, tls.VerifyClientCertIfGiven, func(c *Config) {
		c.TLSAddr = ""
		c.WSSAddr = "127.0.0.1:0"
		c.Auth = withUsers(t)
		c.X509Login = true
	})
	url := "wss://" + srv.WSSAddr().String() + WSPath
	cert := ca.Issue(t, "carol", nil).TLS(t)
	conn, err := DialWebSocket(context.Background(), url, tlsClientConfig(ca, &cert), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if conn.(*wsConn).ConnectionState().Version < tls.VersionTLS12 {
		t.Fatal("not over TLS 1.2+")
	}
	cl, err := gostomp.Connect(conn, gostomp.ConnOpt.HeartBeat(0, 0))
	if err != nil {
		t.Fatalf("x509 login over wss: %v", err)
	}
	if err := cl.Send("/queue/wss", "text/plain", []byte("x"), gostomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	if v := peerCounter(t, srv.m.connections.WithLabelValues("wss")); v != 1 {
		t.Fatalf(`brokerd_stomp_connections{transport="wss"} = %v, want 1`, v)
	}
	_ = cl.Disconnect()

	// Without a certificate, the passcode is checked.
	conn2, err := DialWebSocket(context.Background(), url, tlsClientConfig(ca, nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close()
	if _, err := gostomp.Connect(conn2, gostomp.ConnOpt.HeartBeat(0, 0)); err == nil {
		t.Fatal("logged in over wss without a certificate or passcode")
	}
}

// TestWSFrameTooLarge: a frame over the frame-size limit in one message
// gets ERROR "frame too large", then the WebSocket closes (the message's
// rest is over the WebSocket read limit, the same size: status 1009).
func TestWSFrameTooLarge(t *testing.T) {
	srv := wsServer(t, func(c *Config) {
		c.Limits = DefaultLimits()
		c.Limits.MaxFrameSize = 4096
	})
	w := wsDial(t, wsURL(srv), nil)
	w.send(websocket.MessageText, wsConnect)
	w.expect(frame.CONNECTED)
	w.send(websocket.MessageText, "SEND\ndestination:/queue/big\n\n"+strings.Repeat("x", 8000)+"\x00")
	if f := w.expect(frame.ERROR); f.Header.Get(frame.Message) != "frame too large" {
		t.Fatalf("ERROR %v", f.Header)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		_, _, err := w.c.Read(ctx)
		if err == nil {
			continue
		}
		if s := websocket.CloseStatus(err); s != websocket.StatusNormalClosure && s != websocket.StatusMessageTooBig {
			t.Fatalf("want the WebSocket closed (1000 or 1009), got %v", err)
		}
		return
	}
}
