package test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/cmd/brokerd/node"
	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/test/netsim"
	"github.com/go-stomp/stomp/v3"
	"github.com/go-stomp/stomp/v3/frame"
	"github.com/hashicorp/memberlist"
)

// memBrokers is N complete brokerd nodes in this process: gossip over a
// netsim network, peer links over loopback TCP cut by the same
// partitions (a dial across a partition fails, and a link is closed once
// its ends are separated), STOMP clients on loopback.
type memBrokers struct {
	*memCluster
	brokers map[string]*node.Node
	mu      sync.Mutex
	addrs   map[string]string // peer-link address -> node name
}

func newMemBrokers(t *testing.T, m, r int, names ...string) *memBrokers {
	return newMemBrokersConfig(t, config.Default(), m, r, names...)
}

// newMemBrokersConfig is newMemBrokers with base as every node's config
// (limits, queue settings); addresses, data directories and cluster
// settings are set here.
func newMemBrokersConfig(t testing.TB, base config.Config, m, r int, names ...string) *memBrokers {
	t.Helper()
	netw := netsim.New()
	tt, _ := t.(*testing.T)
	mb := &memBrokers{
		memCluster: &memCluster{t: tt, net: netw, m: m, nodes: map[string]*cluster.Node{}},
		brokers:    map[string]*node.Node{},
		addrs:      map[string]string{},
	}
	for i, name := range names {
		h := netw.Host(name)
		cfg := base
		cfg.Node.Name = name
		cfg.Node.DataDir = t.TempDir()
		cfg.STOMP.Addr = "127.0.0.1:0"
		cfg.Admin.Addr = "127.0.0.1:0"
		cfg.Store.Sync = "none"
		cfg.Cluster.GossipAddr = h.Addr()
		cfg.Cluster.AllowPlaintextGossip = true
		cfg.Cluster.PeerAddr = "127.0.0.1:0"
		cfg.Cluster.ActiveMembers = m
		cfg.Cluster.PromotionDelay = 200 * time.Millisecond
		cfg.Replica.Factor = r
		if i > 0 {
			cfg.Cluster.Join = []string{netw.Host(names[0]).Addr()}
		}
		level := slog.LevelWarn + 4
		if os.Getenv("BROKERD_TEST_LOG") != "" {
			level = slog.LevelInfo
		}
		log := slog.New(slog.NewTextHandler(io.Discard, nil))
		if level == slog.LevelInfo {
			log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
		}
		n, err := node.NewWithOptions(cfg, log, node.Options{
			Cluster: func(c *cluster.Config) {
				c.Transport = h.Transport()
				c.RejoinInterval = 300 * time.Millisecond
				c.Tick = 20 * time.Millisecond
				c.Memberlist = func(mc *memberlist.Config) {
					mc.ProbeInterval = 100 * time.Millisecond
					mc.ProbeTimeout = 50 * time.Millisecond
					mc.GossipInterval = 20 * time.Millisecond
					mc.SuspicionMult = 2
					mc.PushPullInterval = time.Second
					mc.TCPTimeout = 200 * time.Millisecond
					mc.GossipToTheDeadTime = 2 * time.Second
				}
			},
			PeerDial: mb.dialer(name),
		})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := n.Start(); err != nil {
			t.Fatalf("%s: start: %v", name, err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = n.Shutdown(ctx)
		})
		mb.mu.Lock()
		mb.addrs[n.PeerAddr()] = name
		mb.mu.Unlock()
		mb.brokers[name] = n
		mb.nodes[name] = n.Cluster()
		mb.names = append(mb.names, name)
	}
	return mb
}

// dialer dials peer links from node from, as the netsim network allows.
func (mb *memBrokers) dialer(from string) func(ctx context.Context, addr string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		mb.mu.Lock()
		to, ok := mb.addrs[addr]
		mb.mu.Unlock()
		if !ok {
			return nil, fmt.Errorf("dial %s: no such node", addr)
		}
		if !mb.net.Reachable(from, to) {
			time.Sleep(20 * time.Millisecond)
			return nil, fmt.Errorf("dial %s (%s): partitioned", addr, to)
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		done := make(chan struct{})
		go func() {
			t := time.NewTicker(10 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-done:
					return
				case <-t.C:
				}
				if !mb.net.Reachable(from, to) {
					c.Close()
					return
				}
			}
		}()
		return &watchedConn{Conn: c, done: done}, nil
	}
}

type watchedConn struct {
	net.Conn
	once sync.Once
	done chan struct{}
}

func (w *watchedConn) Close() error {
	w.once.Do(func() { close(w.done) })
	return w.Conn.Close()
}

func (mb *memBrokers) dial(name string) (*stomp.Conn, error) {
	return stomp.Dial("tcp", mb.brokers[name].STOMPAddr(), stomp.ConnOpt.HeartBeat(0, 0))
}

// TestReplicationPartitionHeal: 5 nodes, M=5, R=2. The network splits
// {a,b,c} | {d,e}; each side agrees on its own members and keeps serving:
// producers on both sides send receipted messages to the same queues and
// consumers on both sides acknowledge some. After the heal, draining
// every queue from one node finds every receipted message that was not
// acknowledged during the split (nothing lost); duplicates are counted.
func TestReplicationPartitionHeal(t *testing.T) {
	if testing.Short() {
		t.Skip("in-process cluster")
	}
	mb := newMemBrokers(t, 5, 2, "a", "b", "c", "d", "e")
	mb.waitConverged(15*time.Second, mb.names)
	queues := []string{"/queue/p1", "/queue/p2", "/queue/p3", "/queue/p4"}
	sideA, sideB := []string{"a", "b", "c"}, []string{"d", "e"}

	var mu sync.Mutex
	receipted := map[string]bool{}
	consumed := map[string]int{}
	unknown := 0
	produce := func(via, tag string, n int) {
		c, err := mb.dial(via)
		if err != nil {
			t.Errorf("dial %s: %v", via, err)
			return
		}
		defer c.Disconnect()
		for i := 0; i < n; i++ {
			q := queues[i%len(queues)]
			body := tag + "-" + strconv.Itoa(i)
			if err := c.Send(q, "text/plain", []byte(body), stomp.SendOpt.Receipt); err != nil {
				mu.Lock()
				unknown++
				mu.Unlock()
				if c, err = mb.dial(via); err != nil {
					t.Errorf("redial %s: %v", via, err)
					return
				}
				continue
			}
			mu.Lock()
			receipted[body] = true
			mu.Unlock()
		}
	}
	consume := func(via string, q string, n int) {
		c, err := mb.dial(via)
		if err != nil {
			t.Errorf("dial %s: %v", via, err)
			return
		}
		defer c.Disconnect()
		sub, err := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "8"))
		if err != nil {
			return
		}
		for i := 0; i < n; i++ {
			select {
			case m := <-sub.C:
				if m.Err != nil {
					return
				}
				if err := c.Ack(m); err != nil {
					return
				}
				mu.Lock()
				consumed[string(m.Body)]++
				mu.Unlock()
			case <-time.After(2 * time.Second):
				return
			}
		}
	}

	produce("a", "before", 80)
	mb.net.Partition(sideA, sideB)
	mb.waitConverged(15*time.Second, sideA, sideB)
	var wg sync.WaitGroup
	for _, p := range []struct{ via, tag string }{{"b", "A"}, {"e", "B"}} {
		wg.Add(1)
		go func() { defer wg.Done(); produce(p.via, p.tag, 200) }()
	}
	wg.Wait()
	for _, via := range []string{"c", "d"} {
		for _, q := range queues[:2] {
			consume(via, q, 20)
		}
	}
	mb.net.Heal()
	mb.waitConverged(20*time.Second, mb.names)

	// Drain everything from one node, reconnecting after an ERROR (an
	// ACK whose quorum could not be reached while the links came back),
	// as a client would.
	got := map[string]int{}
	redelivered := 0
	for _, q := range queues {
		deadline := time.Now().Add(20 * time.Second)
		for quiet := false; !quiet; {
			if time.Now().After(deadline) {
				t.Fatalf("drain %s: errors for 20 s", q)
			}
			c, err := mb.dial("c")
			if err != nil {
				t.Fatal(err)
			}
			sub, err := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "8"))
			if err != nil {
				t.Fatal(err)
			}
		drain:
			for {
				select {
				case m := <-sub.C:
					if m.Err != nil {
						t.Logf("drain %s: %v; reconnecting", q, m.Err)
						break drain
					}
					got[string(m.Body)]++
					if m.Header.Get("redelivered") == "true" {
						redelivered++
					}
					if err := c.Ack(m); err != nil {
						break drain
					}
				case <-time.After(2 * time.Second):
					quiet = true
					break drain
				}
			}
			_ = c.Disconnect()
		}
	}
	mu.Lock()
	defer mu.Unlock()
	lost := 0
	var example []string
	for b := range receipted {
		if got[b] == 0 && consumed[b] == 0 {
			lost++
			if len(example) < 5 {
				example = append(example, b)
			}
		}
	}
	dups := 0
	for b, n := range got {
		dups += n - 1
		if consumed[b] > 0 {
			dups++
		}
	}
	t.Logf("receipted %d (unknown outcome %d); consumed during the split %d; drained after the heal %d distinct, %d duplicates, %d marked redelivered; lost %d",
		len(receipted), unknown, len(consumed), len(got), dups, redelivered, lost)
	if lost > 0 {
		t.Fatalf("%d receipted messages lost, e.g. %v", lost, example)
	}
	if len(receipted) < 400 {
		t.Fatalf("only %d sends receipted: a side did not serve during the split", len(receipted))
	}
}

// TestReplicationAckedStaysAckedAfterHeal: 3 nodes, M=3, R=2. Messages
// are sent to queues of which node c holds a copy; c is cut off, and the
// other side consumes every message with client-individual acks (a
// receipted DISCONNECT confirms them). c's copies missed those acks. After
// the heal the acks and c's copies meet: draining every queue finds
// nothing that was acknowledged (the acks are remembered as tombstones,
// replica.tombstone_ttl), and nothing receipted and unacknowledged is
// lost.
func TestReplicationAckedStaysAckedAfterHeal(t *testing.T) {
	if testing.Short() {
		t.Skip("in-process cluster")
	}
	mb := newMemBrokers(t, 3, 2, "a", "b", "c")
	mb.waitConverged(15*time.Second, mb.names)
	st := mb.brokers["a"].Cluster().Status()
	cID := mb.brokers["c"].Cluster().Status().NodeID
	var queues []string
	for i := 0; len(queues) < 3; i++ {
		q := "/queue/heal" + strconv.Itoa(i)
		if slices.Contains(replica.ReplicaSet(q, st.ActiveSet, 2), cID) {
			queues = append(queues, q)
		}
	}
	const perQueue = 60
	sent := map[string]bool{}
	c, err := mb.dial("a")
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range queues {
		for i := range perQueue {
			body := q + "#" + strconv.Itoa(i)
			if err := c.Send(q, "text/plain", []byte(body), stomp.SendOpt.Receipt); err != nil {
				t.Fatalf("send before the split: %v", err)
			}
			sent[body] = true
		}
	}
	_ = c.Disconnect()

	mb.net.Partition([]string{"a", "b"}, []string{"c"})
	mb.waitConverged(15*time.Second, []string{"a", "b"}, []string{"c"})

	// Consume everything on the majority side; keep only what a receipted
	// DISCONNECT confirmed (an ACK refused while the sides renegotiate
	// leaves its message, which may then come back).
	acked := map[string]bool{}
	for _, q := range queues {
		deadline := time.Now().Add(20 * time.Second)
		for done := false; !done; {
			if time.Now().After(deadline) {
				t.Fatalf("consume %s during the split: not done in 20 s", q)
			}
			c, err := mb.dial("b")
			if err != nil {
				t.Fatal(err)
			}
			sub, err := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "8"))
			if err != nil {
				t.Fatal(err)
			}
			var batch []string
		read:
			for {
				select {
				case m := <-sub.C:
					if m.Err != nil {
						break read
					}
					if c.Ack(m) != nil {
						break read
					}
					batch = append(batch, string(m.Body))
				case <-time.After(time.Second):
					done = true
					break read
				}
			}
			if c.Disconnect() == nil {
				for _, b := range batch {
					acked[b] = true
				}
			} else {
				done = false
			}
		}
	}
	if len(acked) < len(sent)/2 {
		t.Fatalf("only %d of %d messages consumed during the split", len(acked), len(sent))
	}

	mb.net.Heal()
	mb.waitConverged(20*time.Second, mb.names)

	got := map[string]int{}
	for _, via := range []string{"c", "a"} {
		for _, q := range queues {
			deadline := time.Now().Add(20 * time.Second)
			for quiet := false; !quiet; {
				if time.Now().After(deadline) {
					t.Fatalf("drain %s: errors for 20 s", q)
				}
				c, err := mb.dial(via)
				if err != nil {
					t.Fatal(err)
				}
				sub, err := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "8"))
				if err != nil {
					t.Fatal(err)
				}
			drain:
				for {
					select {
					case m := <-sub.C:
						if m.Err != nil {
							break drain
						}
						got[string(m.Body)]++
						if acked[string(m.Body)] && len(got) <= 3 {
							t.Logf("via %s at %s: acknowledged during the split and delivered again: %s message-id %s redelivered %s",
								via, time.Now().Format("15:04:05.000"), m.Body, m.Header.Get("message-id"), m.Header.Get("redelivered"))
						}
						if c.Ack(m) != nil {
							break drain
						}
					case <-time.After(1500 * time.Millisecond):
						quiet = true
						break drain
					}
				}
				_ = c.Disconnect()
			}
		}
	}
	again, lost := 0, 0
	var example []string
	for b := range sent {
		switch {
		case acked[b] && got[b] > 0:
			again++
			if len(example) < 5 {
				example = append(example, b)
			}
		case !acked[b] && got[b] == 0:
			lost++
		}
	}
	t.Logf("sent %d, acknowledged during the split %d, drained after the heal %d; acknowledged and delivered again %d; lost %d",
		len(sent), len(acked), len(got), again, lost)
	if lost > 0 {
		t.Fatalf("%d receipted, unacknowledged messages lost", lost)
	}
	if again > 0 {
		t.Fatalf("%d messages acknowledged during the split were delivered again after the heal, e.g. %v", again, example)
	}
}

// TestReplicationTransactionAcrossOwners: a COMMIT whose SENDs go to two
// queues with different owners, one of which refuses its part (the queue
// is at queue.max_length), is not left half applied: the client gets an
// ERROR saying the transaction is recorded, and once the full queue has
// room the coordinator applies the rest. Both queues end with the
// transaction's message; neither part is lost.
func TestReplicationTransactionAcrossOwners(t *testing.T) {
	if testing.Short() {
		t.Skip("in-process cluster")
	}
	base := config.Default()
	base.Queue.MaxLength = 1
	mb := newMemBrokersConfig(t, base, 3, 2, "a", "b", "c")
	mb.waitConverged(15*time.Second, mb.names)
	st := mb.brokers["a"].Cluster().Status()
	self := st.NodeID
	var qa, qb string
	for i := 0; qa == "" || qb == ""; i++ {
		q := "/queue/tx" + strconv.Itoa(i)
		switch owner := replica.ReplicaSet(q, st.ActiveSet, 2)[0]; {
		case owner == self && qa == "":
			qa = q
		case owner != self && qb == "":
			qb = q
		}
	}
	c, err := mb.dial("a")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Send(qb, "text/plain", []byte("filler"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	_ = c.Disconnect()

	conn, err := net.Dial("tcp", mb.brokers["a"].STOMPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	rc := &rawConn{t: t, c: conn, r: frame.NewReader(br), br: br}
	rc.connect()
	rc.frame("BEGIN", "", "transaction", "t1")
	rc.frame("SEND", "to-a", "destination", qa, "transaction", "t1")
	rc.frame("SEND", "to-b", "destination", qb, "transaction", "t1")
	rc.frame("COMMIT", "", "transaction", "t1", "receipt", "c1")
	f := rc.read()
	if f.Command != frame.ERROR || !strings.Contains(string(f.Body), "transaction is recorded") {
		t.Fatalf("COMMIT with a part refused: got %s %v %q, want an ERROR saying the transaction is recorded", f.Command, f.Header, f.Body)
	}
	t.Logf("COMMIT answered: %s: %s", f.Header.Get(frame.Message), f.Body)

	// Make room in qb: the recorded part is applied by itself.
	got := map[string][]string{}
	for _, q := range []string{qb, qa, qb} {
		c, err := mb.dial("c")
		if err != nil {
			t.Fatal(err)
		}
		sub, err := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "1"))
		if err != nil {
			t.Fatal(err)
		}
		for quiet := false; !quiet; {
			select {
			case m := <-sub.C:
				if m.Err != nil {
					t.Fatal(m.Err)
				}
				got[q] = append(got[q], string(m.Body))
				if err := c.Ack(m); err != nil {
					t.Fatal(err)
				}
			case <-time.After(3 * time.Second):
				quiet = true
			}
		}
		_ = c.Disconnect()
	}
	if fmt.Sprint(got[qa]) != "[to-a]" {
		t.Fatalf("%s (coordinator's own part) holds %v, want [to-a]", qa, got[qa])
	}
	if fmt.Sprint(got[qb]) != "[filler to-b]" {
		t.Fatalf("%s (the refused part) holds %v, want [filler to-b]: the transaction was left half applied", qb, got[qb])
	}
}
