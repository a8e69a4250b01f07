package cluster_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/test/netsim"
	"github.com/prometheus/client_golang/prometheus"
)

func protoRange(lo, hi int) cluster.ProtocolRange { return cluster.ProtocolRange{Min: lo, Max: hi} }

// startVersioned starts a node speaking r on host name of netw.
func startVersioned(t *testing.T, netw *netsim.Network, name string, join []string, r cluster.ProtocolRange) *cluster.Node {
	t.Helper()
	cfg := testConfig(netw, name, join)
	cfg.Protocols = r
	return startConfig(t, cfg)
}

// everyVersion reports whether every node's status says version v and
// lists every other node alive.
func everyVersion(v int, nodes map[string]*cluster.Node) bool {
	for _, n := range nodes {
		if n.Status().ProtocolVersion != v || n.ProtocolVersion() != v {
			return false
		}
		for name := range nodes {
			if memberState(n, name) != "alive" && name != n.Status().NodeName {
				return false
			}
		}
	}
	return true
}

// TestClusterProtocolRollingUpgrade: a cluster of version-1 nodes is
// upgraded one node at a time to a build speaking 1..2. While one old node
// is alive every node says version 1 (Status, ProtocolVersion and the
// metric); once the last one is replaced, every node says 2. Each member's
// range is in the status.
func TestClusterProtocolRollingUpgrade(t *testing.T) {
	netw := netsim.New()
	join := []string{netw.Host("a").Addr()}
	old, next := protoRange(1, 1), protoRange(1, 2)
	nodes := map[string]*cluster.Node{}
	for _, name := range []string{"a", "b", "c"} {
		nodes[name] = startVersioned(t, netw, name, join, old)
	}
	waitFor(t, 10*time.Second, "three version-1 nodes at version 1", func() bool { return everyVersion(1, nodes) })

	for i, name := range []string{"a", "b", "c"} {
		if err := nodes[name].Leave(time.Second); err != nil {
			t.Logf("%s leave: %v", name, err)
		}
		var others []string
		for _, o := range []string{"a", "b", "c"} {
			if o != name {
				others = append(others, netw.Host(o).Addr())
			}
		}
		// The same node on the next build: a new transport on the same
		// host (memberlist reclaims the name after DeadNodeReclaimTime).
		cfg := testConfig(netw, name, others)
		cfg.Protocols = next
		nodes[name] = startConfig(t, cfg)
		want := 1
		if i == 2 {
			want = 2
		}
		// From the moment Start returns: its peer links must not act on
		// its lone view (version 2) while old members are there.
		if v := nodes[name].ProtocolVersion(); i < 2 && v != 1 {
			t.Errorf("%s says version %d right after joining a cluster with version-1 members", name, v)
		}
		waitFor(t, 15*time.Second, "version after upgrading "+name, func() bool { return everyVersion(want, nodes) })
	}
	reg := prometheus.NewRegistry()
	cfg := testConfig(netw, "d", []string{netw.Host("a").Addr()})
	cfg.Protocols = next
	cfg.Registerer = reg
	nodes["d"] = startConfig(t, cfg)
	waitFor(t, 10*time.Second, "d joins at version 2", func() bool { return everyVersion(2, nodes) })
	if v := gaugeValue(t, reg, "brokerd_cluster_protocol_version"); v != 2 {
		t.Errorf("brokerd_cluster_protocol_version = %v, want 2", v)
	}
	for _, m := range nodes["a"].Status().Members {
		if m.Protocols != next {
			t.Errorf("a lists %s speaking %v, want %v", m.Name, m.Protocols, next)
		}
	}

	// An old node joins again: the cluster goes back to version 1, which
	// every member still speaks.
	nodes["e"] = startVersioned(t, netw, "e", join, old)
	waitFor(t, 10*time.Second, "an old node brings the cluster back to 1", func() bool { return everyVersion(1, nodes) })
}

// gaugeValue returns the value of reg's one-sample gauge name.
func gaugeValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// TestClusterProtocolJoinRefused: a node whose versions the cluster does
// not speak (too old: 1..1 against members speaking 2..3; too new: 4..5)
// fails to start, with an error naming both ranges, and no member lists
// it. A node that overlaps joins.
func TestClusterProtocolJoinRefused(t *testing.T) {
	netw := netsim.New()
	join := []string{netw.Host("a").Addr()}
	a := startVersioned(t, netw, "a", nil, protoRange(2, 3))
	b := startVersioned(t, netw, "b", join, protoRange(2, 3))
	waitFor(t, 10*time.Second, "a and b together", func() bool { return memberState(a, "b") == "alive" && memberState(b, "a") == "alive" })

	for _, tc := range []struct {
		name string
		r    cluster.ProtocolRange
		want string
	}{
		{"old", protoRange(1, 1), "protocol version 1..1 is not supported by the cluster (members speak 2..3)"},
		{"new", protoRange(4, 5), "protocol version 4..5 is not supported by the cluster (members speak 2..3)"},
	} {
		cfg := testConfig(netw, tc.name, join)
		cfg.Protocols = tc.r
		n, err := cluster.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		err = n.Start()
		if err == nil {
			n.Close()
			t.Fatalf("%s (%v) started in a cluster speaking 2..3", tc.name, tc.r)
		}
		if !errors.Is(err, cluster.ErrProtocolVersion) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: start error %q, want errors.Is ErrProtocolVersion and %q", tc.name, err, tc.want)
		}
		var ve *cluster.VersionError
		if !errors.As(err, &ve) || ve.Node != tc.r || ve.Cluster != protoRange(2, 3) {
			t.Errorf("%s: error %#v, want a *VersionError with both ranges", tc.name, ve)
		}
		n.Close() // idempotent after a failed Start
	}
	// The refused nodes never became members; one that overlaps does.
	c := startVersioned(t, netw, "c", join, protoRange(1, 2))
	waitFor(t, 10*time.Second, "c (1..2) admitted at version 2", func() bool {
		return memberState(a, "c") == "alive" && a.ProtocolVersion() == 2 && c.ProtocolVersion() == 2
	})
	for _, n := range []*cluster.Node{a, b, c} {
		for _, name := range []string{"old", "new"} {
			if st := memberState(n, name); st != "" {
				t.Errorf("%s lists refused node %s as %q", n.Status().NodeName, name, st)
			}
		}
	}
	// With c (1..2) in, the members speak 2..2: an old node is still out.
	cfg := testConfig(netw, "old2", []string{netw.Host("c").Addr()})
	cfg.Protocols = protoRange(1, 1)
	n, err := cluster.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(); !errors.Is(err, cluster.ErrProtocolVersion) {
		t.Errorf("1..1 joining through c: start error %v, want ErrProtocolVersion", err)
	}
	n.Close()
}
