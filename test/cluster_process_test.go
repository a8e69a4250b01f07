package test

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
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
func startClusterProcs(t *testing.T, n, m int, extra ...string) []*clusterProc {
	t.Helper()
	var ps []*clusterProc
	for i := 0; i < n; i++ {
		name := "n" + strconv.Itoa(i+1)
		gossip := freeAddr(t)
		args := append([]string{"--node-name", name, "--gossip-addr", gossip, "--active-members", strconv.Itoa(m)}, extra...)
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

// waitMembers waits until p sees exactly want alive members (itself included).
func waitMembers(t *testing.T, p *clusterProc, want int, d time.Duration) cluster.Status {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		s, err := p.status()
		alive := 0
		for _, m := range s.Members {
			if m.State == "alive" {
				alive++
			}
		}
		if err == nil && alive == want && s.Converged {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: want %d alive members, converged, within %v; last view %+v (err %v)", p.name, want, d, s, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestProcessClusterJoinRetries: a node whose --join finds nobody starts
// alone, says so, and joins once the other node appears.
func TestProcessClusterJoinRetries(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	target := freeAddr(t)
	args := []string{"--node-name", "early", "--gossip-addr", freeAddr(t), "--join", target}
	early := &clusterProc{proc: startProc(t, t.TempDir(), procOpts{args: args}), name: "early"}
	s := waitMembers(t, early, 1, 10*time.Second)
	if len(s.ActiveSet) != 1 {
		t.Fatalf("alone, the node should be its own active member: %+v", s)
	}
	if !strings.Contains(early.stderr.String(), "join failed") {
		t.Fatalf("no join failure logged; stderr:\n%s", early.stderr.String())
	}
	lateArgs := []string{"--node-name", "late", "--gossip-addr", target}
	late := &clusterProc{proc: startProc(t, t.TempDir(), procOpts{args: lateArgs}), name: "late"}
	waitMembers(t, early, 2, 15*time.Second)
	waitMembers(t, late, 2, 15*time.Second)
}

// TestProcessClusterRefusesStrangers: nodes with another cluster name, or
// another gossip key, are not merged.
func TestProcessClusterRefusesStrangers(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	dir := t.TempDir()
	key1, key2 := dir+"/k1", dir+"/k2"
	os.WriteFile(key1, []byte("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n"), 0o600)
	os.WriteFile(key2, []byte("ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=\n"), 0o600)
	for _, tc := range []struct {
		name       string
		a, b       []string
		sameExpect bool
	}{
		{"other cluster name", []string{"--cluster-name", "alpha"}, []string{"--cluster-name", "beta"}, false},
		{"other key", []string{"--config", writeYAML(t, "cluster:\n  secret_key_file: "+key1+"\n")}, []string{"--config", writeYAML(t, "cluster:\n  secret_key_file: "+key2+"\n")}, false},
		{"same key", []string{"--config", writeYAML(t, "cluster:\n  secret_key_file: "+key1+"\n")}, []string{"--config", writeYAML(t, "cluster:\n  secret_key_file: "+key1+"\n")}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ga := freeAddr(t)
			a := &clusterProc{proc: startProc(t, t.TempDir(), procOpts{args: append([]string{"--node-name", "a", "--gossip-addr", ga}, tc.a...)}), name: "a"}
			b := &clusterProc{proc: startProc(t, t.TempDir(), procOpts{args: append([]string{"--node-name", "b", "--gossip-addr", freeAddr(t), "--join", ga}, tc.b...)}), name: "b"}
			if tc.sameExpect {
				waitMembers(t, a, 2, 10*time.Second)
				waitMembers(t, b, 2, 10*time.Second)
				return
			}
			// Give the join and two rejoin rounds their chance, then check
			// that neither merged the other.
			deadline := time.Now().Add(5 * time.Second)
			for time.Now().Before(deadline) {
				for _, p := range []*clusterProc{a, b} {
					s, err := p.status()
					if err != nil {
						t.Fatal(err)
					}
					if len(s.Members) != 1 {
						t.Fatalf("%s merged a stranger: %+v", p.name, s.Members)
					}
				}
				time.Sleep(100 * time.Millisecond)
			}
			if !strings.Contains(b.stderr.String(), "join failed") {
				t.Fatalf("b's refused join was not logged; stderr:\n%s", b.stderr.String())
			}
			if !strings.Contains(a.stderr.String(), "level=ERROR msg=memberlist") {
				t.Fatalf("a did not log the stranger it refused; stderr:\n%s", a.stderr.String())
			}
		})
	}
}

func writeYAML(t *testing.T, content string) string {
	t.Helper()
	f := t.TempDir() + "/brokerd.yaml"
	if err := os.WriteFile(f, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestProcessClusterBadAddresses: gossip and join addresses that do not
// parse stop the start with a message naming the key.
func TestProcessClusterBadAddresses(t *testing.T) {
	for _, tc := range []struct {
		args []string
		key  string
	}{
		{[]string{"--gossip-addr", "nonsense"}, "cluster.gossip_addr"},
		{[]string{"--gossip-addr", "127.0.0.1:0", "--join", "no-port"}, "cluster.join"},
		{[]string{"--join", "127.0.0.1:7946"}, "cluster.gossip_addr"},
	} {
		p := spawn(t, append([]string{"--data-dir", t.TempDir(), "--stomp-addr", freeAddr(t), "--admin-addr", freeAddr(t)}, tc.args...), nil, nil)
		code, ok := p.wait(10 * time.Second)
		if !ok || code == 0 {
			t.Fatalf("%v: want a failed start, got exit %d (exited %v)", tc.args, code, ok)
		}
		if !strings.Contains(p.stderr.String(), tc.key) {
			t.Fatalf("%v: stderr does not name %s:\n%s", tc.args, tc.key, p.stderr.String())
		}
	}
}

// TestProcessClusterOperations: what an operator does with a running
// cluster: brokerd status, brokerd active-members, the metrics, and a
// SIGTERM that leaves gracefully.
func TestProcessClusterOperations(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 5 processes")
	}
	ps := startClusterProcs(t, 5, 3)
	waitAgreed(t, ps, 5, 3, 20*time.Second)

	// brokerd status prints the table.
	st := spawn(t, []string{"status", "--admin-addr", ps[2].adminAddr}, nil, nil)
	if code, ok := st.wait(10 * time.Second); !ok || code != 0 {
		t.Fatalf("brokerd status: exit %d; stderr %s", code, st.stderr.String())
	}
	out := st.stdout.String()
	for _, want := range []string{"converged yes", "active members wanted 3", "NAME", "ROLE", "n1", "n5", "observer", "active"} {
		if !strings.Contains(out, want) {
			t.Fatalf("brokerd status output lacks %q:\n%s", want, out)
		}
	}

	// M raised through one node spreads to all.
	am := spawn(t, []string{"active-members", "4", "--admin-addr", ps[4].adminAddr}, nil, nil)
	if code, ok := am.wait(10 * time.Second); !ok || code != 0 {
		t.Fatalf("brokerd active-members: exit %d; stderr %s", code, am.stderr.String())
	}
	set := waitAgreed(t, ps, 5, 4, 15*time.Second)
	for _, p := range ps {
		s, _ := p.status()
		if s.ActiveMembersWanted != 4 {
			t.Fatalf("%s: active_members_wanted %d, want 4", p.name, s.ActiveMembersWanted)
		}
	}
	if v, _ := ps[0].metric("brokerd_cluster_members", "role", "active", "state", "alive"); v != 4 {
		t.Fatalf("brokerd_cluster_members{role=active,state=alive} = %v, want 4", v)
	}
	if v, _ := ps[0].metric("brokerd_cluster_epoch"); v < 1 {
		t.Fatalf("brokerd_cluster_epoch = %v", v)
	}
	promotions := 0.0
	for _, p := range ps {
		v, _ := p.metric("brokerd_cluster_promotions_total")
		promotions += v
	}
	if promotions < 4 {
		t.Fatalf("promotions across the cluster = %v, want at least 4", promotions)
	}

	// A bad value is refused and changes nothing.
	bad := spawn(t, []string{"active-members", "0", "--admin-addr", ps[0].adminAddr}, nil, nil)
	if code, ok := bad.wait(10 * time.Second); !ok || code == 0 || !strings.Contains(bad.stderr.String(), ">= 1") {
		t.Fatalf("active-members 0: exit %d, stderr %s", code, bad.stderr.String())
	}

	// SIGTERM an active member (not n1): it leaves, the rest agree on a
	// set without it and see it as "left".
	var victim int
	for i, p := range ps {
		if i > 0 && strings.Contains(","+strings.Join(set, ",")+",", ","+p.name+",") {
			victim = i
		}
	}
	v := ps[victim]
	if err := v.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code, ok := v.wait(10 * time.Second); !ok || code != 0 {
		t.Fatalf("SIGTERM: exit %d (exited %v)", code, ok)
	}
	var rest []*clusterProc
	for i, p := range ps {
		if i != victim {
			rest = append(rest, p)
		}
	}
	// A metadata update whose gossip broadcast was dropped (UDP, a busy
	// machine) is repaired by the next push-pull (every 10 s, staggered):
	// allow two.
	waitAgreed(t, rest, 4, 4, 30*time.Second)
	s, _ := rest[0].status()
	for _, m := range s.Members {
		if m.Name == v.name && m.State != "left" {
			t.Fatalf("%s after SIGTERM: state %q, want left", v.name, m.State)
		}
	}
}
