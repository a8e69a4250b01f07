package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// Replication over peer links: peerLinks carries a PeerReplicator's
// batches to the other replicas, and replicationHandler applies the
// batches other owners send here.

// opAppend is the peer operation that carries replicated queue writes:
// header x-epoch (the owner's epoch, cluster.EpochID's text form), body
// the replica package's wire form.
const (
	opAppend     = "append"
	headerEpoch  = "x-epoch"
	maxBatchBody = 4 << 20 // appends merged into one request, at most
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
	id        string
	c         *stomp.PeerClient
	downSince time.Time // run's goroutine only
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
	return &peerLinks{base: base, addrOf: addrOf, maxQueued: max(maxQueued, maxBatchBody), log: log, out: map[string]*peerOut{}}
}

// Append implements replica.Peers.
func (p *peerLinks) Append(peer string, epoch cluster.EpochID, body []byte, done func(error)) {
	o, err := p.get(peer)
	if err != nil {
		done(err)
		return
	}
	o.mu.Lock()
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
			epoch := o.q[0].epoch
			n, size := 0, 0
			for n < len(o.q) && o.q[n].epoch == epoch && (n == 0 || size+len(o.q[n].body) <= maxBatchBody) {
				size += len(o.q[n].body)
				n++
			}
			batch := append([]pendingAppend(nil), o.q[:n]...)
			clear(o.q[:n])
			o.q = o.q[n:]
			o.bytes -= size
			o.mu.Unlock()

			body := batch[0].body
			if len(batch) > 1 {
				body = make([]byte, 0, size)
				for _, a := range batch {
					body = append(body, a.body...)
				}
			}
			finish := func(_ *frame.Frame, err error) {
				for _, a := range batch {
					a.done(err)
				}
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
			err := o.c.Request(ctx, opAppend, []string{headerEpoch, epoch.String()}, body, finish)
			cancel()
			if err != nil {
				finish(nil, fmt.Errorf("%w: %s: %w", errPeerDown, o.id, err))
			}
		}
	}
}

func (o *peerOut) failQueued(err error) {
	o.mu.Lock()
	q := o.q
	o.q, o.bytes = nil, 0
	o.mu.Unlock()
	for _, a := range q {
		a.done(err)
	}
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
		err := n.ApplyReplicated(e, epoch(), f.Body, func(err error) {
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
		default:
			reply(stomp.PeerFail("refused", err.Error()))
		}
	})
}
