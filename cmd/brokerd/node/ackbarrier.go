package node

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// Unsynced forwarded ACKs.
//
// An ACK or NACK without a receipt promises the client nothing about
// durability; on a single node it is written to the log without an
// fdatasync, and the next RECEIPT on the connection (a store barrier)
// covers it. An ACK of a delivery from a queue owned elsewhere goes to
// the owner (routedSub.ack) the same way: unsynced there and at the
// owner's replicas. The owner and the queue are recorded here, and every
// barrier of this node (router.Barrier, and router.Apply of a batch with
// Sync) first has each recorded owner sync: an empty ack-keys request
// for the queue (a synced write of nothing at its owner, which waits for
// every earlier write and its replication; nodes of every version answer
// it). Requests to one peer travel in order on one link and the owner
// applies ACKs in arrival order, so the barrier follows the ACKs it
// covers. A receipted ACK, and any ACK once maxAckDirty queues are
// recorded, is synced at the owner as before.

// maxAckDirty bounds the (owner, queue) pairs with unsynced ACKs.
const maxAckDirty = 4096

type ackDirty struct {
	mu    sync.Mutex
	pairs map[[2]string]struct{} // (owner, queue) with unsynced ACKs
	// inflight: barriers sent and not answered yet. A later barrier
	// waits for them too: the pairs they cover were taken out of pairs
	// when they were sent, and the ACKs of its own connection may be
	// among them.
	inflight map[uint64]*ackBarrier
	seq      uint64
}

type ackBarrier struct {
	mu    sync.Mutex
	fired bool
	err   error
	after []func(error)
}

func (b *ackBarrier) fire(err error) {
	b.mu.Lock()
	b.fired, b.err = true, err
	after := b.after
	b.after = nil
	b.mu.Unlock()
	for _, f := range after {
		f(err)
	}
}

// wait calls f with b's outcome once it has one.
func (b *ackBarrier) wait(f func(error)) {
	b.mu.Lock()
	if b.fired {
		err := b.err
		b.mu.Unlock()
		f(err)
		return
	}
	b.after = append(b.after, f)
	b.mu.Unlock()
}

// markAckUnsynced records an unsynced ACK of dest sent to owner. It
// returns false when maxAckDirty pairs are recorded already (unless
// force): the ACK is then sent synced. The ACK is recorded before it is
// sent (so that its x-sync is known) and again, forced, once queued on
// the link: only a barrier queued after it covers it.
func (rt *router) markAckUnsynced(owner, dest string, force bool) bool {
	d := &rt.acks
	d.mu.Lock()
	defer d.mu.Unlock()
	k := [2]string{owner, dest}
	if _, ok := d.pairs[k]; ok {
		return true
	}
	if len(d.pairs) >= maxAckDirty && !force {
		return false
	}
	if d.pairs == nil {
		d.pairs = map[[2]string]struct{}{}
	}
	d.pairs[k] = struct{}{}
	return true
}

// ackBarrierNeeded reports whether a barrier has ACKs to sync or to wait
// for (syncAcks).
func (rt *router) ackBarrierNeeded() bool {
	d := &rt.acks
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.pairs) > 0 || len(d.inflight) > 0
}

// syncAcks has every owner sent unsynced ACKs sync them, and waits for
// the barriers already in flight; done gets nil, or the first error: the
// ACKs' outcome is then unknown.
func (rt *router) syncAcks(done func(error)) {
	d := &rt.acks
	d.mu.Lock()
	pairs := d.pairs
	d.pairs = nil
	waits := make([]*ackBarrier, 0, len(d.inflight)+len(pairs))
	for _, b := range d.inflight {
		waits = append(waits, b)
	}
	type sent struct {
		owner, dest string
		b           *ackBarrier
		id          uint64
	}
	var mine []sent
	for k := range pairs {
		d.seq++
		b := &ackBarrier{}
		if d.inflight == nil {
			d.inflight = map[uint64]*ackBarrier{}
		}
		d.inflight[d.seq] = b
		mine = append(mine, sent{k[0], k[1], b, d.seq})
		waits = append(waits, b)
	}
	d.mu.Unlock()
	all := replica.JoinN(len(waits)+1, done)
	for _, b := range waits {
		b.wait(all)
	}
	for _, s := range mine {
		rt.ackBarrierAt(s.owner, s.dest, func(err error) {
			d.mu.Lock()
			delete(d.inflight, s.id)
			d.mu.Unlock()
			s.b.fire(err)
		})
	}
	all(nil)
}

// ackBarrierAt asks owner to sync the ACKs of dest it was sent: an
// empty ack-keys request. An owner that no longer owns dest released it
// after the ACKs (they are in the store it handed over), and one this
// node cannot reach may have lost them: either way their outcome is
// unknown, and done says so.
func (rt *router) ackBarrierAt(owner, dest string, done func(error)) {
	if owner == rt.view().self {
		rt.rep.Barrier(done) // owned here since: the local store has them
		return
	}
	ctx, cancel := context.WithTimeout(rt.ctx, forwardTimeout)
	err := rt.fwd.request(ctx, owner, opAckKeys, []string{frame.Destination, dest}, nil, func(_ *frame.Frame, err error) {
		cancel()
		if err != nil {
			var pe *stomp.PeerError
			if errors.As(err, &pe) && pe.Code == codeNotOwner {
				err = fmt.Errorf("%w: the queue moved before its acknowledgements were synced: %w", replica.ErrNoQuorum, err)
			} else {
				err = peerErr(err)
			}
		}
		done(err)
	})
	if err != nil {
		cancel()
		done(peerErr(err))
	}
}
