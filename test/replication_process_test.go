package test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/go-stomp/stomp/v3"
)

// replCluster starts n brokerd processes, M=n, replication factor 2, and
// waits until they agree; it returns them by node ID.
func replCluster(t *testing.T, n int) ([]*clusterProc, map[string]*clusterProc, []string) {
	t.Helper()
	ps := startClusterProcs(t, n, n)
	waitAgreed(t, ps, n, n, 20*time.Second)
	byID := map[string]*clusterProc{}
	var active []string
	for _, p := range ps {
		s, err := p.status()
		if err != nil {
			t.Fatal(err)
		}
		byID[s.NodeID] = p
		active = s.ActiveSet
	}
	return ps, byID, active
}

// TestProcessReplicationCrossNode: a producer on one node and a consumer
// on another exchange every message of a queue a third node owns, in
// order.
func TestProcessReplicationCrossNode(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	ps, byID, active := replCluster(t, 3)
	_ = ps
	q := "/queue/cross"
	owner := byID[replica.ReplicaSet(q, active, 2)[0]]
	var others []*clusterProc
	for _, p := range byID {
		if p != owner {
			others = append(others, p)
		}
	}
	cons := others[1].dial()
	// prefetch-count: go-stomp's client deadlocks when more than ~18
	// messages are outstanding while the application blocks in Ack.
	sub, err := cons.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "8"))
	if err != nil {
		t.Fatal(err)
	}
	prod := others[0].dial()
	const n = 500
	for i := 0; i < n; i++ {
		if err := prod.Send(q, "text/plain", []byte(strconv.Itoa(i)), stomp.SendOpt.Receipt); err != nil {
			t.Fatalf("send %d via %s (owner %s): %v", i, others[0].name, owner.name, err)
		}
	}
	for i := 0; i < n; i++ {
		select {
		case m := <-sub.C:
			if m.Err != nil {
				t.Fatal(m.Err)
			}
			if string(m.Body) != strconv.Itoa(i) {
				t.Fatalf("message %d: got %q, want in order", i, m.Body)
			}
			if err := cons.Ack(m); err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("consumer on %s got %d of %d messages sent on %s (owner %s)", others[1].name, i, n, others[0].name, owner.name)
		}
	}
}

// TestProcessReplicationOwnerKilled: 3 brokerd, M=3, R=2. A producer
// sends receipted messages to one node while a consumer reads from
// another with client-individual acks; the queue's owner is killed with
// kill -9 halfway. Every receipted message must reach the consumer;
// duplicates are reported.
func TestProcessReplicationOwnerKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	_, byID, active := replCluster(t, 3)
	q := "/queue/failover"
	owner := byID[replica.ReplicaSet(q, active, 2)[0]]
	var others []*clusterProc
	for _, p := range byID {
		if p != owner {
			others = append(others, p)
		}
	}
	prodNode, consNode := others[0], others[1]
	const n = 3000

	var mu sync.Mutex
	received := map[string]int{}
	redelivered := 0
	consErr := make(chan error, 1)
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			c, err := consNode.tryDial()
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			// go-stomp's client stops reading while a subscription's
			// channel is full and the application blocks in Ack (its one
			// loop both dispatches and writes): bound what is in flight.
			sub, err := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "8"))
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			for m := range sub.C {
				if m.Err != nil {
					break
				}
				mu.Lock()
				received[string(m.Body)]++
				if m.Header.Get("redelivered") == "true" {
					redelivered++
				}
				mu.Unlock()
				if err := c.Ack(m); err != nil {
					break
				}
			}
			select {
			case <-stop:
				return
			default:
			}
		}
	}()
	_ = consErr

	receipted := map[string]bool{}
	unknown := 0
	var maxGap time.Duration
	killed := false
	prod := prodNode.dial()
	last := time.Now()
	for i := 0; i < n; i++ {
		if i == n/2 && !killed {
			owner.kill()
			killed = true
			t.Logf("killed the owner %s after %d receipted messages", owner.name, len(receipted))
		}
		body := "m" + strconv.Itoa(i)
		err := prod.Send(q, "text/plain", []byte(body), stomp.SendOpt.Receipt)
		if err != nil {
			if unknown < 3 {
				t.Logf("send %d: %v", i, err)
			}
			unknown++
			prod, err = prodNode.tryDial()
			if err != nil {
				t.Fatalf("producer cannot reconnect to %s: %v", prodNode.name, err)
			}
			continue
		}
		now := time.Now()
		maxGap = max(maxGap, now.Sub(last))
		last = now
		receipted[body] = true
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		mu.Lock()
		missing := 0
		for b := range receipted {
			if received[b] == 0 {
				missing++
			}
		}
		dups := 0
		for _, c := range received {
			dups += c - 1
		}
		mu.Unlock()
		if missing == 0 {
			t.Logf("sent %d: receipted %d, unknown outcome %d; longest gap between receipts %v; received %d distinct, %d duplicates (%d marked redelivered)",
				n, len(receipted), unknown, maxGap.Round(time.Millisecond), len(received), dups, redelivered)
			break
		}
		if time.Now().After(deadline) {
			for _, p := range byID {
				if p != owner {
					_, b := p.get("/v1/destinations")
					t.Logf("%s: %s", p.name, b)
					if dir := os.Getenv("BROKERD_TEST_DUMP"); dir != "" {
						_, g := p.get("/debug/pprof/goroutine?debug=2")
						_ = os.WriteFile(filepath.Join(dir, p.name+".goroutines"), g, 0o644)
						_, m := p.get("/metrics")
						_ = os.WriteFile(filepath.Join(dir, p.name+".metrics"), m, 0o644)
					}
				}
			}
			close(stop)
			t.Fatalf("%d receipted messages never reached the consumer (receipted %d, unknown %d, received %d distinct)", missing, len(receipted), unknown, len(received))
		}
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	if len(receipted) < n/2 {
		t.Fatalf("only %d of %d sends receipted: the survivors did not take over", len(receipted), n)
	}
}

// TestProcessReplicationOwnerRestarts: the owner of a queue is killed
// with kill -9, the survivors take the queue over and accept more
// messages, then the old owner restarts on its data directory, rejoins
// and, owning the queue again, merges the survivors' copies: every
// receipted message is delivered (duplicates, marked, are allowed).
func TestProcessReplicationOwnerRestarts(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	ps, byID, active := replCluster(t, 3)
	q := "/queue/rejoin"
	ownerID := replica.ReplicaSet(q, active, 2)[0]
	owner := byID[ownerID]
	var other *clusterProc
	for _, p := range ps {
		if p != owner {
			other = p
			break
		}
	}
	sent := map[string]bool{}
	send := func(via *clusterProc, from, to int) {
		t.Helper()
		c := via.dial()
		for i := from; i < to; i++ {
			body := "m" + strconv.Itoa(i)
			if err := c.Send(q, "text/plain", []byte(body), stomp.SendOpt.Receipt); err != nil {
				t.Fatalf("send %s via %s: %v", body, via.name, err)
			}
			sent[body] = true
		}
		_ = c.Disconnect()
	}
	send(other, 0, 300)
	owner.kill()
	var survivors []*clusterProc
	for _, p := range ps {
		if p != owner {
			survivors = append(survivors, p)
		}
	}
	waitAgreed(t, survivors, 2, 3, 20*time.Second)
	send(other, 300, 600)
	restarted := &clusterProc{proc: owner.restart(procOpts{args: owner.args}), name: owner.name, gossip: owner.gossip, args: owner.args}
	all := append(survivors, restarted)
	waitAgreed(t, all, 3, 3, 30*time.Second)
	send(other, 600, 900)

	c := restarted.dial()
	sub, err := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "8"))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	redelivered := 0
	for missing := len(sent); missing > 0; {
		select {
		case m := <-sub.C:
			if m.Err != nil {
				t.Fatal(m.Err)
			}
			b := string(m.Body)
			if got[b] == 0 && sent[b] {
				missing--
			}
			got[b]++
			if m.Header.Get("redelivered") == "true" {
				redelivered++
			}
			if err := c.Ack(m); err != nil {
				t.Fatal(err)
			}
		case <-time.After(15 * time.Second):
			t.Fatalf("%d of %d receipted messages never delivered after the owner restarted", missing, len(sent))
		}
	}
	dups := 0
	for _, n := range got {
		dups += n - 1
	}
	t.Logf("%d receipted, all delivered; %d duplicates, %d deliveries marked redelivered", len(sent), dups, redelivered)
}

// TestProcessReplicationLagMetric: 3 brokerd, R=2, W=1. While a queue's
// replica is stopped (SIGSTOP), receipted SENDs still complete on the
// owner alone, and the owner's /metrics shows the replica falling behind
// on that queue (brokerd_replication_lag_ops); once it runs again the lag
// goes back to nothing and its copy is in sync.
func TestProcessReplicationLagMetric(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	ps := startClusterProcs(t, 3, 3, "--write-quorum", "1")
	waitAgreed(t, ps, 3, 3, 20*time.Second)
	byID := map[string]*clusterProc{}
	var active []string
	for _, p := range ps {
		s, err := p.status()
		if err != nil {
			t.Fatal(err)
		}
		byID[s.NodeID] = p
		active = s.ActiveSet
	}
	q := "/queue/lag"
	set := replica.ReplicaSet(q, active, 2)
	owner, rep := byID[set[0]], byID[set[1]]
	c := owner.dial()
	defer c.Disconnect()
	for i := range 20 {
		if err := c.Send(q, "text/plain", []byte(strconv.Itoa(i)), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	owner.waitMetric(valueCond{">= 1", func(v float64) bool { return v >= 1 }}, "brokerd_replication_copies", "state", "synced")

	if err := rep.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	defer func() {
		if stopped {
			_ = rep.cmd.Process.Signal(syscall.SIGCONT)
		}
	}()
	// kill(2) returns before the process has stopped: on a busy machine
	// it may still confirm the next append (the lag would read 99).
	waitProcStopped(t, rep.cmd.Process.Pid)
	const n = 100
	for i := range n {
		if err := c.Send(q, "text/plain", []byte("while stopped "+strconv.Itoa(i)), stomp.SendOpt.Receipt); err != nil {
			t.Fatalf("send %d with W=1 while the replica is stopped: %v", i, err)
		}
	}
	lag, ok := owner.metric("brokerd_replication_lag_ops", "destination", q, "peer", set[1])
	if !ok || lag < n {
		t.Fatalf("owner %s reports replication lag %v (present %v) on %s for stopped replica %s, want >= %d", owner.name, lag, ok, q, rep.name, n)
	}
	if b, _ := owner.metric("brokerd_replication_lag_bytes", "destination", q, "peer", set[1]); b <= 0 {
		t.Fatalf("lag bytes %v with %v ops behind", b, lag)
	}
	t.Logf("replica %s stopped: owner %s reports %v ops behind on %s", rep.name, owner.name, lag, q)

	if err := rep.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	stopped = false
	deadline := time.Now().Add(30 * time.Second)
	for {
		// The queue may have moved while the replica was stopped; what
		// matters is that no node reports it behind any more.
		behind := false
		for _, p := range ps {
			if v, ok := p.metric("brokerd_replication_lag_ops", "destination", q); ok && v > 0 {
				behind = true
			}
		}
		if !behind {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("replication lag still reported 30 s after the replica resumed")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestProcessReplicationFailoverKeepsOrder: 3 brokerd, R=2. A producer
// pipelines receipted SENDs (32 outstanding) to a node that does not own
// the queue while the owner is killed with kill -9; a consumer on the
// third node reads with client-individual acks. SENDs in flight when the
// owner dies are retried by the producer's node; they must not land
// after the ones sent behind them: the messages delivered for the first
// time (not marked redelivered) arrive in the order they were sent, and
// nothing receipted is missing.
func TestProcessReplicationFailoverKeepsOrder(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	_, byID, active := replCluster(t, 3)
	q := "/queue/failover-order"
	owner := byID[replica.ReplicaSet(q, active, 2)[0]]
	var others []*clusterProc
	for _, p := range byID {
		if p != owner {
			others = append(others, p)
		}
	}
	prodNode, consNode := others[0], others[1]
	const n, window = 4000, 32

	var mu sync.Mutex
	received := map[int]bool{}
	outOfOrder, firstSeen := 0, -1
	var example string
	stop := make(chan struct{})
	consDone := make(chan struct{})
	go func() {
		defer close(consDone)
		for {
			select {
			case <-stop:
				return
			default:
			}
			c, err := consNode.tryDial()
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			sub, err := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "8"))
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			for m := range sub.C {
				if m.Err != nil {
					break
				}
				seq, _ := strconv.Atoi(string(m.Body))
				mu.Lock()
				if m.Header.Get("redelivered") != "true" && !received[seq] {
					if seq < firstSeen {
						outOfOrder++
						if example == "" {
							example = fmt.Sprintf("%d after %d", seq, firstSeen)
						}
					}
					firstSeen = max(firstSeen, seq)
				}
				received[seq] = true
				mu.Unlock()
				if err := c.Ack(m); err != nil {
					break
				}
			}
		}
	}()

	// The producer: raw frames, window receipts outstanding.
	rc := prodNode.raw()
	rc.connect()
	receipted := map[int]bool{}
	sent, killed := 0, false
	outstanding := 0
	for sent < n || outstanding > 0 {
		for outstanding < window && sent < n {
			if sent == n/2 && !killed {
				owner.kill()
				killed = true
			}
			rc.frame("SEND", strconv.Itoa(sent), "destination", q, "receipt", strconv.Itoa(sent))
			sent++
			outstanding++
		}
		_ = rc.c.SetReadDeadline(time.Now().Add(30 * time.Second))
		f, err := rc.r.Read()
		if err != nil {
			t.Fatalf("producer on %s: %v after %d receipts", prodNode.name, err, len(receipted))
		}
		if f == nil {
			continue
		}
		if f.Command != "RECEIPT" {
			t.Fatalf("producer on %s: %s %v %q after %d receipts", prodNode.name, f.Command, f.Header, f.Body, len(receipted))
		}
		id, _ := strconv.Atoi(f.Header.Get("receipt-id"))
		receipted[id] = true
		outstanding--
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		mu.Lock()
		missing := 0
		for id := range receipted {
			if !received[id] {
				missing++
			}
		}
		ooo, ex := outOfOrder, example
		mu.Unlock()
		if missing == 0 {
			close(stop)
			t.Logf("owner %s killed after %d SENDs; %d receipted, all received; %d first deliveries out of order", owner.name, n/2, len(receipted), ooo)
			if ooo > 0 {
				t.Fatalf("%d messages delivered for the first time after a later one of the same producer, e.g. %s", ooo, ex)
			}
			return
		}
		if time.Now().After(deadline) {
			close(stop)
			t.Fatalf("%d receipted messages never reached the consumer", missing)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitProcStopped waits until process pid is stopped (state T in
// /proc/pid/stat), for at most 5 s.
func waitProcStopped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Fatal(err)
		}
		// pid (comm) state ...: comm may hold spaces and parentheses.
		if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) && (b[i+2] == 'T' || b[i+2] == 't') {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d not stopped 5 s after SIGSTOP: %s", pid, b)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
