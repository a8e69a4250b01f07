package node

import (
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
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

// A replication link made again after a prune goes on numbering its
// appends above the old link's: the receiver refuses an append numbered
// at or below one it applied ("reordered"), so a fresh count would fail
// every append to that peer until it passed the old one.
func TestPruneLinksReplicationSeqResumes(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	var mu sync.Mutex
	var seqs []string
	pcfg := stomp.DefaultPeerServerConfig()
	pcfg.Addr, pcfg.Secret, pcfg.NodeID, pcfg.Logger = "127.0.0.1:0", testSecret, "node-b", slog.New(slog.DiscardHandler)
	srv := stomp.NewPeerServer(pcfg, stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		mu.Lock()
		seqs = append(seqs, f.Header.Get(headerSeq))
		mu.Unlock()
		reply(stomp.PeerOK())
	}))
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	rn.set("node-b", srv.Addr().String())
	ccfg := stomp.DefaultPeerClientConfig()
	ccfg.Secret, ccfg.NodeID, ccfg.Logger = testSecret, "node-a", slog.New(slog.DiscardHandler)
	p := newPeerLinks(ccfg, rn.addr, 1<<20, nil)
	t.Cleanup(p.Close)
	send := func(k int) {
		for i := 0; i < k; i++ {
			errc := make(chan error, 1)
			p.Append("node-b", cluster.EpochID{Counter: 1, Set: 1}, []byte("x"), func(err error) { errc <- err })
			if err := waitErr(t, "append", errc, 10*time.Second); err != nil {
				t.Fatal(err)
			}
		}
	}
	send(3)
	if gone := p.prune(func(string) bool { return false }); len(gone) != 1 {
		t.Fatalf("pruned %v, want node-b", gone)
	}
	send(2)
	mu.Lock()
	defer mu.Unlock()
	last := uint64(0)
	for i, s := range seqs {
		_, n, _ := strings.Cut(s, "/")
		v, err := strconv.ParseUint(n, 10, 64)
		if err != nil {
			t.Fatalf("append %d: %s %q: %v", i, headerSeq, s, err)
		}
		if v <= last {
			t.Fatalf("append %d numbered %q after %d (all: %v): the receiver refuses it as reordered", i, s, last, seqs)
		}
		last = v
	}
	if len(seqs) != 5 {
		t.Fatalf("%d appends received, want 5", len(seqs))
	}
}

// A peer refused while its host answered stays refused until a link to
// it comes up; pruning its links clears that, or the peer, back under its
// ID, would be left out of every view.
func TestPruneLinksClearsRefused(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	a := startR6(t, "node-a", rn, []string{"node-a"}, []string{"node-a", "node-b"}, r6Opts{r: 1, w: 1, noWatch: true})
	a.rt.vmu.Lock()
	a.rt.refused["node-b"] = true
	a.rt.refused["node-c"] = true // forgotten
	a.rt.vmu.Unlock()
	a.rt.pruneLinks()
	a.rt.vmu.Lock()
	b, c := a.rt.refused["node-b"], a.rt.refused["node-c"]
	a.rt.vmu.Unlock()
	if !b {
		t.Fatal("pruning cleared the refusal of member node-b")
	}
	if c {
		t.Fatal("forgotten node-c is still counted refused")
	}
}
