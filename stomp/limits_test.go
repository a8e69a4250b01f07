package stomp

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/go-stomp/stomp/v3/frame"
)

// tclient is a raw STOMP client for the tests of this package.
type tclient struct {
	t *testing.T
	c net.Conn
	r *frame.Reader
}

func tdial(t *testing.T, addr string) *tclient {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &tclient{t: t, c: c, r: frame.NewReader(bufio.NewReader(c))}
}

// tframe encodes a frame; hdr holds "name:value" lines.
func tframe(cmd, body string, hdr ...string) string {
	var sb strings.Builder
	sb.WriteString(cmd + "\n")
	for _, h := range hdr {
		sb.WriteString(h + "\n")
	}
	sb.WriteString("\n" + body + "\x00")
	return sb.String()
}

func (tc *tclient) write(s string) {
	tc.t.Helper()
	if _, err := io.WriteString(tc.c, s); err != nil {
		tc.t.Fatalf("write: %v", err)
	}
}

// read returns the next frame within 5 s, skipping heart-beats.
func (tc *tclient) read() *frame.Frame {
	tc.t.Helper()
	_ = tc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		f, err := tc.r.Read()
		if err != nil {
			tc.t.Fatalf("read: %v", err)
		}
		if f != nil {
			return f
		}
	}
}

// connect sends CONNECT (version 1.2 unless hdr says otherwise) and
// expects CONNECTED.
func (tc *tclient) connect(hdr ...string) *frame.Frame {
	tc.t.Helper()
	if len(hdr) == 0 {
		hdr = []string{"accept-version:1.2", "host:/", "heart-beat:0,0"}
	}
	tc.write(tframe(frame.CONNECT, "", hdr...))
	f := tc.read()
	if f.Command != frame.CONNECTED {
		tc.t.Fatalf("want CONNECTED, got %s %v %q", f.Command, f.Header, f.Body)
	}
	return f
}

// receipt reads up to the RECEIPT for id and returns the MESSAGEs before it.
func (tc *tclient) receipt(id string) []*frame.Frame {
	tc.t.Helper()
	var msgs []*frame.Frame
	for {
		f := tc.read()
		switch {
		case f.Command == frame.MESSAGE:
			msgs = append(msgs, f)
		case f.Command == frame.RECEIPT && f.Header.Get(frame.ReceiptId) == id:
			return msgs
		default:
			tc.t.Fatalf("waiting for RECEIPT %s: got %s %v %q", id, f.Command, f.Header, f.Body)
		}
	}
}

// expectError reads an ERROR whose message is msg, then expects the
// connection to be closed.
func (tc *tclient) expectError(msg string) *frame.Frame {
	tc.t.Helper()
	f := tc.read()
	if f.Command != frame.ERROR || f.Header.Get(frame.Message) != msg {
		tc.t.Fatalf("want ERROR %q, got %s %v %q", msg, f.Command, f.Header, f.Body)
	}
	tc.expectClosed()
	return f
}

// expectClosed expects EOF within 5 s, with no frame before it.
func (tc *tclient) expectClosed() {
	tc.t.Helper()
	_ = tc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		f, err := tc.r.Read()
		if err != nil {
			if err != io.EOF {
				tc.t.Fatalf("want the connection closed, got %v", err)
			}
			return
		}
		if f != nil {
			tc.t.Fatalf("want the connection closed, got %s %v", f.Command, f.Header)
		}
	}
}

// TestSessionLargeMessageAfterIdle: a consumer idle for longer than
// WriteTimeout (no heart-beats) receives a message larger than the write
// buffer intact, not after a disconnect and a redelivery.
func TestSessionLargeMessageAfterIdle(t *testing.T) {
	const timeout = 200 * time.Millisecond
	_, srv := testServerCfg(t, func(c *Config) { c.WriteTimeout = timeout })
	addr := srv.Addr().String()
	q := "/queue/large-after-idle"
	cons := tdial(t, addr)
	cons.connect()
	cons.write(tframe(frame.SUBSCRIBE, "", "id:0", "destination:"+q, "ack:client-individual", "receipt:s"))
	cons.receipt("s")
	// Idle: nothing to write, nothing read, for longer than WriteTimeout.
	time.Sleep(3 * timeout)
	body := bytes.Repeat([]byte("0123456789abcdef"), 20<<10/16)
	prod := tdial(t, addr)
	prod.connect()
	prod.write(tframe(frame.SEND, string(body), "destination:"+q, "receipt:p"))
	prod.receipt("p")
	m := cons.read()
	if m.Command != frame.MESSAGE {
		t.Fatalf("want MESSAGE, got %s %v %q", m.Command, m.Header, m.Body)
	}
	if !bytes.Equal(m.Body, body) {
		t.Fatalf("body of %d bytes, want the %d sent", len(m.Body), len(body))
	}
	if r := m.Header.Get("redelivered"); r != "" {
		t.Fatalf("first delivery marked redelivered:%s (count %s)", r, m.Header.Get("x-delivery-count"))
	}
	cons.write(tframe(frame.ACK, "", "id:"+m.Header.Get(frame.Ack), "receipt:a"))
	if msgs := cons.receipt("a"); len(msgs) != 0 {
		t.Fatalf("more messages: %v", msgs[0].Header)
	}
}

// TestSessionBrokerRefusals: a SEND the broker refuses because its queue is
// full or the disk is low gets an ERROR saying so, with its receipt-id,
// and the connection closes.
func TestSessionBrokerRefusals(t *testing.T) {
	for _, tc := range []struct {
		err       error
		msg, body string
	}{
		{fmt.Errorf("%w: /queue/full holds 1000 messages, its limit (queue.max_length)", replica.ErrQueueFull),
			"queue full", "/queue/full holds 1000 messages, its limit (queue.max_length)"},
		{fmt.Errorf("%w: 10 MiB free, store.min_free_bytes is 1 GiB", replica.ErrLowDisk),
			"broker low on disk space", "consumers can still receive and acknowledge"},
	} {
		t.Run(tc.msg, func(t *testing.T) {
			rb, srv := testServerCfg(t, nil)
			c := tdial(t, srv.Addr().String())
			c.connect()
			rb.mu.Lock()
			rb.applyErr = tc.err
			rb.mu.Unlock()
			c.write(tframe(frame.SEND, "m", "destination:/queue/full", "receipt:r1"))
			f := c.expectError(tc.msg)
			if got := f.Header.Get(frame.ReceiptId); got != "r1" {
				t.Errorf("ERROR receipt-id %q, want r1", got)
			}
			if !strings.Contains(string(f.Body), tc.body) {
				t.Errorf("ERROR body %q does not contain %q", f.Body, tc.body)
			}
		})
	}
}

// TestSessionTxBytesLimit: the bytes buffered in a connection's open
// transactions are bounded by MaxTxBytes: the frame that would pass it
// gets an ERROR naming the limit, with its receipt-id, the connection
// closes and the transaction's SENDs are dropped. ABORT frees the budget.
func TestSessionTxBytesLimit(t *testing.T) {
	const limit = 1000
	_, srv := testServerCfg(t, func(c *Config) { c.MaxTxBytes = limit })
	addr := srv.Addr().String()
	q := "/queue/tx-bytes"
	body := strings.Repeat("x", 400)
	c := tdial(t, addr)
	c.connect()
	c.write(tframe(frame.BEGIN, "", "transaction:t1"))
	c.write(tframe(frame.SEND, body, "destination:"+q, "transaction:t1"))
	c.write(tframe(frame.SEND, body, "destination:"+q, "transaction:t1", "receipt:s2"))
	c.receipt("s2")
	c.write(tframe(frame.ABORT, "", "transaction:t1"))
	c.write(tframe(frame.BEGIN, "", "transaction:t2"))
	c.write(tframe(frame.SEND, body, "destination:"+q, "transaction:t2", "receipt:s3"))
	c.receipt("s3")
	c.write(tframe(frame.SEND, body+body, "destination:"+q, "transaction:t2", "receipt:big"))
	f := c.expectError("transaction too large")
	if got := f.Header.Get(frame.ReceiptId); got != "big" {
		t.Errorf("ERROR receipt-id %q, want big", got)
	}
	if !strings.Contains(string(f.Body), "1000 bytes") {
		t.Errorf("ERROR body %q does not name the limit", f.Body)
	}
	// Nothing of t2 reached the queue: a sentinel sent now comes first.
	c2 := tdial(t, addr)
	c2.connect()
	c2.write(tframe(frame.SEND, "sentinel", "destination:"+q, "receipt:p"))
	c2.receipt("p")
	c2.write(tframe(frame.SUBSCRIBE, "", "id:0", "destination:"+q))
	if m := c2.read(); m.Command != frame.MESSAGE || string(m.Body) != "sentinel" {
		t.Fatalf("want the sentinel first, got %s %q", m.Command, m.Body)
	}
}
