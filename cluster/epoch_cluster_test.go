package cluster_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/test/netsim"
)

// epochRecord is where a node persists its epoch (cluster.State).
const epochRecord = "cluster_epoch"

// memState is a cluster.State in memory. Writes to the record named
// failing fail with failErr.
type memState struct {
	mu       sync.Mutex
	m        map[string][]byte
	failing  string
	failErr  error
	attempts map[string]int
}

func newMemState() *memState {
	return &memState{m: map[string][]byte{}, attempts: map[string]int{}}
}

func (s *memState) Meta(name string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.m[name]...), nil
}

func (s *memState) SetMeta(name string, v []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.attempts[name]++
	if name == s.failing {
		return s.failErr
	}
	s.m[name] = append([]byte(nil), v...)
	return nil
}

func (s *memState) fail(name string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failing, s.failErr = name, err
}

func (s *memState) writes(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.attempts[name]
}

// epoch is the epoch persisted in s.
func (s *memState) epoch(t *testing.T) cluster.EpochID {
	t.Helper()
	b, _ := s.Meta(epochRecord)
	var e cluster.EpochID
	if err := e.UnmarshalText(b); err != nil {
		t.Fatalf("persisted epoch %q: %v", b, err)
	}
	return e
}

// logRecorder is a slog.Handler that keeps the messages it is given.
type logRecorder struct {
	mu   sync.Mutex
	msgs []string // "LEVEL message"
}

func (h *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (h *logRecorder) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.msgs = append(h.msgs, r.Level.String()+" "+r.Message)
	return nil
}
func (h *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *logRecorder) WithGroup(string) slog.Handler      { return h }

func (h *logRecorder) count(msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, m := range h.msgs {
		if m == msg {
			n++
		}
	}
	return n
}

// agreed reports whether nodes agree: each is converged and sees exactly
// the others alive, all publish the same active set of min(M, len(nodes))
// members, each of them seated, and the same epoch. Otherwise it says what
// it saw.
func agreed(nodes map[string]*cluster.Node) (cluster.Status, string, bool) {
	var names []string
	for name := range nodes {
		names = append(names, name)
	}
	sort.Strings(names)
	var first cluster.Status
	var desc strings.Builder
	ok := true
	for i, name := range names {
		s := nodes[name].Status()
		var alive []string
		seated := 0
		for _, m := range s.Members {
			if m.State == "alive" {
				alive = append(alive, m.Name)
				if m.Role == "active" && m.ActiveSince != nil {
					seated++
				}
			}
		}
		sort.Strings(alive)
		fmt.Fprintf(&desc, "\n  %s: epoch %v converged %v set %v seated %d alive %v", name, s.EpochID, s.Converged, s.ActiveSet, seated, alive)
		want := min(s.ActiveMembersWanted, len(names))
		if !s.Converged || strings.Join(alive, ",") != strings.Join(names, ",") || len(s.ActiveSet) != want || seated != want {
			ok = false
		}
		if i == 0 {
			first = s
		} else if s.EpochID != first.EpochID || strings.Join(s.ActiveSet, ",") != strings.Join(first.ActiveSet, ",") {
			ok = false
		}
	}
	return first, desc.String(), ok
}

// waitAgreed waits until each group of nodes agrees (see agreed) and
// returns each group's status; it fails with what it last saw.
func waitAgreed(t *testing.T, d time.Duration, groups ...map[string]*cluster.Node) []cluster.Status {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		var out []cluster.Status
		var desc string
		all := true
		for _, g := range groups {
			s, dsc, ok := agreed(g)
			out, desc, all = append(out, s), desc+dsc, all && ok
		}
		if all {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("no agreement within %v; last seen:%s", d, desc)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// epochWatch records every epoch each node shows, polling its status.
type epochWatch struct {
	stopc chan struct{}
	wg    sync.WaitGroup
	mu    sync.Mutex
	seen  map[string][]cluster.EpochID
}

func watchEpochs(t *testing.T, nodes map[string]*cluster.Node) *epochWatch {
	w := &epochWatch{stopc: make(chan struct{}), seen: map[string][]cluster.EpochID{}}
	nodes = copyNodes(nodes)
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		for {
			for name, n := range nodes {
				e := n.Status().EpochID
				w.mu.Lock()
				if h := w.seen[name]; len(h) == 0 || h[len(h)-1] != e {
					w.seen[name] = append(h, e)
				}
				w.mu.Unlock()
			}
			select {
			case <-w.stopc:
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(w.stop)
	return w
}

func (w *epochWatch) stop() {
	select {
	case <-w.stopc:
	default:
		close(w.stopc)
	}
	w.wg.Wait()
}

// history stops the watch and returns what it saw, checking that no node's
// epoch ever went back.
func (w *epochWatch) history(t *testing.T) map[string][]cluster.EpochID {
	t.Helper()
	w.stop()
	for name, h := range w.seen {
		for i := 1; i < len(h); i++ {
			if h[i].Compare(h[i-1]) < 0 || h[i].Counter < h[i-1].Counter {
				t.Errorf("%s: epoch went back from %v to %v (history %v)", name, h[i-1], h[i], h)
			}
		}
	}
	return w.seen
}

func copyNodes(nodes map[string]*cluster.Node) map[string]*cluster.Node {
	out := make(map[string]*cluster.Node, len(nodes))
	for k, v := range nodes {
		out[k] = v
	}
	return out
}

func pick(nodes map[string]*cluster.Node, names ...string) map[string]*cluster.Node {
	out := make(map[string]*cluster.Node, len(names))
	for _, name := range names {
		out[name] = nodes[name]
	}
	return out
}

// TestClusterEpochPartitionHeal: five nodes, M = 3, split {3|2} so that
// each side loses an active member and promotes an observer. The sides'
// epochs differ (by set, even at the same counter); after the heal, every
// node converges on one epoch above every epoch any node showed before.
func TestClusterEpochPartitionHeal(t *testing.T) {
	if testing.Short() {
		t.Skip("partitions a five-node cluster")
	}
	netw := netsim.New()
	nodes := map[string]*cluster.Node{}
	for i, name := range []string{"a", "b", "c", "d", "e"} {
		var join []string
		if i > 0 {
			join = []string{netw.Host("a").Addr()}
		}
		cfg := testConfig(netw, name, join)
		cfg.State = newMemState()
		nodes[name] = startConfig(t, cfg)
	}
	before := waitAgreed(t, 20*time.Second, nodes)[0]

	// Two of the active members and one observer on one side, the third
	// active member and the other observer on the other.
	var actives, observers []string
	for _, name := range []string{"a", "b", "c", "d", "e"} {
		if slices.Contains(before.ActiveSet, "id-"+name) {
			actives = append(actives, name)
		} else {
			observers = append(observers, name)
		}
	}
	side1 := []string{actives[0], actives[1], observers[0]}
	side2 := []string{actives[2], observers[1]}
	watch := watchEpochs(t, nodes)
	netw.Partition(side1, side2)
	split := waitAgreed(t, 20*time.Second, pick(nodes, side1...), pick(nodes, side2...))
	e1, e2 := split[0].EpochID, split[1].EpochID
	t.Logf("before %v %v; split: %v %v and %v %v", before.EpochID, before.ActiveSet, e1, split[0].ActiveSet, e2, split[1].ActiveSet)
	if e1.Compare(before.EpochID) <= 0 || e2.Compare(before.EpochID) <= 0 {
		t.Fatalf("a side kept the epoch from before the split (%v): %v, %v", before.EpochID, e1, e2)
	}
	if e1 == e2 || e1.Compare(e2) == 0 {
		t.Fatalf("the two sides, with sets %v and %v, share epoch %v", split[0].ActiveSet, split[1].ActiveSet, e1)
	}

	netw.Heal()
	after := waitAgreed(t, 30*time.Second, nodes)[0]
	hist := watch.history(t)
	t.Logf("healed: %v %v", after.EpochID, after.ActiveSet)
	// Every epoch seen until the merged one appeared, on any node.
	for name, h := range hist {
		for _, e := range h {
			if e == after.EpochID {
				break
			}
			if after.EpochID.Compare(e) <= 0 || after.EpochID.Counter <= e.Counter {
				t.Errorf("merged epoch %v not above %v, which %s showed (history %v)", after.EpochID, e, name, h)
			}
		}
	}
	if after.EpochID.Counter <= max(e1.Counter, e2.Counter) {
		t.Errorf("merged epoch %v not above the sides' %v and %v", after.EpochID, e1, e2)
	}
}

// TestClusterEpochRestart: an active member that crashes and restarts on
// the same state never shows an epoch below the one it advertised before,
// not even at its first evaluation, before it hears from anyone.
func TestClusterEpochRestart(t *testing.T) {
	netw := netsim.New()
	nodes := map[string]*cluster.Node{}
	states := map[string]*memState{}
	for i, name := range []string{"a", "b", "c", "d"} {
		var join []string
		if i > 0 {
			join = []string{netw.Host("a").Addr()}
		}
		cfg := testConfig(netw, name, join)
		states[name] = newMemState()
		cfg.State = states[name]
		nodes[name] = startConfig(t, cfg)
	}
	s0 := waitAgreed(t, 20*time.Second, nodes)[0]
	victim := ""
	for _, id := range s0.ActiveSet {
		if id != "id-a" {
			victim = strings.TrimPrefix(id, "id-")
			break
		}
	}
	e0 := nodes[victim].Status().EpochID
	if got := states[victim].epoch(t); got != e0 {
		t.Fatalf("%s persisted %v, advertises %v", victim, got, e0)
	}
	if e0.Counter < 2 {
		t.Fatalf("epoch %v: a node starting afresh would show it too; the test proves nothing", e0)
	}

	nodes[victim].Close()
	delete(nodes, victim)
	s1 := waitAgreed(t, 20*time.Second, nodes)[0]
	t.Logf("before %v %v; without %s: %v %v", e0, s0.ActiveSet, victim, s1.EpochID, s1.ActiveSet)

	cfg := testConfig(netw, victim, []string{netw.Host("a").Addr()})
	cfg.State = states[victim]
	n := startConfig(t, cfg)
	if first := n.Status().EpochID; first.Compare(e0) < 0 || first.Counter < e0.Counter {
		t.Fatalf("restarted %s shows epoch %v, below the %v it advertised before", victim, first, e0)
	}
	nodes[victim] = n
	watch := watchEpochs(t, nodes)
	s2 := waitAgreed(t, 20*time.Second, nodes)[0]
	for name, h := range watch.history(t) {
		if name == victim && h[0].Compare(e0) < 0 {
			t.Errorf("%s went back to %v after %v", name, h[0], e0)
		}
	}
	// The restarted node is an observer now, so the set may be the one
	// the others had without it, and the epoch theirs.
	if s2.EpochID.Compare(s1.EpochID) < 0 || s2.EpochID.Compare(e0) <= 0 {
		t.Errorf("after the restart: epoch %v, before it %v and %v", s2.EpochID, e0, s1.EpochID)
	}
	if got := states[victim].epoch(t); got != n.Status().EpochID {
		t.Errorf("%s persisted %v, advertises %v", victim, got, n.Status().EpochID)
	}
}

// soloConfig is a node with no gossip: a cluster of one.
func soloConfig(name string, st cluster.State, logs slog.Handler) cluster.Config {
	cfg := cluster.DefaultConfig()
	cfg.NodeID, cfg.NodeName = "id-"+name, name
	cfg.BindAddr = ""
	cfg.Tick = 5 * time.Millisecond
	cfg.State = st
	cfg.Logger = slog.New(logs)
	return cfg
}

// TestEpochPersistFailure: a node that cannot persist its new epoch keeps
// advertising the old one, says so once, and moves on when the write
// succeeds.
func TestEpochPersistFailure(t *testing.T) {
	st := newMemState()
	old := cluster.EpochID{Counter: 5, Set: cluster.ActiveSet{"id-x", "id-y"}.Sum64()}
	b, _ := old.MarshalText()
	st.m[epochRecord] = b
	st.fail(epochRecord, errors.New("disk on fire"))
	logs := &logRecorder{}
	n := startConfig(t, soloConfig("a", st, logs))
	// Alone, a's set is {a}: it wants epoch 6 for it.
	waitFor(t, 5*time.Second, "three failed writes", func() bool { return st.writes(epochRecord) >= 3 })
	if s := n.Status(); s.EpochID != old || s.Epoch != old.Counter || len(s.ActiveSet) != 0 {
		t.Fatalf("while the epoch cannot be persisted: status epoch %v (%d), set %v; want %v and no set", s.EpochID, s.Epoch, s.ActiveSet, old)
	}
	if got := st.epoch(t); got != old {
		t.Fatalf("persisted %v", got)
	}
	if k := logs.count("ERROR epoch not persisted; advertising the previous one"); k != 1 {
		t.Fatalf("logged the failure %d times over %d attempts, want once: %v", k, st.writes(epochRecord), logs.msgs)
	}

	st.fail("", nil)
	want := cluster.EpochID{Counter: 6, Set: cluster.ActiveSet{"id-a"}.Sum64()}
	waitFor(t, 5*time.Second, "the new epoch", func() bool { return n.Status().EpochID == want })
	if got := st.epoch(t); got != want {
		t.Fatalf("persisted %v, want %v", got, want)
	}
	if k := logs.count("INFO epoch persisted again"); k != 1 {
		t.Fatalf("logged the recovery %d times: %v", k, logs.msgs)
	}
}

// TestEpochRecordCorrupt: a persisted epoch that does not parse stops the
// node rather than letting it start its epoch afresh.
func TestEpochRecordCorrupt(t *testing.T) {
	st := newMemState()
	st.m[epochRecord] = []byte("seven")
	if _, err := cluster.New(soloConfig("a", st, &logRecorder{})); err == nil || !strings.Contains(err.Error(), "epoch") {
		t.Fatalf("New with a corrupt epoch record: %v", err)
	}
}
