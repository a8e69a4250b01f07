package cluster_test

import (
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/test/netsim"
	"github.com/hashicorp/memberlist"
)

// dialCounter counts the streams a node opens, by address.
type dialCounter struct {
	memberlist.NodeAwareTransport
	mu    sync.Mutex
	dials map[string]int
}

func (d *dialCounter) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return d.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

func (d *dialCounter) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	d.mu.Lock()
	d.dials[a.Addr]++
	d.mu.Unlock()
	return d.NodeAwareTransport.DialAddressTimeout(a, timeout)
}

func (d *dialCounter) count(addr string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.dials[addr]
}

const rejoinEvery = 50 * time.Millisecond

// startNode starts a cluster node on host name of netw, with fast timings;
// transport wraps the host's transport and now is its clock (nil: real).
func startNode(t *testing.T, netw *netsim.Network, name string, join []string, transport func(memberlist.NodeAwareTransport) memberlist.NodeAwareTransport, now func() time.Time) *cluster.Node {
	t.Helper()
	cfg := testConfig(netw, name, join)
	if transport != nil {
		cfg.Transport = transport(cfg.Transport)
	}
	if now != nil {
		cfg.Now = now
	}
	return startConfig(t, cfg)
}

// testConfig is the configuration of a node on host name of netw (a fresh
// transport of that host), with fast timings and M = 3.
func testConfig(netw *netsim.Network, name string, join []string) cluster.Config {
	h := netw.Host(name)
	cfg := cluster.DefaultConfig()
	cfg.NodeID = "id-" + name
	cfg.NodeName = name
	cfg.BindAddr = h.Addr()
	cfg.Transport = h.Transport()
	cfg.Join = join
	cfg.ActiveMembers = 3
	cfg.PromotionDelay = 100 * time.Millisecond
	cfg.RejoinInterval = rejoinEvery
	cfg.Tick = 20 * time.Millisecond
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg.Memberlist = func(mc *memberlist.Config) {
		mc.ProbeInterval = 100 * time.Millisecond
		mc.ProbeTimeout = 50 * time.Millisecond
		mc.GossipInterval = 20 * time.Millisecond
		mc.SuspicionMult = 2
		mc.PushPullInterval = time.Second
		mc.TCPTimeout = 200 * time.Millisecond
		mc.GossipToTheDeadTime = 2 * time.Second
	}
	return cfg
}

// startConfig creates and starts a node, closed when the test ends.
func startConfig(t *testing.T, cfg cluster.Config) *cluster.Node {
	t.Helper()
	n, err := cluster.New(cfg)
	if err != nil {
		t.Fatalf("%s: %v", cfg.NodeName, err)
	}
	if err := n.Start(); err != nil {
		t.Fatalf("%s: start: %v", cfg.NodeName, err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// memberState is name's state in n's status, "" when n does not list it.
func memberState(n *cluster.Node, name string) string {
	for _, m := range n.Status().Members {
		if m.Name == name {
			return m.State
		}
	}
	return ""
}

// waitFor polls cond every 10 ms until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestForgetDeadMember: a member that died is listed as dead and its address
// re-dialled (to heal partitions) until it has been dead for ForgetAfter (by
// default 24h; the node's clock is moved on a day); then it leaves the
// status and nobody dials it any more. A node that has not reached
// ForgetAfter still lists it.
func TestForgetDeadMember(t *testing.T) {
	netw := netsim.New()
	var offset atomic.Int64 // added to a's clock
	clock := func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	var counter *dialCounter
	a := startNode(t, netw, "a", nil, func(tr memberlist.NodeAwareTransport) memberlist.NodeAwareTransport {
		counter = &dialCounter{NodeAwareTransport: tr, dials: map[string]int{}}
		return counter
	}, clock)
	if got := cluster.DefaultConfig().ForgetAfter; got != 24*time.Hour {
		t.Fatalf("DefaultConfig().ForgetAfter = %v, want 24h", got)
	}
	join := []string{netw.Host("a").Addr()}
	b := startNode(t, netw, "b", join, nil, nil)
	c := startNode(t, netw, "c", join, nil, nil)
	waitFor(t, 10*time.Second, "a and b see c alive", func() bool {
		return memberState(a, "c") == "alive" && memberState(b, "c") == "alive" && memberState(a, "b") == "alive"
	})

	victim := netw.Host("c").Addr()
	netw.Kill("c")
	c.Close()
	waitFor(t, 10*time.Second, "a sees c dead", func() bool { return memberState(a, "c") == "dead" })
	// While it is remembered, a keeps dialling its address.
	before := counter.count(victim)
	waitFor(t, 5*time.Second, "a re-dials dead c", func() bool { return counter.count(victim) >= before+2 })
	if st := memberState(a, "c"); st != "dead" {
		t.Fatalf("c is %q in a's status before ForgetAfter, want dead", st)
	}

	offset.Store(int64(24*time.Hour + time.Minute))
	waitFor(t, 5*time.Second, "a forgets c a day after it died", func() bool { return memberState(a, "c") == "" })
	if st := memberState(b, "c"); st != "dead" {
		t.Errorf("b (real clock) lists c as %q, want dead: only a's day has passed", st)
	}
	if st := memberState(a, "b"); st != "alive" {
		t.Errorf("a lists live b as %q after forgetting c", st)
	}

	// No more dials: watch for as long as it took a to dial twice above,
	// many rejoin rounds. One dial may already have been on its way when
	// a forgot c.
	after := counter.count(victim)
	deadline := time.Now().Add(20 * rejoinEvery)
	for time.Now().Before(deadline) {
		if n := counter.count(victim); n > after+1 {
			t.Fatalf("a dialled forgotten c %d more times", n-after)
		}
		time.Sleep(rejoinEvery)
	}
	if memberState(a, "c") != "" {
		t.Errorf("c came back into a's status: %+v", a.Status().Members)
	}
}

// TestLeaveTwice: a node that leaves because its store failed and is then
// shut down leaves once; memberlist panics on a second leave.
func TestLeaveTwice(t *testing.T) {
	netw := netsim.New()
	a := startNode(t, netw, "a", nil, nil, nil)
	b := startNode(t, netw, "b", []string{netw.Host("a").Addr()}, nil, nil)
	waitFor(t, 10*time.Second, "a sees b", func() bool { return memberState(a, "b") == "alive" })
	if err := b.Leave(time.Second); err != nil {
		t.Logf("first leave: %v", err)
	}
	if err := b.Leave(time.Second); err != nil {
		t.Errorf("second leave: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Errorf("close after leave: %v", err)
	}
	waitFor(t, 5*time.Second, "a sees b left", func() bool { return memberState(a, "b") == "left" })
}
