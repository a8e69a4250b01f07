//go:build linux

package chaos

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

var (
	flagDuration = flag.Duration("chaos.duration", 100*time.Second, "how long nemeses are applied (the short profile; e.g. 30m for a release check)")
	flagSeed     = flag.Uint64("chaos.seed", 0, "seed of the nemesis schedule and the clients' choices; 0 picks one (printed)")
	flagNodes    = flag.Int("chaos.nodes", 5, "brokerd nodes (M=3, R=2, W=2)")
	flagKeep     = flag.Bool("chaos.keep", false, "keep the run's directory (logs, data, history) even when it passes")
	flagRolling  = flag.Bool("chaos.rolling", true, "end the schedule with a rolling restart (SIGTERM, restart) of every node under load")
	flagProd     = flag.Int("chaos.producers", 4, "producer connections")
	flagCons     = flag.Int("chaos.consumers", 3, "consumer connections")
	flagNemeses  = flag.String("chaos.nemeses", "kill,pause,isolate,split,bridge,loss,delay,lose", "the faults to choose from, comma-separated")
)

// convergeBound is how long the cluster may take to agree after a heal.
const convergeBound = 60 * time.Second

type nemesisRecord struct {
	Name     string  `json:"name"`
	Target   string  `json:"target"`
	Start    float64 `json:"start_s"`
	Held     float64 `json:"held_s"`
	Converge float64 `json:"converge_s"`
}

type run struct {
	t     *testing.T
	dir   string
	nw    *network
	nodes []*node
	rng   *rand.Rand
	t0    time.Time

	mu       sync.Mutex
	applied  []nemesisRecord
	expected map[int]*atomic.Bool // set before the suite stops a node's current process
	crashed  []string
}

func (r *run) logf(format string, args ...any) {
	r.t.Logf("[%7.2fs] %s", time.Since(r.t0).Seconds(), fmt.Sprintf(format, args...))
}

func requireTools(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Fatal("the chaos suite needs Linux network namespaces")
	}
	if os.Geteuid() != 0 {
		t.Fatal("the chaos suite needs root (network namespaces, iptables)")
	}
	for _, tool := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("the chaos suite needs %s (Debian packages iproute2, iptables; test/run.sh installs them): %v", tool, err)
		}
	}
}

// TestChaos runs real brokerd binaries in network namespaces under a
// randomised schedule of crashes, pauses, partitions and packet loss, with
// producers and consumers recording a history, then checks that no
// receipted message was lost and none appeared that was never sent. It runs
// only when BROKERD_CHAOS=1 (test/run.sh sets it); see doc.go.
func TestChaos(t *testing.T) {
	if os.Getenv("BROKERD_CHAOS") != "1" {
		t.Skip("set BROKERD_CHAOS=1 to run the chaos suite (root, Linux; test/run.sh does)")
	}
	requireTools(t)
	seed := *flagSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("chaos seed %d (replay with -chaos.seed=%d)", seed, seed)

	dir, err := os.MkdirTemp("", "brokerd-chaos-")
	if err != nil {
		t.Fatal(err)
	}
	r := &run{t: t, dir: dir, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), t0: time.Now(), expected: map[int]*atomic.Bool{}}

	cleanupLeftovers(t.Logf)
	var once sync.Once
	cleanup := func() {
		once.Do(func() {
			for _, nd := range r.nodes {
				_, _ = r.stopNode(nd, syscall.SIGKILL)
			}
			cleanupLeftovers(t.Logf)
		})
	}
	// An interrupted run cleans up too (a killed one is cleaned up by the
	// next run's cleanupLeftovers).
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	stopSigs := make(chan struct{})
	go func() {
		select {
		case s := <-sigs:
			fmt.Fprintf(os.Stderr, "chaos: %v: cleaning up\n", s)
			cleanup()
			os.Exit(1)
		case <-stopSigs:
		}
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

	bin := filepath.Join(dir, "brokerd")
	if out, err := exec.Command("go", "build", "-o", bin, "../../cmd/brokerd").CombinedOutput(); err != nil {
		t.Fatalf("build brokerd: %v\n%s", err, out)
	}
	nw, err := setupNetwork(*flagNodes)
	if err != nil {
		t.Fatalf("network: %v", err)
	}
	r.nw = nw
	var join []string
	for i := 1; i <= *flagNodes; i++ {
		join = append(join, fmt.Sprintf("%s:%d", nodeIP(i), gossipPort))
	}
	for i := 1; i <= *flagNodes; i++ {
		nd := &node{i: i, bin: bin, dataDir: filepath.Join(dir, fmt.Sprintf("n%d", i)), logPath: filepath.Join(dir, fmt.Sprintf("n%d.log", i)), join: join}
		r.nodes = append(r.nodes, nd)
		if err := r.startNode(nd); err != nil {
			t.Fatal(err)
		}
	}
	took, err := waitAgreement(r.nodes, convergeBound)
	if err != nil {
		t.Fatalf("cluster did not form: %v", err)
	}
	r.logf("cluster of %d formed in %s", *flagNodes, took.Round(time.Millisecond))

	h := &history{}
	cl := &clients{h: h, receiptWait: 15 * time.Second, gaps: map[string]*gapTracker{}}
	for _, nd := range r.nodes {
		cl.addrs = append(cl.addrs, nd.stompAddr())
	}
	for k := 0; k < 3; k++ {
		cl.queues = append(cl.queues, fmt.Sprintf("/queue/chaos-%d-%d", seed%100000, k))
	}
	prodCtx, stopProd := context.WithCancel(context.Background())
	consCtx, stopCons := context.WithCancel(context.Background())
	defer stopProd()
	defer stopCons()
	var wg sync.WaitGroup
	for p := 0; p < *flagProd; p++ {
		rng := rand.New(rand.NewPCG(seed+uint64(p)+1, 1))
		wg.Add(1)
		go func() { defer wg.Done(); cl.produce(prodCtx, fmt.Sprintf("p%d", p), rng) }()
	}
	var cwg sync.WaitGroup
	for c := 0; c < *flagCons; c++ {
		rng := rand.New(rand.NewPCG(seed+uint64(c)+101, 2))
		cwg.Add(1)
		go func() { defer cwg.Done(); cl.consume(consCtx, fmt.Sprintf("c%d", c), rng) }()
	}

	// The schedule.
	end := time.Now().Add(*flagDuration)
	sleepCtx(context.Background(), 3*time.Second) // load before the first fault
	for time.Now().Before(end) {
		r.nemesis()
		r.checkCrashes()
	}
	var rolling rollingResult
	if *flagRolling {
		rolling = r.rollingRestart(cl)
	}

	// Stop the producers (each finishes its current SEND), let the
	// cluster settle, then drain every queue from every node.
	stopProd()
	wg.Wait()
	if err := nw.heal(); err != nil {
		t.Error(err)
	}
	took, err = waitAgreement(r.nodes, convergeBound)
	if err != nil {
		t.Errorf("after the last heal: %v", err)
	}
	r.logf("final agreement after %s", took.Round(time.Millisecond))
	sleepCtx(context.Background(), 3*time.Second)
	stopCons()
	cwg.Wait()
	drained := map[string]int{}
	for pass := 0; pass < 2; pass++ {
		for _, nd := range r.nodes {
			n, err := cl.consumeFrom(context.Background(), "drain", nd.i, nd.stompAddr(), time.Now().Add(2*time.Minute), 3*time.Second)
			if err != nil && err != errQuiet {
				t.Errorf("drain from %s: %v", nd.name(), err)
			}
			drained[fmt.Sprintf("pass%d/%s", pass+1, nd.name())] = n
		}
	}
	r.checkCrashes()

	evs := h.snapshot()
	if err := writeHistory(filepath.Join(dir, "history.jsonl"), evs); err != nil {
		t.Error(err)
	}
	res := check(evs)
	conv := r.convergeStats()
	t.Logf("seed %d; nemeses applied (%d):", seed, len(r.applied))
	for _, a := range r.applied {
		t.Logf("  %7.1fs  %-9s %-22s held %5.1fs  converged %.2fs after heal", a.Start, a.Name, a.Target, a.Held, a.Converge)
	}
	t.Logf("convergence after heals: median %.2fs, max %.2fs (%d heals)", conv.Median, conv.Max, conv.N)
	if *flagRolling {
		t.Logf("rolling restart: %d nodes, %.1fs, clients' longest pause %.2fs (%s), each node's SIGTERM exit: %s",
			len(rolling.Nodes), rolling.Seconds, rolling.MaxPause, rolling.MaxPauseClient, strings.Join(rolling.Exits, "; "))
	}
	t.Logf("drained after the run: %v", drained)
	t.Logf("history:\n%s", res)
	line, _ := json.Marshal(map[string]any{
		"seed": seed, "nodes": *flagNodes, "duration_s": flagDuration.Seconds(),
		"nemeses": r.applied, "convergence": conv, "rolling": rolling, "result": res, "crashed": r.crashed,
	})
	t.Logf("%s", line)
	fmt.Println("CHAOS " + string(line))

	if res.Lost > 0 {
		t.Errorf("%d receipted messages lost", res.Lost)
	}
	if res.Unexpected > 0 {
		t.Errorf("%d messages received that were never sent", res.Unexpected)
	}
	if res.Receipted == 0 {
		t.Errorf("no SEND was receipted: the run tested nothing")
	}
	if len(r.crashed) > 0 {
		t.Errorf("brokerd exited by itself: %s", strings.Join(r.crashed, "; "))
	}
}

func (r *run) startNode(nd *node) error {
	if err := nd.start(); err != nil {
		return err
	}
	stopping := new(atomic.Bool)
	r.mu.Lock()
	r.expected[nd.i] = stopping
	r.mu.Unlock()
	nd.mu.Lock()
	done := nd.done
	nd.mu.Unlock()
	go func() {
		<-done
		r.mu.Lock()
		defer r.mu.Unlock()
		if !stopping.Load() {
			r.crashed = append(r.crashed, fmt.Sprintf("%s at %.1fs (see %s)", nd.name(), time.Since(r.t0).Seconds(), nd.logPath))
		}
	}()
	return nil
}

// stopNode stops nd on purpose.
func (r *run) stopNode(nd *node, sig syscall.Signal) (string, error) {
	r.mu.Lock()
	if f := r.expected[nd.i]; f != nil {
		f.Store(true)
	}
	r.mu.Unlock()
	return nd.stop(sig, 30*time.Second)
}

func (r *run) checkCrashes() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.crashed) > 0 {
		r.t.Fatalf("brokerd exited by itself: %s", strings.Join(r.crashed, "; "))
	}
}

func (r *run) others(i int) []int {
	var o []int
	for _, nd := range r.nodes {
		if nd.i != i {
			o = append(o, nd.i)
		}
	}
	return o
}

// nemesis applies one fault, chosen at random, for a random time, heals it
// and waits for the cluster to agree again.
func (r *run) nemesis() {
	kinds := strings.Split(*flagNemeses, ",")
	kind := kinds[r.rng.IntN(len(kinds))]
	hold := time.Duration(4+r.rng.IntN(8)) * time.Second
	perm := r.rng.Perm(len(r.nodes))
	ids := make([]int, len(perm))
	for k, p := range perm {
		ids[k] = r.nodes[p].i
	}
	victim := r.nodes[perm[0]]
	rec := nemesisRecord{Name: kind, Start: time.Since(r.t0).Seconds()}
	var heal func()
	var err error
	switch kind {
	case "kill":
		rec.Target = victim.name()
		_, err = r.stopNode(victim, syscall.SIGKILL)
		heal = func() { r.must(r.startNode(victim)) }
	case "pause":
		rec.Target = victim.name()
		err = victim.signal(syscall.SIGSTOP)
		heal = func() { r.must(victim.signal(syscall.SIGCONT)) }
	case "isolate":
		rec.Target = victim.name()
		err = r.nw.cut(victim.i, r.others(victim.i))
		heal = func() { r.must(r.nw.heal()) }
	case "split":
		minority := len(ids) / 2
		a, b := slices.Clone(ids[:minority]), slices.Clone(ids[minority:])
		sort.Ints(a)
		sort.Ints(b)
		rec.Target = fmt.Sprintf("%v|%v", a, b)
		err = r.nw.partition(a, b)
		heal = func() { r.must(r.nw.heal()) }
	case "bridge":
		// Two sides that share one node: each side reaches the middle,
		// neither reaches the other.
		mid := ids[0]
		rest := ids[1:]
		half := len(rest) / 2
		a, b := slices.Clone(rest[:half]), slices.Clone(rest[half:])
		sort.Ints(a)
		sort.Ints(b)
		rec.Target = fmt.Sprintf("%v|%d|%v", a, mid, b)
		err = r.nw.partition(a, b)
		heal = func() { r.must(r.nw.heal()) }
	case "loss":
		p := 0.1 + 0.2*r.rng.Float64()
		rec.Target = fmt.Sprintf("%s %.0f%%", victim.name(), p*100)
		err = r.nw.lossy(victim.i, p)
		heal = func() { r.must(r.nw.heal()) }
	case "delay":
		d := time.Duration(50+r.rng.IntN(250)) * time.Millisecond
		rec.Target = fmt.Sprintf("%s %s", victim.name(), d)
		var stop func()
		stop, err = r.nw.delay(victim.i, d)
		if err == nil {
			// Show that it acts: a TCP connect waits for the node's
			// SYN-ACK, which is delayed.
			t0 := time.Now()
			if c, derr := net.DialTimeout("tcp", victim.adminAddr(), 5*time.Second); derr == nil {
				c.Close()
				rec.Target += fmt.Sprintf(" (connect %s)", time.Since(t0).Round(time.Millisecond))
			}
		}
		heal = func() { stop(); r.must(r.nw.heal()) }
	case "lose":
		// A node lost for good: only once every copy is trusted again,
		// else two losses in a row could take both copies of a message.
		rec.Target = victim.name()
		if !r.copiesSynced(40 * time.Second) {
			r.logf("lose %s: skipped, copies still catching up after 40s", victim.name())
			return
		}
		if _, err = r.stopNode(victim, syscall.SIGKILL); err == nil {
			err = os.RemoveAll(victim.dataDir)
		}
		heal = func() { r.must(r.startNode(victim)) }
	default:
		r.t.Fatalf("unknown nemesis %q (-chaos.nemeses)", kind)
	}
	if err != nil {
		r.t.Fatalf("%s %s: %v", kind, rec.Target, err)
	}
	r.logf("%s %s for %s", kind, rec.Target, hold)
	start := time.Now()
	sleepCtx(context.Background(), hold)
	heal()
	rec.Held = time.Since(start).Seconds()
	took, err := waitAgreement(r.nodes, convergeBound)
	if err != nil {
		r.t.Fatalf("after healing %s %s: %v", kind, rec.Target, err)
	}
	rec.Converge = took.Seconds()
	r.logf("healed %s %s; agreement after %s", kind, rec.Target, took.Round(time.Millisecond))
	r.mu.Lock()
	r.applied = append(r.applied, rec)
	r.mu.Unlock()
	sleepCtx(context.Background(), time.Duration(1+r.rng.IntN(3))*time.Second)
}

func (r *run) must(err error) {
	if err != nil {
		r.t.Fatal(err)
	}
}

// copiesSynced waits until every owner trusts every replica's copy.
func (r *run) copiesSynced(d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if n, err := catchingUp(r.nodes); err == nil && n == 0 {
			return true
		}
		time.Sleep(500 * time.Millisecond)
	}
	return false
}

type convergeStats struct {
	N      int     `json:"n"`
	Median float64 `json:"median_s"`
	Max    float64 `json:"max_s"`
}

func (r *run) convergeStats() convergeStats {
	var v []float64
	for _, a := range r.applied {
		v = append(v, a.Converge)
	}
	if len(v) == 0 {
		return convergeStats{}
	}
	sort.Float64s(v)
	return convergeStats{N: len(v), Median: v[len(v)/2], Max: v[len(v)-1]}
}

type rollingResult struct {
	Nodes          []string `json:"nodes"`
	Seconds        float64  `json:"seconds"`
	MaxPause       float64  `json:"max_pause_s"`
	MaxPauseClient string   `json:"max_pause_client"`
	Exits          []string `json:"exits"`
}

// rollingRestart stops every node in turn with SIGTERM and starts it
// again, waiting for the cluster to agree before the next, while the
// clients keep going; it reports the longest time a producer went without
// a RECEIPT.
func (r *run) rollingRestart(cl *clients) rollingResult {
	var res rollingResult
	if err := r.nw.heal(); err != nil {
		r.t.Fatal(err)
	}
	if _, err := waitAgreement(r.nodes, convergeBound); err != nil {
		r.t.Fatalf("before the rolling restart: %v", err)
	}
	start := time.Now()
	cl.resetGaps()
	for _, nd := range r.nodes {
		state, err := r.stopNode(nd, syscall.SIGTERM)
		if err != nil {
			r.t.Errorf("rolling restart: %v", err)
		}
		res.Nodes = append(res.Nodes, nd.name())
		res.Exits = append(res.Exits, nd.name()+": "+state)
		r.must(r.startNode(nd))
		took, err := waitAgreement(r.nodes, convergeBound)
		if err != nil {
			r.t.Fatalf("rolling restart of %s: %v", nd.name(), err)
		}
		r.logf("rolling restart: %s back (%s), agreement after %s", nd.name(), state, took.Round(time.Millisecond))
		r.checkCrashes()
	}
	res.Seconds = time.Since(start).Seconds()
	gap, who := cl.maxGap()
	res.MaxPause, res.MaxPauseClient = gap.Seconds(), who
	return res
}

func writeHistory(path string, evs []event) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(f)
	for _, e := range evs {
		_ = enc.Encode(map[string]any{"t": e.t.Format(time.RFC3339Nano), "kind": e.kind.String(), "id": e.id,
			"node": e.node, "client": e.client, "redelivered": e.redelivered, "info": e.info})
	}
	return f.Close()
}
