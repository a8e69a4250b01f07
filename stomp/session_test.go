package stomp

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"github.com/prometheus/client_golang/prometheus"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/store"
)

// recBroker wraps a Broker, records its calls and can fail the next Apply.
type recBroker struct {
	inner    Broker
	mu       sync.Mutex
	log      []string
	failNext bool
	applyErr error // returned by Apply, which then applies nothing
	quiet    bool  // pass Apply and Barrier through, recording nothing
	subs     []replica.Sub
}

func (b *recBroker) Subscribe(o replica.SubOptions) (replica.Sub, error) {
	rs, err := b.inner.Subscribe(o)
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	b.subs = append(b.subs, rs)
	b.mu.Unlock()
	return rs, nil
}

// closedSubs counts the subscriptions made through b that are closed.
func (b *recBroker) closedSubs() int {
	b.mu.Lock()
	subs := b.subs
	b.mu.Unlock()
	n := 0
	for _, rs := range subs {
		if errors.Is(rs.Check(0), replica.ErrSubscriptionClosed) {
			n++
		}
	}
	return n
}
func (b *recBroker) Apply(x *replica.Batch, done func(error)) error {
	b.mu.Lock()
	if b.quiet {
		b.mu.Unlock()
		return b.inner.Apply(x, done)
	}
	dests := []string{}
	for _, m := range x.Sends {
		dests = append(dests, m.Dest)
	}
	b.log = append(b.log, "apply sync="+map[bool]string{true: "T", false: "F"}[x.Sync]+" "+strings.Join(dests, ","))
	fail := b.failNext
	applyErr := b.applyErr
	b.mu.Unlock()
	if applyErr != nil {
		return applyErr
	}
	if fail {
		done(errors.New("disk on fire"))
		return nil
	}
	return b.inner.Apply(x, func(err error) {
		b.mu.Lock()
		b.log = append(b.log, "done")
		b.mu.Unlock()
		done(err)
	})
}
func (b *recBroker) Barrier(done func(error)) {
	b.mu.Lock()
	quiet := b.quiet
	b.mu.Unlock()
	if quiet {
		b.inner.Barrier(done)
		return
	}
	closed := b.closedSubs()
	b.mu.Lock()
	b.log = append(b.log, "barrier")
	b.mu.Unlock()
	b.inner.Barrier(func(err error) {
		b.mu.Lock()
		b.log = append(b.log, fmt.Sprintf("barrier done, issued after %d closes", closed))
		b.mu.Unlock()
		done(err)
	})
}

func testServer(t *testing.T) (*recBroker, string) {
	rb, srv := testServerCfg(t, nil)
	return rb, srv.Addr().String()
}

// testServerCfg starts a Server on a fresh store and replica, with
// DefaultConfig changed by mutate.
func testServerCfg(t testing.TB, mutate func(*Config)) (*recBroker, *Server) {
	scfg := store.DefaultConfig(filepath.Join(t.TempDir(), "r.db"))
	scfg.Sync = store.SyncNone
	scfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	st, err := store.Open(scfg)
	if err != nil {
		t.Fatal(err)
	}
	st.Start()
	t.Cleanup(func() { st.Close() })
	rcfg := replica.DefaultConfig()
	rcfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	rep := replica.New(rcfg, st)
	rep.Start()
	rb := &recBroker{inner: Local(rep)}
	cfg := DefaultConfig()
	cfg.Addr = "127.0.0.1:0"
	cfg.Logger = rcfg.Logger
	if mutate != nil {
		mutate(&cfg)
	}
	srv := NewServer(cfg, rb)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Shutdown(context.Background()) })
	return rb, srv
}

func readAll(t *testing.T, c net.Conn) string {
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	b, _ := io.ReadAll(bufio.NewReader(c))
	return strings.ReplaceAll(string(b), "\x00", "|")
}

// A store failure must reach the client as an ERROR frame.
func TestSessionStoreFailureSendsError(t *testing.T) {
	rb, addr := testServer(t)
	rb.failNext = true
	c, _ := net.Dial("tcp", addr)
	io.WriteString(c, "CONNECT\naccept-version:1.2\nhost:/\n\n\x00"+
		"SEND\ndestination:/queue/a\nreceipt:r1\n\nq\x00")
	out := readAll(t, c)
	if !strings.Contains(out, "ERROR\nmessage:internal error\nreceipt-id:r1") {
		t.Fatalf("want an ERROR frame for r1 after the store failed, the client saw %q", out)
	}
	if strings.Contains(out, "RECEIPT") {
		t.Fatalf("a RECEIPT for a frame whose write failed: %q", out)
	}
}

// TestSessionOneReceiptPerFrame: an UNSUBSCRIBE with a receipt after an
// unsynced SEND gets exactly one RECEIPT (after a barrier), not two.
func TestSessionOneReceiptPerFrame(t *testing.T) {
	_, addr := testServer(t)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "CONNECT\naccept-version:1.2\nhost:/\n\n\x00"+
		"SUBSCRIBE\nid:1\ndestination:/queue/one\n\n\x00"+
		"SEND\ndestination:/queue/other\n\nq\x00"+
		"UNSUBSCRIBE\nid:1\nreceipt:u\n\n\x00"+
		"DISCONNECT\nreceipt:d\n\n\x00")
	out := readAll(t, c)
	if n := strings.Count(out, "receipt-id:u"); n != 1 {
		t.Fatalf("want one RECEIPT for the UNSUBSCRIBE, got %d in %q", n, out)
	}
	if n := strings.Count(out, "receipt-id:d"); n != 1 {
		t.Fatalf("want one RECEIPT for the DISCONNECT, got %d in %q", n, out)
	}
}

// TestReceiptSecondsMetric: brokerd_stomp_receipt_seconds counts one
// observation per RECEIPT written (DISCONNECT's included), none for frames
// without a receipt, each from the frame's read to the RECEIPT's write.
func TestReceiptSecondsMetric(t *testing.T) {
	reg := prometheus.NewRegistry()
	_, srv := testServerCfg(t, func(c *Config) { c.Registerer = reg })
	c, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	io.WriteString(c, "CONNECT\naccept-version:1.2\nhost:/\n\n\x00"+
		"SEND\ndestination:/queue/m\nreceipt:1\n\na\x00"+
		"SEND\ndestination:/queue/m\n\nb\x00"+
		"SEND\ndestination:/queue/m\nreceipt:2\n\nc\x00"+
		"DISCONNECT\nreceipt:d\n\n\x00")
	out := readAll(t, c)
	elapsed := time.Since(start)
	if strings.Count(out, "RECEIPT") != 3 {
		t.Fatalf("want 3 RECEIPTs, got %q", out)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "brokerd_stomp_receipt_seconds" {
			continue
		}
		h := mf.GetMetric()[0].GetHistogram()
		if h.GetSampleCount() != 3 {
			t.Fatalf("%d receipt observations, want 3", h.GetSampleCount())
		}
		if s := h.GetSampleSum(); s <= 0 || s > 3*elapsed.Seconds() {
			t.Fatalf("receipt seconds sum %v, want in (0, %v]", s, 3*elapsed.Seconds())
		}
		return
	}
	t.Fatal("brokerd_stomp_receipt_seconds not registered")
}
