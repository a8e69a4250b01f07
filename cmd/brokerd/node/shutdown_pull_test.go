package node

import (
	"testing"
	"time"
)

// A node shutting down does not wait for its background take-overs'
// pulls from a peer that does not answer: the router's close waits for
// its background work, and a pull waited up to forwardTimeout (5 s) per
// attempt, so a SIGTERM during a rolling restart held the node (and its
// clients) for seconds. Pulls now end with the router.
func TestShutdownDoesNotWaitForHungPull(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	// node-b's peer port accepts connections and never answers.
	rn.set("node-b", blackHole(t))
	a := startR6(t, "node-a", rn, []string{"node-a"}, []string{"node-b"}, r6Opts{r: 1, w: 1, noWatch: true})
	started := make(chan struct{})
	a.rt.goBackground(func() {
		close(started)
		_ = a.rt.ensureOwned("/queue/shutdown-pull") // pulls from node-b: hangs
	})
	<-started
	time.Sleep(300 * time.Millisecond) // the pull is waiting for node-b
	t0 := time.Now()
	a.rt.close()
	if d := time.Since(t0); d > 2*time.Second {
		t.Fatalf("the router's close took %v: it waited for a take-over's pull from a peer that never answers", d.Round(time.Millisecond))
	}
}
