//go:build linux

package chaos

import (
	"context"
	"encoding/json"
	"errors"
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
	flagDuration = flag.Duration("chaos.duration", 130*time.Second, "how long nemeses are applied (the short profile, long enough for every fault once; e.g. 30m for a release check)")
	flagSeed     = flag.Uint64("chaos.seed", 0, "seed of the nemesis schedule and the clients' choices; 0 picks one (printed)")
	flagNodes    = flag.Int("chaos.nodes", 5, "brokerd nodes (M=3, R=2, W=2)")
	flagKeep     = flag.Bool("chaos.keep", false, "keep the run's directory (logs, data, history) even when it passes")
	flagRolling  = flag.Bool("chaos.rolling", true, "end the schedule with a rolling restart (SIGTERM, restart) of every node under load")
	flagProd     = flag.Int("chaos.producers", 4, "producer connections")
	flagCons     = flag.Int("chaos.consumers", 3, "consumer connections")
	flagTLS      = flag.Bool("chaos.tls", true, "mutual TLS on peer links (a CA and a certificate per node, made for the run) and encrypted gossip; false runs them in the clear (the admin token is always on)")
	flagNemeses  = flag.String("chaos.nemeses", "kill,pause,isolate,split,bridge,loss,delay,lose,clock", "the faults to choose from, comma-separated")
)

// convergeBound is how long the cluster may take to agree after a heal.
const convergeBound = 60 * time.Second

type nemesisRecord struct {
	Name     string  `json:"name"`
	Target   string  `json:"target"`
	Start    float64 `json:"start_s"`
	Held     float64 `json:"held_s"`
	Converge float64 `json:"converge_s"`
	// ConsumersOff: the consumers were off during the step.
	ConsumersOff bool `json:"consumers_off,omitempty"`
}

type run struct {
	t     *testing.T
	dir   string
	nw    *network
	nodes []*node // fixed before anything starts
	h     *history
	t0    time.Time
	// deadline is the test's: phases that would overrun it are cut short.
	deadline time.Time

	mu       sync.Mutex
	applied  []nemesisRecord
	expected map[int]*atomic.Bool // set before the suite stops a node's current process
	crashed  []string
	errs     []string // what went wrong and ended the schedule early
	skipped  []string // steps not applied, and why
	// crashReported: checkCrashes has turned crashed into an error.
	crashReported bool
}

func (r *run) logfLocked(format string, args ...any) { r.logf(format, args...) }

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
	t.Logf("chaos seed %d (replay with -chaos.seed=%d -chaos.nodes=%d -chaos.nemeses=%s -chaos.duration=%s -chaos.tls=%v; victims named member#k are resolved at run time, so a replay may pick other nodes)",
		seed, seed, *flagNodes, *flagNemeses, *flagDuration, *flagTLS)
	// The phases are budgeted against the test's deadline, so that the run
	// ends by itself with its summary instead of being killed by -timeout;
	// a watchdog covers a phase that overruns.
	deadline, ok := t.Deadline()
	if !ok {
		deadline = time.Now().Add(24 * time.Hour)
	}

	// One run at a time: a second run would kill the first one's nodes
	// and remove its namespaces.
	lock, err := os.OpenFile(filepath.Join(os.TempDir(), "brokerd-chaos.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		t.Fatalf("another chaos run is in progress on this machine (%s is locked): %v", lock.Name(), err)
	}
	t.Cleanup(func() { lock.Close() }) // registered first: runs last

	cleanupLeftovers(t.Logf, "")
	dir, err := os.MkdirTemp("", "brokerd-chaos-")
	if err != nil {
		t.Fatal(err)
	}
	r := &run{t: t, dir: dir, t0: time.Now(), deadline: deadline, expected: map[int]*atomic.Bool{}, h: &history{}}
	bin := filepath.Join(dir, "brokerd")
	var join []string
	for i := 1; i <= *flagNodes; i++ {
		join = append(join, fmt.Sprintf("%s:%d", nodeIP(i), gossipPort))
	}
	sec, err := newSecurity(t, dir, *flagNodes, *flagTLS)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("security: %s", sec)
	for i := 1; i <= *flagNodes; i++ {
		r.nodes = append(r.nodes, &node{i: i, bin: bin, dataDir: filepath.Join(dir, fmt.Sprintf("n%d", i)), logPath: filepath.Join(dir, fmt.Sprintf("n%d.log", i)), join: join, sec: sec})
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
	// An interrupted or overrunning run checks what history it has, writes
	// it to the run directory (kept), prints the summary and cleans up;
	// brokerd processes die with the test binary however it ends
	// (Pdeathsig), and what a killed run left (namespaces, links, its
	// directory) the next run removes.
	var emergencyOnce sync.Once
	emergency := func(why string) {
		emergencyOnce.Do(func() {
			evs := r.h.snapshot()
			_ = writeHistory(filepath.Join(dir, "history.jsonl"), evs)
			fmt.Fprintf(os.Stderr, "chaos: %s: cleaning up; run directory kept: %s\nhistory so far (the run did not drain, so lost counts are not final):\n%s\n", why, dir, check(evs))
			cleanup()
			os.Exit(1)
		})
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	stopSigs := make(chan struct{})
	go func() {
		select {
		case s := <-sigs:
			emergency(s.String())
		case <-stopSigs:
		}
	}()
	watchdog := time.AfterFunc(time.Until(deadline)-20*time.Second, func() { emergency("out of time (the test deadline is near)") })
	t.Cleanup(func() {
		watchdog.Stop()
		close(stopSigs)
		signal.Stop(sigs)
		cleanup()
		if t.Failed() || *flagKeep {
			t.Logf("run directory kept: %s (node logs n*.log, data, history.jsonl, schedule.txt)", dir)
		} else {
			os.RemoveAll(dir)
		}
	})

	// -tags chaos: the build whose wall clock the clock nemesis can shift
	// (cmd/brokerd/node/clock_chaos.go); nothing else differs.
	if out, err := exec.Command("go", "build", "-tags", "chaos", "-o", bin, "../../cmd/brokerd").CombinedOutput(); err != nil {
		t.Fatalf("build brokerd: %v\n%s", err, out)
	}
	nw, err := setupNetwork(*flagNodes)
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
	r.logf("cluster of %d formed in %s", *flagNodes, took.Round(time.Millisecond))
	if sec.tls {
		for _, nd := range r.nodes {
			if err := checkPeerTLS(nd); err != nil {
				t.Fatalf("peer links without TLS: %v", err)
			}
		}
		r.logf("every node's peer port refuses plain text (mutual TLS on peer links)")
	}

	kinds := strings.Split(*flagNemeses, ",")
	for _, k := range kinds {
		if !slices.Contains(allNemeses, k) {
			t.Fatalf("unknown nemesis %q in -chaos.nemeses (known: %s)", k, strings.Join(allNemeses, ","))
		}
	}
	steps := makeSchedule(rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), kinds, *flagNodes, *flagDuration)
	var plan []string
	for k, st := range steps {
		plan = append(plan, fmt.Sprintf("%d:%s", k+1, st))
	}
	_ = os.WriteFile(filepath.Join(dir, "schedule.txt"), []byte(strings.Join(plan, "\n")+"\n"), 0o644)
	if len(plan) > 40 {
		plan = append(plan[:40], fmt.Sprintf("... %d more in schedule.txt", len(plan)-40))
	}
	t.Logf("schedule (steps run while time lasts): %s", strings.Join(plan, "; "))

	cl := &clients{h: r.h, receiptWait: 15 * time.Second, gaps: map[string]*gapTracker{}, cgaps: map[string]*gapTracker{}}
	for _, nd := range r.nodes {
		cl.addrs = append(cl.addrs, nd.stompAddr())
	}
	for k := 0; k < chaosQueues; k++ {
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

	// The schedule, within its time and the test's deadline (the rest
	// needs about 5 minutes at most: rolling restart, heal, drain).
	end := time.Now().Add(*flagDuration)
	if last := deadline.Add(-6 * time.Minute); last.Before(end) {
		end = last
		r.logf("the schedule is cut short to end by %s, 6 minutes before the test deadline", end.Format(time.TimeOnly))
	}
	sleepCtx(context.Background(), 3*time.Second) // load before the first fault
	started := 0
	for k, st := range steps {
		if !time.Now().Before(end) || r.aborted() {
			break
		}
		started++
		cl.consumersOff.Store(st.ConsumersOff)
		if err := r.apply(k+1, st); err != nil {
			r.abort(err)
		}
		r.checkCrashes()
	}
	cl.consumersOff.Store(false)
	if !r.aborted() && started >= len(kinds) {
		// The first steps were every kind once: each must have acted.
		for _, k := range kinds {
			if !slices.ContainsFunc(r.applied, func(a nemesisRecord) bool { return a.Name == k }) {
				r.abort(fmt.Errorf("fault %q was never applied (skipped: %v)", k, r.skipped))
			}
		}
	}
	var rolling rollingResult
	if *flagRolling && !r.aborted() {
		if rolling, err = r.rollingRestart(cl, rollingHooks{}); err != nil {
			r.abort(err)
		}
	}

	// The end, whatever happened above: with the consumers off for a few
	// seconds, so that the drain has a backlog to find; then the producers
	// stop (each finishes its current SEND), every fault is healed, the
	// cluster must agree, and every queue is drained from every node.
	cl.consumersOff.Store(true)
	sleepCtx(context.Background(), 5*time.Second)
	stopProd()
	wg.Wait()
	if err := nw.heal(); err != nil {
		r.abort(err)
	}
	for _, nd := range r.nodes {
		nd.mu.Lock()
		down := nd.cmd == nil
		nd.mu.Unlock()
		if down { // an aborted step may have left a node stopped
			if err := r.startNode(nd); err != nil {
				r.abort(err)
			}
		} else {
			_ = nd.signal(syscall.SIGCONT)
		}
		// ... or its clock stepped.
		if b, err := os.ReadFile(filepath.Join(nd.dataDir, clockOffsetFile)); err == nil && strings.TrimSpace(string(b)) != "0s" {
			if err := nd.jumpClock(0); err != nil {
				r.abort(err)
			}
		}
	}
	took, err = waitAgreement(r.nodes, convergeBound)
	if err != nil {
		r.abort(fmt.Errorf("after the last heal: %v", err))
	}
	r.logf("final agreement after %s", took.Round(time.Millisecond))
	stopCons()
	cwg.Wait()
	drainEnd := time.Now().Add(3 * time.Minute)
	if d := deadline.Add(-time.Minute); d.Before(drainEnd) {
		drainEnd = d
	}
	drained := map[string]int{}
	total := 0
	for pass := 0; pass < 2 && time.Now().Before(drainEnd); pass++ {
		for _, nd := range r.nodes {
			if !time.Now().Before(drainEnd) {
				break
			}
			n, err := cl.consumeFrom(context.Background(), "drain", nd.i, nd.stompAddr(), drainEnd, 3*time.Second)
			if err != nil && err != errQuiet {
				r.abort(fmt.Errorf("drain from %s: %v", nd.name(), err))
			}
			drained[fmt.Sprintf("pass%d/%s", pass+1, nd.name())] = n
			total += n
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
	conv := r.convergeStats()
	t.Logf("seed %d; nemeses applied (%d):", seed, len(r.applied))
	for _, a := range r.applied {
		t.Logf("  %7.1fs  %-7s %-30s held %5.1fs  converged %.2fs after heal%s", a.Start, a.Name, a.Target, a.Held, a.Converge,
			map[bool]string{true: "  (consumers off)"}[a.ConsumersOff])
	}
	t.Logf("convergence after heals: median %.2fs, max %.2fs (%d heals)", conv.Median, conv.Max, conv.N)
	if *flagRolling {
		t.Logf("rolling restart: %d nodes, %.1fs, producers' longest pause %.2fs (%s), consumers' longest pause %.2fs (%s), each node's SIGTERM exit: %s",
			len(rolling.Nodes), rolling.Seconds, rolling.MaxPause, rolling.MaxPauseClient, rolling.MaxConsumerPause, rolling.MaxConsumerPauseClient, strings.Join(rolling.Exits, "; "))
	}
	t.Logf("drained after the run: %d messages %v", total, drained)
	t.Logf("history:\n%s", res)
	r.mu.Lock()
	line, _ := json.Marshal(map[string]any{
		"seed": seed, "nodes": *flagNodes, "duration_s": flagDuration.Seconds(), "nemeses_allowed": *flagNemeses, "tls": *flagTLS,
		"nemeses": r.applied, "skipped": r.skipped, "convergence": conv, "rolling": rolling, "drained": total, "result": res,
		"crashed": r.crashed, "errors": r.errs,
	})
	errs := slices.Clone(r.errs)
	r.mu.Unlock()
	t.Logf("%s", line)
	fmt.Println("CHAOS " + string(line))

	for _, f := range res.failures() {
		t.Error(f)
	}
	for _, e := range errs {
		t.Error(e)
	}
}

// chaosQueues is how many queues the clients use: enough that every
// active member owns some.
const chaosQueues = 16

var allNemeses = []string{"kill", "pause", "isolate", "split", "bridge", "loss", "delay", "lose", "clock"}

// step is one fault of the schedule, every random choice drawn up front
// from the seed, so that a seed replays the same schedule.
type step struct {
	Kind string
	Hold time.Duration
	// Perm orders the nodes (0-based): the victim is Perm[0], or, with
	// Member, the active member at index Perm[0] mod M of the sorted
	// active set at the time (a member owns queues and holds copies;
	// printed as member#index).
	Perm         []int
	Member       bool
	Param        float64 // loss: probability; delay: milliseconds; clock: minutes (signed)
	After        time.Duration
	ConsumersOff bool // the consumers are off for this step: a backlog builds up
}

func (s step) String() string {
	v := fmt.Sprintf("n%d", s.Perm[0]+1)
	if s.Member {
		v = fmt.Sprintf("member#%d", s.Perm[0]%wantActive(len(s.Perm)))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s ", s.Kind)
	switch s.Kind {
	case "split", "bridge":
		fmt.Fprintf(&b, "perm%v", s.Perm)
	case "loss":
		fmt.Fprintf(&b, "%s %.0f%%", v, s.Param*100)
	case "delay":
		fmt.Fprintf(&b, "%s %.0fms", v, s.Param)
	case "clock":
		fmt.Fprintf(&b, "%s %+.0fm", v, s.Param)
	default:
		b.WriteString(v)
	}
	fmt.Fprintf(&b, " %s", s.Hold)
	if s.ConsumersOff {
		b.WriteString(" consumers-off")
	}
	return b.String()
}

// makeSchedule draws more steps than the duration can hold (a step takes
// at least 5 s). The first steps are every kind once, in a random order, so
// that a run long enough for them (the short profile is) applies every
// fault; the rest are drawn at random.
func makeSchedule(rng *rand.Rand, kinds []string, nodes int, d time.Duration) []step {
	n := max(int(d/(5*time.Second))+1, len(kinds))
	steps := make([]step, 0, n)
	order := rng.Perm(len(kinds))
	for k := 0; k < n; k++ {
		kind := ""
		if k < len(kinds) {
			kind = kinds[order[k]]
		} else {
			kind = kinds[rng.IntN(len(kinds))]
		}
		st := step{
			Kind:         kind,
			Hold:         time.Duration(4+rng.IntN(8)) * time.Second,
			Perm:         rng.Perm(nodes),
			Member:       rng.IntN(4) != 0,
			After:        time.Duration(1+rng.IntN(3)) * time.Second,
			ConsumersOff: rng.IntN(3) == 0,
		}
		p, neg := rng.Float64(), rng.IntN(2) == 0
		switch st.Kind {
		case "loss":
			st.Param = 0.1 + 0.2*p
		case "delay":
			st.Param = float64(50 + int(250*p))
		case "clock":
			st.Param = float64(1 + int(59*p))
			if neg {
				st.Param = -st.Param
			}
		}
		steps = append(steps, st)
	}
	return steps
}

// queueDepths lists, as every node reports them, the chaos queues (and
// their dead-letter queues) that still hold pending or in-flight messages.
func queueDepths(nodes []*node, queues []string) []string {
	want := map[string]bool{}
	for _, q := range queues {
		want[q], want[dlqOf(q)] = true, true
	}
	var left []string
	for _, nd := range nodes {
		var ds []struct {
			Name      string `json:"name"`
			Pending   int    `json:"pending"`
			InFlight  int    `json:"in_flight"`
			OwnerName string `json:"owner_name"`
		}
		if err := getJSON(nd, "/v1/destinations", &ds); err != nil {
			left = append(left, fmt.Sprintf("%s: %v", nd.name(), err))
			continue
		}
		for _, d := range ds {
			if want[d.Name] && (d.Pending > 0 || d.InFlight > 0) {
				left = append(left, fmt.Sprintf("%s says %s (owner %s) holds %d pending, %d in flight", nd.name(), d.Name, d.OwnerName, d.Pending, d.InFlight))
			}
		}
	}
	return left
}

func (r *run) abort(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.logfLocked("ABORT: %v", err)
	r.errs = append(r.errs, err.Error())
}

func (r *run) aborted() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.errs) > 0
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

// checkCrashes ends the schedule if a brokerd exited by itself (the run
// then fails).
func (r *run) checkCrashes() {
	r.mu.Lock()
	crashed := len(r.crashed) > 0 && !r.crashReported
	r.crashReported = r.crashReported || crashed
	msg := strings.Join(r.crashed, "; ")
	r.mu.Unlock()
	if crashed {
		r.abort(fmt.Errorf("brokerd exited by itself: %s", msg))
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

// activeMembers is the sorted active set, by node name, as the first node
// that answers reports it.
func (r *run) activeMembers() ([]string, error) {
	var last error
	for _, nd := range r.nodes {
		var v clusterView
		if err := getJSON(nd, "/v1/cluster", &v); err != nil {
			last = err
			continue
		}
		names := map[string]string{}
		for _, m := range v.Members {
			names[m.ID] = m.Name
		}
		var out []string
		for _, id := range v.ActiveSet {
			if n, ok := names[id]; ok {
				out = append(out, n)
			} else {
				out = append(out, id)
			}
		}
		sort.Strings(out)
		if len(out) > 0 {
			return out, nil
		}
	}
	return nil, fmt.Errorf("no node reports an active set: %v", last)
}

func (r *run) byName(name string) *node {
	for _, nd := range r.nodes {
		if nd.name() == name {
			return nd
		}
	}
	return nil
}

// apply applies step k of the schedule: a fault held for st.Hold, healed,
// then the cluster given convergeBound to agree again.
func (r *run) apply(k int, st step) error {
	ids := make([]int, len(st.Perm))
	for j, p := range st.Perm {
		ids[j] = r.nodes[p].i
	}
	victim := r.nodes[st.Perm[0]]
	if st.Member {
		active, err := r.activeMembers()
		if err != nil {
			return err
		}
		if nd := r.byName(active[st.Perm[0]%len(active)]); nd != nil {
			victim = nd
		}
	}
	rec := nemesisRecord{Name: st.Kind, Start: time.Since(r.t0).Seconds(), ConsumersOff: st.ConsumersOff}
	var heal func() error
	var err error
	switch st.Kind {
	case "kill":
		rec.Target = victim.name()
		_, err = r.stopNode(victim, syscall.SIGKILL)
		heal = func() error { return r.startNode(victim) }
	case "pause":
		rec.Target = victim.name()
		err = victim.signal(syscall.SIGSTOP)
		heal = func() error { return victim.signal(syscall.SIGCONT) }
	case "isolate":
		rec.Target = victim.name()
		err = r.nw.cut(victim.i, r.others(victim.i))
		heal = r.nw.heal
	case "split":
		minority := len(ids) / 2
		a, b := slices.Clone(ids[:minority]), slices.Clone(ids[minority:])
		sort.Ints(a)
		sort.Ints(b)
		rec.Target = fmt.Sprintf("%v|%v", a, b)
		err = r.nw.partition(a, b)
		heal = r.nw.heal
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
		heal = r.nw.heal
	case "loss":
		rec.Target = fmt.Sprintf("%s %.0f%%", victim.name(), st.Param*100)
		err = r.nw.lossy(victim.i, st.Param)
		heal = r.nw.heal
	case "delay":
		d := time.Duration(st.Param) * time.Millisecond
		rec.Target = fmt.Sprintf("%s %s", victim.name(), d)
		var stop func() string
		stop, err = r.nw.delay(victim.i, d)
		if err == nil {
			// Show that it acts: a TCP connect waits for the node's
			// SYN-ACK, which is delayed. A packet may pass undelayed
			// when the suite is slow to read the queue (fail-open), so
			// up to five connects, one of which must be delayed.
			var took time.Duration
			var derr error
			for try := 0; try < 5 && took < d/2; try++ {
				t0 := time.Now()
				var c net.Conn
				c, derr = net.DialTimeout("tcp", victim.adminAddr(), 5*time.Second)
				took = time.Since(t0)
				if derr == nil {
					c.Close()
				}
			}
			rec.Target += fmt.Sprintf(" (connect %s)", took.Round(time.Millisecond))
			if derr != nil || took < d/2 {
				err = fmt.Errorf("delay %s on %s not in effect: five connects, the last took %s (%v); %s", d, victim.name(), took, derr, stop())
				_ = r.nw.heal()
			}
		}
		heal = func() error {
			rec.Target += " " + stop()
			return r.nw.heal()
		}
	case "clock":
		// The node's wall clock (message keys, expiry, the times it
		// advertises) jumps by Param minutes, and back at heal: a step
		// back as large. Timers keep the monotonic clock, as with a
		// real clock step.
		off := time.Duration(st.Param) * time.Minute
		rec.Target = fmt.Sprintf("%s %+v", victim.name(), off)
		err = victim.jumpClock(off)
		heal = func() error { return victim.jumpClock(0) }
	case "lose":
		// A node lost for good: only once every copy is trusted again,
		// else two losses in a row could take both copies of a message.
		rec.Target = victim.name()
		if !r.copiesSynced(40 * time.Second) {
			r.logf("step %d: lose %s: skipped, copies still catching up after 40s", k, victim.name())
			r.mu.Lock()
			r.skipped = append(r.skipped, fmt.Sprintf("step %d lose %s: copies still catching up after 40s", k, victim.name()))
			r.mu.Unlock()
			return nil
		}
		if _, err = r.stopNode(victim, syscall.SIGKILL); err == nil {
			err = os.RemoveAll(victim.dataDir)
		}
		heal = func() error { return r.startNode(victim) }
	default:
		return fmt.Errorf("unknown nemesis %q", st.Kind)
	}
	if err != nil {
		return fmt.Errorf("step %d: %s %s: %v", k, st.Kind, rec.Target, err)
	}
	r.logf("step %d: %s %s for %s%s", k, st.Kind, rec.Target, st.Hold, map[bool]string{true: ", consumers off"}[st.ConsumersOff])
	start := time.Now()
	sleepCtx(context.Background(), st.Hold)
	switch st.Kind {
	case "isolate", "split", "bridge", "loss":
		// The rules must have acted: a rule that installs and never
		// matches would make the fault a no-op.
		n, err := r.nw.dropped()
		if err == nil && n == 0 {
			err = errors.New("its DROP rules matched no packet")
		}
		if err != nil {
			_ = heal()
			return fmt.Errorf("step %d: %s %s: %v", k, st.Kind, rec.Target, err)
		}
		rec.Target += fmt.Sprintf(" (%d packets dropped)", n)
	}
	if err := heal(); err != nil {
		return fmt.Errorf("step %d: healing %s %s: %v", k, st.Kind, rec.Target, err)
	}
	rec.Held = time.Since(start).Seconds()
	took, err := waitAgreement(r.nodes, convergeBound)
	if err != nil {
		return fmt.Errorf("step %d: after healing %s %s: %v", k, st.Kind, rec.Target, err)
	}
	rec.Converge = took.Seconds()
	r.logf("step %d: healed %s %s; agreement after %s", k, st.Kind, rec.Target, took.Round(time.Millisecond))
	r.mu.Lock()
	r.applied = append(r.applied, rec)
	r.mu.Unlock()
	sleepCtx(context.Background(), st.After)
	return nil
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
	Nodes                  []string `json:"nodes"`
	Seconds                float64  `json:"seconds"`
	MaxPause               float64  `json:"max_pause_s"` // producers: longest time without a RECEIPT
	MaxPauseClient         string   `json:"max_pause_client"`
	MaxConsumerPause       float64  `json:"max_consumer_pause_s"` // consumers: longest time without a MESSAGE
	MaxConsumerPauseClient string   `json:"max_consumer_pause_client"`
	Exits                  []string `json:"exits"`
}

// rollingHooks let a rolling restart change each node while it is down
// (the upgrade test swaps its binary) and check the cluster once the node
// is back; nil hooks do nothing. An error ends the rolling restart.
type rollingHooks struct {
	// down runs after node k (0-based) exited, before it starts again.
	down func(k int, nd *node) error
	// back runs once node k is back and the cluster agrees.
	back func(k int, nd *node) error
}

// rollingRestart stops every node in turn with SIGTERM (each must exit
// with status 0) and starts it again, waiting for the cluster to agree
// before the next, while the clients keep going; it reports the longest
// time a producer went without a RECEIPT and a consumer without a MESSAGE.
func (r *run) rollingRestart(cl *clients, hooks rollingHooks) (res rollingResult, err error) {
	if err := r.nw.heal(); err != nil {
		return res, err
	}
	if _, err := waitAgreement(r.nodes, convergeBound); err != nil {
		return res, fmt.Errorf("before the rolling restart: %v", err)
	}
	start := time.Now()
	cl.resetGaps()
	defer func() {
		res.Seconds = time.Since(start).Seconds()
		p, pw, c, cw := cl.maxGap()
		res.MaxPause, res.MaxPauseClient = p.Seconds(), pw
		res.MaxConsumerPause, res.MaxConsumerPauseClient = c.Seconds(), cw
	}()
	for k, nd := range r.nodes {
		// A node takes at most 30 s to stop and 60 s to agree again.
		if time.Until(r.deadline) < 4*time.Minute {
			r.logf("rolling restart cut short before %s: less than 4 minutes to the test deadline", nd.name())
			return res, nil
		}
		state, err := r.stopNode(nd, syscall.SIGTERM)
		res.Nodes = append(res.Nodes, nd.name())
		res.Exits = append(res.Exits, nd.name()+": "+state)
		if err != nil {
			return res, fmt.Errorf("rolling restart: %v", err)
		}
		if state != "exit status 0" {
			return res, fmt.Errorf("rolling restart: %s ended with %q after SIGTERM, want exit status 0 (see %s)", nd.name(), state, nd.logPath)
		}
		if hooks.down != nil {
			if err := hooks.down(k, nd); err != nil {
				return res, fmt.Errorf("rolling restart: %s: %v", nd.name(), err)
			}
		}
		if err := r.startNode(nd); err != nil {
			return res, err
		}
		took, err := waitAgreement(r.nodes, convergeBound)
		if err != nil {
			return res, fmt.Errorf("rolling restart of %s: %v", nd.name(), err)
		}
		r.logf("rolling restart: %s back (%s), agreement after %s", nd.name(), state, took.Round(time.Millisecond))
		if hooks.back != nil {
			if err := hooks.back(k, nd); err != nil {
				return res, fmt.Errorf("rolling restart: after %s: %v", nd.name(), err)
			}
		}
		r.checkCrashes()
		if r.aborted() {
			return res, nil
		}
	}
	return res, nil
}

func writeHistory(path string, evs []event) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(f)
	for _, e := range evs {
		_ = enc.Encode(map[string]any{"t": e.t.Format(time.RFC3339Nano), "kind": e.kind.String(), "id": e.id, "dest": e.dest,
			"node": e.node, "client": e.client, "redelivered": e.redelivered, "body_ok": e.bodyOK, "info": e.info})
	}
	return f.Close()
}
