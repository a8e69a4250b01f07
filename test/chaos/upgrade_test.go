//go:build linux

package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// upgradeNodes is the size of the cluster the upgrade test runs: every
// node is an active member, so each step replaces a member that owns
// queues and holds copies.
const upgradeNodes = 3

// TestChaosRollingUpgrade upgrades a 3-node cluster under load, one node at
// a time, from the default build (protocol version 1 only) to the
// brokerd_proto2 build (versions 1..2): each node is stopped with SIGTERM
// (it must exit 0), started again on the new binary with the same data
// directory, and must be back (healthy, the cluster agreeing) before the
// next. While an old node is a member, every node must report protocol
// version 1 (/v1/cluster) and no peer request may carry a version-2
// checksum; once the last one is replaced, every node must report 2 and
// the peer links must carry checksums. Then the load stops, every queue is
// drained from every node, and the history is checked as TestChaos does:
// no receipted message lost, none unexpected. It reports the producers' and
// consumers' longest pause. Runs only with BROKERD_CHAOS=1 (root, Linux);
// test/run.sh runs it with the chaos suite (-run TestChaos).
func TestChaosRollingUpgrade(t *testing.T) {
	if os.Getenv("BROKERD_CHAOS") != "1" {
		t.Skip("set BROKERD_CHAOS=1 to run the chaos suite (root, Linux; test/run.sh does)")
	}
	requireTools(t)
	seed := *flagSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("upgrade seed %d (the clients' choices; replay with -chaos.seed=%d)", seed, seed)
	deadline, ok := t.Deadline()
	if !ok {
		deadline = time.Now().Add(24 * time.Hour)
	}
	if time.Until(deadline) < 5*time.Minute {
		t.Fatalf("the rolling upgrade needs about 2 minutes and budgets 5; only %s left before the test deadline", time.Until(deadline).Round(time.Second))
	}

	// One chaos run at a time on a machine (see TestChaos).
	lock, err := os.OpenFile(filepath.Join(os.TempDir(), "brokerd-chaos.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		t.Fatalf("another chaos run is in progress on this machine (%s is locked): %v", lock.Name(), err)
	}
	t.Cleanup(func() { lock.Close() })

	cleanupLeftovers(t.Logf, "")
	dir, err := os.MkdirTemp("", "brokerd-chaos-")
	if err != nil {
		t.Fatal(err)
	}
	r := &run{t: t, dir: dir, t0: time.Now(), deadline: deadline, expected: map[int]*atomic.Bool{}, h: &history{}}
	oldBin, newBin := filepath.Join(dir, "brokerd-proto1"), filepath.Join(dir, "brokerd-proto2")
	var join []string
	for i := 1; i <= upgradeNodes; i++ {
		join = append(join, fmt.Sprintf("%s:%d", nodeIP(i), gossipPort))
	}
	sec, err := newSecurity(t, dir, upgradeNodes, *flagTLS)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= upgradeNodes; i++ {
		r.nodes = append(r.nodes, &node{i: i, bin: oldBin, dataDir: filepath.Join(dir, fmt.Sprintf("n%d", i)), logPath: filepath.Join(dir, fmt.Sprintf("n%d.log", i)), join: join, sec: sec})
	}
	var once sync.Once
	cleanup := func() {
		once.Do(func() {
			for _, nd := range r.nodes {
				_, _ = r.stopNode(nd, syscall.SIGKILL)
			}
			cleanupLeftovers(t.Logf, dir)
		})
	}
	// Interrupted or out of time: clean up (brokerd dies with the test
	// binary anyway, Pdeathsig) and keep the run directory.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	stopSigs := make(chan struct{})
	go func() {
		why := ""
		select {
		case s := <-sigs:
			why = s.String()
		case <-time.After(time.Until(deadline) - 20*time.Second):
			why = "out of time (the test deadline is near)"
		case <-stopSigs:
			return
		}
		_ = writeHistory(filepath.Join(dir, "history.jsonl"), r.h.snapshot())
		fmt.Fprintf(os.Stderr, "chaos: %s: cleaning up; run directory kept: %s\n", why, dir)
		cleanup()
		os.Exit(1)
	}()
	t.Cleanup(func() {
		close(stopSigs)
		signal.Stop(sigs)
		cleanup()
		if t.Failed() || *flagKeep {
			t.Logf("run directory kept: %s (node logs n*.log, data, history.jsonl)", dir)
		} else {
			os.RemoveAll(dir)
		}
	})

	// The version-N build and the version-N+1 build, both with the chaos
	// suite's clock (-tags chaos), from the same source.
	for _, b := range []struct{ out, tags string }{{oldBin, "chaos"}, {newBin, "chaos,brokerd_proto2"}} {
		if out, err := exec.Command("go", "build", "-tags", b.tags, "-o", b.out, "../../cmd/brokerd").CombinedOutput(); err != nil {
			t.Fatalf("build brokerd -tags %s: %v\n%s", b.tags, err, out)
		}
	}
	nw, err := setupNetwork(upgradeNodes)
	if err != nil {
		t.Fatalf("network: %v", err)
	}
	r.nw = nw
	for _, nd := range r.nodes {
		if err := r.startNode(nd); err != nil {
			t.Fatal(err)
		}
	}
	took, err := waitAgreement(r.nodes, convergeBound)
	if err != nil {
		t.Fatalf("cluster did not form: %v", err)
	}
	r.logf("cluster of %d version-1 nodes formed in %s", upgradeNodes, took.Round(time.Millisecond))
	var timeline []string
	note := func(when string) error {
		vs, err := waitVersion(r.nodes, map[bool]int{true: 2, false: 1}[when == "all upgraded"], 15*time.Second)
		timeline = append(timeline, fmt.Sprintf("%s: %s", when, vs))
		r.logf("protocol versions %s: %s", when, vs)
		return err
	}
	if err := note("before"); err != nil {
		t.Fatal(err)
	}

	cl := &clients{h: r.h, receiptWait: 15 * time.Second, gaps: map[string]*gapTracker{}, cgaps: map[string]*gapTracker{}}
	for _, nd := range r.nodes {
		cl.addrs = append(cl.addrs, nd.stompAddr())
	}
	for k := 0; k < chaosQueues; k++ {
		cl.queues = append(cl.queues, fmt.Sprintf("/queue/upgrade-%d-%d", seed%100000, k))
	}
	prodCtx, stopProd := context.WithCancel(context.Background())
	consCtx, stopCons := context.WithCancel(context.Background())
	defer stopProd()
	defer stopCons()
	var wg, cwg sync.WaitGroup
	for p := 0; p < *flagProd; p++ {
		rng := rand.New(rand.NewPCG(seed+uint64(p)+1, 1))
		wg.Add(1)
		go func() { defer wg.Done(); cl.produce(prodCtx, fmt.Sprintf("p%d", p), rng) }()
	}
	for c := 0; c < *flagCons; c++ {
		rng := rand.New(rand.NewPCG(seed+uint64(c)+101, 2))
		cwg.Add(1)
		go func() { defer cwg.Done(); cl.consume(consCtx, fmt.Sprintf("c%d", c), rng) }()
	}
	sleepCtx(context.Background(), 5*time.Second) // load on the old cluster

	var mixedLinks string
	hooks := rollingHooks{
		down: func(k int, nd *node) error {
			nd.mu.Lock()
			nd.bin = newBin
			nd.mu.Unlock()
			return nil
		},
		back: func(k int, nd *node) error {
			if code, err := healthz(nd); err != nil || code != 200 {
				return fmt.Errorf("%s /healthz: %d %v", nd.name(), code, err)
			}
			if k < len(r.nodes)-1 {
				if err := note(fmt.Sprintf("after upgrading %s", nd.name())); err != nil {
					return err
				}
				// Mixed: the new nodes' links to each other speak 2, but
				// the cluster speaks 1, so no checksum may be sent. Give
				// the load time to use the links.
				sleepCtx(context.Background(), 3*time.Second)
				sums, err := sumMetric(r.nodes, "brokerd_peer_server_checksums_verified_total")
				if err != nil {
					return err
				}
				if sums > 0 {
					return fmt.Errorf("%v peer requests carried a version-2 checksum while a version-1 node was a member", sums)
				}
				links, err := linkProtocols(r.nodes)
				if err != nil {
					return err
				}
				mixedLinks = links
				r.logf("mixed cluster: no checksums; link versions %s", links)
				if k == len(r.nodes)-2 && !strings.Contains(links, ":2") {
					// Else the check above proves nothing: the new nodes'
					// links to each other speak 2 and must still not use it.
					return fmt.Errorf("no peer link between the upgraded nodes speaks version 2: %s", links)
				}
				return nil
			}
			return note("all upgraded")
		},
	}
	rolling, rerr := r.rollingRestart(cl, hooks)
	if rerr != nil {
		r.abort(rerr)
	}
	if !r.aborted() {
		// The version-2 feature in use: checksummed peer requests.
		sleepCtx(context.Background(), 5*time.Second)
	}
	sums, err := sumMetric(r.nodes, "brokerd_peer_server_checksums_verified_total")
	if err != nil {
		r.abort(err)
	} else if sums == 0 && !r.aborted() {
		r.abort(fmt.Errorf("no peer request carried a checksum after the upgrade: the version-2 feature is not in use"))
	}
	links, _ := linkProtocols(r.nodes)

	// The end, as TestChaos's: a backlog, the producers stop, the cluster
	// agrees, every queue is drained from every node.
	cl.consumersOff.Store(true)
	sleepCtx(context.Background(), 3*time.Second)
	stopProd()
	wg.Wait()
	for _, nd := range r.nodes {
		nd.mu.Lock()
		down := nd.cmd == nil
		nd.mu.Unlock()
		if down { // an aborted step may have left a node stopped
			if err := r.startNode(nd); err != nil {
				r.abort(err)
			}
		}
	}
	if _, err := waitAgreement(r.nodes, convergeBound); err != nil {
		r.abort(fmt.Errorf("after the upgrade: %v", err))
	}
	stopCons()
	cwg.Wait()
	drainEnd := time.Now().Add(2 * time.Minute)
	if d := deadline.Add(-time.Minute); d.Before(drainEnd) {
		drainEnd = d
	}
	drained := 0
	for pass := 0; pass < 2 && time.Now().Before(drainEnd); pass++ {
		for _, nd := range r.nodes {
			n, err := cl.consumeFrom(context.Background(), drainClient, nd.i, nd.stompAddr(), drainEnd, 3*time.Second)
			if err != nil && err != errQuiet {
				r.abort(fmt.Errorf("drain from %s: %v", nd.name(), err))
			}
			drained += n
		}
	}
	if left := queueDepths(r.nodes, cl.queues); len(left) > 0 {
		r.abort(fmt.Errorf("after the drain, queues not empty: %s", strings.Join(left, "; ")))
	}
	r.checkCrashes()

	evs := r.h.snapshot()
	if err := writeHistory(filepath.Join(dir, "history.jsonl"), evs); err != nil {
		t.Error(err)
	}
	res := check(evs)
	t.Logf("rolling upgrade (protocol 1 -> 2): %d nodes, %.1fs, producers' longest pause %.2fs (%s), consumers' longest pause %.2fs (%s), each node's SIGTERM exit: %s",
		len(rolling.Nodes), rolling.Seconds, rolling.MaxPause, rolling.MaxPauseClient, rolling.MaxConsumerPause, rolling.MaxConsumerPauseClient, strings.Join(rolling.Exits, "; "))
	t.Logf("protocol versions: %s", strings.Join(timeline, "; "))
	t.Logf("peer links while mixed: %s; after: %s; checksummed peer requests after the upgrade: %.0f", mixedLinks, links, sums)
	t.Logf("drained after the run: %d messages", drained)
	t.Logf("history:\n%s", res)
	r.mu.Lock()
	line, _ := json.Marshal(map[string]any{
		"seed": seed, "nodes": upgradeNodes, "tls": *flagTLS, "rolling": rolling, "versions": timeline,
		"checksummed": sums, "drained": drained, "result": res, "crashed": r.crashed, "errors": r.errs,
	})
	errs := slices.Clone(r.errs)
	r.mu.Unlock()
	t.Logf("%s", line)
	fmt.Println("UPGRADE " + string(line))
	for _, f := range res.failures() {
		t.Error(f)
	}
	for _, e := range errs {
		t.Error(e)
	}
}

// waitVersion waits until every node's /v1/cluster says protocol version
// want; it returns what each said last ("n1=1(1..2)", its effective
// version and the range it speaks).
func waitVersion(nodes []*node, want int, d time.Duration) (string, error) {
	deadline := time.Now().Add(d)
	for {
		var vs []string
		all := true
		for _, nd := range nodes {
			var v struct {
				Version   int `json:"protocol_version"`
				Protocols struct {
					Min int `json:"min"`
					Max int `json:"max"`
				} `json:"protocols"`
			}
			if err := getJSON(nd, "/v1/cluster", &v); err != nil {
				vs = append(vs, fmt.Sprintf("%s=? (%v)", nd.name(), err))
				all = false
				continue
			}
			vs = append(vs, fmt.Sprintf("%s=%d(%d..%d)", nd.name(), v.Version, v.Protocols.Min, v.Protocols.Max))
			all = all && v.Version == want
		}
		got := strings.Join(vs, " ")
		if all {
			return got, nil
		}
		if time.Now().After(deadline) {
			return got, fmt.Errorf("protocol version: want %d on every node within %s, got %s", want, d, got)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// healthz returns the status code of nd's /healthz.
func healthz(nd *node) (int, error) {
	resp, err := adminGet(nd, "/healthz")
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// sumMetric sums the samples of metric name (without labels, or with any)
// over the nodes' /metrics.
func sumMetric(nodes []*node, name string) (float64, error) {
	var sum float64
	for _, nd := range nodes {
		text, err := getText(nd, "/metrics")
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(text, "\n") {
			if line != name && !strings.HasPrefix(line, name+" ") && !strings.HasPrefix(line, name+"{") {
				continue
			}
			f := strings.Fields(line)
			if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
				sum += v
			}
		}
	}
	return sum, nil
}

// linkProtocols lists the version of each peer link that is up, as
// "n1->n2:2" (forwarding links "n1->n2/fwd:2"), from
// brokerd_peer_link_protocol.
func linkProtocols(nodes []*node) (string, error) {
	names := map[string]string{}
	var v clusterView
	if err := getJSON(nodes[0], "/v1/cluster", &v); err != nil {
		return "", err
	}
	for _, m := range v.Members {
		names[m.ID] = m.Name
	}
	var out []string
	for _, nd := range nodes {
		text, err := getText(nd, "/metrics")
		if err != nil {
			return "", err
		}
		for _, line := range strings.Split(text, "\n") {
			if !strings.HasPrefix(line, "brokerd_peer_link_protocol{") {
				continue
			}
			f := strings.Fields(line)
			peer := strings.TrimSuffix(strings.TrimPrefix(f[0], `brokerd_peer_link_protocol{peer="`), `"}`)
			id, rest, _ := strings.Cut(peer, "/")
			if name, ok := names[id]; ok {
				peer = name
				if rest != "" {
					peer += "/" + rest
				}
			}
			if f[len(f)-1] != "0" {
				out = append(out, fmt.Sprintf("%s->%s:%s", nd.name(), peer, f[len(f)-1]))
			}
		}
	}
	slices.Sort(out)
	return strings.Join(out, " "), nil
}
