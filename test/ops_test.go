package test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/cmd/brokerd/node"
	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/test/netsim"
	"github.com/go-stomp/stomp/v3"
	"github.com/hashicorp/memberlist"
)

// opsCluster is N complete brokerd nodes in this process, as memBrokers,
// that can also be stopped and started again on the same data directory
// (operator scenarios: drain, purge, restart).
type opsCluster struct {
	*memCluster
	r       int
	cfgs    map[string]config.Config
	brokers map[string]*node.Node
	mu      sync.Mutex
	addrs   map[string]string // peer-link address -> node name
	fwd     *memBrokers       // for its dialer
}

func newOpsCluster(t *testing.T, m, r int, names ...string) *opsCluster {
	t.Helper()
	netw := netsim.New()
	oc := &opsCluster{
		memCluster: &memCluster{t: t, net: netw, m: m, nodes: map[string]*cluster.Node{}},
		r:          r,
		cfgs:       map[string]config.Config{},
		brokers:    map[string]*node.Node{},
		addrs:      map[string]string{},
	}
	// memBrokers' dialer, over this cluster's address map.
	oc.fwd = &memBrokers{memCluster: oc.memCluster, addrs: oc.addrs}
	for i, name := range names {
		cfg := config.Default()
		cfg.Node.Name = name
		cfg.Node.DataDir = t.TempDir()
		cfg.STOMP.Addr = "127.0.0.1:0"
		cfg.Admin.Addr = "127.0.0.1:0"
		cfg.Store.Sync = "none"
		cfg.Cluster.GossipAddr = netw.Host(name).Addr()
		cfg.Cluster.AllowPlaintextGossip = true
		cfg.Cluster.PeerAddr = "127.0.0.1:0"
		cfg.Cluster.ActiveMembers = m
		cfg.Cluster.PromotionDelay = 200 * time.Millisecond
		cfg.Replica.Factor = r
		if i > 0 {
			cfg.Cluster.Join = []string{netw.Host(names[0]).Addr()}
		}
		oc.cfgs[name] = cfg
		oc.names = append(oc.names, name)
		oc.start(name)
	}
	return oc
}

// start starts node name (again) on its data directory.
func (oc *opsCluster) start(name string) {
	t := oc.t
	t.Helper()
	h := oc.net.Host(name)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if os.Getenv("BROKERD_TEST_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	n, err := node.NewWithOptions(oc.cfgs[name], log, node.Options{
		Cluster: func(c *cluster.Config) {
			c.Transport = h.Transport()
			c.RejoinInterval = 300 * time.Millisecond
			c.Tick = 20 * time.Millisecond
			c.Memberlist = func(mc *memberlist.Config) {
				mc.ProbeInterval = 100 * time.Millisecond
				mc.ProbeTimeout = 50 * time.Millisecond
				mc.GossipInterval = 20 * time.Millisecond
				mc.SuspicionMult = 2
				mc.PushPullInterval = time.Second
				mc.TCPTimeout = 200 * time.Millisecond
				mc.GossipToTheDeadTime = 2 * time.Second
			}
		},
		PeerDial: oc.fwd.dialer(name),
	})
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if err := n.Start(); err != nil {
		t.Fatalf("%s: start: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = n.Shutdown(ctx)
	})
	oc.fwd.mu.Lock()
	oc.addrs[n.PeerAddr()] = name
	oc.fwd.mu.Unlock()
	oc.mu.Lock()
	oc.brokers[name] = n
	oc.mu.Unlock()
	oc.nodes[name] = n.Cluster()
}

// restart starts node name again, joining the others.
func (oc *opsCluster) restart(name string) {
	oc.t.Helper()
	cfg := oc.cfgs[name]
	cfg.Cluster.Join = nil
	for _, other := range oc.names {
		if other != name {
			cfg.Cluster.Join = append(cfg.Cluster.Join, oc.net.Host(other).Addr())
		}
	}
	oc.cfgs[name] = cfg
	oc.start(name)
}

// stop shuts node name down (gracefully: its sessions end, it leaves).
func (oc *opsCluster) stop(name string) {
	oc.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := oc.broker(name).Shutdown(ctx); err != nil {
		oc.t.Logf("shutdown %s: %v", name, err)
	}
	delete(oc.nodes, name)
}

func (oc *opsCluster) broker(name string) *node.Node {
	oc.mu.Lock()
	defer oc.mu.Unlock()
	return oc.brokers[name]
}

func (oc *opsCluster) dial(name string) (*stomp.Conn, error) {
	return stomp.Dial("tcp", oc.broker(name).STOMPAddr(), stomp.ConnOpt.HeartBeat(0, 0))
}

// nameOf is the name of the node with ID id.
func (oc *opsCluster) nameOf(id string) string {
	for name, n := range oc.brokers {
		if n.ID() == id {
			return name
		}
	}
	return ""
}

// owner is the name of queue dest's owner as node from's /v1/queues
// shows it ("" when no node serves it).
func (oc *opsCluster) owner(from, dest string) string {
	var qs []struct {
		Name  string `json:"name"`
		Owner string `json:"owner"`
	}
	if code, err := adminJSON(http.MethodGet, oc.broker(from).AdminAddr(), "/v1/queues", &qs); err != nil || code != 200 {
		return ""
	}
	for _, q := range qs {
		if q.Name == dest {
			return oc.nameOf(q.Owner)
		}
	}
	return ""
}

// adminJSON calls a node's admin API and decodes its JSON answer into out.
func adminJSON(method, addr, path string, out any) (int, error) {
	req, err := http.NewRequest(method, "http://"+addr+path, nil)
	if err != nil {
		return 0, err
	}
	c := &http.Client{Timeout: 30 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, err
	}
	if out != nil && resp.StatusCode == 200 {
		if err := json.Unmarshal(b, out); err != nil {
			return resp.StatusCode, fmt.Errorf("%s %s: %w: %s", method, path, err, b)
		}
	}
	if resp.StatusCode != 200 {
		return resp.StatusCode, fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, strings.TrimSpace(string(b)))
	}
	return resp.StatusCode, nil
}

// queueOwnedBy returns a queue name whose replica set (R of the active
// set) starts with node id.
func queueOwnedBy(t *testing.T, prefix string, active []string, r int, id string) string {
	t.Helper()
	for i := range 10000 {
		q := fmt.Sprintf("/queue/%s%d", prefix, i)
		if replica.ReplicaSet(q, active, r)[0] == id {
			return q
		}
	}
	t.Fatalf("no queue name owned by %s", id)
	return ""
}

func waitFor(t *testing.T, d time.Duration, what string, ok func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		good, last := ok()
		if good {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; last seen: %s", what, d, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// connectRaw sends CONNECT to addr and returns the first frame's command
// and message header and body.
func connectRaw(t *testing.T, addr string) (command, message, body string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "", "", err.Error()
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("CONNECT\naccept-version:1.2\nhost:/\n\n\x00")); err != nil {
		return "", "", err.Error()
	}
	r := bufio.NewReader(c)
	command, _ = r.ReadString('\n')
	command = strings.TrimSpace(command)
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return command, message, err.Error()
		}
		l = strings.TrimRight(l, "\r\n")
		if l == "" {
			break
		}
		if v, ok := strings.CutPrefix(l, "message:"); ok {
			message = v
		}
	}
	body, _ = r.ReadString(0)
	return command, message, strings.TrimRight(body, "\x00")
}

// TestClusterPurgeViaNonOwnerStaysPurged: 3 nodes, R=2. A queue holds 50
// receipted messages, 5 of them delivered to a client-individual
// subscriber and not acknowledged. Its second replica stops. A purge
// through a node that is not the owner removes the 45 ready ones and
// keeps the 5. The second replica comes back with its copy of all 50
// (merged at the owner's next take-over). After the owner is
// stopped (the other replica takes the queue over from its copy) and
// after it is started again (it takes the queue back, merging), no
// purged message is delivered: each time a sentinel sent last arrives
// with only the 5 unacknowledged and the messages sent after the purge
// before it.
func TestClusterPurgeViaNonOwnerStaysPurged(t *testing.T) {
	if testing.Short() {
		t.Skip("in-process cluster")
	}
	oc := newOpsCluster(t, 3, 2, "a", "b", "c")
	oc.waitConverged(15*time.Second, oc.names)
	st := oc.broker("a").Cluster().Status()
	ownerID := oc.broker("a").ID()
	q := queueOwnedBy(t, "purge", st.ActiveSet, 2, ownerID)
	set := replica.ReplicaSet(q, st.ActiveSet, 2)
	var via string // a node outside the queue's replica set
	for _, name := range oc.names {
		if !slices.Contains(set, oc.broker(name).ID()) {
			via = name
		}
	}
	prod, err := oc.dial(via)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		if err := prod.Send(q, "text/plain", []byte(fmt.Sprintf("old-%d", i)), stomp.SendOpt.Receipt); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	cons, err := oc.dial(via)
	if err != nil {
		t.Fatal(err)
	}
	sub, err := cons.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "5"))
	if err != nil {
		t.Fatal(err)
	}
	held := map[string]bool{}
	for len(held) < 5 {
		select {
		case m := <-sub.C:
			if m.Err != nil {
				t.Fatal(m.Err)
			}
			held[string(m.Body)] = true
		case <-time.After(10 * time.Second):
			t.Fatalf("only %d of 5 deliveries arrived", len(held))
		}
	}
	// The queue's other replica goes away before the purge and comes
	// back after it with its copy of every message: only tombstones keep
	// the purged ones out when that copy is merged.
	away := oc.nameOf(set[1])
	oc.stop(away)
	var present []string
	for _, n := range oc.names {
		if n != away {
			present = append(present, n)
		}
	}
	oc.waitConverged(15*time.Second, present)
	// The owner's in-flight count shows the 5 before the purge.
	waitFor(t, 5*time.Second, "5 in flight at the owner", func() (bool, string) {
		var qs []node.QueueInfo
		_, err := adminJSON(http.MethodGet, oc.broker(via).AdminAddr(), "/v1/queues", &qs)
		for _, x := range qs {
			if x.Name == q {
				return x.InFlight == 5, fmt.Sprintf("%+v", x)
			}
		}
		return false, fmt.Sprint(qs, err)
	})

	var res struct {
		Queue   string `json:"queue"`
		Removed int    `json:"removed"`
	}
	if _, err := adminJSON(http.MethodPost, oc.broker(via).AdminAddr(), "/v1/queues/"+url.PathEscape(q)+"/purge", &res); err != nil {
		t.Fatalf("purge via %s: %v", via, err)
	}
	if res.Removed != 45 || res.Queue != q {
		t.Fatalf("purge via %s: %+v, want 45 removed from %s (5 in flight kept)", via, res, q)
	}
	// Unknown queue: 404.
	if code, _ := adminJSON(http.MethodPost, oc.broker(via).AdminAddr(), "/v1/queues/"+url.PathEscape("/queue/never-was")+"/purge", nil); code != http.StatusNotFound {
		t.Fatalf("purge of a queue that does not exist: HTTP %d, want 404", code)
	}
	for i := range 3 {
		if err := prod.Send(q, "text/plain", []byte(fmt.Sprintf("new-%d", i)), stomp.SendOpt.Receipt); err != nil {
			t.Fatalf("send after purge: %v", err)
		}
	}
	_ = prod.Disconnect()
	oc.restart(away)
	oc.waitConverged(15*time.Second, oc.names)
	_ = cons.Disconnect() // the 5 return to the queue

	want := map[string]bool{"new-0": true, "new-1": true, "new-2": true}
	for b := range held {
		want[b] = true
	}
	// consumeUntil reads q on node from until sentinel arrives and
	// checks what came before it.
	consumeUntil := func(from, sentinel string) {
		t.Helper()
		p, err := oc.dial(from)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Send(q, "text/plain", []byte(sentinel), stomp.SendOpt.Receipt); err != nil {
			t.Fatalf("send %s: %v", sentinel, err)
		}
		_ = p.Disconnect()
		c, err := oc.dial(from)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Disconnect()
		s, err := c.Subscribe(q, stomp.AckAuto)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]bool{}
		for {
			select {
			case m := <-s.C:
				if m.Err != nil {
					t.Fatalf("consume on %s: %v", from, m.Err)
				}
				b := string(m.Body)
				if strings.HasPrefix(b, "old-") && !held[b] {
					t.Fatalf("purged message %s delivered on %s", b, from)
				}
				if b == sentinel {
					for w := range want {
						if !got[w] {
							t.Fatalf("%s: %s not delivered before the sentinel (got %v)", from, w, got)
						}
					}
					return
				}
				got[b] = true
			case <-time.After(20 * time.Second):
				t.Fatalf("sentinel %s not delivered on %s within 20 s (got %v)", sentinel, from, got)
			}
		}
	}
	// Stop the owner: the other replica serves the queue from its copy.
	ownerName := oc.nameOf(ownerID)
	oc.stop(ownerName)
	var rest []string
	for _, n := range oc.names {
		if n != ownerName {
			rest = append(rest, n)
		}
	}
	oc.waitConverged(15*time.Second, rest)
	consumeUntil(via, "sentinel-1")
	// Start it again: it owns the queue again and merges the copies.
	oc.restart(ownerName)
	oc.waitConverged(15*time.Second, oc.names)
	for b := range want {
		delete(want, b) // consumed (auto ack) by the first round
	}
	consumeUntil(ownerName, "sentinel-2")
}

// TestClusterDrainUnderLoad: 3 nodes, R=2. Producers (receipts) and
// client-individual consumers run on every node, reconnecting to the
// next node when theirs refuses or closes. Mid-run the owner of the
// queue is drained: ownership moves to the other replica, the drained
// node refuses new connections with "node draining", /healthz answers
// 503 and /v1/cluster shows it draining. As in a maintenance it is then
// stopped and started again (it comes back drained), undrained, takes
// the queue back, and the run finishes: every receipted message is
// consumed (0 lost); duplicates are reported.
func TestClusterDrainUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("in-process cluster")
	}
	oc := newOpsCluster(t, 3, 2, "a", "b", "c")
	oc.waitConverged(15*time.Second, oc.names)
	st := oc.broker("a").Cluster().Status()
	ownerID := oc.broker("b").ID()
	q := queueOwnedBy(t, "drain", st.ActiveSet, 2, ownerID)
	owner := oc.nameOf(ownerID)
	set := replica.ReplicaSet(q, st.ActiveSet, 2)
	next := oc.nameOf(set[1])

	var (
		mu       sync.Mutex
		receipts = map[string]bool{}
		consumed = map[string]int{}
		sent     atomic.Int64
		stop     = make(chan struct{})
		prodDone sync.WaitGroup
		consDone sync.WaitGroup
		errs     atomic.Int64 // reconnects
	)
	const perProducer = 600
	// Each worker starts on a node of its own and moves to the next one
	// when a connection fails or is refused.
	dialFrom := func(i *int) *stomp.Conn {
		for range 100 {
			name := oc.names[*i%len(oc.names)]
			c, err := oc.dial(name)
			if err == nil {
				return c
			}
			errs.Add(1)
			*i++
			time.Sleep(20 * time.Millisecond)
		}
		return nil
	}
	for p := range 3 {
		prodDone.Add(1)
		go func() {
			defer prodDone.Done()
			at := p
			c := dialFrom(&at)
			for i := 0; i < perProducer; {
				if c == nil {
					t.Errorf("producer %d: no node to connect to", p)
					return
				}
				body := fmt.Sprintf("p%d-%d", p, i)
				if err := c.Send(q, "text/plain", []byte(body), stomp.SendOpt.Receipt); err != nil {
					// Outcome unknown: send the next one elsewhere (this
					// one may or may not arrive).
					_ = c.MustDisconnect()
					errs.Add(1)
					at++
					c = dialFrom(&at)
					i++
					continue
				}
				mu.Lock()
				receipts[body] = true
				mu.Unlock()
				sent.Add(1)
				i++
				time.Sleep(2 * time.Millisecond)
			}
			_ = c.Disconnect()
		}()
	}
	for k := range 3 {
		consDone.Add(1)
		go func() {
			defer consDone.Done()
			at := k + 1
			for {
				select {
				case <-stop:
					return
				default:
				}
				c := dialFrom(&at)
				if c == nil {
					t.Errorf("consumer %d: no node to connect to", k)
					return
				}
				s, err := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "16"))
				if err != nil {
					_ = c.MustDisconnect()
					at++
					continue
				}
				// Deliveries are counted as they arrive and acknowledged
				// four at a time, so some are in flight when ownership
				// moves (they come back, counted as duplicates).
				var unacked []*stomp.Message
			read:
				for {
					select {
					case <-stop:
						_ = c.Disconnect()
						return
					case m := <-s.C:
						if m.Err != nil {
							break read
						}
						mu.Lock()
						consumed[string(m.Body)]++
						mu.Unlock()
						unacked = append(unacked, m)
						if len(unacked) < 4 {
							continue
						}
						for _, u := range unacked {
							if err := c.Ack(u); err != nil {
								break read
							}
						}
						unacked = unacked[:0]
					case <-time.After(50 * time.Millisecond):
						for _, u := range unacked {
							if err := c.Ack(u); err != nil {
								break read
							}
						}
						unacked = unacked[:0]
					}
				}
				_ = c.MustDisconnect()
				errs.Add(1)
				at++
			}
		}()
	}

	waitFor(t, 30*time.Second, "a third of the messages sent", func() (bool, string) {
		return sent.Load() >= perProducer/2, fmt.Sprint(sent.Load())
	})
	if o := oc.owner("a", q); o != owner {
		t.Fatalf("owner of %s before the drain: %q, want %s", q, o, owner)
	}
	ds, err := oc.broker(owner).Drain()
	if err != nil {
		t.Fatalf("drain %s: %v", owner, err)
	}
	if !ds.Draining {
		t.Fatalf("drain %s: state %+v", owner, ds)
	}
	waitFor(t, 15*time.Second, "the queue owned by the other replica, everywhere", func() (bool, string) {
		var seen []string
		for _, n := range oc.names {
			o := oc.owner(n, q)
			seen = append(seen, n+":"+o)
			if o != next {
				return false, strings.Join(seen, " ")
			}
		}
		return oc.broker(owner).DrainState().OwnedQueues == 0, fmt.Sprintf("%+v", oc.broker(owner).DrainState())
	})
	if cmd, msg, body := connectRaw(t, oc.broker(owner).STOMPAddr()); cmd != "ERROR" || msg != "node draining" {
		t.Fatalf("CONNECT to the drained node: %s %q %q, want ERROR node draining", cmd, msg, body)
	}
	if code, _ := adminJSON(http.MethodGet, oc.broker(owner).AdminAddr(), "/healthz", nil); code != http.StatusServiceUnavailable {
		t.Fatalf("/healthz of the drained node: HTTP %d, want 503", code)
	}
	var cs cluster.Status
	if _, err := adminJSON(http.MethodGet, oc.broker(next).AdminAddr(), "/v1/cluster", &cs); err != nil {
		t.Fatal(err)
	}
	for _, m := range cs.Members {
		if (m.Name == owner) != m.Draining {
			t.Fatalf("/v1/cluster on %s: member %s draining=%v", next, m.Name, m.Draining)
		}
	}
	waitFor(t, 40*time.Second, "the drained node's client sessions ended", func() (bool, string) {
		s := oc.broker(owner).DrainState()
		return s.Clients == 0, fmt.Sprintf("%+v", s)
	})
	atDrain := sent.Load()
	waitFor(t, 30*time.Second, "messages sent while drained", func() (bool, string) {
		return sent.Load() >= atDrain+100, fmt.Sprint(sent.Load())
	})

	// The maintenance: stop the drained node, start it again; it comes
	// back drained, and the load goes on throughout.
	oc.stop(owner)
	var rest []string
	for _, n := range oc.names {
		if n != owner {
			rest = append(rest, n)
		}
	}
	oc.waitConverged(15*time.Second, rest)
	atStop := sent.Load()
	waitFor(t, 30*time.Second, "messages sent while the drained node is down", func() (bool, string) {
		return sent.Load() >= atStop+100, fmt.Sprint(sent.Load())
	})
	oc.restart(owner)
	oc.waitConverged(15*time.Second, oc.names)
	if cmd, msg, body := connectRaw(t, oc.broker(owner).STOMPAddr()); cmd != "ERROR" || msg != "node draining" {
		t.Fatalf("CONNECT to the drained node after its restart: %s %q %q, want ERROR node draining", cmd, msg, body)
	}
	waitFor(t, 15*time.Second, "the queue still owned by the other replica", func() (bool, string) {
		o := oc.owner(next, q)
		return o == next, o
	})

	if _, err := oc.broker(owner).Undrain(); err != nil {
		t.Fatalf("undrain: %v", err)
	}
	waitFor(t, 15*time.Second, "the queue owned by the undrained node again", func() (bool, string) {
		o := oc.owner(next, q)
		return o == owner, o
	})
	if cmd, msg, _ := connectRaw(t, oc.broker(owner).STOMPAddr()); cmd != "CONNECTED" {
		t.Fatalf("CONNECT to the undrained node: %s %q, want CONNECTED", cmd, msg)
	}
	prodDone.Wait()
	mu.Lock()
	total := len(receipts)
	mu.Unlock()
	waitFor(t, 60*time.Second, "every receipted message consumed", func() (bool, string) {
		mu.Lock()
		defer mu.Unlock()
		var missing []string
		for b := range receipts {
			if consumed[b] == 0 {
				missing = append(missing, b)
			}
		}
		slices.Sort(missing)
		return len(missing) == 0, fmt.Sprintf("%d of %d missing, e.g. %v", len(missing), total, missing[:min(len(missing), 10)])
	})
	close(stop)
	consDone.Wait()
	mu.Lock()
	defer mu.Unlock()
	dups := 0
	for _, n := range consumed {
		if n > 1 {
			dups += n - 1
		}
	}
	t.Logf("drain under load: %d receipted, 0 lost, %d duplicate deliveries, %d reconnects", total, dups, errs.Load())
}

// TestClusterDrainRefusalsAndRestart: 3 nodes, R=2. A drain that would
// leave a queue with no undrained replica, or the cluster with no
// undrained active member, is refused (409, naming why) and changes
// nothing. A drained node that restarts comes back drained: it refuses
// CONNECT, /healthz answers 503 and the others see it draining, until
// undrain. After every node restarted, /v1/queues lists the queue idle.
func TestClusterDrainRefusalsAndRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("in-process cluster")
	}
	oc := newOpsCluster(t, 3, 2, "a", "b", "c")
	oc.waitConverged(15*time.Second, oc.names)
	st := oc.broker("a").Cluster().Status()
	aID, bID := oc.broker("a").ID(), oc.broker("b").ID()
	var q string
	for i := range 10000 {
		name := fmt.Sprintf("/queue/refuse%d", i)
		if set := replica.ReplicaSet(name, st.ActiveSet, 2); set[0] == bID && set[1] == aID {
			q = name
			break
		}
	}
	c, err := oc.dial("b")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Send(q, "text/plain", []byte("x"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	_ = c.Disconnect()
	post := func(name, path string) (int, string) {
		code, err := adminJSON(http.MethodPost, oc.broker(name).AdminAddr(), path, nil)
		if err != nil {
			return code, err.Error()
		}
		return code, ""
	}
	seesDraining := func(want map[string]bool) func() (bool, string) {
		return func() (bool, string) {
			for _, n := range oc.names {
				for _, m := range oc.broker(n).Cluster().Status().Members {
					if m.Draining != want[m.Name] {
						return false, fmt.Sprintf("%s sees %s draining=%v", n, m.Name, m.Draining)
					}
				}
			}
			return true, ""
		}
	}
	if code, msg := post("a", "/v1/drain"); code != 200 {
		t.Fatalf("drain a: %d %s", code, msg)
	}
	waitFor(t, 10*time.Second, "every node sees a draining", seesDraining(map[string]bool{"a": true}))
	if code, msg := post("b", "/v1/drain"); code != http.StatusConflict || !strings.Contains(msg, "no other replica of "+q+" is alive and undrained") {
		t.Fatalf("drain b while a, the other replica of %s, is drained: %d %s; want 409 naming the queue", q, code, msg)
	}
	if oc.broker("b").DrainState().Draining {
		t.Fatal("a refused drain left b draining")
	}
	if code, msg := post("c", "/v1/drain"); code != 200 {
		t.Fatalf("drain c: %d %s", code, msg)
	}
	waitFor(t, 10*time.Second, "every node sees a and c draining", seesDraining(map[string]bool{"a": true, "c": true}))
	if code, msg := post("b", "/v1/drain"); code != http.StatusConflict || !strings.Contains(msg, "no undrained active member") {
		t.Fatalf("drain of the last undrained member: %d %s; want 409", code, msg)
	}
	if code, msg := post("c", "/v1/undrain"); code != 200 {
		t.Fatalf("undrain c: %d %s", code, msg)
	}

	// a restarts drained.
	oc.stop("a")
	oc.restart("a")
	oc.waitConverged(15*time.Second, oc.names)
	waitFor(t, 10*time.Second, "every node sees the restarted a draining", seesDraining(map[string]bool{"a": true}))
	if cmd, msg, body := connectRaw(t, oc.broker("a").STOMPAddr()); cmd != "ERROR" || msg != "node draining" {
		t.Fatalf("CONNECT to a restarted drained: %s %q %q, want ERROR node draining", cmd, msg, body)
	}
	if code, _ := adminJSON(http.MethodGet, oc.broker("a").AdminAddr(), "/healthz", nil); code != http.StatusServiceUnavailable {
		t.Fatalf("/healthz of a restarted drained: %d, want 503", code)
	}
	if code, msg := post("a", "/v1/undrain"); code != 200 {
		t.Fatalf("undrain a: %d %s", code, msg)
	}
	waitFor(t, 10*time.Second, "every node sees nobody draining", seesDraining(map[string]bool{}))
	if cmd, msg, _ := connectRaw(t, oc.broker("a").STOMPAddr()); cmd != "CONNECTED" {
		t.Fatalf("CONNECT to a undrained: %s %q", cmd, msg)
	}
	if code, _ := adminJSON(http.MethodGet, oc.broker("a").AdminAddr(), "/healthz", nil); code != 200 {
		t.Fatalf("/healthz of a undrained: %d, want 200", code)
	}

	// After a restart of every node no queue is served until its first
	// use: brokerd queues still lists it, idle, from its copies.
	for _, n := range oc.names {
		oc.stop(n)
	}
	for _, n := range oc.names {
		oc.restart(n)
	}
	oc.waitConverged(15*time.Second, oc.names)
	waitFor(t, 10*time.Second, q+" listed idle, owner b, 1 message", func() (bool, string) {
		var qs []node.QueueInfo
		_, err := adminJSON(http.MethodGet, oc.broker("c").AdminAddr(), "/v1/queues", &qs)
		for _, x := range qs {
			if x.Name == q {
				return x.Idle && x.Owner == bID && x.Pending == 1 && len(x.Replicas) == 2, fmt.Sprintf("%+v", x)
			}
		}
		return false, fmt.Sprint(qs, err)
	})
}
