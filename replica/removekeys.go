package replica

import (
	"container/heap"
	"fmt"
	"slices"
	"sort"

	"github.com/brokerd/brokerd/store"
)

// maxSkipLoad bounds destination.skipLoad; beyond it a removed message
// on disk keeps its place in the queue's counts (the loader corrects them
// when it finds the store holds fewer).
const maxSkipLoad = 65536

// RemoveKeys acknowledges the messages of queue dest stored under keys,
// wherever they are in the queue: pending (in memory or on disk), they
// leave it; handed out to a subscription, they stay there until that
// delivery ends, and are then dropped rather than returned (its ACK
// settles it as usual). Every key gets a removal (a tombstone with a
// Replicator), also a key the queue does not hold: removed already, or a
// copy not merged here yet, which then stays removed when it arrives.
//
// It is how a client's ACK takes effect when the subscription binding
// that delivered the message is gone (its owner released the queue and
// took it over again, or ownership moved): keys are unique in the
// cluster and a take-over keeps them, so the queue's current owner finds
// the message under the key its first owner delivered it with. done runs
// once the removals are durable here (synced) and, with a Replicator, on
// the write quorum.
func (n *Node) RemoveKeys(dest string, keys []uint64, done func(error)) error {
	kind, err := ParseDestination(dest)
	if err != nil {
		return err
	}
	if kind != KindQueue {
		return fmt.Errorf("%w: %s is not a queue", ErrBadDestination, dest)
	}
	keys = slices.Clone(keys)
	slices.Sort(keys)
	keys = slices.Compact(keys)
	if len(keys) > 0 && keys[0] == 0 {
		keys = keys[1:] // no message has key 0
	}
	// The body size of each message still stored, read before the
	// queue's lock (a read may wait for the store's applier): one that is
	// on disk leaves the queue's counts with it.
	sizes := make(map[uint64]int64, len(keys))
	for _, k := range keys {
		err := n.st.Scan(dest, k-1, 1, 0, func(key uint64, v []byte) error {
			if key == k {
				sizes[k] = StoredBodyLen(v)
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	d := n.lockDestination(dest, KindQueue)
	ops := make([]store.Op, 0, len(keys))
	var skipped []uint64
	for _, k := range keys {
		ops = append(ops, d.removeOp(k))
		switch d.takeKeyLocked(k, sizes) {
		case keyTaken:
			n.m.acked.Inc()
		case keyOnDisk:
			n.m.acked.Inc()
			skipped = append(skipped, k)
		}
	}
	ops = append(ops, d.dispatchLocked()...)
	d.mu.Unlock()
	// Submitted after d.mu: a callback the store runs at once (closed)
	// takes it. Nothing else writes these keys meanwhile: they are out of
	// the queue, or flagged in flight (no delivery-count rewrite), and a
	// put after a tombstone is ignored anyway.
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
	return nil
}

type keyPlace int

const (
	keyAbsent keyPlace = iota // not in the queue (removed, or never here)
	keyTaken                  // pending in memory, or in flight: taken
	keyOnDisk                 // pending on disk: taken, the loader skips it
)

// takeKeyLocked takes the message stored under key k out of the queue
// (see RemoveKeys). sizes holds the body sizes of the keys still stored.
func (d *destination) takeKeyLocked(k uint64, sizes map[uint64]int64) keyPlace {
	for i, m := range d.requeued {
		if m.Seq == k {
			heap.Remove(&d.requeued, i)
			d.reqBytes -= int64(len(m.Body))
			if m.Expires > 0 {
				d.expiring--
			}
			return keyTaken
		}
	}
	if k <= d.loadedTo {
		w := d.window[d.head:]
		if i := sort.Search(len(w), func(i int) bool { return w[i].Seq >= k }); i < len(w) && w[i].Seq == k {
			m := w[i]
			j := d.head + i
			copy(d.window[j:], d.window[j+1:])
			d.window[len(d.window)-1] = nil
			d.window = d.window[:len(d.window)-1]
			d.windowBytes -= len(m.Body)
			if m.Expires > 0 {
				d.expiring--
			}
			if len(d.window) == d.head {
				d.window, d.head = d.window[:0], 0
				d.holes = false
			} else {
				// The loader could read it again before its delete is
				// visible: the window is kept (releaseLocked).
				d.holes = true
			}
			return keyTaken
		}
	}
	for _, s := range d.subs {
		for _, e := range s.inflight {
			if e.msg.Seq == k {
				if e.acked {
					return keyAbsent
				}
				e.acked = true
				return keyTaken
			}
		}
	}
	size, stored := sizes[k]
	if k > d.loadedTo && k <= d.countedTo && stored && d.onDisk > 0 && len(d.skipLoad) < maxSkipLoad {
		d.onDisk--
		d.onDiskBytes = max(d.onDiskBytes-size, 0)
		if d.skipLoad == nil {
			d.skipLoad = map[uint64]bool{}
		}
		d.skipLoad[k] = false
		return keyOnDisk
	}
	return keyAbsent
}

// removedFromDisk runs once the removals of keys, taken from disk, are
// committed here: a load whose read starts from now on cannot return
// them. One in progress may (its read may have come first), so its
// entries then go when it ends.
func (d *destination) removedFromDisk(keys []uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, k := range keys {
		if _, ok := d.skipLoad[k]; !ok {
			continue
		}
		if d.loading {
			d.skipLoad[k] = true
		} else {
			delete(d.skipLoad, k)
		}
	}
}
