package test

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
)

// clusterProc is one brokerd process of a real cluster on loopback.
type clusterProc struct {
	*proc
	name   string
	gossip string
	args   []string
}

func (p *clusterProc) status() (cluster.Status, error) {
	code, body := p.get("/v1/cluster")
	var s cluster.Status
	if code != 200 {
		return s, fmt.Errorf("%s: GET /v1/cluster: %d %s", p.name, code, body)
	}
	return s, json.Unmarshal(body, &s)
}

// startClusterProcs starts n brokerd processes that join the first one.
func startClusterProcs(t *testing.T, n, m int) []*clusterProc {
	t.Helper()
	var ps []*clusterProc
	for i := 0; i < n; i++ {
		name := "n" + strconv.Itoa(i+1)
		gossip := freeAddr(t)
		args := []string{"--node-name", name, "--gossip-addr", gossip, "--active-members", strconv.Itoa(m)}
		if i > 0 {
			args = append(args, "--join", ps[0].gossip)
		}
		p := startProc(t, t.TempDir(), procOpts{args: args})
		ps = append(ps, &clusterProc{proc: p, name: name, gossip: gossip, args: args})
	}
	return ps
}

// agreed checks that every process in ps reports a converged view with
// exactly the alive members wantAlive and m active among them, all the
// same, each active member having taken its seat. It returns the active set, or an error describing the views.
func agreed(ps []*clusterProc, wantAlive int, m int) ([]string, error) {
	var set []string
	var views []string
	bad := ""
	for _, p := range ps {
		s, err := p.status()
		if err != nil {
			return nil, err
		}
		var active []string
		alive, unseated := 0, ""
		for _, mem := range s.Members {
			if mem.State == "alive" {
				alive++
				if mem.Role == "active" {
					active = append(active, mem.Name)
					if mem.ActiveSince == nil {
						unseated = mem.Name // agreed on, still in its promotion delay
					}
				}
			}
		}
		sort.Strings(active)
		views = append(views, fmt.Sprintf("%s: epoch %d converged %v alive %d active %v", p.name, s.Epoch, s.Converged, alive, active))
		switch {
		case !s.Converged:
			bad = p.name + " not converged"
		case alive != wantAlive:
			bad = fmt.Sprintf("%s sees %d alive, want %d", p.name, alive, wantAlive)
		case len(active) != min(m, wantAlive):
			bad = fmt.Sprintf("%s sees %d active, want %d", p.name, len(active), min(m, wantAlive))
		case unseated != "":
			bad = fmt.Sprintf("%s: %s has not taken its seat yet", p.name, unseated)
		case set != nil && strings.Join(set, ",") != strings.Join(active, ","):
			bad = fmt.Sprintf("%s disagrees", p.name)
		}
		if set == nil {
			set = active
		}
	}
	if bad != "" {
		return nil, fmt.Errorf("%s; views:\n  %s", bad, strings.Join(views, "\n  "))
	}
	return set, nil
}

func waitAgreed(t *testing.T, ps []*clusterProc, alive, m int, d time.Duration) []string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		set, err := agreed(ps, alive, m)
		if err == nil {
			return set
		}
		if time.Now().After(deadline) {
			t.Fatalf("no agreement within %v: %v", d, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestProcessClusterKill9Promotion: 5 real brokerd processes, M=3; kill -9
// of an active member; an observer is promoted and every survivor agrees.
// BROKERD_PROMOTION_RUNS=N repeats the kill N times (restarting the victim
// as an observer) and logs the median time.
func TestProcessClusterKill9Promotion(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 5 processes")
	}
	runs := 1
	if v, err := strconv.Atoi(os.Getenv("BROKERD_PROMOTION_RUNS")); err == nil && v > 0 {
		runs = v
	}
	ps := startClusterProcs(t, 5, 3)
	set := waitAgreed(t, ps, 5, 3, 20*time.Second)
	t.Logf("active set %v", set)
	var times []time.Duration
	for run := 0; run < runs; run++ {
		// Kill an active member that is not the join target.
		var victim int = -1
		for i, p := range ps {
			for _, a := range set {
				if p.name == a && i > 0 {
					victim = i
				}
			}
		}
		if victim < 0 {
			t.Fatalf("no active member to kill besides n1 in %v", set)
		}
		v := ps[victim]
		before, err := v.status()
		if err != nil {
			t.Fatal(err)
		}
		var survivors []*clusterProc
		for i, p := range ps {
			if i != victim {
				survivors = append(survivors, p)
			}
		}
		start := time.Now()
		v.kill()
		newSet := waitAgreed(t, survivors, 4, 3, 15*time.Second)
		took := time.Since(start)
		times = append(times, took)
		for _, a := range newSet {
			if a == v.name {
				t.Fatalf("killed %s still active in %v", v.name, newSet)
			}
		}
		t.Logf("run %d: killed %s (active); %v agreed on %v after %v", run+1, v.name, len(survivors), newSet, took)
		set = newSet
		if run+1 < runs {
			// The victim comes back on its data directory as an observer.
			p := startProc(t, v.dataDir, procOpts{args: v.args})
			ps[victim] = &clusterProc{proc: p, name: v.name, gossip: v.gossip, args: v.args}
			if after, err := ps[victim].status(); err != nil || after.NodeID != before.NodeID {
				t.Fatalf("restarted %s: node ID %q, want the same %q (%v)", v.name, after.NodeID, before.NodeID, err)
			}
			set = waitAgreed(t, ps, 5, 3, 20*time.Second)
			for _, a := range set {
				if a == v.name {
					t.Fatalf("restarted %s pushed its replacement out: %v", v.name, set)
				}
			}
		}
	}
	sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
	t.Logf("kill -9 to agreement on a new active set: median %v over %d runs (%v)", times[len(times)/2], len(times), times)
}
