package cluster_test

import (
	"errors"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/test/netsim"
)

// TestClusterJoinRefusedAfterStartingAlone: a node whose join list is not
// up yet starts alone; when the cluster there comes up speaking no version
// in common, its retried join is refused and JoinRefused says so (the
// node's /healthz turns 503 on it), while the cluster never lists it.
func TestClusterJoinRefusedAfterStartingAlone(t *testing.T) {
	netw := netsim.New()
	join := []string{netw.Host("a").Addr()}
	old := startVersioned(t, netw, "old", join, protoRange(1, 1))
	if err := old.JoinRefused(); err != nil {
		t.Fatalf("alone, before the cluster exists: JoinRefused = %v", err)
	}
	a := startVersioned(t, netw, "a", nil, protoRange(2, 3))
	waitFor(t, 20*time.Second, "old's retried join refused", func() bool { return old.JoinRefused() != nil })
	err := old.JoinRefused()
	var ve *cluster.VersionError
	if !errors.Is(err, cluster.ErrProtocolVersion) || !errors.As(err, &ve) || ve.Node != protoRange(1, 1) || ve.Cluster != protoRange(2, 3) {
		t.Fatalf("JoinRefused = %v, want a *VersionError naming 1..1 and 2..3", err)
	}
	if st := memberState(a, "old"); st != "" {
		t.Errorf("a lists the refused node as %q", st)
	}
}
