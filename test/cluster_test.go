package test

import (
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/test/netsim"
	"github.com/hashicorp/memberlist"
)

// memCluster is N cluster nodes in this process over an in-memory network
// that can be partitioned.
type memCluster struct {
	t     *testing.T
	net   *netsim.Network
	m     int
	names []string
	nodes map[string]*cluster.Node
}

func newMemCluster(t *testing.T, netw *netsim.Network, m int, names ...string) *memCluster {
	t.Helper()
	c := &memCluster{t: t, net: netw, m: m, nodes: map[string]*cluster.Node{}}
	for i, name := range names {
		var join []string
		if i > 0 {
			join = []string{netw.Host(names[0]).Addr()}
		}
		c.start(name, join)
	}
	return c
}

func (c *memCluster) start(name string, join []string) {
	c.t.Helper()
	h := c.net.Host(name)
	cfg := cluster.DefaultConfig()
	cfg.NodeID = "id-" + name
	cfg.NodeName = name
	cfg.BindAddr = h.Addr()
	cfg.Transport = h.Transport()
	cfg.Join = join
	cfg.ActiveMembers = c.m
	cfg.PromotionDelay = 200 * time.Millisecond
	cfg.RejoinInterval = 300 * time.Millisecond
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
	n, err := cluster.New(cfg)
	if err != nil {
		c.t.Fatalf("%s: %v", name, err)
	}
	if err := n.Start(); err != nil {
		c.t.Fatalf("%s: start: %v", name, err)
	}
	c.t.Cleanup(func() { n.Close() })
	c.nodes[name] = n
	c.names = append(c.names, name)
}

// kill crashes a node: the network drops its traffic and it stops.
func (c *memCluster) kill(name string) {
	c.net.Kill(name)
	c.nodes[name].Close()
	delete(c.nodes, name)
}

// views describes what every listed node sees, for failure messages.
func (c *memCluster) views(names []string) string {
	var b strings.Builder
	for _, name := range names {
		s := c.nodes[name].Status()
		var ms []string
		for _, m := range s.Members {
			ms = append(ms, fmt.Sprintf("%s:%s/%s", m.Name, m.Role, m.State))
		}
		fmt.Fprintf(&b, "\n  %s: epoch %d converged %v m %d members [%s]", name, s.Epoch, s.Converged, s.ActiveMembersWanted, strings.Join(ms, " "))
	}
	return b.String()
}

// agreedGroup reports whether every node of group sees exactly group alive,
// is converged, and all agree on min(m, len(group)) seated actives.
func (c *memCluster) agreedGroup(group []string) ([]string, bool) {
	var set string
	var out []string
	for _, name := range group {
		s := c.nodes[name].Status()
		var alive, active []string
		for _, m := range s.Members {
			if m.State == "alive" {
				alive = append(alive, m.Name)
				if m.Role == "active" {
					if m.ActiveSince == nil {
						return nil, false
					}
					active = append(active, m.Name)
				}
			}
		}
		sort.Strings(alive)
		sort.Strings(active)
		want := append([]string(nil), group...)
		sort.Strings(want)
		if !s.Converged || strings.Join(alive, ",") != strings.Join(want, ",") || len(active) != min(s.ActiveMembersWanted, len(group)) {
			return nil, false
		}
		if set != "" && set != strings.Join(active, ",") {
			return nil, false
		}
		set, out = strings.Join(active, ","), active
	}
	return out, true
}

// waitConverged waits until each group agrees on its own active set, and
// returns the sets; it fails with every node's view, not a bare timeout.
func (c *memCluster) waitConverged(d time.Duration, groups ...[]string) [][]string {
	c.t.Helper()
	deadline := time.Now().Add(d)
	for {
		var sets [][]string
		ok := true
		for _, g := range groups {
			set, good := c.agreedGroup(g)
			ok = ok && good
			sets = append(sets, set)
		}
		if ok {
			return sets
		}
		if time.Now().After(deadline) {
			var all []string
			for _, g := range groups {
				all = append(all, g...)
			}
			c.t.Fatalf("groups %v did not converge within %v; views:%s", groups, d, c.views(all))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestClusterFiveConverge(t *testing.T) {
	c := newMemCluster(t, netsim.New(), 3, "a", "b", "c", "d", "e")
	sets := c.waitConverged(10*time.Second, c.names)
	if len(sets[0]) != 3 {
		t.Fatalf("active set %v, want 3 members", sets[0])
	}
}

func TestClusterActiveKilledIsReplaced(t *testing.T) {
	c := newMemCluster(t, netsim.New(), 3, "a", "b", "c", "d", "e")
	set := c.waitConverged(10*time.Second, c.names)[0]
	victim := set[len(set)-1]
	c.kill(victim)
	var rest []string
	for _, n := range c.names {
		if n != victim {
			rest = append(rest, n)
		}
	}
	after := c.waitConverged(10*time.Second, rest)[0]
	if len(after) != 3 || strings.Contains(strings.Join(after, ","), victim) {
		t.Fatalf("after killing %s: active set %v", victim, after)
	}
	// The survivors of the old set kept their seats.
	for _, a := range set {
		if a != victim && !strings.Contains(strings.Join(after, ","), a) {
			t.Fatalf("%s lost its seat: before %v, after %v", a, set, after)
		}
	}
}

func TestClusterPartitionAndHeal(t *testing.T) {
	netw := netsim.New()
	c := newMemCluster(t, netw, 3, "a", "b", "c", "d", "e")
	before := c.waitConverged(10*time.Second, c.names)[0]
	side1, side2 := []string{"a", "b", "c"}, []string{"d", "e"}
	netw.Partition(side1, side2)
	sets := c.waitConverged(15*time.Second, side1, side2)
	if len(sets[0]) != 3 || len(sets[1]) != 2 {
		t.Fatalf("partition: sides' active sets %v and %v, want 3 and 2", sets[0], sets[1])
	}
	netw.Heal()
	after := c.waitConverged(20*time.Second, c.names)[0]
	if len(after) != 3 {
		t.Fatalf("heal: active set %v", after)
	}
	// The longest active win: the side that kept the original members.
	if strings.Join(after, ",") != strings.Join(sets[0], ",") {
		t.Fatalf("heal: active set %v, want the longest-active %v (before the split: %v)", after, sets[0], before)
	}
}

func TestClusterTwoClustersMerge(t *testing.T) {
	netw := netsim.New()
	c := newMemCluster(t, netw, 3, "a", "b", "c")
	c.waitConverged(10*time.Second, []string{"a", "b", "c"})
	// A second cluster of three, started on its own on the same network.
	for i, name := range []string{"x", "y", "z"} {
		var join []string
		if i > 0 {
			join = []string{netw.Host("x").Addr()}
		}
		c.start(name, join)
	}
	sets := c.waitConverged(10*time.Second, []string{"a", "b", "c"}, []string{"x", "y", "z"})
	if len(sets[0]) != 3 || len(sets[1]) != 3 {
		t.Fatalf("before the merge: %v and %v", sets[0], sets[1])
	}
	if _, err := c.nodes["x"].Join([]string{netw.Host("a").Addr()}); err != nil {
		t.Fatalf("join: %v", err)
	}
	merged := c.waitConverged(15*time.Second, c.names)[0]
	if len(merged) != 3 {
		t.Fatalf("merged active set %v, want 3 of 6", merged)
	}
}

func TestClusterActiveMembersChange(t *testing.T) {
	c := newMemCluster(t, netsim.New(), 3, "a", "b", "c", "d", "e")
	c.waitConverged(10*time.Second, c.names)
	if err := c.nodes["e"].SetActiveMembers(4); err != nil {
		t.Fatal(err)
	}
	if set := c.waitConverged(10*time.Second, c.names)[0]; len(set) != 4 {
		t.Fatalf("M=4: active set %v", set)
	}
	if err := c.nodes["a"].SetActiveMembers(2); err != nil {
		t.Fatal(err)
	}
	if set := c.waitConverged(10*time.Second, c.names)[0]; len(set) != 2 {
		t.Fatalf("M=2: active set %v", set)
	}
}
