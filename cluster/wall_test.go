package cluster_test

import (
	"testing"
	"time"

	"github.com/brokerd/brokerd/test/netsim"
)

// TestWallClockStep: a node whose wall clock is two hours behind advertises
// the seat time of that clock, and the nodes still agree on one active set
// and epoch: the advertised times rank candidates, every node compares the
// same numbers, and a skewed clock does not stop agreement.
func TestWallClockStep(t *testing.T) {
	netw := netsim.New()
	skew := -2 * time.Hour
	ca := testConfig(netw, "a", nil)
	ca.Wall = func() time.Time { return time.Now().Add(skew) }
	a := startConfig(t, ca)
	b := startNode(t, netw, "b", []string{netw.Host("a").Addr()}, nil, nil)
	waitFor(t, 10*time.Second, "a and b converged on one epoch, both active", func() bool {
		sa, sb := a.Status(), b.Status()
		if !sa.Converged || !sb.Converged || sa.EpochID != sb.EpochID || len(sa.ActiveSet) != 2 || len(sb.ActiveSet) != 2 {
			return false
		}
		for _, m := range sb.Members {
			if m.ActiveSince == nil {
				return false
			}
		}
		return true
	})
	for _, m := range b.Status().Members {
		since, err := time.Parse(time.RFC3339Nano, *m.ActiveSince)
		if err != nil {
			t.Fatal(err)
		}
		want := time.Now()
		if m.Name == "a" {
			want = want.Add(skew)
		}
		if d := since.Sub(want); d < -time.Minute || d > time.Minute {
			t.Errorf("b says %s active since %s, want about %s (its wall clock)", m.Name, since, want)
		}
	}
}
