package replica

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/store"
)

// Replication copies the store writes of each queue from its owner to the
// queue's other replicas. The owner's Node submits every write to its
// store and hands the same ops, in the same step (Node.rmu), to its
// Replicator, which queues them per peer: each peer receives, in order,
// exactly the writes of the queues it is a replica of, and applies them to
// its own store (Node.ApplyReplicated) with fdatasync before it answers.
// A replica's bucket is therefore a copy of the owner's: same keys, same
// records, same deletions; a replica that becomes owner reads it like a
// restarted node reads its own (Node.Adopt).

// Replicator copies a Node's queue writes to the queues' other replicas.
type Replicator interface {
	// Replicate sends ops, just submitted to the local store in this
	// order, to the other replicas of the queues they touch. It must not
	// block. quorum, if not nil, is called once: with nil when every queue
	// touched has its write quorum of durable copies (the local one
	// counted), or with an error (ErrNoQuorum) once one cannot. Without
	// ops it calls quorum(nil) at once: the writes before it have quorums
	// of their own, which their callers wait for.
	Replicate(ops []store.Op, sync bool, quorum func(error))
}

// writeCounter is a Replicator that wants to know of a write before it is
// submitted to the local store (anti-entropy: PeerReplicator).
type writeCounter interface {
	WriteStarting(ops []store.Op)
}

// SetReplicator makes n replicate its queue writes through r. Call it
// before Start and before any client is served.
func (n *Node) SetReplicator(r Replicator) { n.rep = r }

// SetOnRemoved makes n call f with the name of each queue it drops from
// memory because the queue does not exist (refused a SEND or SUBSCRIBE
// that may not create it) or was removed as idle, after n's locks are
// released: a router forgets what it knew of the queue. Call it before
// Start.
func (n *Node) SetOnRemoved(f func(dest string)) { n.onRemoved = f }

// SetKeepIdle makes n ask keep, with no lock of n held, before it removes
// an idle queue: true keeps it (for now; it is asked again at the next
// sweep). A router keeps a queue whose take-over could not read every
// copy: the removal's bucket delete, replicated, would destroy messages
// only an unread copy holds. Call it before Start.
func (n *Node) SetKeepIdle(keep func(dest string) bool) { n.keepIdle = keep }

// Errors of replication.
var (
	// ErrNoQuorum: fewer than the write quorum of a queue's replicas
	// confirmed a write. The write is stored here and may still be
	// delivered; the client is told its outcome is unknown.
	ErrNoQuorum = errors.New("fewer replicas than the write quorum confirmed the write")
	// ErrStaleEpoch: an append from an owner acting under an older epoch
	// than this replica has seen; nothing was applied.
	ErrStaleEpoch = errors.New("append from an owner with an older epoch")
	// ErrOwnedHere: an append for a queue this node serves as its owner;
	// nothing was applied.
	ErrOwnedHere = errors.New("append for a queue this node owns")
	// ErrNoCatchUp: a catch-up put for a queue this replica is not
	// catching up (it restarted, or gave the catch-up up); nothing was
	// applied, and the owner begins again.
	ErrNoCatchUp = errors.New("catch-up put outside a catch-up")
	// ErrBadAppend: an append whose encoding or content is invalid;
	// nothing was applied.
	ErrBadAppend = errors.New("invalid append")
	// ErrDiverged: an anti-entropy check found the replica's copy of a
	// queue different from the owner's summary; the owner rebuilds it.
	ErrDiverged = errors.New("the replica's copy differs from the owner's")
)

// Wire form of a batch of replicated ops: each op is its kind (one byte:
// 1 put, 2 delete, 4 delete-bucket, 8 tombstone, and for catch-up 5
// begin, 6 put, 7 end), the bucket (uvarint length, bytes), then for puts,
// deletes and tombstones the key (uvarint), and for puts the value
// (uvarint length, bytes).
const (
	wirePut          = byte(store.OpPut)
	wireDelete       = byte(store.OpDelete)
	wireDeleteBucket = byte(store.OpDeleteBucket)
	// Catch-up (see PeerReplicator.catchUp): begin drops the replica's
	// copy and starts recording the keys deleted since; a catch-up put
	// stores a record read from the owner's bucket unless its key was
	// deleted since begin; end closes the catch-up.
	wireCatchUpBegin = byte(5)
	wireCatchUpPut   = byte(6)
	wireCatchUpEnd   = byte(7)
	// A tombstone removes a message and keeps it removed (store.OpTombstone).
	wireTombstone = byte(8)
	// An anti-entropy check (alone in its batch): the bucket, then the
	// owner's count (uvarint), bytes (uvarint) and key hash (8 bytes,
	// big-endian) of the queue as of the writes sent before it. The
	// replica compares them with its own copy once those are applied,
	// and answers ErrDiverged when they differ.
	wireCheck = byte(9)
	// First byte of a batch of removals the owner did not fsync (ACKs
	// without a receipt): the replica commits it without an fdatasync of
	// its own, as the owner did, and the next synced batch's fdatasync
	// covers it (the log is written in order). Until then a power loss
	// of the replica's host can lose it: the message comes back, a
	// duplicate marked redelivered, never a loss. Batches with a put (a
	// message, a delivery count) are always synced on the replicas.
	wireNoSync = byte(10)
)

// appendCheck appends a check of bucket against sum to b.
func appendCheck(b []byte, bucket string, sum store.BucketStats) []byte {
	b = append(b, wireCheck)
	b = binary.AppendUvarint(b, uint64(len(bucket)))
	b = append(b, bucket...)
	b = binary.AppendUvarint(b, uint64(sum.Count))
	b = binary.AppendUvarint(b, uint64(sum.Bytes))
	return binary.BigEndian.AppendUint64(b, sum.KeyHash)
}

// wireKind is the wire kind of a plain store op (0: not replicated).
func wireKind(k store.OpKind) byte {
	switch k {
	case store.OpPut:
		return wirePut
	case store.OpDelete:
		return wireDelete
	case store.OpDeleteBucket:
		return wireDeleteBucket
	case store.OpTombstone:
		return wireTombstone
	}
	return 0
}

// wireOp is one decoded op with its wire kind.
type wireOp struct {
	kind byte
	op   store.Op
	sum  store.BucketStats // a check's summary
}

// AppendOps appends the wire form of ops to b. Only queue writes are
// encoded: meta writes are a node's own and are skipped.
func AppendOps(b []byte, ops []store.Op) []byte {
	for i := range ops {
		op := &ops[i]
		if k := wireKind(op.Kind); k != 0 {
			b = appendWire(b, k, op)
		}
	}
	return b
}

func appendWire(b []byte, kind byte, op *store.Op) []byte {
	b = append(b, kind)
	b = binary.AppendUvarint(b, uint64(len(op.Bucket)))
	b = append(b, op.Bucket...)
	switch kind {
	case wirePut, wireCatchUpPut:
		b = binary.AppendUvarint(b, op.Key)
		b = binary.AppendUvarint(b, uint64(len(op.Value)))
		b = append(b, op.Value...)
	case wireDelete, wireTombstone:
		b = binary.AppendUvarint(b, op.Key)
	}
	return b
}

// maxBucketName bounds a destination name on the wire (the STOMP edge's
// header limit is far below it).
const maxBucketName = store.MaxBucketName

// DecodeOps parses the wire form of a batch of plain writes (no catch-up
// ops). Every op must be a queue write: a put of a readable message
// record under a key > 0, a delete of a key > 0, or a bucket delete, on a
// /queue/ destination. Values alias b.
func DecodeOps(b []byte) ([]store.Op, error) {
	wops, err := decodeWire(b)
	if err != nil {
		return nil, err
	}
	ops := make([]store.Op, len(wops))
	for i, w := range wops {
		if w.kind != wireKind(w.op.Kind) {
			return nil, fmt.Errorf("%w: catch-up op %d in a plain batch", ErrBadAppend, w.kind)
		}
		ops[i] = w.op
	}
	return ops, nil
}

// decodeWire parses the wire form of a batch, catch-up ops included.
func decodeWire(b []byte) ([]wireOp, error) {
	var ops []wireOp
	for len(b) > 0 {
		kind := b[0]
		b = b[1:]
		var sk store.OpKind
		switch kind {
		case wirePut, wireCatchUpPut:
			sk = store.OpPut
		case wireDelete:
			sk = store.OpDelete
		case wireTombstone:
			sk = store.OpTombstone
		case wireDeleteBucket, wireCatchUpBegin, wireCatchUpEnd:
			sk = store.OpDeleteBucket // begin's effect; end writes nothing
		case wireCheck:
			sk = 0 // writes nothing
		default:
			return nil, fmt.Errorf("%w: op kind %d", ErrBadAppend, int(kind))
		}
		l, n := binary.Uvarint(b)
		if n <= 0 || l == 0 || l > maxBucketName || l > uint64(len(b)-n) {
			return nil, fmt.Errorf("%w: bucket name", ErrBadAppend)
		}
		op := store.Op{Kind: sk, Bucket: string(b[n : n+int(l)])}
		b = b[n+int(l):]
		if k, err := ParseDestination(op.Bucket); err != nil || k != KindQueue {
			return nil, fmt.Errorf("%w: %q is not a queue", ErrBadAppend, op.Bucket)
		}
		if kind == wireCheck {
			w := wireOp{kind: kind, op: op}
			w.sum.Name = op.Bucket
			count, n := binary.Uvarint(b)
			if n <= 0 || count > 1<<62 {
				return nil, fmt.Errorf("%w: check count", ErrBadAppend)
			}
			b = b[n:]
			size, n := binary.Uvarint(b)
			if n <= 0 || size > 1<<62 || len(b)-n < 8 {
				return nil, fmt.Errorf("%w: check summary", ErrBadAppend)
			}
			w.sum.Count, w.sum.Bytes = int64(count), int64(size)
			w.sum.KeyHash = binary.BigEndian.Uint64(b[n:])
			b = b[n+8:]
			ops = append(ops, w)
			continue
		}
		if sk == store.OpPut || sk == store.OpDelete || sk == store.OpTombstone {
			key, n := binary.Uvarint(b)
			if n <= 0 || key == 0 {
				return nil, fmt.Errorf("%w: key", ErrBadAppend)
			}
			op.Key = key
			b = b[n:]
		}
		if sk == store.OpPut {
			l, n := binary.Uvarint(b)
			if n <= 0 || l > uint64(len(b)-n) {
				return nil, fmt.Errorf("%w: value length", ErrBadAppend)
			}
			op.Value = b[n : n+int(l) : n+int(l)]
			b = b[n+int(l):]
			if !validRecord(op.Value) {
				return nil, fmt.Errorf("%w: unreadable message record under %s key %d", ErrBadAppend, op.Bucket, op.Key)
			}
		}
		ops = append(ops, wireOp{kind: kind, op: op})
	}
	return ops, nil
}

// validRecord reports whether b is a message record decodeMessage reads.
func validRecord(b []byte) bool {
	_, err := decodeMessage("", 0, b)
	return err == nil
}

// ApplyReplicated applies a batch of ops an owner replicated to this node
// under epoch: every op, fdatasynced, or none. It refuses (calling nothing)
// a batch that does not decode, one from an owner whose epoch is older
// than current (this node's view of the cluster's epoch), and one that
// touches a queue this node serves as owner. done gets the commit's
// outcome. Keys of replicated messages raise this node's sequence, so
// that if it becomes the owner its own keys come after them.
func (n *Node) ApplyReplicated(epoch, current cluster.EpochID, body []byte, done func(error)) error {
	if epoch.Compare(current) < 0 {
		return fmt.Errorf("%w: %s, this node is at %s", ErrStaleEpoch, epoch, current)
	}
	sync := true
	if len(body) > 0 && body[0] == wireNoSync {
		sync, body = false, body[1:]
	}

	// One copy of the batch: the store reads the values until the
	// commit, and the caller may reuse its buffer once this returns.
	wops, err := decodeWire(slices.Clone(body))
	if err != nil {
		return err
	}
	if !sync && slices.ContainsFunc(wops, func(w wireOp) bool { return w.op.Kind == store.OpPut }) {
		return fmt.Errorf("%w: an unsynced batch with a put", ErrBadAppend)
	}
	// A batch of a queue being checked waits until the check has read
	// the copy: the check compares it as of the writes before it.
	for {
		n.wmu.Lock()
		var wait chan struct{}
		for i := range wops {
			if ch := n.checking[wops[i].op.Bucket]; ch != nil {
				wait = ch
				break
			}
		}
		if wait == nil {
			break
		}
		n.wmu.Unlock()
		<-wait
	}
	defer n.wmu.Unlock()
	n.mu.Lock()
	for i := range wops {
		if d := n.dests[wops[i].op.Bucket]; d != nil {
			n.mu.Unlock()
			return fmt.Errorf("%w: %s", ErrOwnedHere, wops[i].op.Bucket)
		}
	}
	n.mu.Unlock()
	for _, w := range wops {
		if w.kind == wireCheck {
			if len(wops) != 1 {
				return fmt.Errorf("%w: a check must travel alone", ErrBadAppend)
			}
			return n.check(w.sum, done)
		}
	}
	// Catch-up bookkeeping is checked whole before anything changes, so
	// that a refused batch changes nothing: a catch-up put needs a
	// catch-up in progress (begun earlier or in this batch), and the keys
	// a catch-up remembers stay bounded.
	catching := map[string]int{} // bucket -> keys it would remember after this batch, -1 not catching up
	state := func(b string) int {
		if v, ok := catching[b]; ok {
			return v
		}
		if c := n.catchUp[b]; c != nil {
			return len(c.touched)
		}
		return -1
	}
	n.expireCatchUps(time.Now())
	for _, w := range wops {
		b := w.op.Bucket
		switch w.kind {
		case wireCatchUpBegin:
			catching[b] = 0
		case wireCatchUpEnd:
			catching[b] = -1
		case wireCatchUpPut:
			if state(b) < 0 {
				return fmt.Errorf("%w: %s", ErrNoCatchUp, b)
			}
		case wirePut, wireDelete:
			if v := state(b); v >= 0 {
				if v+1 > maxTombstones {
					delete(n.catchUp, b)
					return fmt.Errorf("%w: %s: more than %d keys written while it ran", ErrNoCatchUp, b, maxTombstones)
				}
				catching[b] = v + 1
			}
		}
	}
	ops := make([]store.Op, 0, len(wops)+1)
	for _, w := range wops {
		b := w.op.Bucket
		switch w.kind {
		case wireCatchUpBegin:
			// What is here stays: it may hold receipted messages the
			// owner's only other copy lacks (a gap is why the owner begins
			// again). The copy fills in; keys the owner deleted while a
			// batch to here failed remain here until a later delete (a
			// redelivery after a failover, never a loss).
			n.catchUp[b] = &catchState{touched: map[uint64]struct{}{}, last: time.Now()}
			continue
		case wireCatchUpEnd:
			delete(n.catchUp, b)
			continue
		case wireCatchUpPut:
			// A chunk was read from the owner's bucket at some point;
			// a live put (a newer record: a delivery count) or delete of
			// the same key since begin wins over it.
			c := n.catchUp[b]
			c.last = time.Now()
			if _, touched := c.touched[w.op.Key]; touched {
				continue
			}
		case wirePut, wireDelete:
			// Remembered until end, even across a bucket delete: a chunk
			// read before it may still carry the key.
			if c := n.catchUp[b]; c != nil {
				c.touched[w.op.Key] = struct{}{}
			}
		}
		if w.op.Kind == store.OpPut {
			n.seq = max(n.seq, w.op.Key)
		}
		ops = append(ops, w.op)
	}
	if n.seq > n.seqCeil {
		n.seqCeil = n.seq + seqReserve
		ops = append(ops, store.Op{Kind: store.OpPutMeta, Name: metaSeq, Value: strconv.AppendUint(nil, n.seqCeil, 10)})
	}
	n.st.Submit(ops, sync, done)
	return nil
}

// check compares this node's copy of a queue with the owner's summary
// sum, once every write submitted before it has committed (the owner's
// earlier appends: a peer link is FIFO, and each is submitted before the
// next is read). done gets nil when they match, ErrDiverged otherwise.
// Under wmu.
func (n *Node) check(sum store.BucketStats, done func(error)) error {
	if n.catchUp[sum.Name] != nil {
		return fmt.Errorf("%w: %s is catching up", ErrDiverged, sum.Name)
	}
	// Until the copy is read, later appends of the queue wait (in
	// ApplyReplicated): read after them, it would not be the copy the
	// owner's summary describes.
	read := make(chan struct{})
	n.checking[sum.Name] = read
	release := func() {
		n.wmu.Lock()
		if n.checking[sum.Name] == read {
			delete(n.checking, sum.Name)
		}
		n.wmu.Unlock()
		close(read)
	}
	n.st.Barrier(func(err error) {
		if err != nil {
			// Maybe called before Barrier returns (a closed store),
			// with wmu held by our caller.
			go func() {
				release()
				done(err)
			}()
			return
		}
		// Off the store's completion goroutine: reading waits for the
		// applier.
		go func() {
			mine, err := n.st.Bucket(sum.Name)
			release()
			switch {
			case err != nil:
				done(err)
			case mine.Count != sum.Count || mine.Bytes != sum.Bytes || mine.KeyHash != sum.KeyHash:
				done(fmt.Errorf("%w: %s: %d messages (%d bytes) here, %d (%d bytes) at the owner", ErrDiverged, sum.Name, mine.Count, mine.Bytes, sum.Count, sum.Bytes))
			default:
				done(nil)
			}
		}()
	})
	return nil
}

// catchState is a replica's record of one catch-up in progress: the keys
// written or deleted live since it began, and when the owner last sent
// any of it.
type catchState struct {
	touched map[uint64]struct{}
	last    time.Time
}

// catchUpIdle is how long a catch-up may go without a begin or chunk from
// the owner before the replica forgets it (the owner gave it up, or its
// queue was removed); a later chunk is then refused and the owner begins
// again.
const catchUpIdle = time.Minute

// expireCatchUps forgets catch-ups idle for catchUpIdle. Under wmu.
func (n *Node) expireCatchUps(now time.Time) {
	for b, c := range n.catchUp {
		if now.Sub(c.last) > catchUpIdle {
			delete(n.catchUp, b)
			n.log.Warn("catch-up abandoned by its owner; forgotten", "dest", b)
		}
	}
}

// maxTombstones bounds the keys (written or deleted live) a replica
// remembers for one queue while it catches up; past it the catch-up is
// abandoned and the batch refused (the owner begins again).
const maxTombstones = 1 << 20

// CatchingUp reports whether this node is copying queue dest from its
// owner (a catch-up began and has not ended): its copy is not complete.
func (n *Node) CatchingUp(dest string) bool {
	n.wmu.Lock()
	defer n.wmu.Unlock()
	return n.catchUp[dest] != nil
}

// Adopt makes this node serve queue dest as its owner from what its store
// holds (a replica's copy): counters and key range are read as on a
// restart, the messages stay on disk until a subscriber needs them. A
// queue already adopted is left as it is.
//
// With a Replicator, a queue a client names before it was adopted is
// adopted then (lockQueue), so that no in-memory queue ever stands for
// less than its bucket holds.
func (n *Node) Adopt(dest string) error { return n.adopt(dest, false) }

// AdoptExisting is Adopt of a queue known to exist although this node's
// store may lack its bucket: another node holds it, maybe empty (a
// drained queue whose new owner was not its replica). The queue counts
// as created (QueueExists), so a SEND that may not create it is
// accepted. In memory only, as a queue that was only subscribed to: a
// restart forgets it until the next take-over reads it again.
func (n *Node) AdoptExisting(dest string) error { return n.adopt(dest, true) }

func (n *Node) adopt(dest string, exists bool) error {
	if k, err := ParseDestination(dest); err != nil || k != KindQueue {
		return fmt.Errorf("adopt %q: not a queue", dest)
	}
	n.wmu.Lock()
	defer n.wmu.Unlock()
	n.mu.Lock()
	if d := n.dests[dest]; d != nil && d.adopted {
		if exists {
			d.mu.Lock()
			d.created = true
			d.mu.Unlock()
		}
		n.mu.Unlock()
		return nil
	}
	// In memory from here on: ApplyReplicated refuses the queue (it
	// takes wmu, held until the counters are read).
	d := n.destinationLocked(dest, KindQueue)
	n.mu.Unlock()
	// Every write submitted before (replicated appends included) is
	// committed, so the bucket's stats count it.
	ch := make(chan error, 1)
	n.st.Barrier(func(err error) { ch <- err })
	if err := <-ch; err != nil {
		return fmt.Errorf("adopt %s: %w", dest, err)
	}
	buckets, err := n.st.Buckets()
	if err != nil {
		return fmt.Errorf("adopt %s: %w", dest, err)
	}
	d.mu.Lock()
	if exists {
		d.created = true
	}
	for _, b := range buckets {
		if b.Name == dest {
			// The queue was created before (QueueExists), here or at
			// the owner whose copy this is.
			d.created = true
		}
		if b.Name != dest || b.Count == 0 {
			continue
		}
		// With a Replicator every queue comes into memory here (see
		// lockDestination), under wmu: nothing else touched d yet.
		d.onDisk = b.Count
		d.onDiskBytes = b.Bytes
		d.countedTo = b.LastKey
		if b.FirstKey > 0 {
			d.loadedTo = b.FirstKey - 1
		}
		// The previous owner may have delivered any of them: each is
		// marked redelivered (a client that deduplicates checks those).
		d.inheritedTo = b.LastKey
		n.seq = max(n.seq, b.LastKey)
	}
	onDisk := d.onDisk
	d.mu.Unlock()
	n.mu.Lock()
	d.adopted = true
	n.mu.Unlock()
	n.log.Info("adopted queue", "dest", dest, "messages", onDisk)
	return nil
}

// Release stops serving queue dest here because another node owns it
// now: its subscriptions end without any write (their in-flight messages
// stay stored; the new owner redelivers them) and the queue leaves
// memory. Its bucket stays, a replica's copy, so appends for it are
// accepted again. The caller ends its subscribers' sessions or moves
// them (the subscriptions' Deliver is not called again).
func (n *Node) Release(dest string) {
	if f, ok := n.rep.(interface{ Forget(dest string) }); ok {
		defer f.Forget(dest) // after the locks below are released
	}
	n.wmu.Lock()
	defer n.wmu.Unlock()
	n.mu.Lock()
	defer n.mu.Unlock()
	d := n.dests[dest]
	if d == nil || d.kind != KindQueue {
		return
	}
	d.mu.Lock()
	for _, s := range d.subs {
		s.closed = true
		s.inflight = nil
		s.byID = nil
		s.unwritten = 0
		s.inflightBytes = 0
	}
	d.subs = nil
	d.removed = true
	d.mu.Unlock()
	d.adopted = false
	delete(n.dests, dest)
	n.log.Info("released queue", "dest", dest)
}

// AdoptedQueues returns the queues this node serves (Adopt).
func (n *Node) AdoptedQueues() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []string
	for name, d := range n.dests {
		if d.kind == KindQueue && d.adopted {
			out = append(out, name)
		}
	}
	return out
}

// Adopted reports whether this node serves queue dest (Adopt).
func (n *Node) Adopted(dest string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	d := n.dests[dest]
	return d != nil && d.adopted
}

// View is what a Replicator needs from membership: this node, the active
// members and the epoch they agree under.
type View struct {
	Self   string
	Active []string
	Epoch  cluster.EpochID // the epoch the active set agreed under (cluster.Status.EpochID)
}

// Peers sends replication batches to other nodes.
type Peers interface {
	// Append sends body (AppendOps) to peer under epoch. done runs once,
	// with nil when the peer has applied it durably, or an error (refused,
	// or unknown outcome). Append must not block for long.
	Append(peer string, epoch cluster.EpochID, body []byte, done func(error))
}

// PeerReplicator is the Replicator of a cluster node: it places each
// queue (ReplicaSet of the view's active members, factor R), sends each
// other replica the ops of its queues, and counts durable copies against
// the write quorum W.
type PeerReplicator struct {
	// MaxAppend bounds the body of one Peers.Append (4 MiB by default):
	// larger writes (a big transaction) go in several, in order.
	MaxAppend int

	r, w  int
	view  func() View
	peers Peers
	log   *slog.Logger

	// sendMu keeps the calls to Append in Replicate's order.
	sendMu sync.Mutex
	// dirty: peers sent an unsynced batch since their last synced one
	// (under sendMu); a barrier syncs them.
	dirty map[string]bool

	// pending are the tallies not settled yet, by sequence, so that a
	// barrier can wait for every write replicated before it.
	mu      sync.Mutex
	seq     uint64
	pending map[uint64]*tally

	// Catch-up (EnableCatchUp): per peer and queue, whether the peer's
	// copy is being rebuilt or complete; guarded by stateMu, which is
	// never held while calling Peers.Append (its done may run at once).
	stateMu    sync.Mutex
	src        CatchUpSource
	synced     map[string]map[string]copyInfo
	gen        uint64 // numbers catch-ups, so a superseded one stops
	lastActive map[string]bool
	slots      chan struct{}      // catch-ups running at once
	running    map[[2]string]bool // (peer, queue) with a catch-up goroutine
	stop       chan struct{}      // closed by Close
	closed     bool               // under stateMu: Close began; no goroutine starts
	closeOnce  sync.Once
	wg         sync.WaitGroup

	// Anti-entropy (EnableAntiEntropy). writes counts, per queue, the
	// writes handed to Replicate (under sendMu); diverged counts, per
	// (peer, queue), checks that failed in a row (under stateMu).
	ae *antiEntropy
	// started and writes count, per queue, the writes the node began
	// (WriteStarting, before its local commit) and those handed to
	// Replicate (under sendMu); guarded by cntMu. Equal counts mean every
	// write in the local store is on its way to the replicas.
	cntMu    sync.Mutex
	started  map[string]uint64
	writes   map[string]uint64
	diverged map[[2]string]divergence

	// Metrics (Collector): ops and bytes sent to each peer per queue and
	// not yet confirmed, and counters.
	lagMu   sync.Mutex
	lag     map[[2]string]*lagVal
	cuBytes atomic.Int64
	cuBegun atomic.Int64
	checks  [3]atomic.Int64 // match, diverged, failed
}

type lagVal struct{ ops, bytes int64 }

// addLag adds sign times each queue's ops and bytes of ops to peer's lag.
func (p *PeerReplicator) addLag(peer string, ops []store.Op, sign int64) {
	p.lagMu.Lock()
	defer p.lagMu.Unlock()
	if p.lag == nil {
		p.lag = map[[2]string]*lagVal{}
	}
	for i := range ops {
		k := [2]string{peer, ops[i].Bucket}
		v := p.lag[k]
		if v == nil {
			v = &lagVal{}
			p.lag[k] = v
		}
		v.ops += sign
		v.bytes += sign * int64(len(ops[i].Value))
		if v.ops <= 0 {
			delete(p.lag, k)
		}
	}
}

// copyInfo is what an owner knows of a peer's copy of a queue, and which
// catch-up is rebuilding it.
type copyInfo struct {
	state copyState
	gen   uint64
}

// copyState is what an owner knows of a peer's copy of a queue.
type copyState uint8

const (
	copyUnknown  copyState = iota // rebuild it before relying on it
	copyCatching                  // a catch-up runs
	copySynced                    // complete: every write since reached it
)

// CatchUpSource is where an owner reads the queues it copies to a new
// replica: its store.
type CatchUpSource interface {
	Barrier(done func(error))
	Scan(bucket string, after uint64, limit int, maxBytes int, fn func(key uint64, value []byte) error) error
}

// TombstoneSource is a CatchUpSource that also keeps tombstones (the
// store): a catch-up then sends the queue's tombstones too, so the
// replica removes what it holds of messages removed while its copy
// missed the removals.
type TombstoneSource interface {
	ScanTombstones(bucket string, after uint64, limit int, fn func(key uint64) error) error
}

// catchUpTombstones bounds the tombstones of one catch-up batch.
const catchUpTombstones = 8192

// EnableCatchUp makes the replicator rebuild a peer's copy of a queue
// from src before relying on it: the first write it sends a peer for a
// queue (since the peer became active, or since a batch to it failed)
// begins a catch-up, and a background copy of the queue's bucket follows
// (see ApplyReplicated for how the replica merges it with live writes).
// Call it before the first Replicate.
func (p *PeerReplicator) EnableCatchUp(src CatchUpSource) {
	p.src = src
	p.synced = map[string]map[string]copyInfo{}
	p.lastActive = map[string]bool{}
	p.slots = make(chan struct{}, 4)
	p.running = map[[2]string]bool{}
}

// Synced reports whether peer's copy of queue dest is known complete.
func (p *PeerReplicator) Synced(peer, dest string) bool {
	p.stateMu.Lock()
	defer p.stateMu.Unlock()
	return p.src == nil || p.synced[peer][dest].state == copySynced
}

// Wait waits until no catch-up or repair goroutine runs: every copy it
// was rebuilding is complete or no longer tracked (tests). With a peer
// that stays down it does not return; Close stops them.
func (p *PeerReplicator) Wait() {
	for {
		p.stateMu.Lock()
		n := len(p.running)
		p.stateMu.Unlock()
		if n == 0 {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// catchUpChunk bounds one catch-up batch.
const (
	catchUpMessages = 512
	catchUpBytes    = 1 << 20
)

// catchUp copies dest's bucket to peer after a begin was sent: it waits
// for every write submitted before to commit (so the scan sees them),
// then sends the bucket in chunks, one at a time, and an end. Any failure
// marks the copy unknown: the next write begins again.
func (p *PeerReplicator) catchUp(peer, dest string) {
	defer p.wg.Done()
	key := [2]string{peer, dest}
	backoff := catchUpRetryMin
	for {
		// One goroutine per (peer, queue): it runs the newest catch-up
		// begun for it; after a failure (its own, or a live batch's) it
		// begins one again after a backoff, so that a quiet queue is
		// repaired too. It ends once the copy is complete, or no longer
		// tracked (the peer left the queue's replica set, the queue was
		// removed), or the replicator closes.
		p.stateMu.Lock()
		info, tracked := p.synced[peer][dest]
		if !tracked || info.state == copySynced || p.closed {
			delete(p.running, key)
			p.stateMu.Unlock()
			return
		}
		p.stateMu.Unlock()
		if info.state == copyUnknown {
			select {
			case <-p.stop:
				p.stateMu.Lock()
				delete(p.running, key)
				p.stateMu.Unlock()
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, catchUpRetryMax)
			// Begin again only while the peer is still in the queue's
			// replica set in the current view (a quiet queue sees no
			// Replicate to untrack it) and this node too.
			v := p.view()
			set := ReplicaSet(dest, v.Active, p.r)
			inSet := slices.Contains(set, peer) && slices.Contains(set, v.Self)
			p.sendMu.Lock()
			p.stateMu.Lock()
			info, tracked = p.synced[peer][dest]
			if !inSet && tracked {
				delete(p.synced[peer], dest)
				tracked = false
			}
			begin := tracked && info.state == copyUnknown && !p.closed
			if begin {
				p.gen++
				p.synced[peer][dest] = copyInfo{copyCatching, p.gen}
				p.cuBegun.Add(1)
			}
			p.stateMu.Unlock()
			if begin {
				p.peers.Append(peer, p.view().Epoch, appendWire(nil, wireCatchUpBegin, &store.Op{Bucket: dest}), func(error) {})
			}
			p.sendMu.Unlock()
			continue
		}
		err := p.catchUpOnce(peer, dest, info.gen)
		if errors.Is(err, errSuperseded) {
			continue
		}
		p.stateMu.Lock()
		if p.synced[peer] != nil && p.synced[peer][dest] == (copyInfo{copyCatching, info.gen}) {
			if err == nil {
				p.synced[peer][dest] = copyInfo{copySynced, info.gen}
			} else {
				p.synced[peer][dest] = copyInfo{copyUnknown, 0}
			}
		}
		p.stateMu.Unlock()
		if err != nil {
			p.log.Warn("catch-up failed; retrying", "peer", peer, "dest", dest, "in", backoff, "err", err)
		}
	}
}

// Retry delays of a failed catch-up.
const (
	catchUpRetryMin = 100 * time.Millisecond
	catchUpRetryMax = 5 * time.Second
)

// Close stops the catch-ups waiting to retry and waits for those running.
func (p *PeerReplicator) Close() {
	p.closeOnce.Do(func() {
		// Under stateMu: no goroutine is added once closed is set, so
		// wg.Add never races the Wait below.
		p.stateMu.Lock()
		p.closed = true
		p.stateMu.Unlock()
		close(p.stop)
	})
	p.wg.Wait()
}

var errSuperseded = errors.New("catch-up superseded")

// catchUpOnce runs catch-up gen of dest to peer: a store barrier (every
// write submitted before is then visible), the bucket in chunks, one at a
// time, and an end. It stops with errSuperseded once gen is not the
// current catch-up: the check and the send are one step under sendMu, so
// no chunk of an old catch-up follows the begin of a newer one.
func (p *PeerReplicator) catchUpOnce(peer, dest string, gen uint64) error {
	p.slots <- struct{}{}
	defer func() { <-p.slots }()
	ch := make(chan error, 1)
	p.src.Barrier(func(err error) { ch <- err })
	if err := <-ch; err != nil {
		return err
	}
	send := func(body []byte) error {
		ch := make(chan error, 1)
		p.sendMu.Lock()
		p.stateMu.Lock()
		current := !p.closed && p.synced[peer] != nil && p.synced[peer][dest] == (copyInfo{copyCatching, gen})
		p.stateMu.Unlock()
		if !current {
			p.sendMu.Unlock()
			return errSuperseded
		}
		p.peers.Append(peer, p.view().Epoch, body, func(err error) { ch <- err })
		p.sendMu.Unlock()
		p.cuBytes.Add(int64(len(body)))
		return <-ch
	}
	// Tombstones first: they remove what the replica holds of messages
	// the owner no longer has, and a tombstone is never recorded as a
	// live write there (it wins over any put, whatever the order).
	if ts, ok := p.src.(TombstoneSource); ok {
		var after uint64
		// Bounded by bytes too: each op carries the queue's name.
		limit := max(1, min(catchUpTombstones, catchUpBytes/(len(dest)+1+2*binary.MaxVarintLen64)))
		for {
			var body []byte
			n := 0
			err := ts.ScanTombstones(dest, after, limit, func(key uint64) error {
				body = appendWire(body, wireTombstone, &store.Op{Bucket: dest, Key: key})
				after = key
				n++
				return nil
			})
			if err != nil {
				return err
			}
			if n == 0 {
				break
			}
			if err := send(body); err != nil {
				return err
			}
		}
	}
	var after uint64
	for {
		var body []byte
		n := 0
		err := p.src.Scan(dest, after, catchUpMessages, catchUpBytes, func(key uint64, value []byte) error {
			body = appendWire(body, wireCatchUpPut, &store.Op{Bucket: dest, Key: key, Value: value})
			after = key
			n++
			return nil
		})
		if err != nil {
			return err
		}
		if n == 0 {
			break
		}
		if err := send(body); err != nil {
			return err
		}
	}
	return send(appendWire(nil, wireCatchUpEnd, &store.Op{Bucket: dest}))
}

// NewPeerReplicator returns a Replicator for factor r and write quorum w
// (0: a majority of r).
func NewPeerReplicator(r, w int, view func() View, peers Peers, log *slog.Logger) *PeerReplicator {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &PeerReplicator{r: max(r, 1), w: w, view: view, peers: peers, log: log, pending: map[uint64]*tally{}, MaxAppend: 4 << 20, stop: make(chan struct{}), dirty: map[string]bool{}}
}

// tally counts, per queue, the confirmations still needed and still
// possible, and calls done once.
type tally struct {
	mu       sync.Mutex
	need     map[string]int
	possible map[string]int
	fired    bool
	err      error
	done     func(error)
	after    []func(error) // barriers waiting for it
	onFire   func()        // unregisters it from PeerReplicator.pending
}

func (t *tally) settle(buckets []string, ok bool) {
	t.mu.Lock()
	if t.fired {
		t.mu.Unlock()
		return
	}
	var err error
	complete := true
	for _, b := range buckets {
		t.possible[b]--
		if ok {
			t.need[b]--
		}
	}
	for b, need := range t.need {
		if need > 0 {
			complete = false
			if t.possible[b] < need {
				err = fmt.Errorf("%w for %s", ErrNoQuorum, b)
			}
		}
	}
	if complete || err != nil {
		t.fired = true
	}
	fire := t.fired
	var after []func(error)
	if fire {
		t.err = err
		after = t.after
		t.after = nil
	}
	t.mu.Unlock()
	if !fire {
		return
	}
	if t.onFire != nil {
		t.onFire()
	}
	if t.done != nil {
		t.done(err)
	}
	for _, f := range after {
		f(err)
	}
}

// barrier calls done once every tally pending now has settled: nil if
// all met their quorum, else the first error.
func (p *PeerReplicator) barrier(done func(error)) {
	p.mu.Lock()
	waiting := make([]*tally, 0, len(p.pending))
	for _, t := range p.pending {
		waiting = append(waiting, t)
	}
	p.mu.Unlock()
	if done == nil {
		done = func(error) {}
	}
	// Peers sent unsynced removals since their last synced batch get an
	// empty synced one, so that the RECEIPT after this barrier finds
	// those removals on their disks too. Its failure fails nothing (the
	// removals' own tallies count the copies).
	p.sendMu.Lock()
	var markers []string
	for peer := range p.dirty {
		markers = append(markers, peer)
	}
	clear(p.dirty)
	p.sendMu.Unlock()
	var mu sync.Mutex
	left := len(waiting) + len(markers) + 1
	var first error
	one := func(err error) {
		mu.Lock()
		if err != nil && first == nil {
			first = err
		}
		left--
		last := left == 0
		mu.Unlock()
		if last {
			done(first)
		}
	}
	for _, t := range waiting {
		t.mu.Lock()
		if t.fired {
			err := t.err
			t.mu.Unlock()
			one(err)
			continue
		}
		t.after = append(t.after, one)
		t.mu.Unlock()
	}
	if len(markers) > 0 {
		// Without sendMu (done may run inside Append): each marker
		// follows that peer's earlier batches on its FIFO link anyway.
		epoch := p.view().Epoch
		for _, peer := range markers {
			p.peers.Append(peer, epoch, nil, func(error) { one(nil) })
		}
	}
	one(nil)
}

// Replicate implements Replicator.
func (p *PeerReplicator) Replicate(ops []store.Op, sync bool, quorum func(error)) {
	if len(ops) == 0 {
		// A barrier: every write replicated before it has its quorum
		// (or could not), so that a RECEIPT after it covers them all,
		// internal writes included.
		if sync {
			p.barrier(quorum)
		} else if quorum != nil {
			quorum(nil)
		}
		return
	}
	v := p.view()
	// Which ops go to which peer, and what each queue needs.
	type share struct {
		ops     []store.Op
		buckets []string
	}
	shares := map[string]*share{}
	var order []string
	t := &tally{need: map[string]int{}, possible: map[string]int{}, done: quorum}
	sets := map[string][]string{} // replica set of each queue written
	var deleted []string          // queues removed by this write
	for i := range ops {
		op := &ops[i]
		if wireKind(op.Kind) == 0 {
			continue // a node's own (meta, housekeeping): not replicated
		}
		set := ReplicaSet(op.Bucket, v.Active, p.r)
		if op.Kind == store.OpDeleteBucket {
			deleted = append(deleted, op.Bucket)
		}
		if _, seen := t.need[op.Bucket]; !seen {
			sets[op.Bucket] = set
			// W copies in the replica set: an explicit W holds even
			// when fewer members are active (the SEND then fails); the
			// default is a majority of the set. The local copy counts
			// only if this node is in the set.
			w := p.w
			if w < 1 {
				w = len(set)/2 + 1
			}
			others := 0
			for _, id := range set {
				if id != v.Self {
					others++
				}
			}
			if others == len(set) {
				t.need[op.Bucket] = w
			} else {
				t.need[op.Bucket] = w - 1
			}
			t.possible[op.Bucket] = others
		}
		for _, id := range set {
			if id == v.Self {
				continue
			}
			s := shares[id]
			if s == nil {
				s = &share{}
				shares[id] = s
				order = append(order, id)
			}
			s.ops = append(s.ops, *op)
			if len(s.buckets) == 0 || s.buckets[len(s.buckets)-1] != op.Bucket {
				s.buckets = appendUnique(s.buckets, op.Bucket)
			}
		}
	}
	// Registered for barriers before anything can settle it.
	p.mu.Lock()
	p.seq++
	id := p.seq
	p.pending[id] = t
	p.mu.Unlock()
	t.onFire = func() {
		p.mu.Lock()
		delete(p.pending, id)
		p.mu.Unlock()
	}
	// A quorum already met (W = 1, or nothing to replicate) fires now,
	// and one that cannot be met (an explicit W above the set) fails now.
	t.settle(nil, true)
	type start struct {
		peer, dest string
		gen        uint64
	}
	var starts []start
	begins := map[string][]byte{}
	if p.src != nil {
		p.stateMu.Lock()
		p.noteActiveLocked(v)
		// A peer that is no longer in a queue's replica set stops
		// receiving its writes: its copy can no longer be relied on.
		for b, set := range sets {
			for peer, m := range p.synced {
				if _, ok := m[b]; ok && !slices.Contains(set, peer) {
					delete(m, b)
				}
			}
		}
		for _, id := range order {
			if p.synced[id] == nil {
				p.synced[id] = map[string]copyInfo{}
			}
			for _, b := range shares[id].buckets {
				if p.synced[id][b].state == copyUnknown {
					p.gen++
					p.synced[id][b] = copyInfo{copyCatching, p.gen}
					p.cuBegun.Add(1)
					begins[id] = appendWire(begins[id], wireCatchUpBegin, &store.Op{Bucket: b})
					if key := [2]string{id, b}; !p.running[key] && !p.closed {
						p.running[key] = true
						p.wg.Add(1) // under stateMu, so never after Close's Wait began
						starts = append(starts, start{id, b, p.gen})
					}
				}
			}
		}
		// A removed queue is no longer tracked (its writes end here).
		for _, b := range deleted {
			for _, m := range p.synced {
				delete(m, b)
			}
		}
		p.stateMu.Unlock()
	}
	p.sendMu.Lock()
	p.cntMu.Lock()
	if p.writes != nil {
		for b := range t.need {
			p.writes[b]++
		}
	}
	p.cntMu.Unlock()
	for _, id := range order {
		s := shares[id]
		// Bodies of at most MaxAppend bytes (split between ops; one op
		// larger than that travels alone): the write counts for this
		// peer once every part is applied.
		var parts [][]byte
		var prefix []byte
		if !sync && !slices.ContainsFunc(s.ops, func(op store.Op) bool { return op.Kind == store.OpPut }) {
			prefix = []byte{wireNoSync}
			p.dirty[id] = true
		} else {
			delete(p.dirty, id) // this batch's fdatasync covers the earlier ones
		}
		body := append(slices.Clip(prefix), begins[id]...)
		for i := range s.ops {
			if len(body) > len(prefix) && len(body)+opWireSize(&s.ops[i]) > p.MaxAppend {
				parts = append(parts, body)
				body = slices.Clip(prefix)
			}
			body = AppendOps(body, s.ops[i:i+1])
		}
		parts = append(parts, body)
		buckets := s.buckets
		sent := s.ops
		p.addLag(id, sent, 1)
		result := JoinN(len(parts), func(err error) {
			p.addLag(id, sent, -1)
			if err != nil {
				p.log.Warn("replication to peer failed", "peer", id, "queues", buckets, "err", err)
				if p.src != nil {
					// The peer may have missed this batch: its copy has
					// a gap until a catch-up rebuilds it.
					p.stateMu.Lock()
					for _, b := range buckets {
						if p.synced[id] == nil {
							continue
						}
						if _, tracked := p.synced[id][b]; !tracked {
							continue
						}
						p.synced[id][b] = copyInfo{copyUnknown, 0}
						// Repaired in the background, not only by the
						// queue's next write.
						if k := [2]string{id, b}; !p.running[k] && !p.closed {
							p.running[k] = true
							p.wg.Add(1)
							go p.catchUp(id, b)
						}
					}
					p.stateMu.Unlock()
				}
			}
			t.settle(buckets, err == nil)
		})
		for _, part := range parts {
			p.peers.Append(id, v.Epoch, part, result)
		}
	}
	for _, s := range starts {
		go p.catchUp(s.peer, s.dest)
	}
	p.sendMu.Unlock()
}

// opWireSize is about the size of op's wire form.
func opWireSize(op *store.Op) int {
	return 1 + 3*binary.MaxVarintLen64 + len(op.Bucket) + len(op.Value)
}

// JoinN returns a callback to be called n times that calls done once,
// with the first error, after the n-th call.
func JoinN(n int, done func(error)) func(error) {
	var mu sync.Mutex
	var first error
	return func(err error) {
		mu.Lock()
		if err != nil && first == nil {
			first = err
		}
		n--
		last := n == 0
		mu.Unlock()
		if last {
			done(first)
		}
	}
}

func appendUnique(s []string, v string) []string {
	for _, x := range s {
		if x == v {
			return s
		}
	}
	return append(s, v)
}
