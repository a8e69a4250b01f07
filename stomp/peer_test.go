package stomp

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-stomp/stomp/v3/frame"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// peerNoLeaks fails the test if, once every later cleanup has run (servers
// and clients closed), more goroutines are left than when it began.
func peerNoLeaks(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(2 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= before {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("%d goroutines left, %d before the test:\n%s", n, before, buf)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
}

// peerWaitFor polls cond until it holds or 2 s pass, then reports what.
func peerWaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func peerDiscardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// peerCounter reads a counter or gauge.
func peerCounter(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	if m.Counter != nil {
		return m.Counter.GetValue()
	}
	return m.Gauge.GetValue()
}

// peerHold is a handler that records every request and answers them only
// when told: ops "hold" wait for the test, every other op gets PeerOK
// with x-op echoed and the body.
type peerHold struct {
	mu      sync.Mutex
	frames  []*frame.Frame
	peers   []string
	replies []func(*frame.Frame)
	arrived chan struct{} // one token per request
}

func newPeerHold() *peerHold { return &peerHold{arrived: make(chan struct{}, 4096)} }

func (h *peerHold) HandlePeer(peer string, f *frame.Frame, reply func(*frame.Frame)) {
	h.mu.Lock()
	h.frames = append(h.frames, f)
	h.peers = append(h.peers, peer)
	h.replies = append(h.replies, reply)
	h.mu.Unlock()
	h.arrived <- struct{}{}
	if f.Header.Get(PeerHeaderOp) != "hold" {
		r := PeerOK("x-echo", f.Header.Get(PeerHeaderOp))
		r.Body = f.Body
		reply(r)
	}
}

func (h *peerHold) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.frames)
}

func (h *peerHold) ops() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var ops []string
	for _, f := range h.frames {
		ops = append(ops, f.Header.Get(PeerHeaderOp))
	}
	return ops
}

func (h *peerHold) reply(i int) func(*frame.Frame) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.replies[i]
}

// wait waits for n more requests.
func (h *peerHold) wait(t *testing.T, n int) {
	t.Helper()
	timeout := time.After(2 * time.Second)
	for i := 0; i < n; i++ {
		select {
		case <-h.arrived:
		case <-timeout:
			t.Fatalf("handler got %d of %d requests", i, n)
		}
	}
}

func peerServerConfig(mutate func(*PeerServerConfig)) PeerServerConfig {
	cfg := DefaultPeerServerConfig()
	cfg.Addr = "127.0.0.1:0"
	cfg.NodeID = "node-s"
	cfg.Logger = peerDiscardLogger()
	cfg.Registerer = prometheus.NewRegistry()
	if mutate != nil {
		mutate(&cfg)
	}
	return cfg
}

func startPeerServer(t *testing.T, h PeerHandler, mutate func(*PeerServerConfig)) *PeerServer {
	t.Helper()
	s := NewPeerServer(peerServerConfig(mutate), h)
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func startPeerClient(t *testing.T, addr string, mutate func(*PeerClientConfig)) *PeerClient {
	t.Helper()
	cfg := DefaultPeerClientConfig()
	cfg.Addr = addr
	cfg.NodeID = "node-c"
	cfg.Logger = peerDiscardLogger()
	cfg.Registerer = prometheus.NewRegistry()
	if mutate != nil {
		mutate(&cfg)
	}
	c := NewPeerClient(cfg)
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// peerResult is what a done callback got.
type peerResult struct {
	f   *frame.Frame
	err error
}

// request sends op and returns a channel that receives its answer.
func peerRequest(t *testing.T, c *PeerClient, op string, body []byte, headers ...string) <-chan peerResult {
	t.Helper()
	ch := make(chan peerResult, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := c.Request(ctx, op, headers, body, func(f *frame.Frame, err error) { ch <- peerResult{f, err} }); err != nil {
		t.Fatalf("Request %s: %v", op, err)
	}
	return ch
}

func peerAwait(t *testing.T, ch <-chan peerResult) peerResult {
	t.Helper()
	select {
	case r := <-ch:
		select {
		case r2 := <-ch:
			t.Fatalf("done called twice: %v then %v", r, r2)
		default:
		}
		return r
	case <-time.After(2 * time.Second):
		t.Fatal("no answer within 2 s")
	}
	return peerResult{}
}

// peerMustOK waits for a successful answer echoing op.
func peerMustOK(t *testing.T, ch <-chan peerResult, op string) *frame.Frame {
	t.Helper()
	r := peerAwait(t, ch)
	if r.err != nil {
		t.Fatalf("%s: %v", op, r.err)
	}
	if r.f.Command != frame.RECEIPT || r.f.Header.Get("x-echo") != op {
		t.Fatalf("%s: answer %s x-echo=%q", op, r.f.Command, r.f.Header.Get("x-echo"))
	}
	return r.f
}

// countingConn counts the writes made to a connection and records the
// bytes; the write number gateAt waits for gate.
type countingConn struct {
	net.Conn
	mu     sync.Mutex
	writes int
	wire   bytes.Buffer
	gateAt int
	gate   chan struct{}
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.writes++
	n := c.writes
	c.wire.Write(p)
	c.mu.Unlock()
	if n == c.gateAt {
		<-c.gate
	}
	return c.Conn.Write(p)
}

func (c *countingConn) stats() (int, []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.writes, bytes.Clone(c.wire.Bytes())
}

// TestPeerPipelinedOutOfOrder: many requests are outstanding at once,
// travel in few writes, and each done gets its own answer although the
// handler answers them in reverse order, some with a failure.
func TestPeerPipelinedOutOfOrder(t *testing.T) {
	peerNoLeaks(t)
	const n = 500
	var mu sync.Mutex
	var held []func()
	h := PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		if peer != "node-c" {
			t.Errorf("handler sees peer %q", peer)
		}
		i, _ := strconv.Atoi(f.Header.Get("x-i"))
		body := f.Body
		mu.Lock()
		held = append(held, func() {
			if i%7 == 0 {
				reply(PeerFail("odd-one", "refused "+strconv.Itoa(i)))
				return
			}
			r := PeerOK("x-i", strconv.Itoa(i), "x-op-was", f.Header.Get(PeerHeaderOp))
			r.Body = append([]byte("re:"), body...)
			reply(r)
		})
		all := len(held) == n
		mu.Unlock()
		if all {
			go func() {
				for j := n - 1; j >= 0; j-- {
					held[j]()
				}
			}()
		}
	})
	s := startPeerServer(t, h, func(c *PeerServerConfig) { c.MaxInFlight = n })
	gate := make(chan struct{})
	var conns []*countingConn
	var connsMu sync.Mutex
	c := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
		c.MaxInFlight = n
		c.Dial = func(ctx context.Context, addr string) (net.Conn, error) {
			nc, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			if err != nil {
				return nil, err
			}
			// Write 1 is CONNECT; write 2 (the first request) waits
			// until every request is queued.
			cc := &countingConn{Conn: nc, gateAt: 2, gate: gate}
			connsMu.Lock()
			conns = append(conns, cc)
			connsMu.Unlock()
			return cc, nil
		}
	})
	results := make([]<-chan peerResult, n)
	for i := 0; i < n; i++ {
		results[i] = peerRequest(t, c, "put", []byte("body-"+strconv.Itoa(i)), "x-i", strconv.Itoa(i))
	}
	close(gate)
	for i := 0; i < n; i++ {
		r := peerAwait(t, results[i])
		if i%7 == 0 {
			var pe *PeerError
			if !errors.As(r.err, &pe) || pe.Code != "odd-one" || pe.Message != "refused "+strconv.Itoa(i) {
				t.Fatalf("request %d: got %v, want PeerError odd-one", i, r.err)
			}
			continue
		}
		if r.err != nil {
			t.Fatalf("request %d: %v", i, r.err)
		}
		if got := r.f.Header.Get("x-i"); got != strconv.Itoa(i) {
			t.Fatalf("request %d got the answer of %s", i, got)
		}
		if string(r.f.Body) != "re:body-"+strconv.Itoa(i) || r.f.Header.Get("x-op-was") != "put" {
			t.Fatalf("request %d: body %q x-op-was %q", i, r.f.Body, r.f.Header.Get("x-op-was"))
		}
	}
	connsMu.Lock()
	if len(conns) != 1 {
		t.Fatalf("%d connections, want 1", len(conns))
	}
	writes, _ := conns[0].stats()
	connsMu.Unlock()
	// About 30 KB of requests: a handful of 8 KiB writes, not one per
	// request.
	if writes > 20 {
		t.Fatalf("%d requests took %d writes", n, writes)
	}
	if v := peerCounter(t, c.m.reconnects); v != 0 {
		t.Fatalf("%v reconnects", v)
	}
}

// TestPeerAuth: a client proving the cluster secret is served; a client
// with another secret, or none, is refused and its requests never reach
// the handler; a client with a secret refuses a server that cannot prove
// it; the secret never crosses the wire.
func TestPeerAuth(t *testing.T) {
	peerNoLeaks(t)
	secret := []byte("correct horse battery staple")
	h := newPeerHold()
	s := startPeerServer(t, h, func(c *PeerServerConfig) { c.Secret = secret })
	open := startPeerServer(t, h, nil) // no secret

	t.Run("right secret", func(t *testing.T) {
		var cc *countingConn
		c := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
			c.Secret = secret
			c.Dial = func(ctx context.Context, addr string) (net.Conn, error) {
				nc, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
				if err != nil {
					return nil, err
				}
				cc = &countingConn{Conn: nc}
				return cc, nil
			}
		})
		peerMustOK(t, peerRequest(t, c, "ping", nil), "ping")
		_, wire := cc.stats()
		if !bytes.Contains(wire, []byte("x-auth:")) {
			t.Fatalf("no proof sent: %q", wire)
		}
		if bytes.Contains(wire, secret) || bytes.Contains(wire, []byte(fmt.Sprintf("%x", secret))) {
			t.Fatal("the secret crossed the wire")
		}
	})

	refused := func(t *testing.T, addr string, secret []byte) error {
		t.Helper()
		states := make(chan error, 16)
		c := startPeerClient(t, addr, func(c *PeerClientConfig) {
			c.Secret = secret
			c.OnState = func(up bool, err error) {
				if up {
					err = errors.New("link came up")
				}
				select {
				case states <- err:
				default:
				}
			}
		})
		var err error
		select {
		case err = <-states:
		case <-time.After(2 * time.Second):
			t.Fatal("no state change within 2 s")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		rerr := c.Request(ctx, "ping", nil, nil, func(*frame.Frame, error) { t.Error("done called for a request never sent") })
		if !errors.Is(rerr, context.DeadlineExceeded) {
			t.Fatalf("Request on a refused link: %v, want deadline exceeded", rerr)
		}
		return err
	}
	before := h.count()
	t.Run("wrong secret", func(t *testing.T) {
		if err := refused(t, s.Addr().String(), []byte("wrong")); !errors.Is(err, ErrPeerAuth) {
			t.Fatalf("got %v, want ErrPeerAuth", err)
		}
		if v := peerCounter(t, s.m.dropped.WithLabelValues(peerCodeAuth)); v < 1 {
			t.Fatalf("auth refusals counted: %v", v)
		}
	})
	t.Run("no secret", func(t *testing.T) {
		if err := refused(t, s.Addr().String(), nil); !errors.Is(err, ErrPeerAuth) {
			t.Fatalf("got %v, want ErrPeerAuth", err)
		}
	})
	t.Run("server without the secret", func(t *testing.T) {
		if err := refused(t, open.Addr().String(), secret); !errors.Is(err, ErrPeerAuth) {
			t.Fatalf("got %v, want ErrPeerAuth", err)
		}
	})
	if got := h.count(); got != before {
		t.Fatalf("refused clients reached the handler: %d requests", got-before)
	}
}

// peerRaw is a hand-driven peer connection.
type peerRaw struct {
	t *testing.T
	c net.Conn
	r *frameReader
}

func peerRawConn(t *testing.T, addr string) *peerRaw {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &peerRaw{t: t, c: c, r: newFrameReader(c, DefaultPeerLimits())}
}

// peerRawDial connects and completes a handshake (no secret) as nodeID.
func peerRawDial(t *testing.T, addr, nodeID, heartbeat string) *peerRaw {
	t.Helper()
	p := peerRawConn(t, addr)
	p.write("CONNECT\naccept-version:1.2\nhost:c\nx-node-id:" + nodeID + "\nheart-beat:" + heartbeat + "\n\n\x00")
	if f := p.read(); f.Command != frame.CONNECTED {
		t.Fatalf("handshake answered %s %v: %q", f.Command, f.Header, f.Body)
	}
	return p
}

func (p *peerRaw) write(s string) {
	p.t.Helper()
	_ = p.c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(p.c, s); err != nil {
		p.t.Fatalf("write: %v", err)
	}
}

// read returns the next frame within 2 s, skipping heart-beats.
func (p *peerRaw) read() *frame.Frame {
	p.t.Helper()
	_ = p.c.SetReadDeadline(time.Now().Add(2 * time.Second))
	for {
		f, err := p.r.ReadFrame(peerVersion)
		if err != nil {
			p.t.Fatalf("read: %v", err)
		}
		if f != nil {
			return f
		}
	}
}

// untilClosed reads frames until the server closes (within 2 s).
func (p *peerRaw) untilClosed() []*frame.Frame {
	p.t.Helper()
	_ = p.c.SetReadDeadline(time.Now().Add(2 * time.Second))
	var fs []*frame.Frame
	for {
		f, err := p.r.ReadFrame(peerVersion)
		if err != nil {
			if peerIsTimeout(err) {
				p.t.Fatalf("connection still open after 2 s; frames %v", fs)
			}
			return fs
		}
		if f != nil {
			fs = append(fs, f)
		}
	}
}

// syncBuffer is a log sink safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// records returns the JSON log records whose msg is msg.
func (b *syncBuffer) records(msg string) []map[string]any {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(b.b.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// TestPeerServerProtocolErrors: after the handshake, anything but a SEND
// with a fresh receipt and an x-op gets an ERROR without receipt-id, the
// connection closes, the drop is logged with the peer's node ID and
// address and counted, and the handler sees nothing after the bad frame
// (the valid request sent right after it never arrives).
func TestPeerServerProtocolErrors(t *testing.T) {
	peerNoLeaks(t)
	logs := &syncBuffer{}
	h := newPeerHold()
	s := startPeerServer(t, h, func(c *PeerServerConfig) {
		c.Limits = Limits{MaxBodySize: 1024, MaxFrameSize: 4096, MaxHeaderCount: 16, MaxHeaderLineLen: 512}
		c.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	})
	const sentinel = "SEND\nreceipt:sentinel\nx-op:sentinel\n\n\x00"
	tests := []struct {
		name   string
		before string // valid frames first
		bad    string
		code   string
		ops    []string // what the handler must have seen
	}{
		{"garbage", "", "HELLO\n\n\x00", peerCodeMalformed, nil},
		{"binary", "SEND\nreceipt:1\nx-op:a\n\n\x00", "\x01\x02\x03\xff\n\n\x00", peerCodeMalformed, []string{"a"}},
		{"subscribe", "", "SUBSCRIBE\nid:1\ndestination:/queue/a\n\n\x00", peerCodeProtocol, nil},
		{"connect again", "", "CONNECT\naccept-version:1.2\n\n\x00", peerCodeProtocol, nil},
		{"missing receipt", "", "SEND\nx-op:a\n\n\x00", peerCodeProtocol, nil},
		{"missing x-op", "", "SEND\nreceipt:1\n\n\x00", peerCodeProtocol, nil},
		{"empty x-op", "", "SEND\nreceipt:1\nx-op:\n\n\x00", peerCodeProtocol, nil},
		{"duplicate receipt in flight", "SEND\nreceipt:1\nx-op:hold\n\n\x00", "SEND\nreceipt:1\nx-op:a\n\n\x00", peerCodeProtocol, []string{"hold"}},
		{"body over the limit", "", "SEND\nreceipt:1\nx-op:a\ncontent-length:2000\n\n" + strings.Repeat("x", 2000) + "\x00", peerCodeMalformed, nil},
		{"body over the limit, no length", "", "SEND\nreceipt:1\nx-op:a\n\n" + strings.Repeat("x", 2000) + "\x00", peerCodeMalformed, nil},
		{"header line too long", "", "SEND\nreceipt:1\nx-op:" + strings.Repeat("a", 600) + "\n\n\x00", peerCodeMalformed, nil},
		{"bad escape", "", "SEND\nreceipt:1\nx-op:a\nx:\\t\n\n\x00", peerCodeMalformed, nil},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nodeID := "raw-" + strconv.Itoa(i)
			start := h.count()
			dropped := peerCounter(t, s.m.dropped.WithLabelValues(tc.code))
			p := peerRawDial(t, s.Addr().String(), nodeID, "1000,0")
			if tc.before != "" {
				p.write(tc.before)
				h.wait(t, len(tc.ops))
			}
			p.write(tc.bad + sentinel)
			fs := p.untilClosed()
			var errs []*frame.Frame
			for _, f := range fs {
				switch {
				case f.Command == frame.ERROR:
					errs = append(errs, f)
				case f.Header.Get(frame.ReceiptId) == "sentinel":
					t.Fatalf("the request after the bad frame was answered")
				}
			}
			if len(errs) != 1 {
				t.Fatalf("got %d ERROR frames, want 1: %v", len(errs), fs)
			}
			e := errs[0]
			if _, ok := e.Header.Contains(frame.ReceiptId); ok {
				t.Fatalf("protocol ERROR carries receipt-id: %v", e.Header)
			}
			if got := e.Header.Get(PeerHeaderCode); got != tc.code {
				t.Fatalf("x-code %q, want %q (message %q, body %q)", got, tc.code, e.Header.Get(frame.Message), e.Body)
			}
			if got := h.ops()[start:]; strings.Join(got, ",") != strings.Join(tc.ops, ",") {
				t.Fatalf("handler saw %v, want %v", got, tc.ops)
			}
			if v := peerCounter(t, s.m.dropped.WithLabelValues(tc.code)); v != dropped+1 {
				t.Fatalf("dropped{%s} went from %v to %v", tc.code, dropped, v)
			}
			found := false
			for _, r := range logs.records("peer link dropped") {
				if r["peer"] == nodeID && r["reason"] == tc.code && r["remote"] == p.c.LocalAddr().String() {
					found = true
				}
			}
			if !found {
				t.Fatalf("no log record naming peer %s and its address", nodeID)
			}
		})
	}
	// Answers to requests of a closed connection are dropped safely.
	for i := range h.count() {
		if h.ops()[i] == "hold" {
			h.reply(i)(PeerOK())
		}
	}
}

// TestPeerServerHandshakeRefused: a bad handshake gets an ERROR and the
// connection closes without reaching the handler.
func TestPeerServerHandshakeRefused(t *testing.T) {
	peerNoLeaks(t)
	h := newPeerHold()
	s := startPeerServer(t, h, nil)
	tests := []struct{ name, connect, code string }{
		{"not connect", "SEND\nreceipt:1\nx-op:a\n\n\x00", peerCodeHandshake},
		{"old version", "CONNECT\naccept-version:1.0,1.1\nx-node-id:a\nheart-beat:1000,1000\n\n\x00", peerCodeHandshake},
		{"no node id", "CONNECT\naccept-version:1.2\nheart-beat:1000,1000\n\n\x00", peerCodeHandshake},
		{"no heart-beats", "CONNECT\naccept-version:1.2\nx-node-id:a\nheart-beat:0,1000\n\n\x00", peerCodeHeartbeat},
		{"garbage", "\x00\x01garbage\n\n\x00", peerCodeMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := peerRawConn(t, s.Addr().String())
			p.write(tc.connect)
			fs := p.untilClosed()
			if len(fs) != 1 || fs[0].Command != frame.ERROR || fs[0].Header.Get(PeerHeaderCode) != tc.code {
				t.Fatalf("got %v, want one ERROR with x-code %s", fs, tc.code)
			}
		})
	}
	if h.count() != 0 {
		t.Fatalf("handler called %d times", h.count())
	}
}

// TestPeerServerRestart: requests pending when the server goes away fail
// with ErrPeerUnknownOutcome; the client reconnects by itself to the new
// server on the same address and new requests succeed; the old server's
// late replies are dropped safely.
func TestPeerServerRestart(t *testing.T) {
	peerNoLeaks(t)
	h1 := newPeerHold()
	s1 := startPeerServer(t, h1, nil)
	addr := s1.Addr().String()
	c := startPeerClient(t, addr, nil)
	peerMustOK(t, peerRequest(t, c, "warm", nil), "warm")
	h1.wait(t, 1)
	var pending []<-chan peerResult
	for range 3 {
		pending = append(pending, peerRequest(t, c, "hold", nil))
	}
	h1.wait(t, 3)
	s1.Close()
	for i, ch := range pending {
		r := peerAwait(t, ch)
		if !errors.Is(r.err, ErrPeerUnknownOutcome) {
			t.Fatalf("pending request %d: %v, want ErrPeerUnknownOutcome", i, r.err)
		}
	}
	// The old handler answers after its connection died.
	for i := 1; i <= 3; i++ {
		h1.reply(i)(PeerOK())
	}
	h2 := newPeerHold()
	startPeerServer(t, h2, func(cfg *PeerServerConfig) { cfg.Addr = addr })
	peerMustOK(t, peerRequest(t, c, "after", []byte("x")), "after")
	if v := peerCounter(t, c.m.reconnects); v != 1 {
		t.Fatalf("%v reconnects, want 1", v)
	}
}

// peerFreeAddr returns a loopback address nothing listens on.
func peerFreeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// TestPeerConnectionRefusedThenUp: while nothing listens, the client
// reports connection refused (the fast-failure hint) and a Request waits;
// once a server listens on the address, the client connects by itself
// and the waiting request completes.
func TestPeerConnectionRefusedThenUp(t *testing.T) {
	peerNoLeaks(t)
	addr := peerFreeAddr(t)
	type state struct {
		up  bool
		err error
	}
	states := make(chan state, 64)
	c := startPeerClient(t, addr, func(c *PeerClientConfig) {
		c.OnState = func(up bool, err error) {
			select {
			case states <- state{up, err}:
			default:
			}
		}
	})
	select {
	case st := <-states:
		if st.up || !errors.Is(st.err, syscall.ECONNREFUSED) {
			t.Fatalf("first state %v %v, want down with ECONNREFUSED", st.up, st.err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("no state within 2 s")
	}
	if c.Connected() {
		t.Fatal("connected with nothing listening")
	}
	ready := c.Ready()
	answer := make(chan peerResult, 1)
	queued := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		queued <- c.Request(ctx, "late", nil, nil, func(f *frame.Frame, err error) { answer <- peerResult{f, err} })
	}()
	h := newPeerHold()
	startPeerServer(t, h, func(cfg *PeerServerConfig) { cfg.Addr = addr })
	if err := <-queued; err != nil {
		t.Fatalf("Request while down: %v", err)
	}
	peerMustOK(t, answer, "late")
	select {
	case <-ready:
	default:
		t.Fatal("Ready's channel not closed while the link is up")
	}
	for {
		select {
		case st := <-states:
			if st.up {
				return
			}
		default:
			t.Fatal("OnState never reported the link up")
		}
	}
}

// TestPeerClientFollowsAddrFunc: when the peer moves, the client dials the
// address AddrFunc gives it now.
func TestPeerClientFollowsAddrFunc(t *testing.T) {
	peerNoLeaks(t)
	hA, hB := newPeerHold(), newPeerHold()
	a := startPeerServer(t, hA, func(c *PeerServerConfig) { c.NodeID = "node-p" })
	b := startPeerServer(t, hB, func(c *PeerServerConfig) { c.NodeID = "node-p" })
	var where atomic.Value
	where.Store(a.Addr().String())
	downs := make(chan error, 16)
	c := startPeerClient(t, "", func(c *PeerClientConfig) {
		c.AddrFunc = func() string { return where.Load().(string) }
		c.PeerNodeID = "node-p"
		c.OnState = func(up bool, err error) {
			if !up {
				downs <- err
			}
		}
	})
	peerMustOK(t, peerRequest(t, c, "one", nil), "one")
	where.Store(b.Addr().String())
	a.Close()
	// A request queued before the client sees the close would have an
	// unknown outcome: wait for the link to go down first.
	select {
	case <-downs:
	case <-time.After(2 * time.Second):
		t.Fatal("the link did not go down")
	}
	peerMustOK(t, peerRequest(t, c, "two", nil), "two")
	if hA.count() != 1 || hB.count() != 1 {
		t.Fatalf("server A got %d, B got %d requests; want 1 and 1", hA.count(), hB.count())
	}
}

// TestPeerClientWrongNode: a server with another node ID than expected is
// not taken for the peer.
func TestPeerClientWrongNode(t *testing.T) {
	peerNoLeaks(t)
	s := startPeerServer(t, newPeerHold(), func(c *PeerServerConfig) { c.NodeID = "impostor" })
	errs := make(chan error, 8)
	startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
		c.PeerNodeID = "node-p"
		c.OnState = func(up bool, err error) {
			select {
			case errs <- err:
			default:
			}
		}
	})
	select {
	case err := <-errs:
		if !errors.Is(err, ErrPeerHandshake) {
			t.Fatalf("got %v, want ErrPeerHandshake", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("no state within 2 s")
	}
}

// silentPeerServer accepts connections, completes the handshake with the
// given heart-beat header, then reads everything and never writes, as a
// stopped process or a partition would look.
func silentPeerServer(t *testing.T, heartbeat string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := newFrameReader(c, DefaultPeerLimits())
				var f *frame.Frame
				for f == nil {
					if f, err = r.ReadFrame("1.0"); err != nil {
						return
					}
				}
				_, _ = io.WriteString(c, "CONNECTED\nversion:1.2\nx-node-id:silent\nheart-beat:"+heartbeat+"\n\n\x00")
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// TestPeerHeartbeatSilentServer: a server that stops answering without a
// reset is detected within a few heart-beat periods, and the pending
// requests fail with ErrPeerUnknownOutcome caused by ErrPeerHeartbeat.
func TestPeerHeartbeatSilentServer(t *testing.T) {
	peerNoLeaks(t)
	addr := silentPeerServer(t, "50,50")
	c := startPeerClient(t, addr, func(c *PeerClientConfig) { c.Heartbeat = 50 * time.Millisecond })
	start := time.Now()
	ch := peerRequest(t, c, "lost", nil)
	r := peerAwait(t, ch)
	if !errors.Is(r.err, ErrPeerUnknownOutcome) || !errors.Is(r.err, ErrPeerHeartbeat) {
		t.Fatalf("got %v, want ErrPeerUnknownOutcome and ErrPeerHeartbeat", r.err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("silence detected after %v", d)
	}
}

// TestPeerHeartbeatSilentClient: the server closes, with an ERROR, a link
// whose client falls silent, and counts it.
func TestPeerHeartbeatSilentClient(t *testing.T) {
	peerNoLeaks(t)
	s := startPeerServer(t, newPeerHold(), func(c *PeerServerConfig) { c.Heartbeat = 50 * time.Millisecond })
	p := peerRawDial(t, s.Addr().String(), "mute", "50,0")
	start := time.Now()
	fs := p.untilClosed() // reads, never writes
	if len(fs) != 1 || fs[0].Command != frame.ERROR || fs[0].Header.Get(PeerHeaderCode) != peerCodeHeartbeat {
		t.Fatalf("got %v, want one heart-beat ERROR", fs)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("silence detected after %v", d)
	}
	if v := peerCounter(t, s.m.dropped.WithLabelValues(peerCodeHeartbeat)); v != 1 {
		t.Fatalf("heart-beat drops counted: %v", v)
	}
}

// TestPeerHeartbeatKeepsIdleLinkUp: an idle link with short heart-beats
// stays up for many periods (no false detection) and still serves.
func TestPeerHeartbeatKeepsIdleLinkUp(t *testing.T) {
	peerNoLeaks(t)
	s := startPeerServer(t, newPeerHold(), func(c *PeerServerConfig) { c.Heartbeat = 20 * time.Millisecond })
	var ups, downs atomic.Int32
	c := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
		c.Heartbeat = 20 * time.Millisecond
		c.OnState = func(up bool, err error) {
			if up {
				ups.Add(1)
			} else {
				downs.Add(1)
			}
		}
	})
	peerMustOK(t, peerRequest(t, c, "first", nil), "first")
	time.Sleep(400 * time.Millisecond) // 20 periods of idleness: the subject of the test
	peerMustOK(t, peerRequest(t, c, "second", nil), "second")
	if ups.Load() != 1 || downs.Load() != 0 {
		t.Fatalf("link went up %d and down %d times", ups.Load(), downs.Load())
	}
	if v := peerCounter(t, s.m.dropped.WithLabelValues(peerCodeHeartbeat)); v != 0 {
		t.Fatalf("server dropped %v links for silence", v)
	}
}

// TestPeerClientMaxInFlight: with MaxInFlight requests unanswered,
// Request blocks until its context ends (and done is never called); an
// answer makes room.
func TestPeerClientMaxInFlight(t *testing.T) {
	peerNoLeaks(t)
	h := newPeerHold()
	s := startPeerServer(t, h, nil)
	c := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) { c.MaxInFlight = 2 })
	a := peerRequest(t, c, "hold", nil)
	peerRequest(t, c, "hold", nil)
	h.wait(t, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := c.Request(ctx, "third", nil, nil, func(*frame.Frame, error) { t.Error("done called for a request not queued") })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Request at MaxInFlight: %v, want deadline exceeded", err)
	}
	h.reply(0)(PeerOK("x-echo", "hold"))
	peerMustOK(t, a, "hold")
	peerMustOK(t, peerRequest(t, c, "third", nil), "third")
}

// TestPeerServerMaxInFlight: with MaxInFlight requests of a connection
// unanswered, the server reads no more from it; each answer lets exactly
// one more request in.
func TestPeerServerMaxInFlight(t *testing.T) {
	peerNoLeaks(t)
	h := newPeerHold()
	waits := make(chan struct{}, 16)
	s := NewPeerServer(peerServerConfig(func(c *PeerServerConfig) { c.MaxInFlight = 2 }), h)
	s.testSlotWait = func() { waits <- struct{}{} }
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	c := startPeerClient(t, s.Addr().String(), nil)
	var answers []<-chan peerResult
	for range 5 {
		answers = append(answers, peerRequest(t, c, "hold", nil))
	}
	waitFull := func(want int) {
		t.Helper()
		select {
		case <-waits:
		case <-time.After(2 * time.Second):
			t.Fatal("the server never waited for room")
		}
		if n := h.count(); n != want {
			t.Fatalf("handler got %d requests while the server waits for room, want %d", n, want)
		}
	}
	waitFull(2)
	// Each answer frees one slot, and exactly one more request gets in.
	for _, step := range []struct{ answer, inFlight int }{{1, 3}, {0, 4}, {2, 5}} {
		h.reply(step.answer)(PeerOK("x-echo", "hold"))
		peerMustOK(t, answers[step.answer], "hold")
		waitFull(step.inFlight)
	}
	for _, i := range []int{3, 4} {
		h.reply(i)(PeerOK("x-echo", "hold"))
		peerMustOK(t, answers[i], "hold")
	}
}

// TestPeerClientClosePending: Close fails every unanswered request (with
// ErrPeerClosed and ErrPeerUnknownOutcome), wakes a Request waiting for
// room, refuses later requests, and leaves no goroutine behind.
func TestPeerClientClosePending(t *testing.T) {
	peerNoLeaks(t)
	h := newPeerHold()
	s := startPeerServer(t, h, nil)
	c := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) { c.MaxInFlight = 3 })
	var pending []<-chan peerResult
	for range 3 {
		pending = append(pending, peerRequest(t, c, "hold", nil))
	}
	h.wait(t, 3)
	blocked := make(chan error, 1)
	go func() {
		blocked <- c.Request(context.Background(), "blocked", nil, nil, func(*frame.Frame, error) { t.Error("done called for a request not queued") })
	}()
	c.Close()
	for i, ch := range pending {
		r := peerAwait(t, ch)
		if !errors.Is(r.err, ErrPeerClosed) || !errors.Is(r.err, ErrPeerUnknownOutcome) {
			t.Fatalf("pending %d: %v", i, r.err)
		}
	}
	if err := <-blocked; !errors.Is(err, ErrPeerClosed) {
		t.Fatalf("blocked Request: %v", err)
	}
	if err := c.Request(context.Background(), "after", nil, nil, nil); !errors.Is(err, ErrPeerClosed) {
		t.Fatalf("Request after Close: %v", err)
	}
	if c.Connected() {
		t.Fatal("connected after Close")
	}
	// The server's handler answers after the client left.
	for i := range 3 {
		h.reply(i)(PeerOK())
	}
	peerWaitFor(t, "the server to close the connection", func() bool { return peerCounter(t, s.m.connections) == 0 })
}

// TestPeerReplyTwiceAndAfterDeath: a second reply is ignored, and replies
// to a connection that died do nothing; the server keeps serving.
func TestPeerReplyTwiceAndAfterDeath(t *testing.T) {
	peerNoLeaks(t)
	h := newPeerHold()
	s := startPeerServer(t, h, nil)
	c1 := startPeerClient(t, s.Addr().String(), nil)
	a := peerRequest(t, c1, "hold", nil)
	b := peerRequest(t, c1, "hold", nil)
	h.wait(t, 2)
	h.reply(0)(PeerOK("x-echo", "hold"))
	h.reply(0)(PeerFail("late", "second reply"))
	peerMustOK(t, a, "hold")
	c1.Close()
	if r := peerAwait(t, b); !errors.Is(r.err, ErrPeerUnknownOutcome) {
		t.Fatalf("got %v", r.err)
	}
	peerWaitFor(t, "the server to close the connection", func() bool { return peerCounter(t, s.m.connections) == 0 })
	h.reply(1)(PeerOK())
	h.reply(1)(PeerDrop("too late"))
	c2 := startPeerClient(t, s.Addr().String(), nil)
	peerMustOK(t, peerRequest(t, c2, "next", nil), "next")
}

// TestPeerFailKeepsLink: an operation failure reaches done as *PeerError
// and the link stays up for the next request.
func TestPeerFailKeepsLink(t *testing.T) {
	peerNoLeaks(t)
	h := PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		switch op := f.Header.Get(PeerHeaderOp); op {
		case "known":
			reply(PeerOK("x-echo", op))
		default:
			reply(PeerFail("unknown-op", "no operation "+op))
		}
	})
	s := startPeerServer(t, h, nil)
	var ups atomic.Int32
	c := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
		c.OnState = func(up bool, err error) {
			if up {
				ups.Add(1)
			}
		}
	})
	r := peerAwait(t, peerRequest(t, c, "frobnicate", nil))
	var pe *PeerError
	if !errors.As(r.err, &pe) || pe.Code != "unknown-op" || pe.Message != "no operation frobnicate" {
		t.Fatalf("got %v, want PeerError unknown-op", r.err)
	}
	if errors.Is(r.err, ErrPeerUnknownOutcome) {
		t.Fatal("an operation failure reported as unknown outcome")
	}
	peerMustOK(t, peerRequest(t, c, "known", nil), "known")
	if ups.Load() != 1 {
		t.Fatalf("link came up %d times", ups.Load())
	}
}

// TestPeerHandlerDrop: PeerDrop closes the link with an ERROR; the
// client's pending requests fail with ErrPeerUnknownOutcome and
// ErrPeerDropped naming the reason; the client reconnects.
func TestPeerHandlerDrop(t *testing.T) {
	peerNoLeaks(t)
	h := newPeerHold()
	drop := PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		if f.Header.Get(PeerHeaderOp) == "bad" {
			reply(PeerDrop("stale epoch 3"))
			return
		}
		h.HandlePeer(peer, f, reply)
	})
	s := startPeerServer(t, drop, nil)
	c := startPeerClient(t, s.Addr().String(), nil)
	held := peerRequest(t, c, "hold", nil)
	h.wait(t, 1)
	bad := peerRequest(t, c, "bad", nil)
	for _, ch := range []<-chan peerResult{held, bad} {
		r := peerAwait(t, ch)
		if !errors.Is(r.err, ErrPeerUnknownOutcome) || !errors.Is(r.err, ErrPeerDropped) || !strings.Contains(r.err.Error(), "stale epoch 3") {
			t.Fatalf("got %v, want ErrPeerUnknownOutcome, ErrPeerDropped and the reason", r.err)
		}
	}
	if v := peerCounter(t, s.m.dropped.WithLabelValues(peerCodeDropped)); v != 1 {
		t.Fatalf("drops counted: %v", v)
	}
	peerMustOK(t, peerRequest(t, c, "again", nil), "again")
}

// TestPeerServerMaxConnections: a connection over the limit is refused
// with an ERROR the client reports.
func TestPeerServerMaxConnections(t *testing.T) {
	peerNoLeaks(t)
	s := startPeerServer(t, newPeerHold(), func(c *PeerServerConfig) { c.MaxConnections = 1 })
	first := startPeerClient(t, s.Addr().String(), nil)
	peerMustOK(t, peerRequest(t, first, "one", nil), "one")
	errs := make(chan error, 8)
	startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
		c.OnState = func(up bool, err error) {
			select {
			case errs <- err:
			default:
			}
		}
	})
	select {
	case err := <-errs:
		if !errors.Is(err, ErrPeerHandshake) || !strings.Contains(err.Error(), "too many connections") {
			t.Fatalf("got %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("no state within 2 s")
	}
}

// TestPeerRequestInvalid: requests that cannot be sent are refused by
// Request itself, without calling done or taking room.
func TestPeerRequestInvalid(t *testing.T) {
	peerNoLeaks(t)
	s := startPeerServer(t, newPeerHold(), nil)
	c := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
		c.MaxInFlight = 1
		c.Limits = Limits{MaxBodySize: 100}
	})
	never := func(*frame.Frame, error) { t.Error("done called for an invalid request") }
	ctx := context.Background()
	for name, err := range map[string]error{
		"empty op":          c.Request(ctx, "", nil, nil, never),
		"odd headers":       c.Request(ctx, "a", []string{"x"}, nil, never),
		"receipt":           c.Request(ctx, "a", []string{"receipt", "9"}, nil, never),
		"x-op":              c.Request(ctx, "a", []string{"x-op", "b"}, nil, never),
		"content-length":    c.Request(ctx, "a", []string{"content-length", "1"}, nil, never),
		"empty header name": c.Request(ctx, "a", []string{"", "v"}, nil, never),
		"body too large":    c.Request(ctx, "a", nil, make([]byte, 101), never),
	} {
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	peerMustOK(t, peerRequest(t, c, "valid", make([]byte, 100)), "valid")
}

// TestPeerReplyTooLarge: an answer over the link's limits becomes an
// operation failure instead of breaking the link.
func TestPeerReplyTooLarge(t *testing.T) {
	peerNoLeaks(t)
	h := PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		r := PeerOK("x-echo", f.Header.Get(PeerHeaderOp))
		if f.Header.Get(PeerHeaderOp) == "big" {
			r.Body = make([]byte, 2048)
		}
		reply(r)
	})
	s := startPeerServer(t, h, func(c *PeerServerConfig) { c.Limits = Limits{MaxBodySize: 1024} })
	c := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) { c.Limits = Limits{MaxBodySize: 1024} })
	r := peerAwait(t, peerRequest(t, c, "big", nil))
	var pe *PeerError
	if !errors.As(r.err, &pe) || pe.Code != peerCodeTooLarge {
		t.Fatalf("got %v, want PeerError %s", r.err, peerCodeTooLarge)
	}
	peerMustOK(t, peerRequest(t, c, "small", nil), "small")
}
