package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/brokerd/brokerd/store"
	"github.com/go-stomp/stomp/v3/frame"
	"github.com/prometheus/client_golang/prometheus"
)

// The router makes the cluster one broker: it is the stomp.Broker of a
// clustered node. A queue is served by its owner, the first of its
// replica set (replica.ReplicaSet over the active members); the router
// sends SENDs, ACKs and NACKs of a queue another node owns to that owner
// over a peer link, and every queue subscription, local or not, is held
// by the owner's host (host.go) and read by this node's poller. Topic
// messages are fanned out here and sent to every other alive node.

// viewSnap is one snapshot of the membership.
type viewSnap struct {
	self   string
	active []string
	epoch  cluster.EpochID
	peers  map[string]string // alive nodes but self, and not refusing connections: peer-link address ("" unknown)
	addrs  map[string]string // every alive node but self (refusing or not): peer-link address
	at     time.Time
	// joins counts the times a peer appeared in this node's views that
	// was not in the view loaded before (a partition healed, a node
	// started or came back): a queue taken over under fewer joins may
	// lack copies and acknowledgements those peers hold.
	joins uint64
	// draining holds the alive members that announce maintenance (brokerd
	// drain): ownerOf passes over them while another replica can own.
	draining map[string]bool
	// drainFlips counts the changes of draining seen by any load: a drain
	// and undrain between two ticks of the watch leave draining as it
	// was, but a queue taken over in between must be released.
	drainFlips uint64
}

// viewTTL bounds how stale the router's membership snapshot may be.
const viewTTL = 50 * time.Millisecond

// forwardTimeout bounds one forwarded request (a SEND, an ACK, a
// subscribe) including a wait for the link to come up.
const forwardTimeout = 5 * time.Second

// notOwnerRetry is how long a forward that met another node's different
// view of ownership is retried while the views converge.
const notOwnerRetry = 3 * time.Second

type router struct {
	rep    *replica.Node
	st     *store.Store
	r      int
	log    *slog.Logger
	status func() cluster.Status
	fwd    *fwdLinks
	host   *host
	txn    *txnLog // transactions over several owners (txn.go)

	// SENDs being retried, per queue (waitRetries).
	gmu      sync.Mutex
	retrying map[string]*retryWait

	// Per queue, the SENDs on their way to an owner (waitFlights).
	fmu     sync.Mutex
	flights map[string]*sendFlight

	// Retry chains, per queue (later).
	rqMu   sync.Mutex
	chains map[string]*retryChain

	// As an owner: per (peer, queue), when a forwarded SEND was last
	// refused as not owned here (refusedSince).
	nmu      sync.Mutex
	notOwned map[[2]string]time.Time
	pr       *replica.PeerReplicator // for operators: which copies are in sync
	// pruneRep, if set, closes the replication links to peers keep says
	// no (peerLinks.prune), as pruneLinks does the forwarding links.
	pruneRep func(keep func(peer string) bool) []string
	m        routerMetrics

	vmu  sync.Mutex
	snap viewSnap
	// refused are the peers whose link was refused (ECONNREFUSED) since
	// it was last up: the host answers and the process is gone. Their
	// queues fail over at once, before gossip's verdict. Guarded by vmu.
	refused map[string]bool
	// Under vmu: the peers of the last view loaded, and the joins seen.
	lastPeers  map[string]string
	joins      uint64
	lastDrain  string // drainingSig of the last load
	drainFlips uint64

	omu   sync.Mutex
	owned map[string]*ownState // queues this node owns: pulled, adopted
	// remerging: per peer whose link came up, a remergeMissed running
	// (1) and asked to run again when done (2): one goroutine per peer
	// however often its link flaps. Entries are deleted when it ends.
	remerging map[string]int
	// missTries: per queue whose take-overs keep missing a peer whose
	// link is up, how many times retryMissed took it over again (its
	// backoff). Entries of queues no longer owned are dropped.
	missTries map[string]int
	// probing: queues whose missed peers retryMissed is probing (one
	// goroutine each; a subset of owned).
	probing map[string]bool

	// drainingSelf: this node drains (drain.go); its views count it
	// draining before its gossip says so, so that it releases its queues
	// before the others take them over.
	drainingSelf atomic.Bool

	// acks: the owners sent unsynced ACKs, for the next barrier
	// (ackbarrier.go).
	acks ackDirty

	pmu     sync.Mutex
	pollers map[string]*poller // by owner node ID
	closed  bool

	subSeq atomic.Uint64
	msgSeq atomic.Uint64
	prefix string // makes subscription IDs unique across restarts

	stop chan struct{}
	// ctx is cancelled with stop: background requests to peers (pulls,
	// probes, merge requests) end at once on shutdown rather than hold it
	// up to forwardTimeout (close waits for them). Unsubscribes are left
	// to finish: they return the messages the node's clients held.
	ctx       context.Context
	cancelCtx context.CancelFunc
	wg        sync.WaitGroup
}

type routerMetrics struct {
	takeovers, merged, released, retries prometheus.Counter
}

func newRouterMetrics(reg prometheus.Registerer) routerMetrics {
	m := routerMetrics{
		takeovers: prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_cluster_queue_takeovers_total", Help: "Queues this node took over as their new owner (failovers and re-placements)."}),
		merged:    prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_cluster_takeover_messages_total", Help: "Messages read from other nodes' copies while taking queues over."}),
		released:  prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_cluster_queue_releases_total", Help: "Queues this node stopped serving because ownership moved or nodes joined."}),
		retries:   prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_cluster_forward_retries_total", Help: "Forwarded SENDs routed again after their owner refused or could not be reached."}),
	}
	if reg != nil {
		reg.MustRegister(m.takeovers, m.merged, m.released, m.retries)
	}
	return m
}

type ownState struct {
	done  chan struct{}
	err   error
	joins uint64 // viewSnap.joins when the take-over began (set before done closes)
	// missed: the alive peers whose copy the take-over could not read
	// (set before done closes). They count as merged for staleIn, so the
	// queue is taken over again when the forwarding link to one of them
	// comes up (linkState, remergeMissed), not only on a join: a peer
	// alive in the view all along (its link down: a peer-port partition,
	// a TLS or key refusal) never joins again.
	missed []string
	ended  time.Time // when the take-over ended (set before done closes)
	// releasing: not a take-over but a release in progress (closeDest
	// and Release). It holds dest's place in owned so that no take-over
	// starts before the Release, which would close the subscriptions
	// that take-over's callers bound and drop its adoption (the queue
	// then counted owned here but served by nobody). Waiters start over
	// once it is done.
	releasing bool
}

// markReleasing puts a release's placeholder in owned[dest]; rt.omu is
// held. The caller then calls releaseHere.
func (rt *router) markReleasing(dest string) *ownState {
	st := &ownState{done: make(chan struct{}), releasing: true}
	rt.owned[dest] = st
	return st
}

// releaseHere stops serving dest here, st being its placeholder in
// owned (markReleasing): its subscriptions end (their nodes bind again),
// the replica drops the queue (the bucket stays a copy), and then the
// placeholder goes.
func (rt *router) releaseHere(dest string, st *ownState) {
	rt.host.closeDest(dest)
	rt.rep.Release(dest)
	rt.omu.Lock()
	if rt.owned[dest] == st {
		delete(rt.owned, dest)
	}
	rt.omu.Unlock()
	close(st.done)
}

// staleIn reports whether a peer joined v since the queue was taken
// over: it may hold copies and acknowledgements (a partition healed, a
// node came back) that were not merged.
func (st *ownState) staleIn(v viewSnap) bool { return v.joins > st.joins }

func newRouter(rep *replica.Node, st *store.Store, r int, status func() cluster.Status, fwd *fwdLinks, log *slog.Logger, reg prometheus.Registerer) *router {
	rt := &router{
		rep: rep, st: st, r: r, log: log, status: status, fwd: fwd,
		owned:     map[string]*ownState{},
		remerging: map[string]int{},
		missTries: map[string]int{},
		probing:   map[string]bool{},
		refused:   map[string]bool{},
		pollers:   map[string]*poller{},
		prefix:    fmt.Sprintf("%s-%x", rep.NodeID(), time.Now().UnixNano()),
		stop:      make(chan struct{}),
		m:         newRouterMetrics(reg),
	}
	rt.ctx, rt.cancelCtx = context.WithCancel(context.Background())
	rt.host = newHost(rt)
	rt.txn = newTxnLog(rt)
	// A queue the replica drops (never created, or idle) leaves owned;
	// one whose take-over missed a copy is not removed as idle.
	rep.SetOnRemoved(func(dest string) { rt.forgetRemoved(dest) })
	rep.SetKeepIdle(rt.unmerged)
	rt.retrying = map[string]*retryWait{}
	rt.chains = map[string]*retryChain{}
	rt.flights = map[string]*sendFlight{}
	rt.notOwned = map[[2]string]time.Time{}
	return rt
}

// retryDelay is how long a refused or failed SEND waits before its retry.
const retryDelay = 100 * time.Millisecond

// A retryJob is SENDs whose forward (or local write) failed in a way a
// retry may fix: they are applied again, with a fresh view, on their
// queue's retry chain.
type retryJob struct {
	msgs   []*replica.Message // what is left to apply (never in a queue)
	since  time.Time
	failed time.Time // when it failed first: the first retry waits retryDelay from there
	err    error     // how it failed
	sig    string    // the view when it failed (viewSig)
	done   func(error)
	dests  []string
	// Under rqMu: the chains it has reached the head of; finished
	// closes once it has ended (the chains then move on).
	arrived  int
	finished chan struct{}
}

// retryChain holds the retries of one queue in the order they failed
// (the order they were sent: a link answers and fails requests in
// order). A job runs when it is at the head of the chain of every queue
// it touches (a transaction's batch may touch several), until it
// succeeds, fails for good or its budget is spent; only then do those
// chains move on. Jobs join all their chains in one step, so the chains
// order them alike and never wait on each other in a cycle. A retry
// never overtakes an earlier one of its queues, and a slow one holds up
// only its queues.
type retryChain struct {
	jobs []*retryJob
}

// later schedules msgs (failed with a retryable error) for a retry on the
// chains of their queues; done gets the final outcome. Later SENDs to
// their queues wait meanwhile (waitRetries).
func (rt *router) later(msgs []*replica.Message, since time.Time, failure error, done func(error)) {
	rt.m.retries.Inc()
	if mayHaveStored(failure) {
		msgs = maybeDelivered(msgs)
	}
	untrack := rt.trackRetry(msgs)
	job := &retryJob{msgs: msgs, since: since, failed: time.Now(), err: failure, sig: viewSig(rt.view()), finished: make(chan struct{}), done: func(err error) {
		untrack()
		done(err)
	}}
	for _, m := range msgs {
		if !slices.Contains(job.dests, m.Dest) {
			job.dests = append(job.dests, m.Dest)
		}
	}
	var starts []string
	rt.rqMu.Lock()
	for _, d := range job.dests {
		c := rt.chains[d]
		if c == nil {
			c = &retryChain{}
			rt.chains[d] = c
			starts = append(starts, d)
		}
		c.jobs = append(c.jobs, job)
	}
	rt.rqMu.Unlock()
	for _, d := range starts {
		// Not through goBackground: it must run even after close (its
		// jobs' done then report the failure at once).
		go rt.runChain(d)
	}
}

// runChain runs the chain of queue key until it is empty.
func (rt *router) runChain(key string) {
	for {
		rt.rqMu.Lock()
		c := rt.chains[key]
		if len(c.jobs) == 0 {
			delete(rt.chains, key)
			rt.rqMu.Unlock()
			return
		}
		job := c.jobs[0]
		job.arrived++
		last := job.arrived == len(job.dests)
		rt.rqMu.Unlock()
		if last {
			rt.runJob(job)
			close(job.finished)
		} else {
			<-job.finished // run by the chain it reached last
		}
		rt.rqMu.Lock()
		c.jobs[0] = nil
		c.jobs = c.jobs[1:]
		rt.rqMu.Unlock()
	}
}

// runJob applies job's messages again until they are all applied, one
// fails for good, or the budget is spent; then calls its done.
//
// A failure for want of replicas left a copy at the owner (its outcome is
// unknown, and it may be delivered): trying again while the view is the
// same would mostly store another copy, so such a job is tried again
// when the view changes (the dead replica is out, a new one in) or once
// a second has passed, not every 100 ms.
func (rt *router) runJob(job *retryJob) {
	wait := time.Until(job.failed.Add(retryDelay))
	err, sig, lastTry := job.err, job.sig, job.failed
	for {
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-rt.stop:
			case <-t.C:
			}
			t.Stop()
		}
		if rt.stopped() || time.Since(job.since) >= failoverBudget {
			break
		}
		if leftCopy(err) && viewSig(rt.refresh()) == sig && time.Since(lastTry) < storedRetryEvery {
			wait = retryDelay
			continue
		}
		sig, lastTry = viewSig(rt.view()), time.Now()
		ch := make(chan error, 1)
		rt.applyOnce(job.msgs, job.since, func(left []*replica.Message, err error) {
			job.msgs = left // the parts applied are not applied again
			ch <- err
		})
		err = <-ch
		if err == nil || !retryable(err) {
			break
		}
		if mayHaveStored(err) {
			// Any attempt, not only the first, may leave a copy: from
			// then on every attempt stores its copy marked.
			job.msgs = maybeDelivered(job.msgs)
		}
		wait = retryDelay
	}
	job.done(finalErr(err))
}

// maybeDelivered returns copies of msgs marked as possibly delivered (a
// delivery count of at least 1), for the retry of an attempt that may
// have stored them: that attempt's copy may have been delivered already
// (on the other side of a partition, by an owner that died after storing
// it), so the retry's copy goes out redelivered:true, as STOMP says of a
// message that may have been delivered before. Its x-delivery-count then
// reads at least 1, and queue.max_redeliveries counts that possible
// delivery.
func maybeDelivered(msgs []*replica.Message) []*replica.Message {
	out := copies(msgs)
	for _, m := range out {
		m.Deliveries = max(m.Deliveries, 1)
	}
	return out
}

// storedRetryEvery is how often a SEND whose failure left a copy is tried
// again while the view stays the same (runJob).
const storedRetryEvery = time.Second

// leftCopy reports whether a failed SEND was stored by its owner anyway
// (its write quorum was not reached), as opposed to refused or lost.
func leftCopy(err error) bool {
	var pe *stomp.PeerError
	if errors.As(err, &pe) {
		return pe.Code == "no-quorum"
	}
	return errors.Is(err, replica.ErrNoQuorum) && !errors.Is(err, errNoActiveSet) && !errors.Is(err, errNotOwner)
}

// viewSig names a view's placement: its epoch and active members.
func viewSig(v viewSnap) string {
	return v.epoch.String() + "/" + strings.Join(v.active, ",")
}

func (rt *router) stopped() bool {
	select {
	case <-rt.stop:
		return true
	default:
		return false
	}
}

// retryable reports whether a failed SEND may succeed if tried again: its
// owner refused it as not its own or for want of replicas, or could not
// be reached (outcome unknown), or there was no owner yet.
func retryable(err error) bool {
	var pe *stomp.PeerError
	if errors.As(err, &pe) {
		return pe.Code == codeNotOwner || pe.Code == "no-quorum"
	}
	switch {
	case errors.Is(err, replica.ErrQueueFull), errors.Is(err, replica.ErrLowDisk),
		errors.Is(err, replica.ErrBadDestination), errors.Is(err, replica.ErrUnknownAck),
		errors.Is(err, replica.ErrNoSuchQueue):
		return false
	}
	return true // no quorum here, a link down, an answer that never came
}

// mayHaveStored reports whether a failed attempt to store SENDs may have
// stored them anyway: everything but an owner's refusal (not the owner:
// nothing stored). No quorum leaves a copy at the owner; a link that
// broke or an answer that never came leaves the outcome unknown.
func mayHaveStored(err error) bool {
	var pe *stomp.PeerError
	return !(errors.As(err, &pe) && pe.Code == codeNotOwner) && !errors.Is(err, errNotOwner)
}

// finalErr is the error a client gets for a SEND that failed for good.
func finalErr(err error) error {
	if err == nil {
		return nil
	}
	var pe *stomp.PeerError
	if !errors.As(err, &pe) && (errors.Is(err, replica.ErrNoQuorum) || errors.Is(err, replica.ErrQueueFull) ||
		errors.Is(err, replica.ErrLowDisk) || errors.Is(err, replica.ErrBadDestination) || errors.Is(err, replica.ErrNoSuchQueue)) {
		return err // a local write's own error
	}
	return peerErr(err)
}

// notOwnedFor bounds how long a refusal holds later SENDs of the same
// peer and queue back (refusedSince): the sender retries within its
// failover budget, or gives up.
const notOwnedFor = failoverBudget + time.Second

// markNotOwned records that SENDs of msgs from peer were refused as not
// owned here.
func (rt *router) markNotOwned(peer string, msgs []*replica.Message) {
	now := time.Now()
	rt.nmu.Lock()
	defer rt.nmu.Unlock()
	if len(rt.notOwned) >= maxNotOwnedMarks {
		for k, at := range rt.notOwned {
			if now.Sub(at) > notOwnedFor {
				delete(rt.notOwned, k)
			}
		}
		if len(rt.notOwned) >= maxNotOwnedMarks {
			return // past the bound: order across this retry is not kept
		}
	}
	for _, m := range msgs {
		rt.notOwned[[2]string{peer, m.Dest}] = now
	}
}

// maxNotOwnedMarks bounds the refusals remembered (refusedSince).
const maxNotOwnedMarks = 1 << 16

// refusedSince reports whether a SEND of msgs from peer must be refused
// because an earlier SEND of one of its queues from that peer was (and
// no retry has been stored since): accepting it would store it before
// the earlier one. A retry is never refused for this; once it is
// stored, clearNotOwned lifts the marks.
func (rt *router) refusedSince(peer string, msgs []*replica.Message, retry bool) bool {
	if retry {
		return false
	}
	rt.nmu.Lock()
	defer rt.nmu.Unlock()
	if len(rt.notOwned) == 0 {
		return false
	}
	refused := false
	for _, m := range msgs {
		k := [2]string{peer, m.Dest}
		at, ok := rt.notOwned[k]
		switch {
		case !ok:
		case time.Since(at) > notOwnedFor:
			delete(rt.notOwned, k)
		default:
			refused = true
		}
	}
	return refused
}

// expireNotOwned drops the marks older than notOwnedFor.
func (rt *router) expireNotOwned() {
	now := time.Now()
	rt.nmu.Lock()
	defer rt.nmu.Unlock()
	for k, at := range rt.notOwned {
		if now.Sub(at) > notOwnedFor {
			delete(rt.notOwned, k)
		}
	}
}

// clearNotOwned lifts peer's marks of msgs' queues: a retry of theirs was
// stored, after every SEND of theirs before it.
func (rt *router) clearNotOwned(peer string, msgs []*replica.Message) {
	rt.nmu.Lock()
	defer rt.nmu.Unlock()
	for _, m := range msgs {
		delete(rt.notOwned, [2]string{peer, m.Dest})
	}
}

// sendFlight counts the SENDs of one queue on their way to owner
// (forwarded, or written here) and not finished; ch closes when none is
// left.
type sendFlight struct {
	owner string
	n     int
	ch    chan struct{}
}

// flightStart records that msgs go to owner; the returned func (called
// once, when they are finished) undoes it.
func (rt *router) flightStart(owner string, msgs []*replica.Message) func() {
	var dests []string
	for _, m := range msgs {
		if !slices.Contains(dests, m.Dest) {
			dests = append(dests, m.Dest)
		}
	}
	rt.fmu.Lock()
	for _, d := range dests {
		f := rt.flights[d]
		if f == nil || f.owner != owner && f.n == 0 {
			f = &sendFlight{owner: owner, ch: make(chan struct{})}
			rt.flights[d] = f
		}
		f.n++
	}
	rt.fmu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			rt.fmu.Lock()
			for _, d := range dests {
				if f := rt.flights[d]; f != nil {
					if f.n--; f.n == 0 {
						close(f.ch)
						delete(rt.flights, d)
					}
				}
			}
			rt.fmu.Unlock()
		})
	}
}

// waitFlights holds a SEND to a queue back while earlier SENDs of that
// queue are on their way to another owner than the one it would go to
// (the view changed under them): sent now, it would be stored before
// them if they are retried. At most failoverBudget in all.
func (rt *router) waitFlights(sends []*replica.Message, deadline time.Time) {
	for {
		v := rt.view()
		var wait chan struct{}
		rt.fmu.Lock()
		for _, m := range sends {
			if f := rt.flights[m.Dest]; f != nil && f.n > 0 && f.owner != rt.ownerOf(v, m.Dest) {
				wait = f.ch
				break
			}
		}
		rt.fmu.Unlock()
		left := time.Until(deadline)
		if wait == nil || left <= 0 {
			return
		}
		t := time.NewTimer(left)
		select {
		case <-wait:
		case <-t.C:
		case <-rt.stop:
		}
		t.Stop()
	}
}

// retryWait counts the SENDs of one queue being retried; ch closes when
// none is left.
type retryWait struct {
	n  int
	ch chan struct{}
}

// trackRetry records that msgs are being retried; the returned func
// (called once, when their retry ends) undoes it.
func (rt *router) trackRetry(msgs []*replica.Message) func() {
	var dests []string
	for _, m := range msgs {
		if !slices.Contains(dests, m.Dest) {
			dests = append(dests, m.Dest)
		}
	}
	rt.gmu.Lock()
	for _, d := range dests {
		w := rt.retrying[d]
		if w == nil {
			w = &retryWait{ch: make(chan struct{})}
			rt.retrying[d] = w
		}
		w.n++
	}
	rt.gmu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			rt.gmu.Lock()
			for _, d := range dests {
				if w := rt.retrying[d]; w != nil {
					if w.n--; w.n == 0 {
						close(w.ch)
						delete(rt.retrying, d)
					}
				}
			}
			rt.gmu.Unlock()
		})
	}
}

// waitRetries holds a SEND back while an earlier SEND to one of its
// queues is being retried (its owner refused it or could not be reached),
// so that one connection's SENDs to a queue keep their order across a
// failover: the session's reader waits, at most failoverBudget.
func (rt *router) waitRetries(sends []*replica.Message, deadline time.Time) {
	for _, m := range sends {
		rt.gmu.Lock()
		w := rt.retrying[m.Dest]
		rt.gmu.Unlock()
		if w == nil {
			continue
		}
		left := time.Until(deadline)
		if left <= 0 {
			return
		}
		t := time.NewTimer(left)
		select {
		case <-w.ch:
		case <-t.C:
		case <-rt.stop:
		}
		t.Stop()
	}
}

func (rt *router) start() {
	if err := rt.txn.resume(); err != nil {
		rt.log.Error("reading the recorded transactions failed; they are resumed at the next start", "err", err)
	}
	rt.wg.Add(3)
	go rt.watch()
	go rt.host.sweep(rt.stop, &rt.wg)
	go func() {
		defer rt.wg.Done()
		rt.txn.run(rt.stop)
	}()
}

func (rt *router) close() {
	rt.pmu.Lock()
	if rt.closed {
		rt.pmu.Unlock()
		return
	}
	rt.closed = true
	ps := rt.pollers
	rt.pollers = map[string]*poller{}
	rt.pmu.Unlock()
	close(rt.stop)
	rt.cancelCtx()
	for _, p := range ps {
		p.cancel()
	}
	rt.wg.Wait()
	rt.host.closeAll()
}

// view returns a membership snapshot at most viewTTL old.
func (rt *router) view() viewSnap {
	rt.vmu.Lock()
	defer rt.vmu.Unlock()
	if time.Since(rt.snap.at) < viewTTL && rt.snap.self != "" {
		return rt.snap
	}
	rt.snap = rt.load()
	return rt.snap
}

func (rt *router) refresh() viewSnap {
	rt.vmu.Lock()
	defer rt.vmu.Unlock()
	rt.snap = rt.load()
	return rt.snap
}

func (rt *router) load() viewSnap {
	st := rt.status()
	v := viewSnap{self: st.NodeID, epoch: st.EpochID, peers: map[string]string{}, at: time.Now()}
	v.addrs = map[string]string{}
	if rt.drainingSelf.Load() {
		v.draining = map[string]bool{st.NodeID: true}
	}
	for _, m := range st.Members {
		if m.Draining && (m.State == "alive" || m.State == "suspect") {
			if v.draining == nil {
				v.draining = map[string]bool{}
			}
			v.draining[m.ID] = true
		}
		if m.ID != st.NodeID && (m.State == "alive" || m.State == "suspect") {
			v.addrs[m.ID] = m.PeerAddr
			if !rt.refused[m.ID] {
				v.peers[m.ID] = m.PeerAddr
			}
		}
	}
	// Placement runs over the active members that are not dead: an
	// active member that gossip declared dead keeps its seat for
	// cluster.promotion_delay (a flap costs no re-placement of the
	// membership), but its queues fail over at once; so do those of a
	// member whose process refuses connections (its host is up, the
	// process is not), before gossip notices.
	for _, id := range st.ActiveSet {
		if _, up := v.peers[id]; up || id == st.NodeID {
			v.active = append(v.active, id)
		}
	}
	if rt.lastPeers != nil {
		for p := range v.peers {
			if _, ok := rt.lastPeers[p]; !ok {
				rt.joins++
			}
		}
	}
	rt.lastPeers = v.peers
	v.joins = rt.joins
	if sig := drainingSig(v); sig != rt.lastDrain {
		rt.lastDrain = sig
		rt.drainFlips++
	}
	v.drainFlips = rt.drainFlips
	return v
}

// linkState hears the forwarding links' state: a dial refused marks the
// peer's process gone until its link is up again.
func (rt *router) linkState(peer string, up bool, err error) {
	// A refusal over TLS or the cluster key is one-sided (the node the
	// others refuse would see every other member refused, own every
	// queue and serve stale copies): it is logged, not acted on.
	distrusted := !up && (errors.Is(err, stomp.ErrPeerTLS) || errors.Is(err, stomp.ErrPeerAuth))
	refused := !up && errors.Is(err, syscall.ECONNREFUSED)
	rt.vmu.Lock()
	changed := rt.refused[peer] != refused && (up || refused)
	if up {
		delete(rt.refused, peer)
	} else if refused {
		rt.refused[peer] = true
	}
	if changed {
		rt.snap.at = time.Time{} // reload at the next use
	}
	rt.vmu.Unlock()
	if up {
		rt.linkUp(peer)
	}
	switch {
	case distrusted:
		rt.log.Warn("peer link refused by TLS or the cluster key", "peer", peer, "err", err)
	case changed && refused:
		rt.log.Info("peer's process refuses connections: its queues fail over now", "peer", peer)
	}
}

// replicaView is the replicator's view (replica.View).
func (rt *router) replicaView() replica.View {
	v := rt.view()
	return replica.View{Self: v.self, Active: v.active, Epoch: v.epoch}
}

// peerAddr is a peer's advertised peer-link address.
func (rt *router) peerAddr(id string) string {
	if a := rt.view().addrs[id]; a != "" {
		return a
	}
	return rt.refresh().addrs[id]
}

// pruneLinks closes the links to peers the cluster no longer knows: a
// member dead or gone for cluster.forget_after is forgotten, and its
// links, made on demand, would otherwise be redialled for ever. A link
// pruned by mistake (a peer that joined after the status was read) is
// made again on its next use.
func (rt *router) pruneLinks() {
	st := rt.status()
	known := make(map[string]bool, len(st.Members))
	for _, m := range st.Members {
		known[m.ID] = true
	}
	if st.NodeID == "" || !known[st.NodeID] {
		return // no status yet: nothing to compare with
	}
	keep := func(id string) bool { return known[id] }
	gone := rt.fwd.prune(keep)
	if rt.pruneRep != nil {
		gone = append(gone, rt.pruneRep(keep)...)
	}
	// A peer refused while its host answered (linkState) is cleared by
	// a link that comes up; with its links gone nothing would, and the
	// forgotten peer, back under its ID, would be left out of every view.
	// After the prune: a pruned link's Close waits for its state
	// reports, so none sets a refusal again after this.
	rt.vmu.Lock()
	for id := range rt.refused {
		if !known[id] {
			delete(rt.refused, id)
		}
	}
	rt.vmu.Unlock()
	if len(gone) > 0 {
		rt.log.Info("closed the links to peers the cluster forgot", "peers", gone)
	}
}

// ownerOf is the node that serves queue dest in v: the first of its
// replica set that is not draining (the first when all are); "" while
// this node has no agreed active set.
func (rt *router) ownerOf(v viewSnap, dest string) string {
	return replica.PreferredOwner(replica.ReplicaSet(dest, v.active, rt.r), func(id string) bool { return v.draining[id] })
}

// errNoActiveSet: the node has not agreed on the active members yet.
var errNoActiveSet = fmt.Errorf("%w: the cluster has not agreed on its active members yet", replica.ErrNoQuorum)

// watch follows the view. When it changes, the queues this node no
// longer owns are released: their subscriptions move to the new owner
// (the pollers see them gone and bind again). When nodes appear that were
// not in the previous view (a partition healed, a node restarted or
// joined), they may hold messages this node's copies lack, so every
// queue this node took over before they appeared (ownState.staleIn) is
// taken over again: released, and on its next use pulled from every
// alive node (the union) and adopted. Subscribers bind again; their
// unacknowledged messages come back redelivered. A queue taken over
// since they appeared pulled their copies already: it stays served (a
// released queue is served, and listed by GET /v1/destinations and the
// cluster page, again only once a client uses it).
func (rt *router) watch() {
	defer rt.wg.Done()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	var last cluster.EpochID
	var lastSet string
	lastJoins := rt.refresh().joins
	for tick := 0; ; tick++ {
		select {
		case <-rt.stop:
			return
		case <-t.C:
		}
		if tick%10 == 0 {
			rt.expireNotOwned()
		}
		if tick%100 == 50 {
			rt.pruneLinks()
		}
		if tick%100 == 75 {
			rt.forgetRemoved()
		}
		if tick%10 == 5 {
			rt.retryMissed()
		}
		v := rt.refresh()
		for p := range v.peers {
			_, _ = rt.fwd.get(p) // a link to every peer: each hears a refusal
		}
		joined := v.joins != lastJoins
		lastJoins = v.joins
		// Queues served here outside the router's take-over (a
		// dead-letter move into a queue another node owns, a write
		// racing a release) are released whatever the epoch.
		var mine []string
		stray := map[string]*ownState{}
		rt.omu.Lock()
		for _, dest := range rt.rep.AdoptedQueues() {
			if _, ok := rt.owned[dest]; !ok {
				if rt.ownerOf(v, dest) != v.self {
					stray[dest] = rt.markReleasing(dest)
				} else {
					mine = append(mine, dest)
				}
			}
		}
		rt.omu.Unlock()
		for dest, st := range stray {
			rt.release(v, dest, st)
		}
		for _, dest := range mine {
			// Owned here but adopted without a take-over (a dead-letter
			// move): take it over properly, merging the other copies.
			rt.goBackground(func() {
				if err := rt.ensureOwned(dest); err != nil {
					rt.log.Warn("taking a queue over failed; retried on its next use", "dest", dest, "err", err)
				}
			})
		}
		// A drain or undrain moves ownership as a change of the active
		// set does: the set's signature carries the draining members.
		// drainFlips: a drain and undrain between two ticks, which a
		// queue may have been taken over under, count too.
		set := strings.Join(v.active, ",") + "|" + drainingSig(v) + "|" + strconv.FormatUint(v.drainFlips, 10)
		if v.epoch == last && set == lastSet && !joined {
			continue
		}
		last, lastSet = v.epoch, set
		rt.omu.Lock()
		gone := map[string]*ownState{}
		for dest, st := range rt.owned {
			select {
			case <-st.done:
			default:
				// Being taken over or released: look at it again next
				// tick.
				last = cluster.EpochID{}
				continue
			}
			// A queue taken over after the nodes joined (its take-over's
			// view counted them) pulled their copies already; one whose
			// take-over read its view before a join (staleIn) did not,
			// even when the join was noticed on an earlier tick, while
			// the take-over still ran (joined is false by now).
			if st.staleIn(v) || rt.ownerOf(v, dest) != v.self {
				gone[dest] = rt.markReleasing(dest)
			}
		}
		rt.omu.Unlock()
		for dest, st := range gone {
			rt.release(v, dest, st)
		}
		if joined && len(gone) > 0 {
			rt.log.Info("nodes joined the view: queues will be merged with their copies on next use", "queues", len(gone))
		}
	}
}

// release stops serving dest here and tells its owner in v to merge this
// node's copy: it may hold messages this node accepted after the owner
// took the queue over (while this node's view still named itself).
// st is the release's placeholder in owned (markReleasing).
func (rt *router) release(v viewSnap, dest string, st *ownState) {
	rt.m.released.Inc()
	rt.releaseHere(dest, st)
	owner := rt.ownerOf(v, dest)
	if owner == "" || owner == v.self {
		return
	}
	rt.goBackground(func() {
		ctx, cancel := context.WithTimeout(rt.ctx, forwardTimeout)
		defer cancel()
		done := make(chan error, 1)
		if err := rt.fwd.request(ctx, owner, opMerge, []string{frame.Destination, dest}, nil, func(_ *frame.Frame, err error) { done <- err }); err != nil {
			if !rt.stopped() {
				rt.log.Warn("released a queue; its owner could not be told to merge this copy", "dest", dest, "owner", owner, "err", err)
			}
			return
		}
		select {
		case err := <-done:
			if err != nil && !rt.stopped() {
				rt.log.Warn("released a queue; its owner could not be told to merge this copy", "dest", dest, "owner", owner, "err", err)
			}
		case <-rt.stop:
		}
	})
}

// unmerged reports whether queue dest's take-over is in progress or
// could not read an alive peer's copy (ownState.missed): the replica
// keeps it rather than remove it as idle, since the removal's bucket
// delete, replicated, would destroy the messages only that copy holds.
func (rt *router) unmerged(dest string) bool {
	rt.omu.Lock()
	defer rt.omu.Unlock()
	st := rt.owned[dest]
	if st == nil {
		return false
	}
	select {
	case <-st.done:
		return !st.releasing && len(st.missed) > 0
	default:
		return true
	}
}

// forgetRemoved drops from owned the queues (dests, or all) whose
// take-over succeeded but which the replica no longer serves (not
// Adopted): removed as idle (queue.idle_delete_after), or never created
// (a SEND, SUBSCRIBE or exists request refused because its user may not
// create the queue). Otherwise owned would hold every queue name ever
// used here until the view changes: a user without the configure
// permission could grow it one name per refused SEND. A later use of
// the name takes the queue over anew. The watch calls it every 10 s.
func (rt *router) forgetRemoved(dests ...string) {
	rt.omu.Lock()
	defer rt.omu.Unlock()
	forget := func(dest string, st *ownState) {
		select {
		case <-st.done:
		default:
			return // being taken over or released
		}
		if !st.releasing && st.err == nil && !rt.rep.Adopted(dest) {
			delete(rt.owned, dest)
		}
	}
	if len(dests) == 0 {
		for dest, st := range rt.owned {
			forget(dest, st)
		}
		return
	}
	for _, dest := range dests {
		if st := rt.owned[dest]; st != nil {
			forget(dest, st)
		}
	}
}

// missedRetry is how long after a take-over that could not read the copy
// of a peer whose link is up (it answered with an error, or not in time)
// the queue is taken over again: doubled on each retry of the same
// queue, up to missedRetryMax.
const (
	missedRetry    = 5 * time.Second
	missedRetryMax = 5 * time.Minute
)

// retryMissed takes over again the queues whose take-over missed a peer
// that is alive and whose forwarding link is up: remergeMissed acts when
// such a link comes up, but a pull also fails with the link up (a store
// error at the peer, a scan slower than forwardTimeout), and that peer's
// messages would stay unmerged. Backed off per queue (with jitter, so
// that queues taken over together do not retry together), and only once
// a probe pull from a missed peer succeeds: a take-over again re-binds
// the subscribers, which a peer still failing would cost for nothing. The
// watch calls it every second; the probes and merges run in the
// background, one per queue.
func (rt *router) retryMissed() {
	v := rt.view()
	now := time.Now()
	type cand struct {
		dest  string
		peers []string
	}
	var again []cand
	rt.omu.Lock()
	for dest := range rt.missTries {
		if rt.owned[dest] == nil {
			delete(rt.missTries, dest)
		}
	}
	for dest, st := range rt.owned {
		select {
		case <-st.done:
		default:
			continue
		}
		if st.releasing || st.err != nil {
			continue
		}
		if len(st.missed) == 0 {
			delete(rt.missTries, dest)
			continue
		}
		wait := min(missedRetry<<min(rt.missTries[dest], 6), missedRetryMax)
		wait += time.Duration(rand.Int64N(int64(wait/4) + 1))
		if rt.probing[dest] || now.Sub(st.ended) < wait {
			continue
		}
		var peers []string
		for _, p := range st.missed {
			if _, alive := v.peers[p]; alive && rt.fwd.connected(p) {
				peers = append(peers, p)
			}
		}
		if len(peers) > 0 {
			again = append(again, cand{dest, peers})
			rt.missTries[dest]++
			rt.probing[dest] = true
		}
	}
	rt.omu.Unlock()
	for _, c := range again {
		rt.goBackground(func() {
			defer func() {
				rt.omu.Lock()
				delete(rt.probing, c.dest)
				rt.omu.Unlock()
			}()
			for _, p := range c.peers {
				if err := rt.probePull(p, c.dest); err != nil {
					rt.log.Debug("a peer whose copy a take-over missed still cannot be read", "dest", c.dest, "peer", p, "err", err)
					continue
				}
				rt.log.Info("a peer whose copy a take-over could not read answers now: taking the queue over again", "dest", c.dest, "peer", p)
				rt.merge(c.dest)
				return
			}
		})
	}
}

// probePull asks peer for the first chunk of its copy of dest, without
// applying it: whether a take-over's pull would succeed now.
func (rt *router) probePull(peer, dest string) error {
	ctx, cancel := context.WithTimeout(rt.ctx, forwardTimeout)
	defer cancel()
	errc := make(chan error, 1)
	if err := rt.fwd.request(ctx, peer, opPull, []string{frame.Destination, dest, hdrAfter, "0"}, nil, func(_ *frame.Frame, err error) { errc <- err }); err != nil {
		return err
	}
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// linkUp runs remergeMissed for peer, whose forwarding link is up: in
// the background, one at a time per peer, and once more if the link
// came up again meanwhile.
func (rt *router) linkUp(peer string) {
	rt.omu.Lock()
	defer rt.omu.Unlock()
	if rt.remerging[peer] > 0 {
		rt.remerging[peer] = 2
		return
	}
	rt.remerging[peer] = 1
	rt.goBackground(func() {
		for {
			rt.remergeMissed(peer)
			rt.omu.Lock()
			if rt.remerging[peer] < 2 {
				delete(rt.remerging, peer)
				rt.omu.Unlock()
				return
			}
			rt.remerging[peer] = 1
			rt.omu.Unlock()
		}
	})
}

// remergeMissed takes over again the queues whose take-over could not
// read peer's copy (ownState.missed): peer's forwarding link is up.
func (rt *router) remergeMissed(peer string) {
	rt.omu.Lock()
	var dests []string
	var sts []*ownState
	for dest, st := range rt.owned {
		dests, sts = append(dests, dest), append(sts, st)
	}
	rt.omu.Unlock()
	for i, st := range sts {
		select {
		case <-st.done: // one in progress may miss peer still
		case <-rt.stop:
			return
		}
		if st.releasing || !slices.Contains(st.missed, peer) {
			continue
		}
		v := rt.view()
		rt.omu.Lock()
		cur := rt.owned[dests[i]] == st
		rt.omu.Unlock()
		if cur && rt.ownerOf(v, dests[i]) == v.self {
			rt.log.Info("a peer whose copy a take-over could not read is reachable again: merging it", "dest", dests[i], "peer", peer)
			rt.merge(dests[i])
		}
	}
}

// merge makes this node take dest over again (pulling every alive node's
// copy) if it serves it: another node released a copy that may hold
// messages this one lacks. Subscribers bind again; their unacknowledged
// messages come back redelivered.
func (rt *router) merge(dest string) {
	rt.omu.Lock()
	st := rt.owned[dest]
	if st == nil {
		rt.omu.Unlock()
		// Not taken over here: its take-over will pull every copy (and
		// starts over if the queue was adopted outside one).
		if rt.rep.Adopted(dest) {
			rt.goBackground(func() { _ = rt.ensureOwned(dest) })
		}
		return
	}
	if st.releasing {
		// Being released here: its next take-over pulls every copy,
		// the requester's included.
		rt.omu.Unlock()
		return
	}
	select {
	case <-st.done:
	default:
		rt.omu.Unlock()
		// A take-over in progress may have read the copy already or
		// not: once it ends, take it over again.
		rt.goBackground(func() {
			select {
			case <-st.done:
			case <-rt.stop:
				return
			}
			rt.merge(dest)
		})
		return
	}
	rel := rt.markReleasing(dest)
	rt.omu.Unlock()
	rt.releaseHere(dest, rel)
	rt.log.Info("merging a released copy: the queue is taken over again", "dest", dest)
	rt.goBackground(func() {
		if err := rt.ensureOwned(dest); err != nil {
			rt.log.Warn("taking a queue over again failed; retried on its next use", "dest", dest, "err", err)
		}
	})
}

// ensureOwned makes this node ready to serve queue dest, which it owns:
// the first time, it pulls from every other alive node the messages of
// dest it lacks (the union of the surviving copies), then adopts the
// queue. Concurrent callers wait for the first.
//
// A queue taken over before nodes appeared in the view (a partition
// healed, a node came back) is taken over again before it is served:
// the watch would do it within a tick, but until then this node would
// deliver messages acknowledged on the other side.
func (rt *router) ensureOwned(dest string) error {
	for {
		rt.omu.Lock()
		st := rt.owned[dest]
		if st == nil {
			break
		}
		rt.omu.Unlock()
		if st.releasing {
			// A release always ends (closeDest, Release), however many
			// queues the watch releases before this one: no timeout.
			select {
			case <-st.done:
			case <-rt.stop:
				return fmt.Errorf("%w: the node is stopping", replica.ErrNoQuorum)
			}
			// Released because a node joined: take it over anew (or,
			// if it moved, refuse: takeOver checks).
			continue
		}
		select {
		case <-st.done:
		case <-time.After(forwardTimeout):
			return fmt.Errorf("%w: taking over %s is still in progress", replica.ErrNoQuorum, dest)
		}
		if st.err != nil || !st.staleIn(rt.view()) {
			return st.err
		}
		rt.omu.Lock()
		if rt.owned[dest] == st {
			rel := rt.markReleasing(dest)
			rt.omu.Unlock()
			rt.log.Info("nodes joined the view since this queue was taken over: taking it over again before serving it", "dest", dest)
			rt.releaseHere(dest, rel)
			rt.m.released.Inc()
			continue
		}
		rt.omu.Unlock()
	}
	st := &ownState{done: make(chan struct{})}
	rt.owned[dest] = st
	rt.omu.Unlock()
	err := rt.takeOver(dest, st)
	if err != nil {
		rt.omu.Lock()
		delete(rt.owned, dest)
		rt.omu.Unlock()
	}
	st.err = err
	st.ended = time.Now()
	close(st.done)
	return err
}

// pullChunk bounds one pull reply.
const (
	pullMessages   = 512
	pullBytes      = 1 << 20
	pullTombstones = 16384
)

func (rt *router) takeOver(dest string, st *ownState) error {
	if rt.rep.Adopted(dest) {
		// Adopted outside a take-over (a dead-letter move, a write that
		// raced a release): start over, so the other copies are merged.
		rt.host.closeDest(dest)
		rt.rep.Release(dest)
	}
	// A fresh view, not the cached one: a peer that appeared in the
	// last viewTTL must be pulled from too.
	v := rt.refresh()
	if o := rt.ownerOf(v, dest); o != v.self {
		// The caller checked ownership in an older view (the queue moved
		// since, maybe while this node released it): taken over here, it
		// would be served twice until the next view change. The caller
		// goes to the owner.
		return fmt.Errorf("%w: %w: %s is owned by %s in this node's view", replica.ErrNoQuorum, errNotOwner, dest, o)
	}
	st.joins = v.joins
	var wg sync.WaitGroup
	var mmu sync.Mutex
	var existed atomic.Bool
	for peer := range v.peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := rt.pullRetry(peer, dest, v, &existed)
			if err != nil {
				if !rt.stopped() {
					rt.log.Warn("taking over a queue: a peer's copy could not be read; messages only it holds stay there until its link is up again", "dest", dest, "peer", peer, "err", err)
				}
				mmu.Lock()
				st.missed = append(st.missed, peer)
				mmu.Unlock()
				return
			}
			rt.m.merged.Add(float64(n))
			if n > 0 {
				rt.log.Info("taking over a queue: merged a peer's copy", "dest", dest, "peer", peer, "messages", n)
			}
		}()
	}
	wg.Wait()
	rt.m.takeovers.Inc()
	if existed.Load() {
		// A peer holds the queue's bucket, maybe empty (a drained
		// queue): it exists, whether or not any message was copied.
		return rt.rep.AdoptExisting(dest)
	}
	return rt.rep.Adopt(dest)
}

// pullRetryFor bounds how long a take-over retries reading the copy of a
// peer that is alive in the view but does not answer yet (its link is
// coming up after a partition healed).
const pullRetryFor = 2 * time.Second

// pullRetry copies peer's tombstones and messages of dest into the local
// store (either order gives the same state: a copy of a message removed
// at the peer is ignored by the store, a tombstone removes a copy already
// here). A failure is retried while the peer stays in the view, for up
// to pullRetryFor: taking over without an alive peer's copy would serve
// messages it knows were acknowledged, and leave messages only it holds
// unserved until the next merge.
//
// existed is set when peer says the queue exists there (hdrExists).
func (rt *router) pullRetry(peer, dest string, v viewSnap, existed *atomic.Bool) (int, error) {
	deadline := time.Now().Add(pullRetryFor)
	for {
		// Messages even when the tombstones could not be read: a
		// message only that peer holds matters more than a duplicate.
		_, terr := rt.pull(peer, dest, v, true, nil)
		n, err := rt.pull(peer, dest, v, false, existed)
		if err == nil {
			err = terr
		}
		if err == nil {
			return n, nil
		}
		if _, alive := rt.view().peers[peer]; !alive || time.Now().After(deadline) {
			return n, err
		}
		select {
		case <-rt.stop:
			return n, err
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// pull copies peer's bucket of dest into the local store, or with
// tombs its tombstones of dest. existed, if set, is set when peer says
// the queue exists there.
func (rt *router) pull(peer, dest string, v viewSnap, tombs bool, existed *atomic.Bool) (int, error) {

	var after uint64
	total := 0
	for {
		var resp *frame.Frame
		var rerr error
		done := make(chan struct{})
		ctx, cancel := context.WithTimeout(rt.ctx, forwardTimeout)
		hdrs := []string{frame.Destination, dest, hdrAfter, fmt.Sprint(after)}
		if tombs {
			hdrs = append(hdrs, hdrTombs, "1")
		}
		err := rt.fwd.request(ctx, peer, opPull, hdrs, nil, func(f *frame.Frame, err error) {
			resp, rerr = f, err
			close(done)
		})
		if err != nil {
			cancel()
			return total, err
		}
		select {
		case <-done:
		case <-time.After(forwardTimeout):
			// The link is up but the answer does not come (the peer is
			// stuck or slow): go on without its copy.
			cancel()
			return total, fmt.Errorf("pull from %s: no answer within %v", peer, forwardTimeout)
		case <-rt.stop:
			cancel()
			return total, fmt.Errorf("pull from %s: %w: the node is stopping", peer, replica.ErrNoQuorum)
		}
		cancel()
		if rerr != nil {
			return total, rerr
		}
		if len(resp.Body) > 0 {
			ch := make(chan error, 1)
			if err := rt.rep.ApplyReplicated(v.epoch, v.epoch, resp.Body, func(err error) { ch <- err }); err != nil {
				return total, err
			}
			if err := <-ch; err != nil {
				return total, err
			}
		}
		if existed != nil && resp.Header.Get(hdrExists) == "1" {
			existed.Store(true)
		}
		var n int
		var last uint64
		fmt.Sscan(resp.Header.Get(hdrCount), &n)
		fmt.Sscan(resp.Header.Get(hdrAfter), &last)
		total += n
		if resp.Header.Get(hdrMore) != "1" || last <= after {
			return total, nil
		}
		after = last
	}
}

// Barrier implements stomp.Broker: forwarded operations are durable at
// their owner before they complete, so the local store's barrier covers
// the rest.
// Barrier implements stomp.Broker: every earlier write of this node is
// durable, here and at the owners sent its unsynced ACKs.
func (rt *router) Barrier(done func(error)) {
	if !rt.ackBarrierNeeded() {
		rt.rep.Barrier(done)
		return
	}
	all := replica.JoinN(2, done)
	rt.syncAcks(all)
	rt.rep.Barrier(all)
}

// Apply implements stomp.Broker. The batch is split by where each part
// takes effect: here (topics, queues this node owns), or at another
// owner. Each part is applied whole; a batch whose parts have different
// owners (a transaction over queues of several owners) is not atomic
// across them.
func (rt *router) Apply(b *replica.Batch, done func(error)) error {
	if len(b.Sends) > 0 {
		// Both waits together at most the failover budget.
		deadline := time.Now().Add(failoverBudget + time.Second)
		rt.waitRetries(b.Sends, deadline)
		rt.waitFlights(b.Sends, deadline)
	}
	v := rt.view()
	type part struct {
		sends []*replica.Message
	}
	var local replica.Batch
	local.Sync = b.Sync
	remote := map[string]*part{}
	var topics []*replica.Message
	for _, m := range b.Sends {
		k, err := replica.ParseDestination(m.Dest)
		if err != nil {
			return err
		}
		if k == replica.KindTopic {
			if m.ID == "" {
				// One message-id on every node's subscribers.
				m.ID = rt.prefix + "-t" + strconv.FormatUint(rt.msgSeq.Add(1), 10)
			}
			local.Sends = append(local.Sends, m)
			topics = append(topics, m)
			continue
		}
		o := rt.ownerOf(v, m.Dest)
		if o == v.self {
			if err := rt.ensureOwned(m.Dest); err != nil {
				if !errors.Is(err, errNotOwner) {
					return err
				}
				// It moved while this node released it: to its owner
				// in a fresh view.
				v = rt.refresh()
				if o = rt.ownerOf(v, m.Dest); o == v.self {
					return err
				}
			}
		}
		if o == "" {
			return errNoActiveSet
		}
		if o != v.self {
			if m.ID == "" {
				// Assigned where the SEND arrived, so that a retried
				// forward carries the same message-id.
				m.ID = rt.prefix + "-" + strconv.FormatUint(rt.msgSeq.Add(1), 10)
			}
			p := remote[o]
			if p == nil {
				p = &part{}
				remote[o] = p
			}
			p.sends = append(p.sends, m)
			continue
		}
		local.Sends = append(local.Sends, m)
	}
	// SENDs to queues of several owners: recorded here first, then
	// applied per owner (txn.go), so that they are all applied.
	var txnSends []*replica.Message
	owners := len(remote)
	for _, m := range local.Sends {
		if !isTopic(m) {
			owners++
			break
		}
	}
	if owners > 1 {
		var keep []*replica.Message
		for _, m := range local.Sends {
			if isTopic(m) {
				keep = append(keep, m)
				continue
			}
			if m.ID == "" {
				m.ID = rt.prefix + "-" + strconv.FormatUint(rt.msgSeq.Add(1), 10)
			}
			txnSends = append(txnSends, m)
		}
		for _, p := range remote {
			txnSends = append(txnSends, p.sends...)
		}
		local.Sends, remote = keep, nil
		// Its parts are applied one by one: a queue one of them may
		// not create is looked for first, so that nothing is applied.
		if err := rt.checkExist(txnSends); err != nil {
			return err
		}
	}
	var routed []replica.AckOp
	for _, a := range b.Acks {
		rs, ok := a.Sub.(*routedSub)
		if !ok {
			local.Acks = append(local.Acks, a)
			continue
		}
		if err := rs.Check(a.Tag); err != nil {
			return err
		}
		routed = append(routed, a)
	}
	n := len(remote) + len(routed)
	if len(txnSends) > 0 {
		n++
	}
	// A synced batch is a barrier for the connection's earlier frames:
	// their unsynced ACKs at other owners too.
	syncAcks := b.Sync && rt.ackBarrierNeeded()
	if syncAcks {
		n++
	}
	if len(local.Sends) > 0 || len(local.Acks) > 0 || n == 0 {
		n++
	}
	var body []byte
	if len(topics) > 0 && len(v.peers) > 0 {
		// Encoded before the local fan-out, which may touch them.
		body = encodeMessages(nil, topics)
	}
	all := replica.JoinN(n, done)
	if len(txnSends) > 0 {
		// Refused frames change nothing: check the local ACKs (topic
		// subscriptions; queue ones are routed and checked above)
		// before the transaction is recorded.
		for _, a := range local.Acks {
			if s, ok := a.Sub.(*replica.Subscription); ok {
				if err := s.Check(a.Tag); err != nil {
					return err
				}
			}
		}
		if err := rt.txn.commit(txnSends, all); err != nil {
			return err
		}
	}
	if len(local.Sends) > 0 || len(local.Acks) > 0 || len(remote)+len(routed)+len(txnSends) == 0 {
		localDone := all
		if len(local.Sends) > 0 && len(local.Acks) == 0 && len(topics) == 0 {
			localDone = rt.retryLocal(local.Sends, time.Now(), all)
		}
		var queued []*replica.Message
		for _, m := range local.Sends {
			if !isTopic(m) {
				queued = append(queued, m)
			}
		}
		if len(queued) > 0 {
			landed := rt.flightStart(v.self, queued)
			inner := localDone
			localDone = func(err error) {
				landed()
				inner(err)
			}
			if err := rt.rep.Apply(&local, localDone); err != nil {
				landed()
				return err
			}
		} else if err := rt.rep.Apply(&local, localDone); err != nil {
			return err
		}
	}
	for owner, p := range remote {
		landed := rt.flightStart(owner, p.sends)
		rt.forwardSends(owner, p.sends, time.Now(), false, func(err error) {
			landed()
			all(err)
		})
	}
	if syncAcks {
		rt.syncAcks(all)
	}
	for _, a := range routed {
		a.Sub.(*routedSub).ack(a.Tag, a.Nack, b.Sync, all)
	}
	if body != nil {
		rt.broadcastTopics(v, body)
	}
	return nil
}

// checkExist returns a *replica.NoSuchQueueError for the first of msgs
// that may not create its queue (NoCreate) if that queue does not exist
// at its owner. The owner still checks when the message arrives: a queue
// removed as idle meanwhile refuses it then.
func (rt *router) checkExist(msgs []*replica.Message) error {
	seen := map[string]bool{}
	for _, m := range msgs {
		if !m.NoCreate || seen[m.Dest] {
			continue
		}
		seen[m.Dest] = true
		ok, err := rt.queueExists(m.Dest)
		if err != nil {
			return fmt.Errorf("%w: could not learn from its owner whether %s exists: %w", replica.ErrNoQuorum, m.Dest, err)
		}
		if !ok {
			return &replica.NoSuchQueueError{Dest: m.Dest}
		}
	}
	return nil
}

// queueExists asks the owner of queue dest whether it exists
// (replica.Node.QueueExists), following a change of owner for up to
// notOwnerRetry.
func (rt *router) queueExists(dest string) (bool, error) {
	deadline := time.Now().Add(notOwnerRetry)
	v := rt.view()
	for {
		var ok bool
		var err error
		switch o := rt.ownerOf(v, dest); o {
		case "":
			err = errNoActiveSet
		case v.self:
			if err = rt.ensureOwned(dest); err == nil {
				if ok = rt.rep.QueueExists(dest); !ok {
					rt.forgetRemoved(dest) // taken over only to be refused
				}
			}
		default:
			ok, err = rt.askExists(o, dest)
		}
		if err == nil {
			return ok, nil
		}
		if !isNotOwner(err) && !errors.Is(err, errNotOwner) && !errors.Is(err, errNoActiveSet) || time.Now().After(deadline) {
			return false, err
		}
		time.Sleep(50 * time.Millisecond)
		v = rt.refresh()
	}
}

// askExists sends opExists to owner.
func (rt *router) askExists(owner, dest string) (bool, error) {
	type answer struct {
		f   *frame.Frame
		err error
	}
	ch := make(chan answer, 1)
	ctx, cancel := context.WithTimeout(context.Background(), forwardTimeout)
	defer cancel()
	if err := rt.fwd.request(ctx, owner, opExists, []string{frame.Destination, dest}, nil, func(f *frame.Frame, err error) {
		ch <- answer{f, err}
	}); err != nil {
		return false, err
	}
	select {
	case a := <-ch:
		if a.err != nil {
			return false, a.err
		}
		return a.f.Header.Get(hdrExists) == "1", nil
	case <-time.After(forwardTimeout):
		return false, fmt.Errorf("%s: no answer within %v", owner, forwardTimeout)
	}
}

// failoverBudget is how long a forwarded SEND is retried, through
// another owner if the view changes, before the client gets an ERROR:
// long enough for gossip to declare a dead owner dead (about 1.5 s).
const failoverBudget = 4 * time.Second

// forwardSends sends msgs (queues owner serves) to owner, durable there
// (and on its write quorum) before done. If the owner refuses (its view
// names another owner) or cannot be reached, the SENDs are routed again
// with a fresh view until failoverBudget has passed. A retry after an
// unknown outcome may store a message twice: both copies carry the same
// message-id, assigned here.
//
// retry marks the SENDs as retried (x-retry): an owner that refused an
// earlier SEND of one of their queues from this node refuses the ones
// that follow it until the retries come (see refusedSince), so that the
// retries, sent in order, keep the connection's order.
func (rt *router) forwardSends(owner string, msgs []*replica.Message, since time.Time, retry bool, done func(error)) {
	rt.forwardSendsMode(owner, msgs, since, retry, false, done)
}

// forwardSendsMode is forwardSends; with once, a failure is not retried
// here but handed to done as it came (the retry chain decides).
func (rt *router) forwardSendsMode(owner string, msgs []*replica.Message, since time.Time, retry, once bool, done func(error)) {
	// Large batches (a big transaction) go in chunks of maxForwardBody,
	// in order on the one link; each chunk is applied whole.
	size := 0
	for i, m := range msgs {
		size += len(m.Dest) + len(m.ID) + len(m.Body) + 16
		for _, h := range m.Headers {
			size += len(h) + 8
		}
		if size > maxForwardBody && i > 0 {
			all := replica.JoinN(2, done)
			rt.forwardChunk(owner, msgs[:i], since, retry, once, all)
			rt.forwardSendsMode(owner, msgs[i:], since, retry, once, all)
			return
		}
	}
	rt.forwardChunk(owner, msgs, since, retry, once, done)
}

func (rt *router) forwardChunk(owner string, msgs []*replica.Message, since time.Time, retried, once bool, done func(error)) {
	body := encodeMessages(nil, msgs)
	finish := func(err error) {
		switch {
		case err == nil:
			done(nil)
		case once:
			done(err)
		case retryable(err) && time.Since(since) < failoverBudget:
			rt.later(msgs, since, err, done)
		default:
			done(peerErr(err))
		}
	}
	wait := forwardTimeout
	if c, err := rt.fwd.get(owner); err == nil && !c.Connected() {
		wait = 100 * time.Millisecond // down now: look again soon (a refused redial takes it out of the view)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	var hdrs []string
	if retried {
		hdrs = []string{hdrRetry, "1"}
	}
	if nc := noCreateHeader(msgs); nc != "" {
		hdrs = append(hdrs, hdrNoCreate, nc)
	}
	err := rt.fwd.request(ctx, owner, opSend, hdrs, body, func(_ *frame.Frame, err error) {
		cancel()
		finish(err)
	})
	if err != nil {
		cancel()
		finish(err)
	}
}

// retryLocal wraps done of queue SENDs applied here as their owner: if
// their write quorum was not reached (the replicas moved to a new epoch
// a moment before this node, or a replica just died), they are routed
// again with a fresh view until failoverBudget has passed, as forwarded
// SENDs are. The copy stored by the failed attempt stays: the message
// may then be delivered twice, with the same message-id.
func (rt *router) retryLocal(msgs []*replica.Message, since time.Time, done func(error)) func(error) {
	// Copied now, before the write: once applied, a message belongs to
	// its queue and must not be read here (its delivery count changes).
	again := copies(msgs)
	return func(err error) {
		if err == nil || !errors.Is(err, replica.ErrNoQuorum) || time.Since(since) >= failoverBudget {
			done(err)
			return
		}
		rt.later(again, since, err, done)
	}
}

// applyOnce applies msgs (a retry) with a fresh view, once: forwarded
// to their owners marked as retries, or written here. done gets the
// messages of the parts that failed and the first error as it came.
func (rt *router) applyOnce(msgs []*replica.Message, since time.Time, done func(left []*replica.Message, err error)) {
	v := rt.refresh()
	byOwner := map[string][]*replica.Message{}
	for _, m := range msgs {
		o := rt.ownerOf(v, m.Dest)
		if o == "" {
			done(msgs, errNoActiveSet)
			return
		}
		byOwner[o] = append(byOwner[o], m)
	}
	var mu sync.Mutex
	var left []*replica.Message
	var first error
	all := replica.JoinN(len(byOwner), func(error) {
		mu.Lock()
		l, err := left, first
		mu.Unlock()
		done(l, err)
	})
	for o, ms := range byOwner {
		part := func(err error) {
			if err != nil {
				if mayHaveStored(err) {
					// This part may have left a copy: the next attempt
					// stores it marked, whatever the other parts did.
					ms = maybeDelivered(ms)
				}
				mu.Lock()
				left = append(left, ms...)
				// The job's error is a part's that left a copy, if any:
				// runJob then tries again only when the view changes or
				// once a second, and the client's outcome is unknown.
				if first == nil || (leftCopy(err) && !leftCopy(first)) {
					first = err
				}
				mu.Unlock()
			}
			all(nil)
		}
		if o != v.self {
			rt.forwardSendsMode(o, ms, since, true, true, part)
			continue
		}
		err := error(nil)
		for _, m := range ms {
			if err = rt.ensureOwned(m.Dest); err != nil {
				break
			}
		}
		if err == nil {
			// A copy: an applied message belongs to its queue, and a
			// failed attempt may be retried.
			err = rt.rep.Apply(&replica.Batch{Sends: copies(ms), Sync: true}, part)
		}
		if err != nil {
			part(err)
		}
	}
}

// republish stores m in its queue again: an auto-ack delivery that the
// owner counted acknowledged when it handed it out, but that never
// reached the client (its subscription closed or was re-bound first, or
// the write failed). It keeps its message-id. tried: the write to the
// client failed part way, so the client may have seen it: it comes back
// marked redelivered, and the failed write counts toward
// queue.max_redeliveries. Otherwise no client saw it, nobody failed, and
// its count is kept.
func (rt *router) republish(m *replica.Message, tried bool) {
	c := *m
	if tried {
		c.Deliveries = m.Deliveries + 1
	}
	c.Seq = 0
	c.NoCreate = false // the broker's own SEND
	rt.goBackground(func() {
		if err := rt.Apply(&replica.Batch{Sends: []*replica.Message{&c}, Sync: true}, func(err error) {
			if err != nil {
				rt.log.Error("an auto-ack message that reached no client could not be stored again", "dest", c.Dest, "message_id", c.ID, "err", err)
			}
		}); err != nil {
			rt.log.Error("an auto-ack message that reached no client could not be stored again", "dest", c.Dest, "message_id", c.ID, "err", err)
		}
	})
}

// broadcastTopics sends topic messages (encoded) to every other alive
// node, which fans them out to its own subscribers. Best effort, as a
// topic is, and never blocking the session: a node whose link is down,
// or that does not take the request within 100 ms, misses them.
func (rt *router) broadcastTopics(v viewSnap, body []byte) {
	for peer := range v.peers {
		c, err := rt.fwd.get(peer)
		if err != nil || !c.Connected() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		if err := c.Request(ctx, opTopic, nil, body, func(_ *frame.Frame, err error) {
			if err != nil {
				rt.log.Debug("topic message not delivered to a peer", "peer", peer, "err", err)
			}
		}); err != nil {
			rt.log.Debug("topic message not sent to a peer", "peer", peer, "err", err)
		}
		cancel()
	}
}

// Subscribe implements stomp.Broker. Topic subscriptions are local (every
// node receives every topic message). A queue subscription is held by the
// queue's owner and read by this node's poller for that owner; when the
// owner changes it moves.
func (rt *router) Subscribe(opts replica.SubOptions) (replica.Sub, error) {
	k, err := replica.ParseDestination(opts.Dest)
	if err != nil {
		return nil, err
	}
	if k == replica.KindTopic {
		s, err := rt.rep.Subscribe(opts)
		if err != nil {
			return nil, err
		}
		return s, nil
	}
	rs := &routedSub{
		rt: rt, id: rt.prefix + "." + fmt.Sprint(rt.subSeq.Add(1)), opts: opts,
		// byID (bounded like inflight) finds a message's delivery by its
		// message-id: for STOMP 1.0/1.1 ACKs, and for an ACK of a former
		// binding's delivery redirected to the current one (ack).
		inflight: map[uint64]*flight{}, byID: map[string]uint64{},
	}
	if err := rs.bind(); errors.Is(err, replica.ErrNoSuchQueue) {
		return nil, err // its user may not create the queue
	} else if err != nil {
		// The owner is unreachable or the views are still converging
		// (a node just died, a partition just healed): the subscription
		// stands and binds in the background, as one that lost its owner
		// does, rather than failing the client's SUBSCRIBE.
		rt.log.Info("subscription not bound yet; retrying in the background", "dest", opts.Dest, "err", err)
		rs.rebindLater(0)
	}
	return rs, nil
}

// goBackground runs f on a goroutine the router's close waits for,
// unless the router is closing.
func (rt *router) goBackground(f func()) {
	rt.pmu.Lock()
	defer rt.pmu.Unlock()
	if rt.closed {
		return
	}
	rt.wg.Add(1)
	go func() {
		defer rt.wg.Done()
		f()
	}()
}

// attach adds rs (bound at owner as generation gen) to the poller
// reading owner's subscriptions, starting one if needed.
func (rt *router) attach(owner string, rs *routedSub, gen uint64) error {
	rt.pmu.Lock()
	defer rt.pmu.Unlock()
	if rt.closed {
		return stomp.ErrPeerClosed
	}
	p := rt.pollers[owner]
	if p == nil {
		p = newPoller(rt, owner)
		rt.pollers[owner] = p
		rt.wg.Add(1)
		go p.run()
	}
	id := rs.ownerID(gen)
	p.mu.Lock()
	p.subs[id] = rs
	p.gens[id] = gen
	p.mu.Unlock()
	rs.mu.Lock()
	rs.p = p
	rs.mu.Unlock()
	p.wake()
	return nil
}

// pollerDone removes p once it has no subscriptions left.
func (rt *router) pollerDone(p *poller) bool {
	rt.pmu.Lock()
	defer rt.pmu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.subs) > 0 && !p.stopped {
		return false
	}
	if rt.pollers[p.owner] == p {
		delete(rt.pollers, p.owner)
	}
	p.stopped = true
	return true
}

// Forwarding errors: a peer's refusal codes map back to the replica
// errors the session reports (queue full, low disk, no quorum).
func peerErr(err error) error {
	if err == nil {
		return nil
	}
	var pe *stomp.PeerError
	if !errors.As(err, &pe) {
		return fmt.Errorf("%w: forwarding to the queue's owner failed (outcome unknown): %w", replica.ErrNoQuorum, err)
	}
	switch pe.Code {
	case codeQueueFull:
		return fmt.Errorf("%w (%s)", replica.ErrQueueFull, pe.Message)
	case codeLowDisk:
		return fmt.Errorf("%w (%s)", replica.ErrLowDisk, pe.Message)
	case codeBadDest:
		return fmt.Errorf("%w (%s)", replica.ErrBadDestination, pe.Message)
	case codeUnknownAck:
		return fmt.Errorf("%w (%s)", replica.ErrUnknownAck, pe.Message)
	case codeNoQueue:
		return &replica.NoSuchQueueError{Dest: pe.Message}
	}
	return fmt.Errorf("%w: the queue's owner refused: %s: %s", replica.ErrNoQuorum, pe.Code, pe.Message)
}

func isNotOwner(err error) bool {
	var pe *stomp.PeerError
	return errors.As(err, &pe) && pe.Code == codeNotOwner
}

// failCode is the peer failure code for a local error.
func failCode(err error) string {
	switch {
	case errors.Is(err, errNotOwner):
		return codeNotOwner // the sender asks the owner in a fresh view
	case errors.Is(err, replica.ErrQueueFull):
		return codeQueueFull
	case errors.Is(err, replica.ErrLowDisk):
		return codeLowDisk
	case errors.Is(err, replica.ErrBadDestination):
		return codeBadDest
	case errors.Is(err, replica.ErrUnknownAck), errors.Is(err, replica.ErrSubscriptionClosed):
		return codeUnknownAck
	case errors.Is(err, replica.ErrNoSuchQueue):
		return codeNoQueue
	case errors.Is(err, replica.ErrNoQuorum):
		return "no-quorum"
	}
	return "refused"
}

func validDest(dest string) bool {
	k, err := replica.ParseDestination(dest)
	return err == nil && k == replica.KindQueue && !strings.ContainsAny(dest, "\x00\n")
}

// ReplicaInfo is one replica of a queue, for operators.
type ReplicaInfo struct {
	ID    string `json:"id"`
	Name  string `json:"name"`
	State string `json:"state"` // in-sync | catching-up | owner
}

// DestInfo is a destination as GET /v1/destinations shows it in a
// cluster: where it is served and copied, and its counts at its owner.
type DestInfo struct {
	replica.DestinationInfo
	Owner     string        `json:"owner,omitempty"`
	OwnerName string        `json:"owner_name,omitempty"`
	Replicas  []ReplicaInfo `json:"replicas,omitempty"`
}

// ownedDestinations describes the destinations this node serves: the
// queues it owns (with their replica sets as its replicator knows them)
// and the topics with subscribers here.
func (rt *router) ownedDestinations(pr *replica.PeerReplicator) []DestInfo {
	st := rt.status()
	names := map[string]string{}
	for _, m := range st.Members {
		names[m.ID] = m.Name
	}
	v := rt.view()
	var out []DestInfo
	for _, d := range rt.rep.Destinations() {
		di := DestInfo{DestinationInfo: d}
		if d.Kind == replica.KindQueue.String() {
			di.Owner, di.OwnerName = v.self, names[v.self]
			for _, id := range replica.ReplicaSet(d.Name, v.active, rt.r) {
				state := "owner"
				if id != v.self {
					state = "catching-up"
					if pr.Synced(id, d.Name) {
						state = "in-sync"
					}
				}
				di.Replicas = append(di.Replicas, ReplicaInfo{ID: id, Name: names[id], State: state})
			}
		}
		out = append(out, di)
	}
	return out
}

// clusterDestinations gathers every alive node's ownedDestinations: each
// queue as its owner reports it; topics with their subscribers summed.
func (rt *router) clusterDestinations() []DestInfo {
	v := rt.view()
	all := rt.ownedDestinations(rt.pr)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for peer := range v.peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ch := make(chan []DestInfo, 1)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			err := rt.fwd.request(ctx, peer, opDests, nil, nil, func(f *frame.Frame, err error) {
				var ds []DestInfo
				if err == nil {
					_ = json.Unmarshal(f.Body, &ds)
				}
				ch <- ds
			})
			if err != nil {
				return
			}
			select {
			case ds := <-ch:
				mu.Lock()
				all = append(all, ds...)
				mu.Unlock()
			case <-ctx.Done():
			}
		}()
	}
	wg.Wait()
	byName := map[string]int{}
	var out []DestInfo
	for _, d := range all {
		i, seen := byName[d.Name]
		if !seen {
			byName[d.Name] = len(out)
			out = append(out, d)
			continue
		}
		if d.Kind == replica.KindTopic.String() {
			out[i].Consumers += d.Consumers
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// isTopic reports whether m goes to a topic (Apply has parsed its
// destination already).
func isTopic(m *replica.Message) bool { return strings.HasPrefix(m.Dest, replica.TopicPrefix) }
