package replica

import (
	"context"
	"fmt"

	"github.com/brokerd/brokerd/store"
)

// purgeChunk bounds the keys one round of Purge reads and removes.
const purgeChunk = 8192

// purgeRoundHook, when set (tests), runs between two rounds of a purge.
var purgeRoundHook func()

// Purge removes the ready messages of queue dest, in memory and on disk,
// as RabbitMQ's queue purge does: the messages handed out to a
// subscription and not yet acknowledged stay (their ACK or NACK settles
// them as usual). It returns how many it removed.
//
// Each message leaves as an acknowledgement does: with a Replicator, a
// tombstone replicated to the queue's other replicas, so a purged message
// does not come back from a copy after a failover, a take-over or an
// anti-entropy merge. It returns once every round's removals are durable
// here (synced) and, with a Replicator, on the write quorum; an error
// after some rounds leaves those removed (the count says how many).
// Messages committed while it runs (above the highest key the queue had
// counted when its first round began) are after the purge and stay. The queue
// must exist (QueueExists): dest names a queue this node serves.
//
// Memory is bounded: the bucket is read purgeChunk keys at a time.
func (n *Node) Purge(ctx context.Context, dest string) (int, error) {
	kind, err := ParseDestination(dest)
	if err != nil {
		return 0, err
	}
	if kind != KindQueue {
		return 0, fmt.Errorf("%w: %s is not a queue", ErrBadDestination, dest)
	}
	removed := 0
	var after uint64
	// bound is the highest key counted when the purge began: a message
	// committed later (a SEND receipted while a long purge runs) stays.
	var bound uint64
	first := true
	for {
		if err := ctx.Err(); err != nil {
			return removed, err
		}
		// The keys and body sizes of the next chunk, read before the
		// queue's lock (a read may wait for the store's applier).
		keys := make([]uint64, 0, purgeChunk)
		sizes := make(map[uint64]int64, purgeChunk)
		err := n.st.Scan(dest, after, purgeChunk, 0, func(key uint64, v []byte) error {
			keys = append(keys, key)
			sizes[key] = StoredBodyLen(v)
			return nil
		})
		if err != nil {
			return removed, fmt.Errorf("purge %s: reading the queue: %w", dest, err)
		}
		if len(keys) == 0 {
			return removed, nil
		}
		after = keys[len(keys)-1]
		d := n.lockDestination(dest, KindQueue)
		if first {
			bound, first = d.countedTo, false
		}
		inflight := map[uint64]bool{}
		for _, s := range d.subs {
			for _, e := range s.inflight {
				inflight[e.msg.Seq] = true
			}
		}
		last := false
		var skipped []uint64
		var ops []store.Op
		round := 0
		for _, k := range keys {
			if k > bound {
				last = true // committed after the purge began: it stays
				break
			}
			if inflight[k] {
				continue // delivered, not acknowledged: it stays
			}
			switch d.takeKeyLocked(k, sizes) {
			case keyTaken:
			case keyOnDisk:
				skipped = append(skipped, k)
			default:
				if k <= d.loadedTo {
					continue // not pending any more (acknowledged, expired)
				}
				// Pending on disk past the skip set's bound: removed from
				// the store all the same; the loader corrects the counts.
			}
			ops = append(ops, d.removeOp(k))
			round++
		}
		d.mu.Unlock()
		if len(ops) > 0 {
			ch := make(chan error, 1)
			done := func(err error) { ch <- err }
			var quorum func(error)
			local := done
			if n.rep != nil {
				local, quorum = join2(done)
			}
			n.write(ops, true, func(err error) {
				if len(skipped) > 0 {
					d.removedFromDisk(skipped)
				}
				local(err)
			}, quorum)
			if err := <-ch; err != nil {
				return removed, fmt.Errorf("purge %s: %w", dest, err)
			}
			removed += round
		}
		if last || len(keys) < purgeChunk {
			return removed, nil
		}
		if purgeRoundHook != nil {
			purgeRoundHook()
		}
	}
}
