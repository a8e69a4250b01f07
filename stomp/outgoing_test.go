package stomp

import (
	"errors"
	"io"
	"net"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-stomp/stomp/v3/frame"
)

// outWatch records, per session, the largest outgoing byte count seen,
// and signals when a session's reader first waits for room.
type outWatch struct {
	mu   sync.Mutex
	peak map[*session]int64
	full chan *session
}

func watchOutgoing(t *testing.T) *outWatch {
	w := &outWatch{peak: make(map[*session]int64), full: make(chan *session, 16)}
	testHookOutBytes = func(s *session, n int64) {
		w.mu.Lock()
		if n > w.peak[s] {
			w.peak[s] = n
		}
		w.mu.Unlock()
	}
	testHookOutFull = func(s *session) {
		select {
		case w.full <- s:
		default:
		}
	}
	// Registered before the server's cleanup, so it runs after the
	// server has shut down.
	t.Cleanup(func() { testHookOutBytes, testHookOutFull = nil, nil })
	return w
}

func (w *outWatch) max() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	var m int64
	for _, n := range w.peak {
		m = max(m, n)
	}
	return m
}

// heapPeak samples the live heap (after a GC) until stop is closed and
// returns the largest seen.
func heapPeak(stop <-chan struct{}) <-chan uint64 {
	res := make(chan uint64, 1)
	go func() {
		var ms runtime.MemStats
		var peak uint64
		tk := time.NewTicker(20 * time.Millisecond)
		defer tk.Stop()
		for {
			runtime.GC()
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapAlloc)
			select {
			case <-stop:
				res <- peak
				return
			case <-tk.C:
			}
		}
	}()
	return res
}

// TestSessionOutgoingBounded: a client that subscribes, then sends 200,000
// receipted frames and never reads. The server stops reading its frames
// once MaxOutgoingBytes of RECEIPTs are queued (the queue never holds
// more, and the broker's heap stays small), keeps serving other clients
// meanwhile, closes the connection once its writes have made no progress
// for WriteTimeout, and the messages that client held go back to the
// queue.
func TestSessionOutgoingBounded(t *testing.T) {
	const (
		limit   = 64 << 10
		timeout = time.Second
		frames  = 200000
		msgs    = 50
	)
	w := watchOutgoing(t)
	rb, srv := testServerCfg(t, func(c *Config) {
		c.MaxOutgoingBytes = limit
		c.WriteTimeout = timeout
	})
	rb.mu.Lock()
	rb.quiet = true // its log would grow with every frame
	rb.mu.Unlock()
	addr := srv.Addr().String()
	q := "/queue/outgoing-bounded"

	prod := tdial(t, addr)
	prod.connect()
	for i := 0; i < msgs; i++ {
		prod.write(tframe(frame.SEND, "held-"+strconv.Itoa(i)+strings.Repeat(".", 1000), "destination:"+q))
	}
	prod.write(tframe(frame.SEND, "", "destination:/topic/nobody", "receipt:p"))
	prod.receipt("p")

	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc
	stopHeap := make(chan struct{})
	peakc := heapPeak(stopHeap)

	// The flooder: receipted SENDs to a topic nobody reads (nothing is
	// stored), long receipt ids, and it never reads a byte.
	fl, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer fl.Close()
	wrote := make(chan error, 1)
	go func() {
		var sb strings.Builder
		sb.WriteString(tframe(frame.CONNECT, "", "accept-version:1.2", "host:/", "heart-beat:0,0"))
		sb.WriteString(tframe(frame.SUBSCRIBE, "", "id:0", "destination:"+q, "ack:client-individual"))
		if _, err := io.WriteString(fl, sb.String()); err != nil {
			wrote <- err
			return
		}
		const chunk = 1000
		id := strings.Repeat("r", 64)
		var buf strings.Builder
		for i := 0; i < chunk; i++ {
			buf.WriteString(tframe(frame.SEND, "", "destination:/topic/nobody", "receipt:"+id+strconv.Itoa(i)))
		}
		b := []byte(buf.String())
		for i := 0; i < frames/chunk; i++ {
			if _, err := fl.Write(b); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- nil
	}()

	// The server stops reading the flooder.
	select {
	case <-w.full:
	case err := <-wrote:
		t.Fatalf("the flooder wrote everything (%v) and the server never waited for room", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the server never stopped reading the flooder")
	}
	stalled := time.Now()

	// Others are served meanwhile.
	other := tdial(t, addr)
	other.connect()
	other.write(tframe(frame.SEND, "x", "destination:/queue/other", "receipt:o"))
	other.receipt("o")
	other.write(tframe(frame.SUBSCRIBE, "", "id:0", "destination:/queue/other"))
	if m := other.read(); m.Command != frame.MESSAGE || string(m.Body) != "x" {
		t.Fatalf("other client: got %s %q", m.Command, m.Body)
	}

	// The flooder is disconnected: its blocked write fails, and its
	// connection then reads as closed (after what was sent to it).
	select {
	case err := <-wrote:
		if err == nil {
			t.Fatal("the flooder wrote all its frames: the server kept reading")
		}
	case <-time.After(timeout + 20*time.Second):
		t.Fatalf("the flooder is still connected %v after the server stopped reading it", time.Since(stalled))
	}
	closedAfter := time.Since(stalled)
	close(stopHeap)
	peak := <-peakc
	_ = fl.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = io.Copy(io.Discard, fl)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the flooder's connection was not closed: %v", err)
	}

	if got := w.max(); got > limit {
		t.Errorf("a session queued %d outgoing bytes, more than MaxOutgoingBytes %d", got, limit)
	}
	if grew := int64(peak) - int64(base); grew > 16<<20 {
		t.Errorf("the heap grew by %d MiB while a client did not read", grew>>20)
	}
	t.Logf("live heap grew by at most %d KiB; largest queue %d bytes; closed %v after the reader stopped",
		(int64(peak)-int64(base))>>10, w.max(), closedAfter.Round(time.Millisecond))

	// The messages the flooder held (some written to it, none
	// acknowledged) come back to the queue.
	c := tdial(t, addr)
	c.connect()
	c.write(tframe(frame.SUBSCRIBE, "", "id:0", "destination:"+q))
	seen := map[string]bool{}
	for len(seen) < msgs {
		m := c.read()
		if m.Command != frame.MESSAGE {
			t.Fatalf("got %s %v", m.Command, m.Header)
		}
		seen[strings.TrimRight(string(m.Body), ".")] = true
	}
}
