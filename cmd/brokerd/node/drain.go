package node

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// Draining a node for maintenance (brokerd drain, POST /v1/drain).
//
// A draining node announces it in its gossip metadata (cluster.Meta
// Draining). It stays an active member and a replica of its queues, so
// every queue keeps its R copies, but placement on every node names the
// first undrained member of a queue's replica set as its owner
// (replica.PreferredOwner). The hand-off is the one a change of the
// active set makes, ordered so that the queues have one owner at a time:
// the drained node's router counts itself draining first and releases
// its queues (subscriptions end, their unacknowledged messages come back
// redelivered at the new owner), and only then gossips the drain; the
// other nodes name the new owners as they hear of it, and each new owner
// takes its queues over by pulling every copy, the drained node's too.
// Until the views agree a forwarded SEND or subscribe is refused as not
// owned and routed again, as in a failover. The node refuses new STOMP connections
// with an ERROR "node draining" naming the other nodes, and once it owns
// no queue (or after drainCloseAfter) ends its client sessions as a
// shutdown does, so that clients reconnect elsewhere. /healthz answers
// 503 "draining". The state is kept in the store's meta and survives a
// restart until undrain: an upgraded node comes back without owning
// anything or taking clients until the operator says so.

// metaDraining is the store meta key of the drained state: "1" draining.
const metaDraining = "draining"

// drainReleaseWait bounds how long a drain waits for its node to release
// its queues before it announces the drain (the router's watch releases
// them within a tick, 100 ms, unless a take-over is in progress).
const drainReleaseWait = 1500 * time.Millisecond

// drainCloseAfter bounds how long a drained node waits for its queues to
// move before it ends its client sessions anyway.
const drainCloseAfter = 30 * time.Second

// ErrDrainRefused is a drain that would leave a queue without an
// undrained owner, or the cluster without an undrained active member.
var ErrDrainRefused = errors.New("drain refused")

// DrainStatus is the drained state of a node, as POST /v1/drain,
// POST /v1/undrain and GET /v1/drain return it.
type DrainStatus struct {
	NodeID   string `json:"node_id"`
	NodeName string `json:"node_name"`
	Draining bool   `json:"draining"`
	// OwnedQueues is the number of queues this node still serves (0 once
	// a drain has handed every one over).
	OwnedQueues int `json:"owned_queues"`
	// ClientsClosed is the number of client sessions the drain ended
	// (set once it has).
	ClientsClosed int `json:"clients_closed"`
	// Clients is the number of STOMP sessions open now.
	Clients int `json:"clients"`
	// PendingTransactions is the number of COMMITs over several queues'
	// owners this node recorded and has not applied everywhere yet: their
	// remaining messages are on this node's disk only until then, so it
	// must not be stopped before this is 0.
	PendingTransactions int `json:"pending_transactions"`
}

// drainingSig lists v's draining members, sorted: part of the router's
// view signature, so that a drain or undrain moves ownership.
func drainingSig(v viewSnap) string {
	ids := make([]string, 0, len(v.draining))
	for id := range v.draining {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return strings.Join(ids, ",")
}

// servedQueues is the queues this node serves or is taking over. A
// take-over that ended without a queue (a purge or existence check of a
// queue that does not exist) leaves nothing served.
func (rt *router) servedQueues() []string {
	qs := rt.rep.AdoptedQueues()
	rt.omu.Lock()
	for dest, st := range rt.owned {
		select {
		case <-st.done:
			continue // adopted (listed above) or failed
		default:
		}
		if !slices.Contains(qs, dest) {
			qs = append(qs, dest)
		}
	}
	rt.omu.Unlock()
	sort.Strings(qs)
	return qs
}

// checkDrain says why draining self in v would leave a queue, or the
// cluster, without an undrained owner: nil when it would not.
func (rt *router) checkDrain(v viewSnap) error {
	undrained := 0
	for _, id := range v.active {
		if _, alive := v.peers[id]; alive && id != v.self && !v.draining[id] {
			undrained++
		}
	}
	if undrained == 0 {
		return fmt.Errorf("%w: it would leave no undrained active member (active set %s; draining or unreachable: every other)", ErrDrainRefused, strings.Join(v.active, ","))
	}
	if rt.r < 2 {
		return fmt.Errorf("%w: replica.factor is %d: no other node holds a copy of this node's queues to serve them", ErrDrainRefused, rt.r)
	}
	// The queues it serves, and those it holds a copy of that it would
	// come to own (a queue without another undrained replica stays with
	// its first replica, draining or not).
	check := rt.servedQueues()
	if bs, err := rt.st.Buckets(); err == nil {
		for _, b := range bs {
			if b.Count > 0 && validDest(b.Name) && !slices.Contains(check, b.Name) && slices.Contains(replica.ReplicaSet(b.Name, v.active, rt.r), v.self) {
				check = append(check, b.Name)
			}
		}
	}
	for _, dest := range check {
		ok := false
		for _, id := range replica.ReplicaSet(dest, v.active, rt.r) {
			if _, alive := v.peers[id]; alive && id != v.self && !v.draining[id] {
				ok = true
				break
			}
		}
		if !ok {
			return fmt.Errorf("%w: no other replica of %s is alive and undrained (replica set %s)", ErrDrainRefused, dest, strings.Join(replica.ReplicaSet(dest, v.active, rt.r), ","))
		}
	}
	return nil
}

// legacyMembers refuses a drain while an alive member runs a build from
// before drain (and protocol ranges): it would go on naming this node as
// the owner of its queues while this node refuses them, and its clients'
// SENDs and subscriptions to them would fail until the drain ends.
func legacyMembers(s cluster.Status) error {
	var old []string
	for _, m := range s.Members {
		if m.Legacy && (m.State == "alive" || m.State == "suspect") {
			old = append(old, m.Name)
		}
	}
	if len(old) > 0 {
		return fmt.Errorf("%w: %s run a build from before drain (it would keep sending this node's queues here): upgrade them first, or stop this node without draining", ErrDrainRefused, strings.Join(old, ", "))
	}
	return nil
}

// drainDetail is the body of the ERROR a CONNECT gets while draining:
// the other nodes' STOMP addresses, when known.
func (n *Node) drainDetail() string {
	msg := "this node is draining for maintenance; connect to another node of the cluster"
	if n.cl == nil {
		return msg
	}
	var addrs []string
	for _, m := range n.cl.Status().Members {
		if m.ID != n.id && !m.Draining && m.STOMPAddr != "" && (m.State == "alive" || m.State == "suspect") {
			addrs = append(addrs, m.STOMPAddr)
		}
	}
	if len(addrs) > 0 {
		msg += ": " + strings.Join(addrs, " ")
	}
	return msg
}

// restoreDrain reads the drained state kept in the store: a node that
// was draining when it stopped refuses clients from its first accept.
func (n *Node) restoreDrain() {
	b, err := n.st.Meta(metaDraining)
	if err != nil {
		n.log.Error("reading the drained state failed; starting undrained", "err", err)
		return
	}
	if string(b) == "1" {
		n.drainedAtStart = true
		if n.rt != nil {
			n.rt.drainingSelf.Store(true)
		}
		n.srv.SetDraining("this node is draining for maintenance; connect to another node of the cluster")
		n.log.Info("starting drained: no clients and no queue owned until undrain")
	}
}

// Drain puts the node in maintenance (see above). It returns once the
// drain is recorded and announced; the hand-off and the end of the
// client sessions follow in the background (DrainState shows them). It
// is refused with ErrDrainRefused when no other node could own this
// node's queues. Draining a drained node changes nothing.
func (n *Node) Drain() (DrainStatus, error) {
	n.drainMu.Lock()
	defer n.drainMu.Unlock()
	if n.rt == nil || n.cl == nil {
		return n.drainStateLocked(), fmt.Errorf("%w: not clustered: a single node has no other node to hand its queues and clients to", ErrDrainRefused)
	}
	if n.srv.Draining() && n.cl.Draining() {
		return n.drainStateLocked(), nil
	}
	if err := legacyMembers(n.cl.Status()); err != nil {
		return n.drainStateLocked(), err
	}
	if err := n.rt.checkDrain(n.rt.refresh()); err != nil {
		return n.drainStateLocked(), err
	}
	if err := n.st.SetMeta(metaDraining, []byte("1")); err != nil {
		return n.drainStateLocked(), fmt.Errorf("recording the drained state: %w", err)
	}
	n.srv.SetDraining(n.drainDetail())
	// Release here before the others hear of it: they take the queues
	// over once they see the drain, and this node serves none by then
	// (no two owners at once). Meanwhile the others' forwards of these
	// queues are refused as not owned here and retried.
	queues := len(n.rt.servedQueues())
	n.rt.drainingSelf.Store(true)
	n.rt.refresh()
	deadline := time.Now().Add(drainReleaseWait)
	for len(n.rt.servedQueues()) > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if err := n.cl.SetDraining(true); err != nil {
		n.rt.drainingSelf.Store(false)
		n.srv.SetDraining("")
		_ = n.st.SetMeta(metaDraining, []byte("0"))
		return n.drainStateLocked(), err
	}
	n.rt.refresh()
	n.log.Info("draining: queues handed over, refusing new clients", "queues", queues, "still_served", len(n.rt.servedQueues()))
	n.drainGen++
	n.drainClosed = 0
	n.startDrainClose(n.drainGen)
	return n.drainStateLocked(), nil
}

// startDrainClose ends the client sessions once the node owns no queue
// (or after drainCloseAfter), unless an undrain or a later drain came
// first (gen). Called under drainMu.
func (n *Node) startDrainClose(gen uint64) {
	n.watchWG.Add(1)
	go func() {
		defer n.watchWG.Done()
		deadline := time.Now().Add(drainCloseAfter)
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for len(n.rt.servedQueues()) > 0 && time.Now().Before(deadline) {
			select {
			case <-n.stopped:
				return
			case <-t.C:
			}
		}
		n.drainMu.Lock()
		defer n.drainMu.Unlock()
		if n.drainGen != gen || !n.srv.Draining() {
			return
		}
		n.drainClosed = n.srv.CloseClients()
		n.log.Info("drained: client sessions ended", "sessions", n.drainClosed, "queues_still_owned", len(n.rt.servedQueues()))
	}()
}

// Undrain ends maintenance: the node takes clients again and owns its
// queues again (they are handed back as they were handed over).
// Undraining a node that is not draining changes nothing.
//
// The order mirrors the drain's, so that a queue has one owner at a
// time: the undrain is gossiped while this node still counts itself
// draining, the others release the queues it owns again as they hear of
// it, and only once every alive peer says it has (opReleased; at most
// undrainHandBackWait) does this node own them and take clients.
func (n *Node) Undrain() (DrainStatus, error) {
	n.drainMu.Lock()
	defer n.drainMu.Unlock()
	if err := n.st.SetMeta(metaDraining, []byte("0")); err != nil {
		return n.drainStateLocked(), fmt.Errorf("recording the undrained state: %w", err)
	}
	n.drainGen++
	n.drainClosed = 0
	if n.cl != nil {
		if err := n.cl.SetDraining(false); err != nil {
			return n.drainStateLocked(), err
		}
	}
	if n.rt != nil {
		if n.rt.drainingSelf.Load() {
			if behind := n.rt.waitReleased(n.id, undrainHandBackWait); len(behind) > 0 {
				n.log.Warn("undrain: owning queues again before every peer released them", "peers", behind)
			}
		}
		// This node takes each queue over (pulling every copy) on its
		// next use.
		n.rt.drainingSelf.Store(false)
		n.rt.refresh()
	}
	n.srv.SetDraining("")
	n.log.Info("undrained: taking clients and owning queues again")
	return n.drainStateLocked(), nil
}

// undrainHandBackWait bounds how long an undrain waits for the other
// nodes to release the queues it owns again. Meanwhile the nodes that
// see the undrain forward those queues here, where they are refused as
// not owned and retried for failoverBudget: the wait must end well
// within it, or one peer that cannot be asked (its peer link down,
// gossip alive) fails every client SEND to them elsewhere.
const undrainHandBackWait = failoverBudget - time.Second

// opReleased asks a peer whether it sees node x-node undrained and serves
// none of the queues that node owns (Undrain); answer: x-done "1" if so.
const opReleased = "released"

const (
	hdrNode = "x-node"
	hdrDone = "x-done"
)

// waitReleased waits until every alive peer sees node id undrained and
// serves none of its queues, or for d. It returns the peers that did not
// say so in time. A peer that does not know the operation (an older
// version) is not waited for.
func (rt *router) waitReleased(id string, d time.Duration) []string {
	deadline := time.Now().Add(d)
	v := rt.refresh()
	var behind []string
	for peer := range v.peers {
		for {
			done := make(chan bool, 1)
			ctx, cancel := context.WithDeadline(context.Background(), deadline)
			err := rt.fwd.request(ctx, peer, opReleased, []string{hdrNode, id}, nil, func(f *frame.Frame, err error) {
				var pe *stomp.PeerError
				done <- (err == nil && f.Header.Get(hdrDone) == "1") || (errors.As(err, &pe) && pe.Code == "unknown-op")
			})
			ok := false
			if err == nil {
				select {
				case ok = <-done:
				case <-ctx.Done():
				}
			}
			cancel()
			if ok {
				break
			}
			if _, alive := rt.view().peers[peer]; !alive {
				break
			}
			if time.Now().After(deadline) {
				behind = append(behind, peer)
				break
			}
			select {
			case <-rt.stop:
				return behind
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	return behind
}

// serveReleased answers opReleased.
func (rt *router) serveReleased(f *frame.Frame, reply func(*frame.Frame)) {
	id := f.Header.Get(hdrNode)
	go func() {
		v := rt.refresh()
		done := !v.draining[id]
		if done {
			for _, dest := range rt.servedQueues() {
				if rt.ownerOf(v, dest) == id {
					done = false // released at the router's next tick
					break
				}
			}
		}
		ans := "0"
		if done {
			ans = "1"
		}
		reply(stomp.PeerOK(hdrDone, ans))
	}()
}

// DrainState is the node's drained state now.
func (n *Node) DrainState() DrainStatus {
	n.drainMu.Lock()
	defer n.drainMu.Unlock()
	return n.drainStateLocked()
}

func (n *Node) drainStateLocked() DrainStatus {
	s := DrainStatus{NodeID: n.id, NodeName: n.cfg.Node.Name, Draining: n.srv.Draining(), ClientsClosed: n.drainClosed, Clients: n.srv.Sessions()}
	if n.rt != nil {
		s.OwnedQueues = len(n.rt.servedQueues())
		if n.rt.txn != nil {
			s.PendingTransactions = n.rt.txn.incomplete()
		}
	}
	return s
}
