package node

import (
	"testing"
)

// Links to peers the cluster forgot (cluster.forget_after) are closed and
// forgotten; links to members, alive or dead, stay.
func TestPruneLinksOfForgottenPeers(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	a := startR6(t, "node-a", rn, []string{"node-a"}, []string{"node-a", "node-b", "node-c"}, r6Opts{r: 1, w: 1, noWatch: true})
	a.rt.pruneRep = a.links.prune
	for _, p := range []string{"node-b", "node-c"} {
		if _, err := a.fwd.get(p); err != nil {
			t.Fatal(err)
		}
		if _, err := a.links.get(p); err != nil {
			t.Fatal(err)
		}
	}
	has := func(p string) (fwd, rep bool) {
		a.fwd.mu.Lock()
		_, fwd = a.fwd.links[p]
		a.fwd.mu.Unlock()
		a.links.mu.Lock()
		_, rep = a.links.out[p]
		a.links.mu.Unlock()
		return
	}

	a.rt.pruneLinks() // every peer still a member
	for _, p := range []string{"node-b", "node-c"} {
		if f, r := has(p); !f || !r {
			t.Fatalf("link to member %s pruned (forwarding %v, replication %v)", p, f, r)
		}
	}

	// node-c is forgotten.
	a.view.mu.Lock()
	a.view.members = []string{"node-a", "node-b"}
	a.view.mu.Unlock()
	a.rt.pruneLinks()
	if f, r := has("node-c"); f || r {
		t.Fatalf("links to forgotten node-c kept (forwarding %v, replication %v)", f, r)
	}
	if f, r := has("node-b"); !f || !r {
		t.Fatalf("link to member node-b pruned (forwarding %v, replication %v)", f, r)
	}
	// A link is made again if it is needed after all.
	if _, err := a.fwd.get("node-c"); err != nil {
		t.Fatal(err)
	}

	// A status without this node (not started, or a harness that lists
	// peers only) prunes nothing.
	a.view.mu.Lock()
	a.view.members = nil
	a.view.mu.Unlock()
	a.rt.pruneLinks()
	if f, r := has("node-b"); !f || !r {
		t.Fatalf("an empty status pruned node-b (forwarding %v, replication %v)", f, r)
	}
}
