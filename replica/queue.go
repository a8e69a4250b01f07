package replica

import (
	"container/heap"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/brokerd/brokerd/store"
)

// destination is one queue or topic.
//
// A queue's pending messages are the messages of its store bucket that are
// not in flight. Memory holds a window of them: the requeued heap (returned
// by NACK or a closed session, redelivered first, lowest key first) and the
// window slice (read ahead, in key order). Every pending message whose key
// is at most loadedTo is in memory; the onDisk messages above loadedTo are
// only in the store, and the loader reads them in, in key order, as the
// window drains. Keys commit in increasing order within a bucket (see
// Node.wmu), so a message that commits while onDisk is 0 and the window
// has room can join the window directly, and one that commits otherwise
// is found by the loader's next read.
type destination struct {
	name string
	kind Kind
	n    *Node

	mu          sync.Mutex
	window      []*Message // read-ahead, in key order from head
	head        int
	windowBytes int
	requeued    msgHeap // returned messages, lowest key first
	reqBytes    int64
	loadedTo    uint64     // every pending message with a key <= loadedTo is in memory
	countedTo   uint64     // the highest key whose commit this queue has counted (committed ran)
	inheritedTo uint64     // keys <= this came from a previous owner (Adopt): delivered as redelivered
	adopted     bool       // with a Replicator: counters read from the bucket (Adopt); guarded by Node.mu
	holes       bool       // messages were removed from the window's middle (their deletes may not be visible yet)
	rewrites    []store.Op // delivery-count rewrites to submit before d.mu is released
	onDisk      int64      // pending messages with a key > loadedTo
	onDiskBytes int64      // their body bytes
	diskGen     uint64     // counts messages added to onDisk, so a read that found none can tell
	loading     bool       // queued for, or in, the loader
	reserved    int64      // accepted SENDs not yet committed
	resBytes    int64
	expiring    int // pending messages in memory with an expiry
	subs        []*Subscription
	rr          int
	idleSince   time.Time
	removed     bool // taken out of Node.dests by the sweeper
	// created: the queue exists (see existsLocked) even while idle; set
	// once a message committed to it or it had a subscriber, or it was
	// found in the store (Recover, Adopt).
	created bool
	// awaitingQuorum counts messages committed here whose write quorum is
	// not known yet: the window is kept meanwhile (releaseLocked), so
	// that unconfirmed finds them in memory.
	awaitingQuorum int
	// unconfirmedOnDisk holds keys of messages stored without their
	// quorum that were on disk only when it failed (a full read-ahead
	// window): the loader marks them (bounded by maxUnconfirmedOnDisk).
	unconfirmedOnDisk map[uint64]struct{}
	// skipLoad holds keys of messages on disk that RemoveKeys took out
	// of the queue (and its counts): a load whose read came before their
	// removal committed skips them. An entry goes when a load meets its
	// key, or once its removal is committed and no load that may have
	// read before that is in progress (true: committed during the load
	// in progress, which removes it when it ends).
	skipLoad map[uint64]bool
}

// maxUnconfirmedOnDisk bounds destination.unconfirmedOnDisk; beyond it,
// such messages keep their record's delivery count (their rewrite is
// still submitted).
const maxUnconfirmedOnDisk = 65536

// removeOp removes the message under key for good (acknowledged,
// expired, dead-lettered, dropped by overflow). With a Replicator it
// leaves a tombstone, so a copy of the message that reaches this bucket
// later (a replica that missed the removal, a peer's copy pulled at a
// take-over) stays removed; a node of its own needs none.
func (d *destination) removeOp(key uint64) store.Op {
	kind := store.OpDelete
	if d.n.rep != nil {
		kind = store.OpTombstone
	}
	return store.Op{Kind: kind, Bucket: d.name, Key: key}
}

func (d *destination) memLen() int { return len(d.window) - d.head + len(d.requeued) }

// readyLen is the number of pending messages, in memory and on disk.
func (d *destination) readyLen() int64 { return int64(d.memLen()) + d.onDisk }

// readyBytes is the body bytes of the pending messages.
func (d *destination) readyBytes() int64 { return int64(d.windowBytes) + d.reqBytes + d.onDiskBytes }

// existsLocked reports whether queue d exists: it holds messages, has
// subscribers or writes in progress, or was created before (created).
func (d *destination) existsLocked() bool { return d.created || !d.idleLocked() }

func (d *destination) idleLocked() bool {
	if len(d.subs) > 0 || d.readyLen() > 0 || d.reserved > 0 || d.loading {
		return false
	}
	return true
}

// reserveLocked admits m under the queue's limits, counting it as
// reserved until its commit ends (committed or unreserve).
func (d *destination) reserveLocked(m *Message) error {
	cfg := &d.n.cfg
	if cfg.Overflow == OverflowRejectPublish {
		if cfg.MaxLength > 0 && d.readyLen()+d.reserved+1 > cfg.MaxLength {
			d.n.m.rejected.Inc()
			return fmt.Errorf("%w: %s holds %d messages, its limit (queue.max_length) is %d", ErrQueueFull, d.name, d.readyLen(), cfg.MaxLength)
		}
		if cfg.MaxBytes > 0 && d.readyBytes()+d.resBytes+int64(len(m.Body)) > cfg.MaxBytes {
			d.n.m.rejected.Inc()
			return fmt.Errorf("%w: %s holds %d bytes of message bodies, its limit (queue.max_bytes) is %d", ErrQueueFull, d.name, d.readyBytes(), cfg.MaxBytes)
		}
	}
	d.reserved++
	d.resBytes += int64(len(m.Body))
	d.idleSince = time.Time{}
	return nil
}

func (d *destination) unreserve(m *Message) {
	d.mu.Lock()
	d.reserved--
	d.resBytes -= int64(len(m.Body))
	d.mu.Unlock()
}

// committed makes m, now in the store, pending: in the window when it can
// go there, else on disk for the loader.
func (d *destination) committed(m *Message) {
	d.mu.Lock()
	d.reserved--
	d.resBytes -= int64(len(m.Body))
	d.countedTo = max(d.countedTo, m.Seq)
	d.created = true
	if m.Seq <= d.loadedTo {
		// Cannot happen: keys commit in order and the loader reads only
		// keys already counted here. Keep the message rather than lose it.
		d.n.log.Error("message committed below the read position", "dest", d.name, "key", m.Seq, "loaded_to", d.loadedTo)
		d.insertWindowLocked(m)
	} else if d.onDisk == 0 && len(d.window)-d.head < d.n.cfg.ReadAheadMessages &&
		d.windowBytes+len(m.Body) <= d.n.cfg.ReadAheadBytes {
		d.window = append(d.window, m)
		d.windowBytes += len(m.Body)
		d.loadedTo = m.Seq
		if m.Expires > 0 {
			d.expiring++
		}
	} else {
		d.onDisk++
		d.onDiskBytes += int64(len(m.Body))
		d.diskGen++
	}
	ops := d.enforceLimitsLocked()
	ops = append(ops, d.dispatchLocked()...)
	d.mu.Unlock()
	d.n.m.published.WithLabelValues("queue").Inc()
	d.n.submit(ops)
}

func (d *destination) insertWindowLocked(m *Message) {
	for _, w := range d.window[d.head:] {
		if w.Seq == m.Seq {
			return
		}
	}
	i := len(d.window)
	for i > d.head && d.window[i-1].Seq > m.Seq {
		i--
	}
	d.window = append(d.window, nil)
	copy(d.window[i+1:], d.window[i:])
	d.window[i] = m
	d.windowBytes += len(m.Body)
	if m.Expires > 0 {
		d.expiring++
	}
}

// enforceLimitsLocked removes the oldest pending messages held in memory
// while a drop-head queue is over a limit. A head still on disk is
// removed once the loader has read it in.
func (d *destination) enforceLimitsLocked() []store.Op {
	cfg := &d.n.cfg
	if cfg.Overflow != OverflowDropHead || (cfg.MaxLength <= 0 && cfg.MaxBytes <= 0) {
		return nil
	}
	var ops []store.Op
	for d.memLen() > 0 && ((cfg.MaxLength > 0 && d.readyLen() > cfg.MaxLength) ||
		(cfg.MaxBytes > 0 && d.readyBytes() > cfg.MaxBytes)) {
		m := d.pop()
		if m.Expires > 0 {
			d.expiring--
		}
		d.n.m.droppedHead.Inc()
		ops = append(ops, d.removeOp(m.Seq))
	}
	if d.onDisk > 0 && ((cfg.MaxLength > 0 && d.readyLen() > cfg.MaxLength) ||
		(cfg.MaxBytes > 0 && d.readyBytes() > cfg.MaxBytes)) {
		d.scheduleLoadLocked(true)
	}
	return ops
}

// pop takes the next pending message in memory: requeued first.
func (d *destination) pop() *Message {
	if len(d.requeued) > 0 {
		m := heap.Pop(&d.requeued).(*Message)
		d.reqBytes -= int64(len(m.Body))
		return m
	}
	m := d.window[d.head]
	d.window[d.head] = nil
	d.head++
	d.windowBytes -= len(m.Body)
	if d.head == len(d.window) {
		d.window, d.head = d.window[:0], 0
		d.holes = false
	} else if d.head > 1024 && d.head*2 > len(d.window) {
		d.window = append(d.window[:0], d.window[d.head:]...)
		d.head = 0
	}
	return m
}

func (d *destination) expiredOp(m *Message) store.Op {
	d.n.m.expired.Inc()
	return d.removeOp(m.Seq)
}

// expireLocked drops the expired messages held in memory.
func (d *destination) expireLocked(now time.Time) []store.Op {
	if d.expiring == 0 {
		return nil
	}
	var ops []store.Op
	keep := d.window[d.head:d.head]
	for _, m := range d.window[d.head:] {
		if m.Expired(now) {
			d.expiring--
			d.windowBytes -= len(m.Body)
			ops = append(ops, d.expiredOp(m))
			d.holes = true
			continue
		}
		keep = append(keep, m)
	}
	if len(keep) == 0 {
		d.holes = false // nothing left above them in memory
	}
	for i := d.head + len(keep); i < len(d.window); i++ {
		d.window[i] = nil
	}
	d.window = d.window[:d.head+len(keep)]
	rq := d.requeued[:0]
	for _, m := range d.requeued {
		if m.Expired(now) {
			d.expiring--
			d.reqBytes -= int64(len(m.Body))
			ops = append(ops, d.expiredOp(m))
			continue
		}
		rq = append(rq, m)
	}
	for i := len(rq); i < len(d.requeued); i++ {
		d.requeued[i] = nil
	}
	d.requeued = rq
	heap.Init(&d.requeued)
	return ops
}

// releaseLocked gives back the read-ahead window of a queue without
// subscribers: its messages are on disk, and are read again when a
// subscriber comes. Requeued messages stay (they are few: they were in
// flight).
func (d *destination) releaseLocked() {
	if len(d.subs) > 0 || d.loading || len(d.window) == d.head || d.holes || d.awaitingQuorum > 0 {
		// With holes, the loader could read again a message whose
		// delete is not visible yet: keep the window.
		return
	}
	first := d.window[d.head].Seq
	for _, m := range d.requeued {
		if m.Seq >= first {
			return // keys no longer split cleanly; keep the window
		}
	}
	for _, m := range d.window[d.head:] {
		if m.Expires > 0 {
			d.expiring--
		}
	}
	d.onDisk += int64(len(d.window) - d.head)
	d.onDiskBytes += int64(d.windowBytes)
	d.diskGen++
	d.loadedTo = first - 1
	d.window, d.head, d.windowBytes = nil, 0, 0
}

// scheduleLoadLocked queues d for the loader when its window runs low and
// messages wait on disk, and it has a subscriber (or force).
func (d *destination) scheduleLoadLocked(force bool) {
	if d.loading || d.onDisk == 0 || (!force && len(d.subs) == 0) {
		return
	}
	if len(d.window)-d.head > d.n.cfg.ReadAheadMessages/2 || d.windowBytes > d.n.cfg.ReadAheadBytes/2 {
		return
	}
	d.loading = true
	d.n.queueLoad(d)
}

// dispatchLocked hands pending messages to subscriptions with room, round
// robin, and returns the store writes it needs (deletes of expired messages).
func (d *destination) dispatchLocked() []store.Op {
	if d.kind != KindQueue {
		return nil
	}
	var ops []store.Op
	now := d.n.cfg.Now()
	for d.memLen() > 0 && len(d.subs) > 0 {
		var s *Subscription
		for i := 0; i < len(d.subs); i++ {
			c := d.subs[(d.rr+i)%len(d.subs)]
			if c.hasRoom() {
				s = c
				d.rr = (d.rr + i + 1) % len(d.subs)
				break
			}
		}
		if s == nil {
			break
		}
		m := d.pop()
		if m.Expires > 0 {
			d.expiring--
		}
		if m.Expired(now) {
			ops = append(ops, d.expiredOp(m))
			continue
		}
		s.deliverLocked(m)
	}
	d.scheduleLoadLocked(false)
	return ops
}

// requeueLocked returns m to pending, or, when it has failed too often,
// adds it to nk for the dead-letter queue and returns the delete of the
// original. ops gets the store writes.
//
// delivered: m reached the wire. failed: its delivery failed (a NACK, or
// the client's connection was lost), which counts toward
// MaxRedeliveries. A delivery returned for another reason (the client
// unsubscribed or disconnected, the broker ended the subscription) does
// not count: m only comes back marked as possibly delivered (a count of
// at least 1).
func (d *destination) requeueLocked(m *Message, delivered, failed bool, ops []store.Op, nk *newKeys) []store.Op {
	n := d.n
	counted := delivered && failed
	if delivered {
		n.m.redelivered.Inc()
	}
	marked := false
	switch {
	case counted:
		m.Deliveries++
		marked = true
	case delivered && m.Deliveries == 0:
		m.Deliveries = 1
		marked = true
	}
	if counted && n.cfg.MaxRedeliveries > 0 && m.Deliveries > n.cfg.MaxRedeliveries &&
		!isDLQ(d.name, n.cfg.DLQPrefix) {
		dl := &Message{
			Dest:    n.cfg.DLQPrefix + d.name[len(QueuePrefix):],
			ID:      m.ID,
			Headers: append(append([]string(nil), m.Headers...), "x-original-destination", d.name),
			Body:    m.Body,
		}
		n.m.deadLettered.Inc()
		// The dead-letter queue is found, and the message reserved on it,
		// by commit: d.mu is held here, and Node.mu comes before it.
		nk.add(nil, dl)
		return append(ops, d.removeOp(m.Seq))
	}
	heap.Push(&d.requeued, m)
	d.reqBytes += int64(len(m.Body))
	if m.Expires > 0 {
		d.expiring++
	}
	if !delivered && m.unconfirmed && m.Deliveries == 0 {
		// Handed out unwritten and stored without its quorum: it goes
		// out marked (unconfirmed).
		m.Deliveries = 1
		d.rewrites = append(d.rewrites, store.Op{Kind: store.OpPut, Bucket: d.name, Key: m.Seq, Value: m.encode()})
		return ops
	}
	if !marked {
		return ops
	}
	// Keep the delivery count across restarts. The rewrite is submitted
	// before d.mu is released (flushRewritesLocked): the message can be
	// dispatched again, and acknowledged, as soon as it is, and a rewrite
	// reaching the store after that delete would bring it back.
	d.rewrites = append(d.rewrites, store.Op{Kind: store.OpPut, Bucket: d.name, Key: m.Seq, Value: m.encode()})
	return ops
}

// unconfirmed marks m, committed here without its write quorum, as
// possibly delivered (a delivery count of 1): the producer was told its
// outcome is unknown and may store it again, and the other copy may be
// delivered before this one. Where m is decides how:
//   - pending in the read-ahead window: the window gets a marked copy;
//   - returned (requeued) and not yet marked: it is marked in place;
//   - on disk only (the window was full at its commit): its record is
//     rewritten, and the loader marks it when it reads it (the rewrite
//     may commit after that read);
//   - handed out: flagged, so that a return of a delivery that never
//     reached the client marks it (any real redelivery is marked anyway);
//   - acknowledged or otherwise removed, or the queue released to another
//     owner: nothing (a rewrite would bring back a removed record, or
//     write into a copy this node no longer owns).
//
// Every mark is rewritten to the store like a delivery count. m belongs
// to its queue (the router applies copies); its fields are guarded by
// d.mu.
func (d *destination) unconfirmed(m *Message) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.awaitingQuorum = max(d.awaitingQuorum-1, 0)
	if d.removed || m.Deliveries > 0 {
		return
	}
	mark := func(c *Message) {
		c.Deliveries = 1
		d.rewrites = append(d.rewrites, store.Op{Kind: store.OpPut, Bucket: d.name, Key: c.Seq, Value: c.encode()})
		d.flushRewritesLocked()
	}
	// From the tail: a message whose quorum just failed was committed
	// lately, so it is near the end of the window.
	for i := len(d.window) - 1; i >= d.head; i-- {
		if d.window[i] == m {
			c := *m
			d.window[i] = &c
			mark(&c)
			return
		}
		if d.window[i] != nil && d.window[i].Seq < m.Seq {
			break // keys grow along the window: m is not in it
		}
	}
	for _, r := range d.requeued {
		if r == m {
			mark(m)
			return
		}
	}
	if m.Seq > d.loadedTo {
		if d.unconfirmedOnDisk == nil {
			d.unconfirmedOnDisk = map[uint64]struct{}{}
		}
		if len(d.unconfirmedOnDisk) < maxUnconfirmedOnDisk {
			d.unconfirmedOnDisk[m.Seq] = struct{}{}
		}
		c := *m
		mark(&c)
		return
	}
	m.unconfirmed = true
}

// quorumKnown ends the wait for m's write quorum when it was met (or the
// local commit failed): the window may be released again.
func (d *destination) quorumKnown() {
	d.mu.Lock()
	d.awaitingQuorum = max(d.awaitingQuorum-1, 0)
	d.mu.Unlock()
}

// flushRewritesLocked submits the delivery-count rewrites decided under
// d.mu, before anything else can write the same keys. Submit never waits
// for a destination lock (the store's callbacks run on their own
// goroutine), so calling it with d.mu held cannot deadlock.
func (d *destination) flushRewritesLocked() {
	if len(d.rewrites) == 0 {
		return
	}
	ops := d.rewrites
	d.rewrites = nil
	d.n.write(ops, false, d.n.internalDone, nil)
}

func isDLQ(name, prefix string) bool {
	return len(name) >= len(prefix) && name[:len(prefix)] == prefix
}

func (d *destination) removeSub(s *Subscription) {
	for i, c := range d.subs {
		if c == s {
			d.subs = append(d.subs[:i], d.subs[i+1:]...)
			if d.rr > i {
				d.rr--
			}
			if len(d.subs) > 0 {
				d.rr %= len(d.subs)
			} else {
				d.rr = 0
			}
			return
		}
	}
}

// queueLoad hands d to the loader.
func (n *Node) queueLoad(d *destination) {
	n.loadMu.Lock()
	n.loadQ = append(n.loadQ, d)
	n.loadMu.Unlock()
	select {
	case n.loadSig <- struct{}{}:
	default:
	}
}

// loadLoop reads queues' backlogs into their windows, one queue at a
// time, off every lock.
func (n *Node) loadLoop() {
	defer n.wg.Done()
	for {
		select {
		case <-n.stop:
			return
		case <-n.loadSig:
		}
		for {
			n.loadMu.Lock()
			if len(n.loadQ) == 0 {
				n.loadMu.Unlock()
				break
			}
			d := n.loadQ[0]
			n.loadQ[0] = nil
			n.loadQ = n.loadQ[1:]
			n.loadMu.Unlock()
			n.load(d)
			select {
			case <-n.stop:
				return
			default:
			}
		}
	}
}

// errScanDone stops a Scan at the first key not yet counted.
var errScanDone = errors.New("scan done")

// load reads the next messages of d's backlog into its window. It takes
// only keys this queue has already counted (committed ran): the store can
// show a commit whose callback has not run yet, and that callback would
// add the message a second time.
func (n *Node) load(d *destination) {
	d.mu.Lock()
	from, upTo := d.loadedTo, d.countedTo
	limit := max(n.cfg.ReadAheadMessages-(len(d.window)-d.head), 1)
	maxBytes := max(n.cfg.ReadAheadBytes-d.windowBytes, 1)
	gen := d.diskGen
	d.mu.Unlock()

	var msgs []*Message
	var bad []uint64
	err := n.st.Scan(d.name, from, limit, maxBytes, func(key uint64, value []byte) error {
		if key > upTo {
			return errScanDone
		}
		m, err := decodeMessage(d.name, key, value)
		if err != nil {
			n.log.Error("corrupt message record skipped", "dest", d.name, "key", key, "err", err)
			n.m.corrupt.Inc()
			bad = append(bad, key)
			return nil
		}
		msgs = append(msgs, m)
		return nil
	})
	if errors.Is(err, errScanDone) {
		err = nil
	}

	d.mu.Lock()
	d.loading = false
	if err != nil {
		d.mu.Unlock()
		// A failed read is a failed store, which stops the node.
		n.log.Error("queue read failed", "dest", d.name, "err", err)
		return
	}
	var ops []store.Op
	now := n.cfg.Now()
	took := func(key uint64, body int) {
		d.onDisk--
		d.onDiskBytes -= int64(body)
		d.loadedTo = key
	}
	bi := 0
	for _, m := range msgs {
		for bi < len(bad) && bad[bi] < m.Seq {
			took(bad[bi], 0)
			bi++
		}
		if _, ok := d.skipLoad[m.Seq]; ok {
			// Removed (RemoveKeys), and no longer counted.
			delete(d.skipLoad, m.Seq)
			d.loadedTo = m.Seq
			continue
		}
		took(m.Seq, len(m.Body))
		if _, ok := d.unconfirmedOnDisk[m.Seq]; ok {
			delete(d.unconfirmedOnDisk, m.Seq)
			m.Deliveries = max(m.Deliveries, 1)
		}
		if m.Expired(now) {
			ops = append(ops, d.expiredOp(m))
			continue
		}
		d.window = append(d.window, m)
		d.windowBytes += len(m.Body)
		if m.Expires > 0 {
			d.expiring++
		}
	}
	for ; bi < len(bad); bi++ {
		took(bad[bi], 0)
	}
	for k, committed := range d.skipLoad {
		if committed || k <= d.loadedTo {
			delete(d.skipLoad, k)
		}
	}
	if len(msgs) == 0 && len(bad) == 0 && d.diskGen == gen && d.onDisk != 0 && d.countedTo == upTo {
		n.log.Error("queue count disagrees with the store; corrected", "dest", d.name, "counted", d.onDisk)
		d.onDisk, d.onDiskBytes = 0, 0
	}
	if d.onDisk < 0 || d.onDiskBytes < 0 {
		n.log.Error("queue count below zero; corrected", "dest", d.name, "on_disk", d.onDisk, "bytes", d.onDiskBytes)
		d.onDisk, d.onDiskBytes = max(d.onDisk, 0), max(d.onDiskBytes, 0)
	}
	ops = append(ops, d.enforceLimitsLocked()...)
	ops = append(ops, d.dispatchLocked()...)
	d.mu.Unlock()
	n.submit(ops)
}

// msgHeap orders messages by key.
type msgHeap []*Message

func (h msgHeap) Len() int           { return len(h) }
func (h msgHeap) Less(i, j int) bool { return h[i].Seq < h[j].Seq }
func (h msgHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *msgHeap) Push(x any)        { *h = append(*h, x.(*Message)) }
func (h *msgHeap) Pop() any {
	old := *h
	m := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return m
}
