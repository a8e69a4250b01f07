package netsim

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

// recvPacket returns the next packet already queued on tr, or nil. Packets
// are queued synchronously by the sender, so no waiting is needed.
func recvPacket(tr memberlist.Transport) *memberlist.Packet {
	select {
	case p := <-tr.PacketCh():
		return p
	default:
		return nil
	}
}

func send(t *testing.T, from memberlist.Transport, to *Host, msg string) {
	t.Helper()
	if _, err := from.WriteTo([]byte(msg), to.Addr()); err != nil {
		t.Fatalf("WriteTo %s: %v", to.Name(), err)
	}
}

// expectPacket checks whether msg sent from src to dst arrives.
func expectPacket(t *testing.T, n *Network, src, dst string, want bool) {
	t.Helper()
	from, to := n.Host(src), n.Host(dst)
	msg := fmt.Sprintf("%s->%s", src, dst)
	send(t, from.Transport(), to, msg)
	p := recvPacket(to.Transport())
	switch {
	case want && p == nil:
		t.Fatalf("packet %s dropped, want delivered", msg)
	case !want && p != nil:
		t.Fatalf("packet %s delivered, want dropped", msg)
	case want && (string(p.Buf) != msg || p.From.String() != from.Addr()):
		t.Fatalf("got packet %q from %v, want %q from %s", p.Buf, p.From, msg, from.Addr())
	}
}

func TestHostAddresses(t *testing.T) {
	n := New()
	a, b := n.Host("a"), n.Host("b")
	if n.Host("a") != a {
		t.Fatal("Host(a) twice returned different hosts")
	}
	if a.Addr() != "10.0.0.1:7946" || b.Addr() != "10.0.0.2:7946" {
		t.Fatalf("addresses %s %s", a.Addr(), b.Addr())
	}
	ip, port, err := a.Transport().FinalAdvertiseAddr("", 0)
	if err != nil || !ip.Equal(net.ParseIP("10.0.0.1")) || port != 7946 {
		t.Fatalf("FinalAdvertiseAddr = %v %d %v", ip, port, err)
	}
}

func TestPacketDelivery(t *testing.T) {
	n := New()
	a, b := n.Host("a"), n.Host("b")
	ta, tb := a.Transport(), b.Transport()

	buf := []byte("hello")
	if _, err := ta.WriteTo(buf, b.Addr()); err != nil {
		t.Fatal(err)
	}
	copy(buf, "XXXXX") // the network must have copied the payload
	if _, err := tb.WriteToAddress([]byte("back"), memberlist.Address{Addr: a.Addr(), Name: "a"}); err != nil {
		t.Fatal(err)
	}

	p := recvPacket(tb)
	if p == nil || string(p.Buf) != "hello" || p.Timestamp.IsZero() {
		t.Fatalf("b got %+v", p)
	}
	if u, ok := p.From.(*net.UDPAddr); !ok || u.String() != a.Addr() {
		t.Fatalf("From = %#v, want *net.UDPAddr %s", p.From, a.Addr())
	}
	if p := recvPacket(ta); p == nil || string(p.Buf) != "back" || p.From.String() != b.Addr() {
		t.Fatalf("a got %+v", p)
	}

	// Unknown addresses are a silent drop (UDP); bad ones an error.
	if _, err := ta.WriteTo([]byte("x"), "10.9.9.9:7946"); err != nil {
		t.Fatalf("send to unknown address: %v", err)
	}
	if _, err := ta.WriteTo([]byte("x"), "no-port"); err == nil {
		t.Fatal("send to unparsable address succeeded")
	}
}

func TestPacketBufferFullDrops(t *testing.T) {
	n := New()
	a, b := n.Host("a"), n.Host("b")
	ta, tb := a.Transport(), b.Transport()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < packetBuffer+100; i++ {
			_, _ = ta.WriteTo([]byte{byte(i)}, b.Addr())
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("sender blocked on a full receiver")
	}
	if got := len(tb.PacketCh()); got != packetBuffer {
		t.Fatalf("queued %d packets, want %d", got, packetBuffer)
	}
}

func TestPacketPartition(t *testing.T) {
	n := New()
	for _, h := range []string{"a", "b", "c", "d", "e"} {
		n.Host(h).Transport()
	}
	n.Partition([]string{"a", "b"}, []string{"c"}) // d, e: the rest

	expectPacket(t, n, "a", "b", true)
	expectPacket(t, n, "b", "a", true)
	expectPacket(t, n, "d", "e", true)
	expectPacket(t, n, "a", "c", false)
	expectPacket(t, n, "c", "a", false)
	expectPacket(t, n, "a", "d", false)
	expectPacket(t, n, "d", "c", false)
	if n.Reachable("a", "c") || !n.Reachable("d", "e") {
		t.Fatal("Reachable disagrees with the partition")
	}

	// A new Partition replaces the old one.
	n.Partition([]string{"a", "c"})
	expectPacket(t, n, "a", "c", true)
	expectPacket(t, n, "a", "b", false)
	expectPacket(t, n, "b", "d", true)

	n.Heal()
	for _, src := range []string{"a", "b", "c", "d", "e"} {
		for _, dst := range []string{"a", "b", "c", "d", "e"} {
			if src != dst {
				expectPacket(t, n, src, dst, true)
			}
		}
	}
}

func TestPacketDrop(t *testing.T) {
	count := func(seed int64, p float64) int {
		n := NewSeeded(seed)
		a, b := n.Host("a"), n.Host("b")
		ta, tb := a.Transport(), b.Transport()
		n.SetDrop(p)
		got := 0
		for range 1000 {
			send(t, ta, b, "x")
			if recvPacket(tb) != nil {
				got++
			}
		}
		return got
	}
	if got := count(1, 0); got != 1000 {
		t.Fatalf("drop 0: %d/1000 delivered", got)
	}
	if got := count(1, 1); got != 0 {
		t.Fatalf("drop 1: %d/1000 delivered", got)
	}
	got := count(42, 0.3)
	if got < 600 || got > 800 {
		t.Fatalf("drop 0.3: %d/1000 delivered", got)
	}
	if again := count(42, 0.3); again != got {
		t.Fatalf("same seed delivered %d then %d", got, again)
	}
}

// dial opens a stream from src to dst and returns both ends.
func dial(t *testing.T, n *Network, src, dst string) (client, server net.Conn) {
	t.Helper()
	dstT := n.Host(dst).Transport()
	c, err := n.Host(src).Transport().DialTimeout(n.Host(dst).Addr(), time.Second)
	if err != nil {
		t.Fatalf("dial %s->%s: %v", src, dst, err)
	}
	select {
	case s := <-dstT.StreamCh():
		t.Cleanup(func() { _ = c.Close(); _ = s.Close() })
		return c, s
	case <-time.After(time.Second):
		t.Fatal("stream not accepted")
	}
	return nil, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// roundTrip writes msg on w and checks that r reads it.
func roundTrip(t *testing.T, w, r net.Conn, msg string) {
	t.Helper()
	if _, err := w.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	_ = r.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(r, buf); err != nil || string(buf) != msg {
		t.Fatalf("read %q, %v; want %q", buf, err, msg)
	}
}

// expectSilent checks that r reads nothing before a short deadline.
func expectSilent(t *testing.T, r net.Conn) {
	t.Helper()
	_ = r.SetReadDeadline(time.Now().Add(60 * time.Millisecond))
	buf := make([]byte, 16)
	n, err := r.Read(buf)
	if !isTimeout(err) {
		t.Fatalf("read %q, %v; want a timeout", buf[:n], err)
	}
}

func TestStreamBasics(t *testing.T) {
	n := New()
	c, s := dial(t, n, "a", "b")
	if c.RemoteAddr().String() != n.Host("b").Addr() || s.LocalAddr().String() != n.Host("b").Addr() {
		t.Fatalf("addrs: client remote %v, server local %v", c.RemoteAddr(), s.LocalAddr())
	}
	if !strings.HasPrefix(s.RemoteAddr().String(), n.Host("a").IP().String()+":") || s.RemoteAddr().String() != c.LocalAddr().String() {
		t.Fatalf("addrs: server remote %v, client local %v", s.RemoteAddr(), c.LocalAddr())
	}
	roundTrip(t, c, s, "ping")
	roundTrip(t, s, c, "pong")

	// Large writes do not need a concurrent reader up to the buffer size,
	// and block (until the deadline) beyond it.
	big := bytes.Repeat([]byte("x"), streamBuffer)
	if _, err := c.Write(big); err != nil {
		t.Fatal(err)
	}
	_ = c.SetWriteDeadline(time.Now().Add(30 * time.Millisecond))
	if k, err := c.Write([]byte("more")); k != 0 || !isTimeout(err) {
		t.Fatalf("write to full buffer: %d, %v", k, err)
	}
	_ = c.SetWriteDeadline(time.Time{})
	_ = s.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := io.ReadFull(s, make([]byte, streamBuffer)); err != nil {
		t.Fatal(err)
	}

	// A deadline in the past fails at once; clearing it works again.
	_ = s.SetDeadline(time.Now().Add(-time.Second))
	if _, err := s.Read(make([]byte, 1)); !isTimeout(err) {
		t.Fatalf("read past deadline: %v", err)
	}
	// Moving a deadline wakes a blocked reader.
	_ = s.SetDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() { _, err := s.Read(make([]byte, 1)); errc <- err }()
	time.Sleep(10 * time.Millisecond) // let the reader block (not needed for correctness)
	_ = s.SetReadDeadline(time.Now())
	if err := <-errc; !isTimeout(err) {
		t.Fatalf("read after deadline moved: %v", err)
	}
	_ = s.SetReadDeadline(time.Time{})

	// Close: the peer reads EOF after the remaining data, writes fail.
	if _, err := c.Write([]byte("bye")); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if b, err := io.ReadAll(s); string(b) != "bye" || err != nil {
		t.Fatalf("read after peer close: %q, %v", b, err)
	}
	if _, err := s.Write([]byte("x")); !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("write to closed peer: %v", err)
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read on closed conn: %v", err)
	}
}

func TestDialAcrossPartition(t *testing.T) {
	n := New()
	for _, h := range []string{"a", "b", "c"} {
		n.Host(h).Transport()
	}
	n.Partition([]string{"a", "b"}, []string{"c"})

	ta := n.Host("a").Transport()
	start := time.Now()
	_, err := ta.DialTimeout(n.Host("c").Addr(), 10*time.Second)
	if el := time.Since(start); !isTimeout(err) || el < maxDialFailDelay || el > 2*time.Second {
		t.Fatalf("dial across partition: %v after %v", err, el)
	}
	start = time.Now()
	_, err = ta.DialAddressTimeout(memberlist.Address{Addr: n.Host("c").Addr(), Name: "c"}, 5*time.Millisecond)
	if el := time.Since(start); !isTimeout(err) || el > maxDialFailDelay {
		t.Fatalf("dial with short timeout: %v after %v", err, el)
	}
	if _, err := ta.DialTimeout("10.9.9.9:7946", 5*time.Millisecond); !isTimeout(err) {
		t.Fatalf("dial unknown address: %v", err)
	}
	dial(t, n, "a", "b") // within the group

	n.Heal()
	dial(t, n, "a", "c")

	// A reachable host without a transport refuses at once.
	n.Host("x")
	if _, err := ta.DialTimeout(n.Host("x").Addr(), time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial host without transport: %v", err)
	}
}

func TestStreamSilentOnPartition(t *testing.T) {
	n := New()
	c, s := dial(t, n, "a", "b")
	roundTrip(t, c, s, "before")

	n.Partition([]string{"a"}, []string{"b"})
	if k, err := c.Write([]byte("lost")); k != 4 || err != nil {
		t.Fatalf("write across partition: %d, %v", k, err)
	}
	if k, err := s.Write([]byte("lost too")); k != 8 || err != nil {
		t.Fatalf("write across partition: %d, %v", k, err)
	}
	expectSilent(t, s)
	expectSilent(t, c)

	// A reader blocked without deadline during the partition gets data
	// written after the heal (the partition-time writes are gone).
	got := make(chan string, 1)
	_ = s.SetReadDeadline(time.Time{})
	go func() {
		buf := make([]byte, 16)
		k, err := s.Read(buf)
		if err != nil {
			got <- err.Error()
			return
		}
		got <- string(buf[:k])
	}()
	n.Heal()
	if _, err := c.Write([]byte("after")); err != nil {
		t.Fatal(err)
	}
	select {
	case msg := <-got:
		if msg != "after" {
			t.Fatalf("after heal read %q, want %q", msg, "after")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("reader not woken after heal")
	}
	roundTrip(t, s, c, "reply")

	// Close does not cross a partition either: no EOF until healed.
	n.Partition([]string{"a"})
	_ = c.Close()
	expectSilent(t, s)
	n.Heal()
	_ = s.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := s.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read after heal of closed peer: %v", err)
	}
}

func TestKillRevive(t *testing.T) {
	n := New()
	for _, h := range []string{"a", "b", "c"} {
		n.Host(h).Transport()
	}
	c, s := dial(t, n, "a", "b")

	n.Kill("b")
	expectPacket(t, n, "a", "b", false)
	expectPacket(t, n, "b", "a", false)
	expectPacket(t, n, "a", "c", true)
	if _, err := n.Host("a").Transport().DialTimeout(n.Host("b").Addr(), time.Second); !isTimeout(err) {
		t.Fatalf("dial to killed host: %v", err)
	}
	if _, err := n.Host("b").Transport().DialTimeout(n.Host("c").Addr(), time.Second); !isTimeout(err) {
		t.Fatalf("dial from killed host: %v", err)
	}
	if _, err := c.Write([]byte("lost")); err != nil {
		t.Fatal(err)
	}
	expectSilent(t, s)
	expectSilent(t, c)

	n.Revive("b")
	expectPacket(t, n, "a", "b", true)
	expectPacket(t, n, "b", "a", true)
	roundTrip(t, c, s, "alive")
	dial(t, n, "c", "b")
}

func TestTransportRestart(t *testing.T) {
	n := New()
	a, b := n.Host("a"), n.Host("b")
	ta, tb := a.Transport(), b.Transport()
	if b.Transport() != tb {
		t.Fatal("Transport() returned a new transport while the old one runs")
	}
	// Pending, never accepted streams are reset by Shutdown.
	pending, err := ta.DialTimeout(b.Addr(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := tb.Shutdown(); err != nil {
		t.Fatal(err)
	}
	_ = tb.Shutdown() // idempotent
	_ = pending.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := pending.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read on stream pending at shutdown: %v", err)
	}

	send(t, ta, b, "to nobody")
	if recvPacket(tb) != nil {
		t.Fatal("shut down transport received a packet")
	}
	if _, err := ta.DialTimeout(b.Addr(), time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial to shut down transport: %v", err)
	}
	if _, err := tb.WriteTo([]byte("x"), a.Addr()); !errors.Is(err, ErrShutdown) {
		t.Fatalf("send from shut down transport: %v", err)
	}

	tb2 := b.Transport()
	if tb2 == tb {
		t.Fatal("no new transport after Shutdown")
	}
	if ip, port, _ := tb2.FinalAdvertiseAddr("", 0); net.JoinHostPort(ip.String(), fmt.Sprint(port)) != b.Addr() {
		t.Fatal("restarted transport has a new address")
	}
	expectPacket(t, n, "a", "b", true)
	dial(t, n, "a", "b")
}

// ---- memberlist integration ----

// events records what a memberlist told its EventDelegate. Node fields are
// read inside the callbacks only: memberlist calls them under its lock and
// mutates the same Node later.
type events struct {
	mu     sync.Mutex
	addrs  map[string]string // every node ever seen: name -> address
	leaves map[string]int
}

func (e *events) NotifyJoin(n *memberlist.Node) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.addrs[n.Name] = n.Address()
}

func (e *events) NotifyLeave(n *memberlist.Node) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.leaves[n.Name]++
}

func (e *events) NotifyUpdate(*memberlist.Node) {}

func (e *events) leftCount(name string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.leaves[name]
}

func (e *events) known() map[string]string {
	e.mu.Lock()
	defer e.mu.Unlock()
	m := make(map[string]string, len(e.addrs))
	for k, v := range e.addrs {
		m[k] = v
	}
	return m
}

type node struct {
	name string
	ml   *memberlist.Memberlist
	ev   *events
}

func startNode(t *testing.T, n *Network, name string) *node {
	t.Helper()
	h := n.Host(name)
	ev := &events{addrs: map[string]string{}, leaves: map[string]int{}}
	c := memberlist.DefaultLocalConfig()
	c.Name = name
	c.Transport = h.Transport()
	c.BindAddr = h.IP().String()
	c.BindPort = h.Port()
	c.AdvertiseAddr = h.IP().String()
	c.AdvertisePort = h.Port()
	c.ProbeInterval = 100 * time.Millisecond
	c.ProbeTimeout = 50 * time.Millisecond
	c.GossipInterval = 20 * time.Millisecond
	c.SuspicionMult = 2
	c.PushPullInterval = time.Second
	c.TCPTimeout = 250 * time.Millisecond // bounds push/pull on a stream gone silent
	logOut := io.Discard
	if os.Getenv("NETSIM_LOG") != "" {
		logOut = os.Stderr // memberlist's debug log, for diagnosis
	}
	c.Logger = log.New(logOut, name+" ", log.Lmicroseconds)
	c.Events = ev
	ml, err := memberlist.Create(c)
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	t.Cleanup(func() { _ = ml.Shutdown() })
	return &node{name: name, ml: ml, ev: ev}
}

// members returns the sorted names of the nodes nd considers not dead
// (alive or suspect). Only Name is read: memberlist rewrites the other
// fields of the returned Nodes without synchronisation with the caller,
// and Node.State is never set (always StateAlive).
func (nd *node) members() []string {
	var names []string
	for _, m := range nd.ml.Members() {
		names = append(names, m.Name)
	}
	sort.Strings(names)
	return names
}

// rejoin is the loop the cluster layer has to run so that a healed
// partition (or a revived node) re-merges: every interval, Join each peer
// ever seen (plus the seeds) that is not currently a member. memberlist
// alone never contacts peers it has declared dead.
func (nd *node) rejoin(ctx context.Context, seeds []string, every time.Duration) {
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		known := nd.ev.known()
		skip := map[string]bool{known[nd.name]: true} // self
		for _, name := range nd.members() {
			skip[known[name]] = true
		}
		targets := map[string]bool{}
		for _, addr := range known {
			targets[addr] = true
		}
		for _, addr := range seeds {
			targets[addr] = true
		}
		for addr := range targets {
			if skip[addr] {
				continue
			}
			if ctx.Err() != nil {
				return
			}
			_, _ = nd.ml.Join([]string{addr}) // fails fast while unreachable
		}
	}
}

// waitViews polls until every node's member list equals want(node).
func waitViews(t *testing.T, what string, nodes []*node, want func(*node) []string) {
	t.Helper()
	deadline := time.Now().Add(8 * time.Second)
	for {
		var bad []string
		for _, nd := range nodes {
			if got, w := nd.members(), want(nd); !slices.Equal(got, w) {
				bad = append(bad, fmt.Sprintf("%s sees %v want %v", nd.name, got, w))
			}
		}
		if len(bad) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: timed out: %s", what, strings.Join(bad, "; "))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestMemberlistPartitionHeal(t *testing.T) {
	if testing.Short() {
		t.Skip("runs real memberlist instances for several seconds")
	}
	n := NewSeeded(1)
	names := []string{"a", "b", "c", "d", "e"}
	var nodes []*node
	for _, name := range names {
		nodes = append(nodes, startNode(t, n, name))
	}
	all := func(*node) []string { return names }

	start := time.Now()
	for _, nd := range nodes[1:] {
		if _, err := nd.ml.Join([]string{n.Host("a").Addr()}); err != nil {
			t.Fatalf("%s join: %v", nd.name, err)
		}
	}
	waitViews(t, "join", nodes, all)
	t.Logf("joined after %v", time.Since(start))

	left, right := []string{"a", "b", "c"}, []string{"d", "e"}
	n.Partition(left, right)
	start = time.Now()
	waitViews(t, "partition", nodes, func(nd *node) []string {
		if slices.Contains(left, nd.name) {
			return left
		}
		return right
	})
	t.Logf("partition detected after %v", time.Since(start))

	// Healing the network alone does not re-merge memberlist (see the
	// package doc); the cluster layer's rejoin loop does.
	n.Heal()
	start = time.Now()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	for _, nd := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nd.rejoin(ctx, []string{n.Host("a").Addr()}, 200*time.Millisecond)
		}()
	}
	waitViews(t, "heal", nodes, all)
	t.Logf("re-merged after %v", time.Since(start))

	// Kill e: the others declare it dead.
	n.Kill("e")
	start = time.Now()
	others := nodes[:4]
	waitViews(t, "kill", others, func(*node) []string { return names[:4] })
	for _, nd := range others {
		if nd.ev.leftCount("e") == 0 {
			t.Fatalf("%s got no leave event for e", nd.name)
		}
	}
	t.Logf("e declared dead after %v", time.Since(start))

	// Revive e: the rejoin loops merge it back.
	n.Revive("e")
	start = time.Now()
	waitViews(t, "revive", nodes, all)
	t.Logf("e back after %v", time.Since(start))
}
