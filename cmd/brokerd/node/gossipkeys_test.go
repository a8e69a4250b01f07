package node

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/config"
	gostomp "github.com/go-stomp/stomp/v3"
)

// clusterNode is one brokerd node of an in-process cluster: real gossip
// (memberlist over UDP and TCP on loopback, encrypted with the node's
// keyring) and real peer links.
type clusterNode struct {
	t    *testing.T
	cfg  config.Config
	n    *Node
	logs *lockedBuffer
}

// clusterTestConfig is a node of a cluster on free loopback ports: M = 3,
// R = 2, gossip encrypted with the key in keyFile.
func clusterTestConfig(t *testing.T, name, keyFile string) config.Config {
	t.Helper()
	cfg := config.Default()
	cfg.Node.Name = name
	cfg.Node.DataDir = t.TempDir()
	cfg.STOMP.Addr = "127.0.0.1:0"
	cfg.Admin.Addr = "127.0.0.1:0"
	cfg.Store.Sync = "none"
	cfg.Cluster.GossipAddr = "127.0.0.1:0"
	cfg.Cluster.PeerAddr = "127.0.0.1:0"
	cfg.Cluster.SecretKeyFile = keyFile
	cfg.Cluster.ActiveMembers = 3
	cfg.Cluster.PromotionDelay = 200 * time.Millisecond
	cfg.Replica.Factor = 2
	return cfg
}

// start starts (or restarts, on the same data directory) the node.
func (c *clusterNode) start() {
	c.t.Helper()
	if c.logs == nil {
		c.logs = &lockedBuffer{}
	}
	h := slog.Handler(slog.NewJSONHandler(c.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if os.Getenv("BROKERD_TEST_LOG") != "" {
		h = slog.NewTextHandler(io.MultiWriter(c.logs, os.Stderr), &slog.HandlerOptions{Level: slog.LevelInfo})
	}
	n, err := New(c.cfg, slog.New(h))
	if err != nil {
		c.t.Fatalf("%s: New: %v", c.cfg.Node.Name, err)
	}
	if err := n.Start(); err != nil {
		c.t.Fatalf("%s: Start: %v", c.cfg.Node.Name, err)
	}
	c.n = n
}

func (c *clusterNode) stop() {
	if c.n == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = c.n.Shutdown(ctx)
	c.n = nil
}

// startCluster starts one node per config, each joining the first.
func startCluster(t *testing.T, cfgs ...config.Config) []*clusterNode {
	t.Helper()
	var out []*clusterNode
	for i, cfg := range cfgs {
		if i > 0 {
			cfg.Cluster.Join = []string{out[0].n.Cluster().GossipAddr()}
		}
		c := &clusterNode{t: t, cfg: cfg}
		c.start()
		t.Cleanup(c.stop)
		out = append(out, c)
	}
	return out
}

// agreement says why the nodes do not agree yet ("" when they do): each
// converged, sees every other alive, and all show one epoch.
func agreement(nodes []*clusterNode) string {
	var epoch cluster.EpochID
	for i, c := range nodes {
		st := c.n.Cluster().Status()
		if !st.Converged {
			return c.cfg.Node.Name + " not converged"
		}
		alive := 0
		for _, m := range st.Members {
			if m.State == "alive" {
				alive++
			}
		}
		if alive != len(nodes) {
			return fmt.Sprintf("%s sees %d of %d alive", c.cfg.Node.Name, alive, len(nodes))
		}
		if i == 0 {
			epoch = st.EpochID
		} else if st.EpochID != epoch {
			return fmt.Sprintf("%s at epoch %v, %s at %v", nodes[0].cfg.Node.Name, epoch, c.cfg.Node.Name, st.EpochID)
		}
	}
	return ""
}

func waitAgreement(t *testing.T, d time.Duration, nodes []*clusterNode) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		why := agreement(nodes)
		if why == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no agreement within %v: %s", d, why)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// peerLinksDown reports the peer-link clients of n that are down
// (brokerd_peer_link_up 0), by peer label.
func peerLinksDown(t *testing.T, n *Node) []string {
	t.Helper()
	mfs, err := n.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var down []string
	for _, mf := range mfs {
		if mf.GetName() != "brokerd_peer_link_up" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetGauge().GetValue() != 1 {
				for _, l := range m.GetLabel() {
					down = append(down, l.GetValue())
				}
			}
		}
	}
	return down
}

func writeKeyFile(t *testing.T, key []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "gossip.key")
	if err := os.WriteFile(p, []byte(base64.StdEncoding.EncodeToString(key)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// keysCall sends a key operation to a node's admin API and decodes a 200
// answer; it returns the status and the body.
func keysCall(t *testing.T, n *Node, method, path string, key []byte, out any) (int, string) {
	t.Helper()
	var body io.Reader
	if key != nil {
		b, _ := json.Marshal(map[string]string{"key": base64.StdEncoding.EncodeToString(key)})
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://"+n.AdminAddr()+path, body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Timeout: 20 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == http.StatusOK && out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: %v: %s", method, path, err, b)
		}
	}
	return resp.StatusCode, string(b)
}

// keyOp runs a key operation that must succeed on every one of want
// nodes.
func keyOp(t *testing.T, n *Node, op string, key []byte, want int) GossipKeys {
	t.Helper()
	var res GossipKeys
	code, body := keysCall(t, n, http.MethodPost, "/v1/gossip-keys/"+op, key, &res)
	if code != http.StatusOK || !res.OK || res.Members != want || len(res.Nodes) != want {
		t.Fatalf("%s: %d %s", op, code, body)
	}
	for _, nk := range res.Nodes {
		if !nk.OK {
			t.Fatalf("%s on %s: %s", op, nk.NodeName, nk.Error)
		}
	}
	return res
}

// quietLog keeps go-stomp's client quiet.
type quietLog struct{}

func (quietLog) Debugf(string, ...any)   {}
func (quietLog) Infof(string, ...any)    {}
func (quietLog) Warningf(string, ...any) {}
func (quietLog) Errorf(string, ...any)   {}
func (quietLog) Debug(string)            {}
func (quietLog) Info(string)             {}
func (quietLog) Warning(string)          {}
func (quietLog) Error(string)            {}

func dialSTOMP(addr string) (*gostomp.Conn, error) {
	return gostomp.Dial("tcp", addr, gostomp.ConnOpt.Logger(quietLog{}))
}

// rotationLoad is a producer sending receipted messages through one node
// and a consumer draining them through another, with
// client-individual acknowledgements, while the test runs.
type rotationLoad struct {
	queues []string
	stop   chan struct{}
	wg     sync.WaitGroup

	mu       sync.Mutex
	sent     map[string]bool // receipted
	unknown  int             // SENDs without a receipt (error, broken connection)
	received map[string]bool
	errs     []string
}

func startRotationLoad(t *testing.T, prod, cons *Node, queues []string) *rotationLoad {
	l := &rotationLoad{queues: queues, stop: make(chan struct{}), sent: map[string]bool{}, received: map[string]bool{}}
	l.wg.Add(2)
	go l.produce(prod.STOMPAddr())
	go l.consume(cons.STOMPAddr())
	t.Cleanup(l.halt)
	return l
}

func (l *rotationLoad) note(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) < 20 {
		l.errs = append(l.errs, fmt.Sprintf(format, args...))
	}
}

func (l *rotationLoad) stopped() bool {
	select {
	case <-l.stop:
		return true
	default:
		return false
	}
}

func (l *rotationLoad) produce(addr string) {
	defer l.wg.Done()
	seq := 0
	for !l.stopped() {
		conn, err := dialSTOMP(addr)
		if err != nil {
			l.note("producer dial: %v", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		for !l.stopped() {
			seq++
			id := "m" + strconv.Itoa(seq)
			err := conn.Send(l.queues[seq%len(l.queues)], "text/plain", []byte(id), gostomp.SendOpt.Receipt, gostomp.SendOpt.Header("x-id", id))
			l.mu.Lock()
			if err == nil {
				l.sent[id] = true
			} else {
				l.unknown++
			}
			l.mu.Unlock()
			if err != nil {
				l.note("send %s: %v", id, err)
				break
			}
		}
		_ = conn.Disconnect()
	}
}

func (l *rotationLoad) consume(addr string) {
	defer l.wg.Done()
	for !l.stopped() {
		conn, err := dialSTOMP(addr)
		if err != nil {
			l.note("consumer dial: %v", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		l.drain(conn)
		_ = conn.Disconnect()
	}
}

// drain reads the queues on conn until the load stops or the connection
// breaks.
func (l *rotationLoad) drain(conn *gostomp.Conn) {
	msgs := make(chan *gostomp.Message, 64)
	quit := make(chan struct{})
	defer close(quit)
	for _, q := range l.queues {
		sub, err := conn.Subscribe(q, gostomp.AckClientIndividual)
		if err != nil {
			l.note("subscribe %s: %v", q, err)
			return
		}
		go func() {
			for m := range sub.C {
				select {
				case msgs <- m:
				case <-quit:
					return
				}
			}
		}()
	}
	for {
		select {
		case <-l.stop:
			return
		case m := <-msgs:
			if m.Err != nil {
				l.note("consumer: %v", m.Err)
				return
			}
			l.mu.Lock()
			l.received[string(m.Body)] = true
			l.mu.Unlock()
			if err := conn.Ack(m); err != nil {
				l.note("ack: %v", err)
				return
			}
		}
	}
}

func (l *rotationLoad) halt() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

// counts returns how many messages were receipted, received, and sent
// without a receipt.
func (l *rotationLoad) counts() (sent, received, unknown int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.sent), len(l.received), l.unknown
}

// lost returns the receipted messages not received.
func (l *rotationLoad) lost() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for id := range l.sent {
		if !l.received[id] {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// TestGossipKeyRotationUnderLoad: three nodes gossip with key k1 (from
// cluster.secret_key_file) while a producer sends receipted messages
// through one node and a consumer drains them through another. Through
// the admin API of one node the cluster installs k2, uses it, and removes
// k1: every step answers ok for all three nodes, the membership stays
// converged and every peer link up after each, use of a key not
// installed and removal of the primary are refused. No receipted message
// is lost. Then a node restarts (its secret_key_file still says k1): it
// reads k2 from its keyring file and rejoins the gossip; and a new node
// whose secret_key_file says k2 joins, and its peer links carry receipted
// messages: the others authenticate peer links with their keyring (k2),
// not with the key they were started with.
func TestGossipKeyRotationUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("three nodes under load")
	}
	k1, k2, k3 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32), bytes.Repeat([]byte{3}, 32)
	keyFile := writeKeyFile(t, k1)
	nodes := startCluster(t,
		clusterTestConfig(t, "a", keyFile),
		clusterTestConfig(t, "b", keyFile),
		clusterTestConfig(t, "c", keyFile))
	waitAgreement(t, 20*time.Second, nodes)
	a := nodes[0].n

	var queues []string
	for i := range 6 {
		queues = append(queues, fmt.Sprintf("/queue/rotate-%d", i))
	}
	load := startRotationLoad(t, nodes[1].n, nodes[2].n, queues)
	waitProgress := func(what string) {
		t.Helper()
		s0, r0, _ := load.counts()
		deadline := time.Now().Add(10 * time.Second)
		for {
			s, r, _ := load.counts()
			if s >= s0+20 && r >= r0+20 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the load made no progress in 10 s (sent %d→%d, received %d→%d); %v", what, s0, s, r0, r, load.errs)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	settled := func(what string) {
		t.Helper()
		waitAgreement(t, 10*time.Second, nodes)
		for _, c := range nodes {
			if down := peerLinksDown(t, c.n); len(down) > 0 {
				t.Fatalf("%s: %s's peer links down: %v", what, c.cfg.Node.Name, down)
			}
		}
		waitProgress(what)
	}
	waitProgress("before the rotation")

	keyOp(t, a, keyOpInstall, k2, 3)
	settled("after install")
	if code, body := keysCall(t, a, http.MethodPost, "/v1/gossip-keys/use", k3, nil); code != http.StatusConflict || !strings.Contains(body, "not installed") {
		t.Fatalf("use of a key not installed: %d %s", code, body)
	}
	keyOp(t, a, keyOpUse, k2, 3)
	settled("after use")
	if code, body := keysCall(t, a, http.MethodPost, "/v1/gossip-keys/remove", k2, nil); code != http.StatusConflict || !strings.Contains(body, "primary") {
		t.Fatalf("removal of the primary key: %d %s", code, body)
	}
	keyOp(t, a, keyOpRemove, k1, 3)
	settled("after remove")

	var list GossipKeys
	if code, body := keysCall(t, nodes[1].n, http.MethodGet, "/v1/gossip-keys", nil, &list); code != http.StatusOK || !list.OK {
		t.Fatalf("list: %d %s", code, body)
	}
	want := base64.StdEncoding.EncodeToString(k2)
	if len(list.Keys) != 1 || list.Keys[0].Key != want || list.Keys[0].Nodes != 3 || list.Keys[0].PrimaryOn != 3 {
		t.Fatalf("keys after the rotation: %+v", list.Keys)
	}

	// Nothing receipted is lost.
	load.halt()
	drainAll(t, nodes[0].n, load)
	sent, received, unknown := load.counts()
	if lost := load.lost(); len(lost) > 0 {
		t.Fatalf("%d of %d receipted messages lost: %v", len(lost), sent, lost[:min(len(lost), 20)])
	}
	t.Logf("%d receipted messages sent, %d received, %d SENDs without a receipt", sent, received, unknown)

	// c restarts with its keyring file (k2), although its
	// cluster.secret_key_file says k1.
	c := nodes[2]
	c.stop()
	waitAgreement(t, 20*time.Second, nodes[:2])
	c.cfg.Cluster.Join = []string{a.Cluster().GossipAddr()}
	c.start()
	waitAgreement(t, 20*time.Second, nodes)
	if keys, err := c.n.Cluster().GossipKeys(); err != nil || len(keys) != 1 || !bytes.Equal(keys[0], k2) {
		t.Fatalf("restarted c's keys %x (%v), want k2 alone", keys, err)
	}
	if !strings.Contains(c.logs.String(), "gossip keys read from the keyring file") {
		t.Fatal("restarted c did not say it read the keyring file")
	}
	d := startCluster(t, clusterTestConfig(t, "d", writeKeyFile(t, k2)))[0]
	d.cfg.Cluster.Join = nil
	nodes = append(nodes, d)
	if _, err := d.n.Cluster().Join([]string{a.Cluster().GossipAddr()}); err != nil {
		t.Fatalf("d joins with k2: %v", err)
	}
	waitAgreement(t, 20*time.Second, nodes)
	load2 := startRotationLoad(t, d.n, c.n, queues)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if s, r, _ := load2.counts(); s >= 50 && r >= 50 {
			break
		}
		if time.Now().After(deadline) {
			s, r, _ := load2.counts()
			t.Fatalf("after c's restart: %d sent, %d received in 10 s; %v", s, r, load2.errs)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, x := range nodes {
		if down := peerLinksDown(t, x.n); len(down) > 0 {
			t.Fatalf("after c's restart: %s's peer links down: %v", x.cfg.Node.Name, down)
		}
	}
	load2.halt()
	drainAll(t, nodes[1].n, load2)
	if lost := load2.lost(); len(lost) > 0 {
		t.Fatalf("after c's restart, %d receipted messages lost: %v", len(lost), lost[:min(len(lost), 20)])
	}
}

// drainAll consumes what is left of l's queues through n until every
// receipted message was received, or 20 s pass.
func drainAll(t *testing.T, n *Node, l *rotationLoad) {
	t.Helper()
	l.stop = make(chan struct{})
	deadline := time.AfterFunc(20*time.Second, func() { close(l.stop) })
	defer deadline.Stop()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for !l.stopped() {
			conn, err := dialSTOMP(n.STOMPAddr())
			if err != nil {
				time.Sleep(50 * time.Millisecond)
				continue
			}
			l.drain(conn)
			_ = conn.Disconnect()
		}
	}()
	for len(l.lost()) > 0 && !l.stopped() {
		time.Sleep(20 * time.Millisecond)
	}
	if deadline.Stop() {
		close(l.stop)
	}
	<-done
}
