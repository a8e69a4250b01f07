package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// Replication over peer links: peerLinks carries a PeerReplicator's
// batches to the other replicas, and replicationHandler applies the
// batches other owners send here.

// maxAppendBody is the largest body of one append request: the
// replicator splits larger writes (see replica.PeerReplicator), keeping
// each request well under the peer link's frame limit.
const maxAppendBody = 4 << 20

// opAppend is the peer operation that carries replicated queue writes:
// header x-epoch (the owner's epoch, cluster.EpochID's text form), body
// the replica package's wire form.
const (
	opAppend    = "append"
	headerEpoch = "x-epoch"
	// headerSeq orders one sender's appends across reconnects:
	// "<incarnation>/<sequence>", decimal. A replica refuses an append
	// whose sequence is not above the last it applied from the same
	// incarnation of that sender: a request of a broken connection that
	// is handled after the new connection's (the sender already counted
	// it failed) must not land after them.
	headerSeq = "x-seq"
)

// errPeerBacklog: more replication bytes are queued for a peer than
// peerLinks allows; the batch is not sent (its writes miss the quorum).
var errPeerBacklog = errors.New("replication backlog to the peer is full")

// errPeerDown: the link to the peer has been down longer than
// peerLinks.connectWait; batches fail at once (their writes miss the
// quorum: the client gets an ERROR, not a hang) until it is back.
var errPeerDown = errors.New("peer unreachable")

// connectWait is how long a batch waits for a link that is down (or not
// yet up) before it fails.
const connectWait = 2 * time.Second

// peerLinks implements replica.Peers over stomp peer links: one
// PeerClient per peer node, created on first use, fed by a queue bounded
// in bytes and drained in order by one goroutine, so that Append never
// blocks (PeerClient.Request waits while the link is down or full).
type peerLinks struct {
	inc uint64 // this incarnation, for headerSeq
	// seq numbers the appends of every link (headerSeq's second part):
	// one counter, so that a link made again after prune goes on above
	// the old one's numbers, which its receiver still remembers.
	seq       atomic.Uint64
	base      stomp.PeerClientConfig // Secret, NodeID, Logger, Registerer, timeouts
	addrOf    func(id string) string // a peer's peer-link address, "" when unknown
	maxQueued int                    // bytes queued per peer
	log       *slog.Logger

	mu     sync.Mutex
	out    map[string]*peerOut
	closed bool
}

type pendingAppend struct {
	epoch cluster.EpochID
	body  []byte
	done  func(error)
}

type peerOut struct {
	closed    bool // under mu: the sender has ended, Append fails at once
	id        string
	c         *stomp.PeerClient
	downSince time.Time // run's goroutine only
	seq       uint64    // run's goroutine only: the last headerSeq sent
	mu        sync.Mutex
	q         []pendingAppend
	bytes     int
	signal    chan struct{}
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
}

func newPeerLinks(base stomp.PeerClientConfig, addrOf func(string) string, maxQueued int, log *slog.Logger) *peerLinks {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &peerLinks{inc: uint64(time.Now().UnixNano()), base: base, addrOf: addrOf, maxQueued: max(maxQueued, maxAppendBody), log: log, out: map[string]*peerOut{}}
}

// Append implements replica.Peers.
func (p *peerLinks) Append(peer string, epoch cluster.EpochID, body []byte, done func(error)) {
	o, err := p.get(peer)
	if err != nil {
		done(err)
		return
	}
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		done(stomp.ErrPeerClosed)
		return
	}
	if o.bytes+len(body) > p.maxQueued {
		o.mu.Unlock()
		done(fmt.Errorf("%w (%s)", errPeerBacklog, peer))
		return
	}
	o.q = append(o.q, pendingAppend{epoch: epoch, body: body, done: done})
	o.bytes += len(body)
	o.mu.Unlock()
	select {
	case o.signal <- struct{}{}:
	default:
	}
}

func (p *peerLinks) get(peer string) (*peerOut, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, stomp.ErrPeerClosed
	}
	if o := p.out[peer]; o != nil {
		return o, nil
	}
	cfg := p.base
	cfg.Peer = peer
	cfg.PeerNodeID = peer
	cfg.AddrFunc = func() string { return p.addrOf(peer) }
	c := stomp.NewPeerClient(cfg)
	if err := c.Start(); err != nil {
		return nil, fmt.Errorf("peer link to %s: %w", peer, err)
	}
	o := &peerOut{id: peer, c: c, signal: make(chan struct{}, 1)}
	o.ctx, o.cancel = context.WithCancel(context.Background())
	o.wg.Add(1)
	go p.run(o)
	p.out[peer] = o
	return o, nil
}

// run sends o's queued appends in order, merging consecutive ones of one
// epoch into a request of at most maxBatchBody bytes.
func (p *peerLinks) run(o *peerOut) {
	defer o.wg.Done()
	for {
		select {
		case <-o.ctx.Done():
			o.failQueued(stomp.ErrPeerClosed)
			return
		case <-o.signal:
		}
		for {
			o.mu.Lock()
			if len(o.q) == 0 {
				o.mu.Unlock()
				break
			}
			// One request per append: a replica refuses or applies a
			// request whole, so appends are not merged (a refusal of one
			// queue must not fail another's write). The peer's group
			// commit shares its fdatasync among them.
			a := o.q[0]
			o.q[0] = pendingAppend{}
			o.q = o.q[1:]
			o.mu.Unlock()
			epoch, body := a.epoch, a.body
			var once sync.Once
			finish := func(_ *frame.Frame, err error) {
				once.Do(func() {
					// Bytes count until the answer: queued and in flight
					// together stay under maxQueued.
					o.mu.Lock()
					o.bytes -= len(body)
					o.mu.Unlock()
					var pe *stomp.PeerError
					if errors.As(err, &pe) {
						switch pe.Code {
						case "diverged":
							err = fmt.Errorf("%w: %s", replica.ErrDiverged, pe.Message)
						case "owned-here":
							err = fmt.Errorf("%w: %s", replica.ErrOwnedHere, pe.Message)
						}
					}
					a.done(err)
				})
			}
			ctx, cancel := o.ctx, context.CancelFunc(func() {})
			if o.c.Connected() {
				o.downSince = time.Time{}
			} else {
				if o.downSince.IsZero() {
					o.downSince = time.Now()
				}
				left := connectWait - time.Since(o.downSince)
				if left <= 0 {
					finish(nil, fmt.Errorf("%w: %s, for %v", errPeerDown, o.id, time.Since(o.downSince).Round(time.Millisecond)))
					continue
				}
				ctx, cancel = context.WithTimeout(o.ctx, left)
			}
			o.seq = p.seq.Add(1)
			seq := strconv.FormatUint(p.inc, 10) + "/" + strconv.FormatUint(o.seq, 10)
			err := o.c.Request(ctx, opAppend, []string{headerEpoch, epoch.String(), headerSeq, seq}, body, finish)
			cancel()
			if err != nil {
				finish(nil, fmt.Errorf("%w: %s: %w", errPeerDown, o.id, err))
			}
		}
	}
}

func (o *peerOut) failQueued(err error) {
	o.mu.Lock()
	o.closed = true
	q := o.q
	o.q = nil
	for _, a := range q {
		o.bytes -= len(a.body)
	}
	o.mu.Unlock()
	for _, a := range q {
		a.done(err)
	}
}

// prune stops the links to peers keep says no (see fwdLinks.prune);
// their queued and pending appends fail. It returns the peers pruned.
func (p *peerLinks) prune(keep func(peer string) bool) []string {
	p.mu.Lock()
	var gone []string
	var outs []*peerOut
	for peer, o := range p.out {
		if !keep(peer) {
			// Cancelled before a new link to peer can be made: the old
			// one sends nothing numbered after the new one's first
			// append (the receiver would apply it out of order).
			o.cancel()
			gone = append(gone, peer)
			outs = append(outs, o)
			delete(p.out, peer)
		}
	}
	p.mu.Unlock()
	for _, o := range outs {
		o.wg.Wait()
		_ = o.c.Close()
	}
	return gone
}

// Close stops every link; queued and pending appends fail.
func (p *peerLinks) Close() {
	p.mu.Lock()
	p.closed = true
	out := p.out
	p.out = nil
	p.mu.Unlock()
	for _, o := range out {
		o.cancel()
		o.wg.Wait()
		_ = o.c.Close()
	}
}

// replicationHandler applies the replication batches owners send to this
// node. An append that does not decode is garbage: the peer is dropped
// and nothing of it applied. A stale epoch or a queue this node serves is
// refused, the link kept.
func replicationHandler(n *replica.Node, epoch func() cluster.EpochID) stomp.PeerHandler {
	type sender struct {
		mu       sync.Mutex // one append of this sender at a time
		inc, seq uint64
		seen     bool
	}
	var mu sync.Mutex
	senders := map[string]*sender{} // bounded by the cluster's nodes
	return stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		if op := f.Header.Get(stomp.PeerHeaderOp); op != opAppend {
			reply(stomp.PeerFail("unknown-op", fmt.Sprintf("unknown operation %q", op)))
			return
		}
		var e cluster.EpochID
		if err := e.UnmarshalText([]byte(f.Header.Get(headerEpoch))); err != nil {
			reply(stomp.PeerDrop("append without a valid " + headerEpoch + " header"))
			return
		}
		incS, seqS, ok := strings.Cut(f.Header.Get(headerSeq), "/")
		inc, err1 := strconv.ParseUint(incS, 10, 64)
		seq, err2 := strconv.ParseUint(seqS, 10, 64)
		if !ok || err1 != nil || err2 != nil {
			reply(stomp.PeerDrop("append without a valid " + headerSeq + " header"))
			return
		}
		// Check, record and submit in one step: the store commits the
		// appends of one sender in sequence order. Per sender: an append
		// that waits (behind an anti-entropy check of its queue) holds
		// up only its own sender.
		mu.Lock()
		sd := senders[peer]
		if sd == nil {
			sd = &sender{}
			senders[peer] = sd
		}
		mu.Unlock()
		sd.mu.Lock()
		defer sd.mu.Unlock()
		if sd.seen && (inc < sd.inc || inc == sd.inc && seq <= sd.seq) {
			reply(stomp.PeerFail("reordered", fmt.Sprintf("append %d/%d after %d/%d from %s: refused", inc, seq, sd.inc, sd.seq, peer)))
			return
		}
		sd.inc, sd.seq, sd.seen = inc, seq, true
		err := n.ApplyReplicated(e, epoch(), f.Body, func(err error) {
			if errors.Is(err, replica.ErrDiverged) {
				reply(stomp.PeerFail("diverged", err.Error()))
				return
			}
			if err != nil {
				reply(stomp.PeerFail("store", err.Error()))
				return
			}
			reply(stomp.PeerOK())
		})
		switch {
		case err == nil:
		case errors.Is(err, replica.ErrBadAppend):
			reply(stomp.PeerDrop(err.Error()))
		case errors.Is(err, replica.ErrStaleEpoch):
			reply(stomp.PeerFail("stale-epoch", err.Error()))
		case errors.Is(err, replica.ErrOwnedHere):
			reply(stomp.PeerFail("owned-here", err.Error()))
		case errors.Is(err, replica.ErrDiverged):
			reply(stomp.PeerFail("diverged", err.Error()))
		default:
			reply(stomp.PeerFail("refused", err.Error()))
		}
	})
}
