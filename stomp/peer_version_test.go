package stomp

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/go-stomp/stomp/v3/frame"
)

func peerRange(lo, hi int) cluster.ProtocolRange { return cluster.ProtocolRange{Min: lo, Max: hi} }

// peerVersionStates collects a client's OnState errors.
type peerVersionStates struct {
	mu   sync.Mutex
	errs []error
}

func (p *peerVersionStates) on(up bool, err error) {
	if !up && err != nil {
		p.mu.Lock()
		p.errs = append(p.errs, err)
		p.mu.Unlock()
	}
}

func (p *peerVersionStates) last() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.errs) == 0 {
		return nil
	}
	return p.errs[len(p.errs)-1]
}

// TestPeerVersionRefused: a link between nodes with no protocol version in
// common never comes up: the server refuses a client too old or too new
// with an ERROR naming both ranges (logged), and the client reports
// ErrPeerVersion with both ranges.
func TestPeerVersionRefused(t *testing.T) {
	peerNoLeaks(t)
	for _, tc := range []struct {
		name           string
		server, client cluster.ProtocolRange
	}{
		{"client too old", peerRange(2, 3), peerRange(1, 1)},
		{"client too new", peerRange(1, 2), peerRange(3, 4)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logs := &syncBuffer{}
			h := newPeerHold()
			s := startPeerServer(t, h, func(c *PeerServerConfig) {
				c.Protocols = tc.server
				c.Logger = slog.New(slog.NewJSONHandler(logs, nil))
			})
			st := &peerVersionStates{}
			startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
				c.Protocols = tc.client
				c.OnState = st.on
			})
			peerWaitFor(t, "a refused handshake", func() bool { return st.last() != nil })
			err := st.last()
			if !errors.Is(err, ErrPeerVersion) {
				t.Fatalf("client error %v, want ErrPeerVersion", err)
			}
			for _, r := range []cluster.ProtocolRange{tc.server, tc.client} {
				if !strings.Contains(err.Error(), r.String()) {
					t.Errorf("client error %q does not name %s", err, r)
				}
			}
			peerWaitFor(t, "the server's log", func() bool { return len(logs.records("peer handshake refused")) > 0 })
			rec := logs.records("peer handshake refused")[0]
			if rec["reason"] != "version" || !strings.Contains(rec["err"].(string), tc.client.String()) || !strings.Contains(rec["err"].(string), tc.server.String()) {
				t.Errorf("server log %v, want reason version naming %s and %s", rec, tc.client, tc.server)
			}
			if h.count() != 0 {
				t.Errorf("handler called %d times", h.count())
			}
		})
	}
}

// TestPeerVersionOldServer: a server that states no range (a build before
// ranges: 1..1) is refused by a client that speaks only 2..3, and accepted
// at version 1 by a client speaking 1..2, which then sends no checksum.
func TestPeerVersionOldServer(t *testing.T) {
	peerNoLeaks(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 16)
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				r := newFrameReader(c, DefaultPeerLimits())
				_ = c.SetDeadline(time.Now().Add(3 * time.Second))
				if f, err := r.ReadFrame("1.0"); err != nil || f == nil {
					return
				}
				_, _ = io.WriteString(c, "CONNECTED\nversion:1.2\nx-node-id:old\nheart-beat:1000,1000\n\n\x00")
				for {
					f, err := r.ReadFrame(peerVersion)
					if err != nil {
						return
					}
					if f == nil {
						continue
					}
					_, crc := f.Header.Contains(peerHeaderCRC)
					got <- f.Header.Get(PeerHeaderOp) + map[bool]string{true: " with crc", false: ""}[crc]
					_, _ = io.WriteString(c, "RECEIPT\nreceipt-id:"+f.Header.Get(frame.Receipt)+"\nx-echo:x\n\n\x00")
				}
			}()
		}
	}()
	st := &peerVersionStates{}
	startPeerClient(t, ln.Addr().String(), func(c *PeerClientConfig) {
		c.Protocols = peerRange(2, 3)
		c.OnState = st.on
	})
	peerWaitFor(t, "the client's refusal", func() bool { return st.last() != nil })
	if err := st.last(); !errors.Is(err, ErrPeerVersion) || !strings.Contains(err.Error(), "1..1") || !strings.Contains(err.Error(), "2..3") {
		t.Fatalf("client error %v, want ErrPeerVersion naming 1..1 and 2..3", err)
	}

	c := startPeerClient(t, ln.Addr().String(), func(c *PeerClientConfig) {
		c.Protocols = peerRange(1, 2)
		c.Protocol = func() int { return 2 }
	})
	peerAwait(t, peerRequest(t, c, "v1", []byte("body")))
	if op := <-got; op != "v1" {
		t.Errorf("the old server got %q: a checksum on a version-1 link", op)
	}
}

// TestPeerChecksum: on a link both ends speak version 2, requests carry
// the body's CRC-32C once the cluster's version is 2, never before; the
// server checks it, counts it, and hands the request to the handler
// without it. A link to a 1..1 client carries none. A wrong checksum drops
// the link without the handler seeing the request.
func TestPeerChecksum(t *testing.T) {
	peerNoLeaks(t)
	var seen []string
	var mu sync.Mutex
	h := PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		mu.Lock()
		_, crc := f.Header.Contains(peerHeaderCRC)
		seen = append(seen, f.Header.Get(PeerHeaderOp)+map[bool]string{true: "+crc", false: ""}[crc])
		mu.Unlock()
		r := PeerOK("x-echo", f.Header.Get(PeerHeaderOp))
		r.Body = f.Body
		reply(r)
	})
	s := startPeerServer(t, h, func(c *PeerServerConfig) { c.Protocols = peerRange(1, 2) })
	var effective atomic.Int64
	effective.Store(1)
	c := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
		c.Protocols = peerRange(1, 2)
		c.Protocol = func() int { return int(effective.Load()) }
	})
	old := startPeerClient(t, s.Addr().String(), func(c *PeerClientConfig) {
		c.NodeID = "node-old"
		c.Protocols = peerRange(1, 1)
		c.Protocol = func() int { return 2 }
	})
	verified := func() float64 { return peerCounter(t, s.m.checksums) }

	peerMustOK(t, peerRequest(t, c, "mixed", []byte("a")), "mixed")
	if v := verified(); v != 0 {
		t.Fatalf("%v checksums while the cluster speaks version 1", v)
	}
	if v := peerCounter(t, c.m.proto); v != 2 {
		t.Errorf("brokerd_peer_link_protocol = %v, want 2", v)
	}
	effective.Store(2)
	for i := 0; i < 3; i++ {
		if f := peerMustOK(t, peerRequest(t, c, "upgraded", []byte("payload")), "upgraded"); string(f.Body) != "payload" {
			t.Fatalf("body %q", f.Body)
		}
	}
	peerMustOK(t, peerRequest(t, c, "empty", nil), "empty")
	peerMustOK(t, peerRequest(t, old, "old", []byte("b")), "old")
	if v := verified(); v != 3 {
		t.Errorf("%v checksums verified, want 3 (the version-2 requests with a body)", v)
	}
	mu.Lock()
	got := strings.Join(seen, ",")
	mu.Unlock()
	if got != "mixed,upgraded,upgraded,upgraded,empty,old" {
		t.Errorf("handler saw %s (x-crc32c must not reach it)", got)
	}
	if err := c.Request(t.Context(), "x", []string{peerHeaderCRC, "00000000"}, []byte("x"), nil); err == nil {
		t.Error("a caller's x-crc32c header was accepted")
	}

	// A damaged body: the server drops the link and applies nothing.
	p := peerRawConn(t, s.Addr().String())
	p.write("CONNECT\naccept-version:1.2\nhost:c\nx-node-id:raw\nheart-beat:1000,0\nx-proto:1..2\n\n\x00")
	if f := p.read(); f.Command != frame.CONNECTED || f.Header.Get(peerHeaderProto) != "1..2" {
		t.Fatalf("handshake: %s %v", f.Command, f.Header)
	}
	p.write("SEND\nreceipt:1\nx-op:damaged\nx-crc32c:" + peerCRC([]byte("good")) + "\ncontent-length:3\n\nbad\x00")
	fs := p.untilClosed()
	if len(fs) != 1 || fs[0].Command != frame.ERROR || fs[0].Header.Get(PeerHeaderCode) != peerCodeChecksum {
		t.Fatalf("damaged request: got %v, want one ERROR with x-code checksum", fs)
	}
	mu.Lock()
	defer mu.Unlock()
	if strings.Contains(strings.Join(seen, ","), "damaged") {
		t.Error("the handler saw the damaged request")
	}
}
