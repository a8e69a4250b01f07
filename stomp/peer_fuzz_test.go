package stomp

import (
	"bytes"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-stomp/stomp/v3/frame"
)

// peerFuzzConn is a server-side connection whose input is a fixed byte
// string followed by EOF and whose output is kept: each input runs the
// same way every time, without blocking or timers.
type peerFuzzConn struct {
	in     io.Reader
	mu     sync.Mutex
	out    bytes.Buffer
	closed atomic.Bool
}

func (c *peerFuzzConn) Read(p []byte) (int, error) {
	if c.closed.Load() {
		return 0, net.ErrClosed
	}
	return c.in.Read(p)
}

func (c *peerFuzzConn) Write(p []byte) (int, error) {
	if c.closed.Load() {
		return 0, net.ErrClosed
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.Write(p)
}

func (c *peerFuzzConn) Close() error        { c.closed.Store(true); return nil }
func (c *peerFuzzConn) LocalAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1} }
func (c *peerFuzzConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 2}
}
func (c *peerFuzzConn) SetDeadline(time.Time) error      { return nil }
func (c *peerFuzzConn) SetReadDeadline(time.Time) error  { return nil }
func (c *peerFuzzConn) SetWriteDeadline(time.Time) error { return nil }

// peerFuzzHandler checks every request it gets and answers by op: "drop"
// drops the peer, "fail" fails, "async" answers from another goroutine,
// "big" answers over the limits, "bad" answers with an invalid frame,
// "twice" answers twice, anything else succeeds.
type peerFuzzHandler struct {
	mu       sync.Mutex
	t        *testing.T
	seen     []*frame.Frame
	inflight map[string]bool
	wg       sync.WaitGroup
}

func (h *peerFuzzHandler) HandlePeer(peer string, f *frame.Frame, reply func(*frame.Frame)) {
	h.mu.Lock()
	t := h.t
	receipt := f.Header.Get(frame.Receipt)
	switch {
	case peer != "fuzz-client":
		t.Errorf("handler called for peer %q", peer)
	case f.Command != frame.SEND:
		t.Errorf("handler called for a %s frame", f.Command)
	case receipt == "" || f.Header.Get(PeerHeaderOp) == "":
		t.Errorf("handler called without receipt or x-op: %v", f.Header)
	case h.inflight[receipt]:
		t.Errorf("handler called for receipt %q still in flight", receipt)
	}
	h.seen = append(h.seen, f)
	h.inflight[receipt] = true
	h.mu.Unlock()
	answer := func(r *frame.Frame) {
		h.mu.Lock()
		delete(h.inflight, receipt)
		h.mu.Unlock()
		reply(r)
	}
	switch op := f.Header.Get(PeerHeaderOp); op {
	case "drop":
		answer(PeerDrop("fuzz"))
	case "fail":
		answer(PeerFail("fuzz", "failed"))
	case "async":
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			answer(PeerOK("x-async", "1"))
		}()
	case "big":
		r := PeerOK()
		r.Body = make([]byte, 4096)
		answer(r)
	case "bad":
		answer(frame.New(frame.MESSAGE))
	case "twice":
		answer(PeerOK())
		reply(PeerFail("again", "second answer"))
	default:
		r := PeerOK("x-echo", op)
		r.Body = f.Body
		answer(r)
	}
}

// peerFuzzOracle returns the requests of in that a server must hand to
// its handler if nothing drops the link: the valid frames before the
// first invalid one.
func peerFuzzOracle(in []byte, lim Limits) []*frame.Frame {
	r := newFrameReader(bytes.NewReader(in), lim)
	var fs []*frame.Frame
	for {
		f, err := r.ReadFrame(peerVersion)
		if err != nil {
			return fs
		}
		if f == nil {
			continue
		}
		if f.Command != frame.SEND || f.Header.Get(frame.Receipt) == "" || f.Header.Get(PeerHeaderOp) == "" {
			return fs
		}
		fs = append(fs, f)
	}
}

func peerSameRequest(a, b *frame.Frame) bool {
	return a.Header.Get(frame.Receipt) == b.Header.Get(frame.Receipt) &&
		a.Header.Get(PeerHeaderOp) == b.Header.Get(PeerHeaderOp) && bytes.Equal(a.Body, b.Body)
}

// FuzzPeerServer feeds arbitrary bytes, after a valid authenticated
// handshake, to one server connection. The server must not panic or
// hang; the handler must get exactly the valid requests before the first
// invalid frame, in order (fewer only after a drop, or at a receipt that
// may still have been in flight); the server's output must be
// well-formed, answer only requests the handler got, and end at its
// first ERROR without receipt-id.
func FuzzPeerServer(f *testing.F) {
	seeds := []string{
		"SEND\nreceipt:1\nx-op:put\n\nhello\x00SEND\nreceipt:2\nx-op:async\n\n\x00SEND\nreceipt:3\nx-op:fail\n\n\x00",
		"\n\nSEND\nreceipt:1\nx-op:async\ncontent-length:3\n\na\x00b\x00SEND\nreceipt:1\nx-op:put\n\n\x00",
		"SEND\nreceipt:1\nx-op:drop\n\n\x00SEND\nreceipt:2\nx-op:put\n\n\x00",
		"SEND\nreceipt:1\nx-op:big\n\n\x00SEND\nreceipt:2\nx-op:bad\n\n\x00SEND\nreceipt:3\nx-op:twice\n\n\x00",
		"SEND\nreceipt:1\nx-op:async\n\n\x00SEND\nreceipt:2\nx-op:async\n\n\x00SEND\nreceipt:3\nx-op:async\n\n\x00SEND\nreceipt:4\nx-op:put\n\n\x00",
		"SUBSCRIBE\nid:1\ndestination:/queue/a\n\n\x00",
		"SEND\nx-op:put\n\n\x00",
		"SEND\nreceipt:1\nx-op:a\\cb\nx:\\n\\r\\\\\n\n\x00SEND\nreceipt:2\nx-op:a\nx:\\t\n\n\x00",
		"SEND\nreceipt:1\nx-op:put\ncontent-length:99999\n\n\x00",
		"CONNECT\naccept-version:1.2\n\n\x00",
		"\x00\x01\x02",
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	secret := []byte("fuzz-secret")
	const nonce = "00112233445566778899aabbccddeeff"
	connect := []byte("CONNECT\naccept-version:1.2\nhost:fuzz\nx-node-id:fuzz-client\nheart-beat:10000,0\nx-nonce:" + nonce +
		"\nx-auth:" + peerMAC(secret, peerMACClient, nonce, "fuzz-client") + "\n\n\x00")
	lim := Limits{MaxFrameSize: 4096, MaxHeaderCount: 16, MaxHeaderLineLen: 256, MaxBodySize: 2048}
	h := &peerFuzzHandler{}
	cfg := DefaultPeerServerConfig()
	cfg.NodeID = "fuzz-server"
	cfg.Secret = secret
	cfg.Limits = lim
	cfg.MaxInFlight = 2
	cfg.Logger = peerDiscardLogger()
	srv := NewPeerServer(cfg, h)

	f.Fuzz(func(t *testing.T, in []byte) {
		h.mu.Lock()
		h.t, h.seen, h.inflight = t, nil, make(map[string]bool)
		h.mu.Unlock()
		c := &peerFuzzConn{in: io.MultiReader(bytes.NewReader(connect), bytes.NewReader(in))}
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.serveConn(c)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the server did not finish a connection whose input ended")
		}
		h.wg.Wait()

		// The handler got a prefix of the valid requests.
		want := peerFuzzOracle(in, lim)
		h.mu.Lock()
		seen := h.seen
		h.mu.Unlock()
		if len(seen) > len(want) {
			t.Fatalf("handler got %d requests, only %d are valid", len(seen), len(want))
		}
		receipts := make(map[string]bool)
		for i, f := range seen {
			if !peerSameRequest(f, want[i]) {
				t.Fatalf("request %d: handler got %v, input has %v", i, f.Header, want[i].Header)
			}
			receipts[f.Header.Get(frame.Receipt)] = true
		}
		if k := len(seen); k < len(want) {
			dropped := k > 0 && seen[k-1].Header.Get(PeerHeaderOp) == "drop"
			if !dropped && !receipts[want[k].Header.Get(frame.Receipt)] {
				t.Fatalf("handler stopped after %d of %d valid requests, with no drop or reused receipt", k, len(want))
			}
		}

		// The output: CONNECTED, answers to requests handled, and nothing
		// after a fatal ERROR.
		r := newFrameReader(bytes.NewReader(c.out.Bytes()), DefaultPeerLimits())
		first := true
		fatal := false
		for {
			fr, err := r.ReadFrame(peerVersion)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("server wrote a malformed frame: %v; output %q", err, c.out.Bytes())
			}
			if fr == nil {
				continue
			}
			if fatal {
				t.Fatalf("server wrote %s after a fatal ERROR", fr.Command)
			}
			if first {
				if fr.Command != frame.CONNECTED || fr.Header.Get(peerHeaderNodeID) != "fuzz-server" {
					t.Fatalf("first frame %s %v, want CONNECTED", fr.Command, fr.Header)
				}
				first = false
				continue
			}
			id, ok := fr.Header.Contains(frame.ReceiptId)
			switch {
			case fr.Command == frame.ERROR && !ok:
				fatal = true
				if fr.Header.Get(PeerHeaderCode) == "" || fr.Header.Get(frame.Message) == "" {
					t.Fatalf("fatal ERROR without x-code or message: %v", fr.Header)
				}
			case fr.Command != frame.RECEIPT && fr.Command != frame.ERROR:
				t.Fatalf("server wrote a %s frame", fr.Command)
			case !receipts[id]:
				t.Fatalf("server answered receipt %q, which the handler never got", id)
			}
		}
		if first {
			t.Fatal("no CONNECTED")
		}
		if strings.Contains(c.out.String(), "x-auth:") == false {
			t.Fatal("CONNECTED without the server's proof")
		}
	})
}

// FuzzPeerHandshake feeds arbitrary bytes, handshake included, to one
// server connection with TLS off and a keyring of two keys. The server
// must not panic or hang; it answers CONNECTED only to a CONNECT whose
// proof was made with a key of its ring, and proves back with that key;
// the handler sees nothing from a connection without CONNECTED.
func FuzzPeerHandshake(f *testing.F) {
	k1, k2 := []byte("fuzz-key-one-0123456789a"), []byte("fuzz-key-two-0123456789a")
	const nonce = "00112233445566778899aabbccddeeff"
	connect := func(key []byte, id, extra string) string {
		return "CONNECT\naccept-version:1.2\nhost:fuzz\nx-node-id:" + id + "\nheart-beat:10000,0\nx-nonce:" + nonce +
			"\nx-auth:" + peerMAC(key, peerMACClient, nonce, id) + "\n" + extra + "\n\x00"
	}
	for _, s := range []string{
		connect(k1, "fuzz-client", "") + "SEND\nreceipt:1\nx-op:put\n\nhello\x00",
		connect(k2, "fuzz-client", "") + "SEND\nreceipt:1\nx-op:async\n\n\x00",
		connect([]byte("not-in-the-ring-01234567"), "fuzz-client", "") + "SEND\nreceipt:1\nx-op:put\n\n\x00",
		connect(k1, "other-id", ""),
		connect(k1, "fuzz-client", "accept-version:1.0\n"),
		"CONNECT\naccept-version:1.2\nx-node-id:a\nheart-beat:1000,0\n\n\x00",
		"STOMP\naccept-version:1.2\nx-node-id:a\nheart-beat:1000,0\nx-nonce:zz\nx-auth:00\n\n\x00",
		"\n\n\nCONNECT\n\n\x00",
		"\x16\x03\x01\x00\x05hello",
		"",
	} {
		f.Add([]byte(s))
	}
	lim := Limits{MaxFrameSize: 4096, MaxHeaderCount: 16, MaxHeaderLineLen: 512, MaxBodySize: 2048}
	var mu sync.Mutex
	var handled int
	cfg := DefaultPeerServerConfig()
	cfg.NodeID = "fuzz-server"
	cfg.SecretKeys = func() [][]byte { return [][]byte{k1, k2} }
	cfg.Limits = lim
	cfg.Logger = peerDiscardLogger()
	srv := NewPeerServer(cfg, PeerHandlerFunc(func(peer string, fr *frame.Frame, reply func(*frame.Frame)) {
		mu.Lock()
		handled++
		mu.Unlock()
		reply(PeerOK())
	}))

	f.Fuzz(func(t *testing.T, in []byte) {
		mu.Lock()
		handled = 0
		mu.Unlock()
		c := &peerFuzzConn{in: bytes.NewReader(in)}
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.serveConn(c)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the server did not finish a connection whose input ended")
		}
		mu.Lock()
		n := handled
		mu.Unlock()

		// The first frame of the input, as the server reads a CONNECT.
		var connectF *frame.Frame
		r := newFrameReader(bytes.NewReader(in), lim)
		for {
			fr, err := r.ReadFrame("1.0")
			if err != nil {
				break
			}
			if fr != nil {
				connectF = fr
				break
			}
		}
		out := newFrameReader(bytes.NewReader(c.out.Bytes()), DefaultPeerLimits())
		var first *frame.Frame
		for {
			fr, err := out.ReadFrame(peerVersion)
			if err != nil {
				break
			}
			if fr != nil {
				first = fr
				break
			}
		}
		if first == nil || first.Command != frame.CONNECTED {
			if n > 0 {
				t.Fatalf("handler called %d times without CONNECTED", n)
			}
			return
		}
		if connectF == nil {
			t.Fatal("CONNECTED without a CONNECT")
		}
		id, nc := connectF.Header.Get(peerHeaderNodeID), connectF.Header.Get(peerHeaderNonce)
		key := peerMatchKey([][]byte{k1, k2}, connectF.Header.Get(peerHeaderAuth), peerMACClient, nc, id)
		if key == nil {
			t.Fatalf("CONNECTED to a CONNECT without a valid proof: %v", connectF.Header)
		}
		if !peerMACEqual(first.Header.Get(peerHeaderAuth), peerMAC(key, peerMACServer, nc, id, "fuzz-server")) {
			t.Fatalf("the server's proof is not made with the client's key: %v", first.Header)
		}
	})
}
