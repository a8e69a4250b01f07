package test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cmd/brokerd/node"
	"github.com/brokerd/brokerd/config"
	"github.com/go-stomp/stomp/v3"
	"github.com/go-stomp/stomp/v3/frame"
)

// broker is one in-process brokerd node for a test.
type broker struct {
	t    testing.TB
	cfg  config.Config
	node *node.Node
}

// testConfig is a config on free loopback ports in a fresh directory.
func testConfig(t testing.TB) config.Config {
	cfg := config.Default()
	cfg.Node.Name = "test"
	cfg.Node.DataDir = t.TempDir()
	cfg.STOMP.Addr = "127.0.0.1:0"
	cfg.Admin.Addr = "127.0.0.1:0"
	cfg.Store.Sync = "none"
	return cfg
}

// startBroker starts a node with testConfig changed by mutate; it is shut
// down when the test ends.
func startBroker(t testing.TB, mutate func(*config.Config)) *broker {
	t.Helper()
	cfg := testConfig(t)
	if mutate != nil {
		mutate(&cfg)
	}
	return startBrokerConfig(t, cfg)
}

func startBrokerConfig(t testing.TB, cfg config.Config) *broker {
	t.Helper()
	if os.Getenv("BROKERD_TEST_CLUSTER") != "" {
		// The same tests against one node of a 3-node cluster (R=2):
		// about two thirds of their queues are owned by the other
		// nodes, so they run through forwarding.
		mb := newMemBrokersConfig(t, cfg, 3, 2, "a", "b", "c")
		if mt, ok := t.(*testing.T); ok {
			mb.waitConverged(15*time.Second, mb.names)
			_ = mt
		}
		b := &broker{t: t, cfg: cfg, node: mb.brokers["a"]}
		return b
	}
	level := slog.LevelWarn
	if os.Getenv("BROKERD_TEST_LOG") != "" {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	n, err := node.New(cfg, log)
	if err != nil {
		t.Fatalf("node.New: %v", err)
	}
	if err := n.Start(); err != nil {
		t.Fatalf("node.Start: %v", err)
	}
	b := &broker{t: t, cfg: cfg, node: n}
	t.Cleanup(b.stop)
	return b
}

func (b *broker) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = b.node.Shutdown(ctx)
}

// restart shuts the node down and starts a new one on the same data
// directory (and new ports).
func (b *broker) restart() *broker {
	b.t.Helper()
	if os.Getenv("BROKERD_TEST_CLUSTER") != "" {
		// A fresh cluster would start empty: restarts of a cluster's
		// nodes are tested by the process tests (replication_process_test.go).
		b.t.Skip("restarts the broker: not in BROKERD_TEST_CLUSTER mode")
	}
	b.stop()
	cfg := b.cfg
	return startBrokerConfig(b.t, cfg)
}

func (b *broker) addr() string { return b.node.STOMPAddr() }

// dial connects go-stomp's client; it is disconnected when the test ends.
func (b *broker) dial(opts ...func(*stomp.Conn) error) *stomp.Conn {
	b.t.Helper()
	opts = append([]func(*stomp.Conn) error{stomp.ConnOpt.HeartBeat(0, 0)}, opts...)
	c, err := stomp.Dial("tcp", b.addr(), opts...)
	if err != nil {
		b.t.Fatalf("dial %s: %v", b.addr(), err)
	}
	b.t.Cleanup(func() { _ = c.MustDisconnect() })
	return c
}

// rawConn is a STOMP connection driven frame by frame.
type rawConn struct {
	t  testing.TB
	c  net.Conn
	r  *frame.Reader
	br *bufio.Reader
}

func (b *broker) raw() *rawConn {
	b.t.Helper()
	c, err := net.Dial("tcp", b.addr())
	if err != nil {
		b.t.Fatalf("dial: %v", err)
	}
	b.t.Cleanup(func() { c.Close() })
	br := bufio.NewReader(c)
	return &rawConn{t: b.t, c: c, r: frame.NewReader(br), br: br}
}

// write sends raw bytes.
func (rc *rawConn) write(s string) {
	rc.t.Helper()
	if _, err := io.WriteString(rc.c, s); err != nil {
		rc.t.Fatalf("write: %v", err)
	}
}

// connect sends CONNECT with accept-version 1.2 and expects CONNECTED.
func (rc *rawConn) connect(extra ...string) *frame.Frame {
	rc.t.Helper()
	h := "CONNECT\naccept-version:1.2\nhost:/\nheart-beat:0,0\n"
	for i := 0; i+1 < len(extra); i += 2 {
		h += extra[i] + ":" + extra[i+1] + "\n"
	}
	rc.write(h + "\n\x00")
	f := rc.read()
	if f.Command != frame.CONNECTED {
		rc.t.Fatalf("want CONNECTED, got %s %v %q", f.Command, f.Header, f.Body)
	}
	return f
}

// read reads the next frame, skipping heart-beats, within 5 s.
func (rc *rawConn) read() *frame.Frame {
	rc.t.Helper()
	_ = rc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		f, err := rc.r.Read()
		if err != nil {
			rc.t.Fatalf("read frame: %v", err)
		}
		if f != nil {
			return f
		}
	}
}

// expectError reads an ERROR frame whose message contains want, then
// expects the server to close the connection.
func (rc *rawConn) expectError(want string) *frame.Frame {
	rc.t.Helper()
	f := rc.read()
	if f.Command != frame.ERROR {
		rc.t.Fatalf("want ERROR (%s), got %s %v", want, f.Command, f.Header)
	}
	if msg := f.Header.Get(frame.Message); !strings.Contains(msg, want) {
		rc.t.Fatalf("ERROR message %q does not contain %q (body %q)", msg, want, f.Body)
	}
	rc.expectClosed()
	return f
}

// expectClosed expects EOF within 5 s.
func (rc *rawConn) expectClosed() {
	rc.t.Helper()
	_ = rc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(rc.br)
	if err != nil {
		rc.t.Fatalf("want the server to close the connection, got %v after %q", err, b)
	}
	if strings.Trim(string(b), "\n") != "" {
		rc.t.Fatalf("want close, got more data %q", b)
	}
}

// recv receives one message from sub within d.
func recv(t testing.TB, sub *stomp.Subscription, d time.Duration) *stomp.Message {
	t.Helper()
	select {
	case m, ok := <-sub.C:
		if !ok {
			t.Fatalf("subscription %s closed", sub.Destination())
		}
		if m.Err != nil {
			t.Fatalf("subscription %s: %v", sub.Destination(), m.Err)
		}
		return m
	case <-time.After(d):
		t.Fatalf("no message on %s within %v", sub.Destination(), d)
	}
	return nil
}

// recvNone expects no message on sub for d.
func recvNone(t testing.TB, sub *stomp.Subscription, d time.Duration) {
	t.Helper()
	select {
	case m := <-sub.C:
		if m != nil && m.Err == nil {
			t.Fatalf("unexpected message on %s: %q %v", sub.Destination(), m.Body, m.Header)
		}
	case <-time.After(d):
	}
}

func uniqueQueue(t testing.TB) string {
	return fmt.Sprintf("/queue/%s-%d", strings.ReplaceAll(t.Name(), "/", "_"), time.Now().UnixNano())
}

// settle returns once every frame c sent before has taken effect: a
// RECEIPT comes only after the effects of all earlier frames.
func settle(t testing.TB, c *stomp.Conn) {
	t.Helper()
	if err := c.Send("/topic/brokerd.test.settle", "", nil, stomp.SendOpt.Receipt); err != nil {
		t.Fatalf("settle: %v", err)
	}
}
