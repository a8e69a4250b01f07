package stomp

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"strings"
	"testing"

	"github.com/go-stomp/stomp/v3/frame"
	"github.com/prometheus/client_golang/prometheus"
)

// BenchmarkSessionSendReceipt measures the SEND -> RECEIPT path through a
// real connection: a window of 64 receipted SENDs of 256 bytes to a topic
// (nothing stored; each receipt waits for a store barrier). Allocations
// include the client's, which are few.
func BenchmarkSessionSendReceipt(b *testing.B) {
	rb, srv := testServerCfg(b, nil)
	rb.mu.Lock()
	rb.quiet = true
	rb.mu.Unlock()
	c, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReaderSize(c, 64<<10)
	if _, err := c.Write([]byte(tframe(frame.CONNECT, "", "accept-version:1.2", "host:/", "heart-beat:0,0"))); err != nil {
		b.Fatal(err)
	}
	if _, err := br.ReadSlice(0); err != nil {
		b.Fatal(err)
	}
	const window = 64
	one := []byte(tframe(frame.SEND, strings.Repeat("x", 256), "destination:/topic/bench", "receipt:r"))
	burst := bytes.Repeat(one, window)
	b.SetBytes(int64(len(one)))
	b.ReportAllocs()
	b.ResetTimer()
	for n := 0; n < b.N; n += window {
		if _, err := c.Write(burst); err != nil {
			b.Fatal(err)
		}
		for i := 0; i < window; i++ {
			if _, err := br.ReadSlice(0); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkPeerRoundTrip measures one peer request at a time (a 256-byte
// body answered at once by the handler) over loopback: the peer link's
// own share of a replicated SEND's receipt latency, without any disk.
func BenchmarkPeerRoundTrip(b *testing.B) {
	s := NewPeerServer(peerServerConfig(nil), PeerHandlerFunc(func(_ string, _ *frame.Frame, reply func(*frame.Frame)) {
		reply(PeerOK())
	}))
	if err := s.Start(); err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	cfg := DefaultPeerClientConfig()
	cfg.Addr = s.Addr().String()
	cfg.NodeID = "node-c"
	cfg.Logger = peerDiscardLogger()
	cfg.Registerer = prometheus.NewRegistry()
	c := NewPeerClient(cfg)
	if err := c.Start(); err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	body := make([]byte, 256)
	done := make(chan error, 1)
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := c.Request(ctx, "op", nil, body, func(_ *frame.Frame, err error) { done <- err }); err != nil {
			b.Fatal(err)
		}
		if err := <-done; err != nil {
			b.Fatal(err)
		}
	}
}
