package cluster_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/test/netsim"
)

// aliveView is the sorted names n lists alive, n itself included.
func aliveView(n *cluster.Node) []string {
	var v []string
	for _, m := range n.Status().Members {
		if m.State == "alive" || m.State == "suspect" {
			v = append(v, m.Name)
		}
	}
	slices.Sort(v)
	return slices.Compact(v)
}

// viewsConsistent reports whether the views are clean clusters: every
// node that x lists has exactly x's view.
func viewsConsistent(nodes map[string]*cluster.Node) (bool, string) {
	views := map[string][]string{}
	var b strings.Builder
	for _, name := range []string{"a", "b", "c", "d"} {
		views[name] = aliveView(nodes[name])
		fmt.Fprintf(&b, "%s:%v(v%d, active %v) ", name, views[name], nodes[name].ProtocolVersion(), nodes[name].Status().ActiveSet)
	}
	for _, vx := range views {
		for _, y := range vx {
			if vy, ok := views[y]; ok && !slices.Equal(vx, vy) {
				return false, b.String()
			}
		}
	}
	return true, b.String()
}

// TestReview13VersionPartitionHealClean: a[1..1] is cut off from c
// (1..2) while d, a build speaking only 2..2, joins c (which sees no
// version-1 member). When the partition heals, a and d have no version in
// common: the cluster must end as clean groups (every node's view equal
// to the views of the nodes it lists), not a membership in which b
// and c list each other but not the same others (placement would then
// differ between nodes that both think they are in one cluster).
//
// Before the fix, NotifyAlive judged a returning node by its own range
// only: a and b let c (1..2) back in, c let b in, and the run ended with
// a:[a b c] b:[a b c] c:[b c d] d:[b c d], two active sets sharing b and
// c.
func TestReview13VersionPartitionHealClean(t *testing.T) {
	netw := netsim.New()
	join := []string{netw.Host("a").Addr()}
	nodes := map[string]*cluster.Node{}
	nodes["a"] = startVersioned(t, netw, "a", nil, protoRange(1, 1))
	nodes["b"] = startVersioned(t, netw, "b", join, protoRange(1, 2))
	nodes["c"] = startVersioned(t, netw, "c", join, protoRange(1, 2))
	waitFor(t, 10*time.Second, "a, b, c together", func() bool {
		for _, n := range nodes {
			if len(aliveView(n)) != 3 {
				return false
			}
		}
		return true
	})
	netw.Partition([]string{"a", "b"}, []string{"c", "d"})
	waitFor(t, 10*time.Second, "c alone", func() bool { return len(aliveView(nodes["c"])) == 1 })
	nodes["d"] = startVersioned(t, netw, "d", []string{netw.Host("c").Addr()}, protoRange(2, 2))
	waitFor(t, 10*time.Second, "d with c", func() bool { return len(aliveView(nodes["c"])) == 2 })
	netw.Heal()
	time.Sleep(8 * time.Second)
	ok, views := viewsConsistent(nodes)
	t.Logf("views after the heal: %s", views)
	if !ok {
		t.Errorf("membership is not a set of clean clusters after the heal: %s", views)
	}
}

// TestReview13VersionPartitionHealCompatible: the positive control. a
// (1..2) is cut off while e, a build speaking 2..3, joins b and c (1..2):
// the two sides speak 2 together, so the heal must merge them, with no
// refusal, and every node must end at version 2 with one view.
func TestReview13VersionPartitionHealCompatible(t *testing.T) {
	netw := netsim.New()
	join := []string{netw.Host("a").Addr()}
	nodes := map[string]*cluster.Node{}
	for _, name := range []string{"a", "b", "c"} {
		nodes[name] = startVersioned(t, netw, name, join, protoRange(1, 2))
	}
	waitFor(t, 10*time.Second, "a, b, c together", func() bool {
		for _, n := range nodes {
			if len(aliveView(n)) != 3 {
				return false
			}
		}
		return true
	})
	netw.Partition([]string{"a"}, []string{"b", "c", "e"})
	waitFor(t, 10*time.Second, "b without a", func() bool { return len(aliveView(nodes["b"])) == 2 })
	nodes["e"] = startVersioned(t, netw, "e", []string{netw.Host("b").Addr()}, protoRange(2, 3))
	netw.Heal()
	waitFor(t, 15*time.Second, "one view of four at version 2", func() bool {
		for _, n := range nodes {
			if len(aliveView(n)) != 4 || n.ProtocolVersion() != 2 {
				return false
			}
		}
		return true
	})
}
