package stomp

import (
	"bufio"
	"bytes"
	"net"
	"strings"
	"testing"

	"github.com/go-stomp/stomp/v3/frame"
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
