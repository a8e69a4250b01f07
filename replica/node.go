package replica

import (
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/brokerd/brokerd/store"
	"github.com/prometheus/client_golang/prometheus"
)

// AckMode is a subscription's acknowledgement mode.
type AckMode int

const (
	// AckAuto treats a message as acknowledged once written to the connection.
	AckAuto AckMode = iota + 1
	// AckClient needs an ACK; an ACK acknowledges every earlier message of the subscription too.
	AckClient
	// AckClientIndividual needs an ACK for each message.
	AckClientIndividual
)

func (m AckMode) String() string {
	switch m {
	case AckAuto:
		return "auto"
	case AckClient:
		return "client"
	case AckClientIndividual:
		return "client-individual"
	}
	return fmt.Sprintf("AckMode(%d)", int(m))
}

// ParseAckMode reads a STOMP ack header value; "" is auto.
func ParseAckMode(s string) (AckMode, bool) {
	switch s {
	case "", "auto":
		return AckAuto, true
	case "client":
		return AckClient, true
	case "client-individual":
		return AckClientIndividual, true
	}
	return 0, false
}

// Overflow is what a queue at its length or byte limit does with a new
// message.
type Overflow int

const (
	// OverflowRejectPublish refuses the SEND with ErrQueueFull; nothing is
	// stored.
	OverflowRejectPublish Overflow = iota + 1
	// OverflowDropHead accepts the message and removes the oldest pending
	// ones until the queue is within its limits again.
	OverflowDropHead
)

func (o Overflow) String() string {
	switch o {
	case OverflowRejectPublish:
		return "reject-publish"
	case OverflowDropHead:
		return "drop-head"
	}
	return fmt.Sprintf("Overflow(%d)", int(o))
}

// ParseOverflow reads "reject-publish" or "drop-head".
func ParseOverflow(s string) (Overflow, error) {
	switch strings.ToLower(s) {
	case "reject-publish":
		return OverflowRejectPublish, nil
	case "drop-head":
		return OverflowDropHead, nil
	}
	return 0, fmt.Errorf("unknown overflow %q (want reject-publish or drop-head)", s)
}

// Config configures a Node.
type Config struct {
	// NodeID prefixes every message-id this node assigns.
	NodeID string
	// MaxRedeliveries is how many times a message may be redelivered
	// before it moves to the dead-letter queue; 0 never dead-letters.
	MaxRedeliveries int
	// DLQPrefix names the dead-letter queue of /queue/NAME: DLQPrefix+NAME.
	DLQPrefix string
	// WriteWindow caps the messages handed to one subscription's
	// connection and not yet written to it.
	WriteWindow int
	// TopicBuffer caps the unwritten (and, in client modes, unacknowledged)
	// messages of one topic subscription; beyond it messages for that
	// subscriber are dropped and counted.
	TopicBuffer int
	// MaxUnackedBytes caps the body bytes of one subscription's delivered,
	// unacknowledged (or, in auto mode, unwritten) messages, queue or
	// topic; a subscription always gets at least one message.
	MaxUnackedBytes int
	// MaxUnacked caps the delivered, unacknowledged messages of one queue
	// subscription in a client ack mode (they are held in memory); a larger
	// prefetch-count, or none, is clamped to it.
	MaxUnacked int
	// ReadAheadMessages and ReadAheadBytes bound the pending messages of
	// one queue held in memory, ready for dispatch; the rest of a backlog
	// stays on disk and is read in as the window drains.
	ReadAheadMessages int
	ReadAheadBytes    int
	// MaxLength and MaxBytes limit a queue's ready (pending, not in
	// flight) messages and the bytes of their bodies; 0 is unlimited.
	MaxLength int64
	MaxBytes  int64
	// Overflow says what happens to a SEND beyond MaxLength or MaxBytes.
	Overflow Overflow
	// IdleDeleteAfter is how long a queue without messages, subscribers
	// or writes in progress is kept before it is removed (with its store
	// bucket); 0 never removes one.
	IdleDeleteAfter time.Duration
	// ExpirySweep is how often pending messages in memory are checked for
	// expiry, idle queues removed and unused read-ahead windows released.
	ExpirySweep time.Duration
	// TombstoneTTL is how often, with a Replicator, the store's tombstones
	// rotate: a removed message is remembered between one and two of it
	// (see store.OpTombstone). 0 never forgets them.
	TombstoneTTL time.Duration
	// Registerer receives the metrics; nil means none.
	Registerer prometheus.Registerer
	// Logger receives the node's logs.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// DefaultConfig returns a Config with every field set.
func DefaultConfig() Config {
	return Config{
		NodeID:            "node",
		MaxRedeliveries:   5,
		DLQPrefix:         "/queue/DLQ.",
		WriteWindow:       256,
		TopicBuffer:       10000,
		MaxUnacked:        10000,
		MaxUnackedBytes:   64 << 20,
		ReadAheadMessages: 1000,
		ReadAheadBytes:    4 << 20,
		Overflow:          OverflowRejectPublish,
		IdleDeleteAfter:   time.Hour,
		ExpirySweep:       time.Second,
		TombstoneTTL:      5 * time.Minute,
		Logger:            slog.Default(),
		Now:               time.Now,
	}
}

// Delivery is one message handed to a subscription.
type Delivery struct {
	Msg *Message
	Sub Sub
	// Tag identifies the delivery within its subscription for ACK and NACK.
	Tag uint64
	// Redelivered is true when the message may have been delivered before.
	Redelivered bool
	// Count is the number of earlier deliveries that ended without an ACK.
	Count int
}

// SubOptions describe a new subscription.
type SubOptions struct {
	Dest     string
	Ack      AckMode
	Prefetch int // unacknowledged messages at most; 0 is Config.MaxUnacked
	// ByMessageID keeps an index from message-id to delivery, for
	// TagOf (STOMP 1.0 and 1.1 clients acknowledge by message-id).
	ByMessageID bool
	// Deliver hands a message to the subscriber. It runs with the
	// destination's lock held: it must not block or call into the Node.
	// The subscriber calls Subscription.Written once the message is on the
	// wire.
	Deliver func(Delivery)
	// NoCreate refuses the subscription with ErrNoSuchQueue if its queue
	// does not exist (the subscriber may not create queues there).
	// Ignored for topics.
	NoCreate bool
}

// Sub is what a subscriber holds of its subscription: a *Subscription of
// this node, or one whose queue another node serves (the cluster's
// forwarding implements it).
type Sub interface {
	// TagOf returns the outstanding delivery tag of message-id id.
	TagOf(id string) (uint64, bool)
	// Written records that deliveries are on the wire (AckAuto: acked).
	Written(tags ...uint64)
	// Tried records that deliveries may have reached the client.
	Tried(tags ...uint64)
	// Check returns ErrUnknownAck unless tag is outstanding.
	Check(tag uint64) error
	// Close ends the subscription because its client failed; its
	// unacknowledged messages return, each that reached the wire counting
	// toward MaxRedeliveries.
	Close()
	// Return ends the subscription for another reason; its
	// unacknowledged messages return marked redelivered, not counted.
	Return()
}

var _ Sub = (*Subscription)(nil)

// Batch is a set of operations applied together: the SENDs, ACKs and NACKs
// of one frame or of one committed transaction. Its store writes go into a
// single commit.
type Batch struct {
	Sends []*Message
	Acks  []AckOp
	// Sync asks for the batch, and everything committed before it, to be
	// on disk before done runs (a RECEIPT needs it); without it the batch
	// survives a crash of the process but not necessarily of the machine.
	Sync bool
}

// AckOp acknowledges (or, with Nack, rejects) the delivery Tag of Sub; in
// AckClient mode every earlier outstanding delivery of Sub as well.
type AckOp struct {
	Sub  Sub
	Tag  uint64
	Nack bool
}

// DestinationInfo describes one destination for operators.
type DestinationInfo struct {
	Name      string `json:"name"`
	Kind      string `json:"kind"`
	Pending   int    `json:"pending"`
	InFlight  int    `json:"in_flight"`
	Consumers int    `json:"consumers"`
	// Bytes is the body bytes of the pending messages.
	Bytes int64 `json:"pending_bytes"`
	// InMemory is the pending messages held in memory (read-ahead window
	// and returned messages); the rest are on disk.
	InMemory int `json:"in_memory"`
}

// Node is the set of destinations of one broker node.
type Node struct {
	cfg Config
	st  *store.Store
	log *slog.Logger
	m   *metrics
	// seq is the last key this node assigned or saw (see nextKey). Keys
	// are taken and submitted to the store under wmu, so within every
	// bucket keys commit in increasing order: the loader, which reads a
	// queue's backlog by key from where its window ends, relies on it.
	wmu  sync.Mutex
	seq  uint64
	slot uint64 // this node's low key bits, from its ID
	// rmu makes a store submission and its replication one step, so that
	// every replica receives a bucket's writes in the order the local
	// store commits them (lock order: wmu, destination.mu, then rmu).
	rmu sync.Mutex
	rep Replicator // nil: a node of its own, nothing is replicated
	// onRemoved (SetOnRemoved) is told of queues dropped as uncreated
	// or idle.
	onRemoved func(dest string)
	keepIdle  func(dest string) bool // SetKeepIdle
	// catchUp holds, per queue being copied from its owner, the keys
	// deleted since the copy began (see ApplyReplicated). Guarded by wmu.
	catchUp map[string]*catchState
	// checking holds, per queue with an anti-entropy check being
	// answered, a channel closed once its copy has been read: later
	// appends of that queue wait for it (see Node.check). Guarded by wmu.
	checking map[string]chan struct{}
	// seqCeil is the sequence number recorded in the store: after a
	// restart numbering resumes above it, so message IDs are never reused
	// even when every message was acknowledged and deleted. Guarded by wmu.
	seqCeil uint64
	// Topic messages are not stored: their IDs are unique by a prefix
	// naming this process's start and a counter.
	topicIDPrefix string
	topicSeq      atomic.Uint64

	mu     sync.Mutex
	dests  map[string]*destination
	closed bool

	loadMu  sync.Mutex
	loadQ   []*destination // queues waiting for the loader, each at most once
	loadSig chan struct{}

	stop chan struct{}
	wg   sync.WaitGroup
}

// NodeID is the ID this node's message-ids start with.
func (n *Node) NodeID() string { return n.cfg.NodeID }

// New returns a Node over st. Call Recover, then Start.
func New(cfg Config, st *store.Store) *Node {
	def := DefaultConfig()
	if cfg.Logger == nil {
		cfg.Logger = def.Logger
	}
	if cfg.Now == nil {
		cfg.Now = def.Now
	}
	if cfg.WriteWindow <= 0 {
		cfg.WriteWindow = def.WriteWindow
	}
	if cfg.TopicBuffer <= 0 {
		cfg.TopicBuffer = def.TopicBuffer
	}
	if cfg.MaxUnacked <= 0 {
		cfg.MaxUnacked = def.MaxUnacked
	}
	if cfg.MaxUnackedBytes <= 0 {
		cfg.MaxUnackedBytes = def.MaxUnackedBytes
	}
	if cfg.ReadAheadMessages <= 0 {
		cfg.ReadAheadMessages = def.ReadAheadMessages
	}
	if cfg.ReadAheadBytes <= 0 {
		cfg.ReadAheadBytes = def.ReadAheadBytes
	}
	if cfg.Overflow == 0 {
		cfg.Overflow = def.Overflow
	}
	if cfg.ExpirySweep <= 0 {
		cfg.ExpirySweep = def.ExpirySweep
	}
	if cfg.DLQPrefix == "" {
		cfg.DLQPrefix = def.DLQPrefix
	}
	n := &Node{
		slot:          nodeSlot(cfg.NodeID),
		topicIDPrefix: cfg.NodeID + "-t" + strconv.FormatInt(cfg.Now().UnixMilli(), 36) + "-",
		cfg:           cfg,
		st:            st,
		log:           cfg.Logger.With("component", "replica"),
		dests:         make(map[string]*destination),
		catchUp:       make(map[string]*catchState),
		checking:      make(map[string]chan struct{}),
		loadSig:       make(chan struct{}, 1),
		stop:          make(chan struct{}),
	}
	n.m = newMetrics(cfg.Registerer, n)
	return n
}

const (
	metaSeq = "seq"
	// slotBits low bits of a key name the node that assigned it; the
	// bits above are a time in microseconds (see nextKey).
	slotBits = 12
	// seqReserve is how far ahead of use the recorded key runs (one
	// second of key time), so that about one commit a second records it.
	seqReserve = uint64(time.Second/time.Microsecond) << slotBits
)

// nodeSlot is the low key bits of the node with ID id.
func nodeSlot(id string) uint64 {
	return xxhash.Sum64String(id) & (1<<slotBits - 1)
}

// nextKey returns a new store key. A key is a hybrid logical clock: the
// microseconds since 1970 (or one more than the last key's, when the
// clock is behind it) above slotBits bits naming this node. Keys thus
// grow on this node and sort after every key it has seen (a replicated
// or adopted queue's keys raise seq), and two nodes, which differ in
// their slot, never assign the same key: a new owner that missed some of
// its predecessor's messages cannot overwrite them on other replicas.
// Call with wmu held.
func (n *Node) nextKey() uint64 {
	t := uint64(max(n.cfg.Now().UnixMicro(), 0))
	if last := n.seq >> slotBits; t <= last {
		t = last + 1
	}
	n.seq = t<<slotBits | n.slot
	return n.seq
}

// Recover reads what the store holds: the sequence ceiling and, for every
// queue, its message count, byte count and key range. It reads no message:
// each queue's backlog stays on disk and is read into its window once the
// queue has a subscriber, so a restart takes the same time whatever the
// backlog.
func (n *Node) Recover() error {
	var maxSeq uint64
	if b, err := n.st.Meta(metaSeq); err != nil {
		return fmt.Errorf("read sequence: %w", err)
	} else if len(b) > 0 {
		v, err := strconv.ParseUint(string(b), 10, 64)
		if err != nil {
			return fmt.Errorf("read sequence: %w", err)
		}
		maxSeq = v
	}
	buckets, err := n.st.Buckets()
	if err != nil {
		return fmt.Errorf("recover: %w", err)
	}
	var count int64
	queues := 0
	for _, b := range buckets {
		if b.Count == 0 {
			if k, err := ParseDestination(b.Name); err == nil && k == KindQueue && n.rep == nil {
				// An empty queue still exists (QueueExists): in memory
				// until the sweeper removes it, and its bucket, as idle.
				d := n.destination(b.Name, KindQueue)
				d.mu.Lock()
				d.created = true
				d.mu.Unlock()
			}
			continue
		}
		if k, err := ParseDestination(b.Name); err != nil || k != KindQueue {
			n.log.Warn("store bucket is not a queue; left alone", "bucket", b.Name, "messages", b.Count)
			continue
		}
		maxSeq = max(maxSeq, b.LastKey)
		count += b.Count
		queues++
		if n.rep != nil {
			// Replicated: a queue is served only by its owner, which
			// adopts it (Adopt); until then this is a replica's copy.
			continue
		}
		d := n.destination(b.Name, KindQueue)
		d.mu.Lock()
		d.created = true
		d.onDisk = b.Count
		d.onDiskBytes = b.Bytes
		d.countedTo = b.LastKey
		if b.FirstKey > 0 {
			d.loadedTo = b.FirstKey - 1
		}
		d.mu.Unlock()
	}
	n.seq = maxSeq
	n.seqCeil = maxSeq
	n.log.Info("recovered queues", "queues", queues, "messages", count, "seq", maxSeq)
	return nil
}

// Start starts the loader and the sweeper.
func (n *Node) Start() {
	n.wg.Add(2)
	go n.sweepLoop()
	go n.loadLoop()
}

// Close stops the loader and the sweeper. Callers close subscriptions
// first; the store is closed by its owner after Close returns.
func (n *Node) Close() {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return
	}
	n.closed = true
	close(n.stop)
	n.mu.Unlock()
	n.wg.Wait()
}

// destination returns the destination name, creating it.
func (n *Node) destination(name string, kind Kind) *destination {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.destinationLocked(name, kind)
}

func (n *Node) destinationLocked(name string, kind Kind) *destination {
	d := n.dests[name]
	if d == nil {
		d = &destination{name: name, kind: kind, n: n}
		n.dests[name] = d
	}
	return d
}

// lockDestination returns destination name, created if missing, locked.
// Taking d.mu before Node.mu is released means the sweeper, which removes
// idle queues holding both, cannot remove d between lookup and use.
func (n *Node) lockDestination(name string, kind Kind) *destination {
	n.mu.Lock()
	if n.rep != nil && kind == KindQueue {
		if d := n.dests[name]; d == nil || !d.adopted {
			// Replicated: the bucket may hold a replica's copy; the
			// queue comes into memory counting it (Adopt). Not under
			// wmu: callers of lockDestination never hold it.
			n.mu.Unlock()
			if err := n.Adopt(name); err != nil {
				n.log.Error("queue not adopted", "dest", name, "err", err)
			}
			n.mu.Lock()
		}
	}
	d := n.destinationLocked(name, kind)
	d.mu.Lock()
	n.mu.Unlock()
	return d
}

// Subscribe registers a subscription; messages flow to opts.Deliver from
// now on, the first possibly before Subscribe returns.
func (n *Node) Subscribe(opts SubOptions) (*Subscription, error) {
	kind, err := ParseDestination(opts.Dest)
	if err != nil {
		return nil, err
	}
	if opts.Ack == 0 {
		opts.Ack = AckAuto
	}
	if opts.Ack != AckAuto && kind == KindQueue && (opts.Prefetch <= 0 || opts.Prefetch > n.cfg.MaxUnacked) {
		opts.Prefetch = n.cfg.MaxUnacked
	}
	d := n.lockDestination(opts.Dest, kind)
	if kind == KindQueue {
		if opts.NoCreate && !d.existsLocked() {
			d.mu.Unlock()
			n.dropUncreated(d)
			return nil, &NoSuchQueueError{Dest: opts.Dest}
		}
		d.created = true
	}
	s := &Subscription{d: d, opts: opts, inflight: make(map[uint64]*inflight), active: kind == KindQueue}
	if opts.ByMessageID {
		s.byID = make(map[string]uint64)
	}
	d.subs = append(d.subs, s)
	d.idleSince = time.Time{}
	ops := d.dispatchLocked()
	d.mu.Unlock()
	n.submit(ops)
	if kind == KindTopic {
		// A topic message reaches the subscribers present when its fan-out
		// runs, in store completion order: the subscription starts there
		// too, so it gets exactly the messages whose SENDs came after its
		// SUBSCRIBE on the same connection.
		n.write(nil, false, func(error) {
			d.mu.Lock()
			s.active = true
			d.mu.Unlock()
		}, nil)
	}
	return s, nil
}

// newKeys is the part of a commit that stores messages under new keys.
type newKeys struct {
	msgs []*Message
	dst  []*destination // the queue each message goes to
	move []bool         // a dead-letter move (added without its queue)
}

func (k *newKeys) add(d *destination, m *Message) {
	k.msgs = append(k.msgs, m)
	k.dst = append(k.dst, d)
	k.move = append(k.move, d == nil)
}

// quorumJoin waits for a commit's two outcomes, the local commit's and
// the write quorum's.
type quorumJoin struct {
	mu                    sync.Mutex
	localDone, quorumDone bool
	stored, quorumFailed  bool
}

// local and quorum record an outcome; the second reports both=true, with
// mark=true when the message was stored here and its quorum failed.
func (j *quorumJoin) local(stored bool) (both, mark bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.localDone, j.stored = true, stored
	return j.quorumDone, j.stored && j.quorumFailed
}

func (j *quorumJoin) quorum(failed bool) (both, mark bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.quorumDone, j.quorumFailed = true, failed
	return j.localDone, j.stored && j.quorumFailed
}

// commit submits ops plus a put of every message of nk under a new key,
// in one group commit. Once it commits, each message of nk joins its
// queue, then after runs. done gets the outcome.
func (n *Node) commit(ops []store.Op, nk newKeys, sync bool, after func(), done func(error)) {
	// With replication, done waits for the write quorum as well as for
	// the local commit: a RECEIPT means W durable copies. A local failure
	// wins; a missing quorum leaves the local effects in place (the
	// message is stored here and may still be delivered: the client was
	// told its outcome is unknown).
	var quorum func(error)
	if n.rep != nil && done != nil {
		done, quorum = join2(done)
	}
	// apply makes the local commit's outcome visible; finish then tells
	// the caller. Marking a copy stored without its quorum (below) goes
	// between the two, so that a client told of the failure never finds
	// the copy unmarked.
	apply := func(err error) {
		if err == nil {
			for i, m := range nk.msgs {
				nk.dst[i].committed(m)
			}
			if after != nil {
				after()
			}
		} else {
			for i, m := range nk.msgs {
				nk.dst[i].unreserve(m)
			}
			n.log.Error("store commit failed", "err", err)
		}
	}
	finish := func(err error) {
		apply(err)
		if done != nil {
			done(err)
		}
	}
	if len(nk.msgs) == 0 {
		switch {
		case len(ops) > 0:
			n.write(ops, sync, finish, quorum)
		case sync:
			// Nothing to write, but a receipt still promises that earlier
			// unsynced writes are on disk (and, replicated, on W replicas).
			n.write(nil, true, finish, quorum)
		default:
			// Nothing to write: through the store anyway, so that effects
			// (a topic fan-out) keep the order of earlier frames.
			n.write(nil, false, finish, quorum)
		}
		return
	}
	for i, m := range nk.msgs {
		if nk.dst[i] == nil {
			// A dead-letter move: admitted whatever the limits (it is
			// not a new publish; drop-head still applies once committed).
			d := n.lockDestination(m.Dest, KindQueue)
			d.reserved++
			d.resBytes += int64(len(m.Body))
			d.idleSince = time.Time{}
			d.mu.Unlock()
			nk.dst[i] = d
		}
	}
	if quorum != nil {
		// A message stored here without its write quorum may be stored
		// again by the client's (or the router's) retry, and that copy
		// may be delivered first: once both the local commit and the
		// quorum's failure are known, it is marked possibly delivered
		// (destination.unconfirmed). Until the quorum is known its
		// queue keeps its read-ahead window. Dead-letter moves are not
		// SENDs: nothing retries them, they are not marked.
		j := &quorumJoin{}
		var msgs []*Message
		var dsts []*destination
		for i, m := range nk.msgs {
			if !nk.move[i] {
				msgs, dsts = append(msgs, m), append(dsts, nk.dst[i])
			}
		}
		for _, d := range dsts {
			d.mu.Lock()
			d.awaitingQuorum++
			d.mu.Unlock()
		}
		settle := func(mark bool) {
			for i, m := range msgs {
				if mark {
					dsts[i].unconfirmed(m)
				} else {
					dsts[i].quorumKnown()
				}
			}
		}
		q := quorum
		finish = func(err error) {
			apply(err)
			if both, mark := j.local(err == nil); both {
				settle(mark)
			}
			if done != nil {
				done(err)
			}
		}
		quorum = func(err error) {
			if both, mark := j.quorum(errors.Is(err, ErrNoQuorum)); both {
				settle(mark)
			}
			q(err)
		}
	}
	n.wmu.Lock()
	for _, m := range nk.msgs {
		m.Seq = n.nextKey()
		if m.ID == "" {
			m.ID = n.cfg.NodeID + "-" + strconv.FormatUint(m.Seq, 10)
		}
		ops = append(ops, store.Op{Kind: store.OpPut, Bucket: m.Dest, Key: m.Seq, Value: m.encode()})
	}
	if n.seq > n.seqCeil {
		n.seqCeil = n.seq + seqReserve
		ops = append(ops, store.Op{Kind: store.OpPutMeta, Name: metaSeq, Value: strconv.AppendUint(nil, n.seqCeil, 10)})
	}
	n.write(ops, sync, finish, quorum)
	n.wmu.Unlock()
}

// write submits ops to the store and, with a Replicator, to the replicas
// of the queues they touch, as one step (see rmu). local gets the local
// commit's outcome; quorum, if not nil, the replicas' (nil without a
// Replicator). With sync and no ops it is a barrier: every earlier write
// is durable here and, replicated, on the replicas it was sent to.
func (n *Node) write(ops []store.Op, synced bool, local, quorum func(error)) {
	if n.rep == nil {
		if len(ops) == 0 && synced {
			n.st.Barrier(local)
		} else {
			n.st.Submit(ops, synced, local)
		}
		return
	}
	// A callback the store (closed) or the replicator (quorum met at
	// once) calls before returning runs after rmu is released: callbacks
	// take destination locks, which are taken before rmu elsewhere.
	var dmu sync.Mutex
	var deferred []func()
	inside := true
	later := func(f func(error)) func(error) {
		if f == nil {
			return nil
		}
		return func(err error) {
			dmu.Lock()
			if inside {
				deferred = append(deferred, func() { f(err) })
				dmu.Unlock()
				return
			}
			dmu.Unlock()
			f(err)
		}
	}
	n.rmu.Lock()
	if wc, ok := n.rep.(writeCounter); ok && len(ops) > 0 {
		wc.WriteStarting(ops)
	}
	if len(ops) == 0 && synced {
		n.st.Barrier(later(local))
	} else {
		n.st.Submit(ops, synced, later(local))
	}
	n.rep.Replicate(ops, synced, later(quorum))
	n.rmu.Unlock()
	dmu.Lock()
	inside = false
	run := deferred
	dmu.Unlock()
	for _, f := range run {
		f()
	}
}

// join2 returns two callbacks that call done (if not nil) once both ran,
// with the first one's error if any, else the second's.
func join2(done func(error)) (first, second func(error)) {
	if done == nil {
		done = func(error) {}
	}
	var mu sync.Mutex
	var n int
	var errs [2]error
	end := func(i int) func(error) {
		return func(err error) {
			mu.Lock()
			errs[i] = err
			n++
			last := n == 2
			mu.Unlock()
			if last {
				if errs[0] != nil {
					done(errs[0])
				} else {
					done(errs[1])
				}
			}
		}
	}
	return end(0), end(1)
}

// Apply validates b, then applies it: acknowledgements at once in memory,
// store writes in one group commit, new queue messages visible once
// committed, topic messages fanned out after everything submitted before
// them took effect. done is called once every effect is durable (or
// failed). An invalid ACK, a full queue (ErrQueueFull) or a low disk
// (ErrLowDisk) makes Apply return an error and change nothing.
func (n *Node) Apply(b *Batch, done func(error)) error {
	for _, a := range b.Acks {
		s, ok := a.Sub.(*Subscription)
		if !ok {
			return fmt.Errorf("%w: not a subscription of this node", ErrSubscriptionClosed)
		}
		if err := s.Check(a.Tag); err != nil {
			return err
		}
	}
	var nk newKeys
	var topics []*Message
	queued := 0
	for _, m := range b.Sends {
		k, err := ParseDestination(m.Dest)
		if err != nil {
			return err
		}
		if k == KindQueue {
			queued++
		}
	}
	if len(b.Sends) > 0 && n.st.LowDisk() {
		return fmt.Errorf("%w: free space on the data directory's filesystem is below the configured minimum; new messages are refused until it returns", ErrLowDisk)
	}
	if queued > 0 {
		nk.msgs = make([]*Message, 0, queued)
		nk.dst = make([]*destination, 0, queued)
	}
	for _, m := range b.Sends {
		if !strings.HasPrefix(m.Dest, QueuePrefix) {
			topics = append(topics, m)
			continue
		}
		d := n.lockDestination(m.Dest, KindQueue)
		var err error
		if m.NoCreate && !d.existsLocked() {
			d.mu.Unlock()
			n.dropUncreated(d)
			err = &NoSuchQueueError{Dest: m.Dest}
		} else {
			err = d.reserveLocked(m)
			d.mu.Unlock()
		}
		if err != nil {
			for i, r := range nk.msgs {
				nk.dst[i].unreserve(r)
			}
			return err
		}
		nk.add(d, m)
	}
	var ops []store.Op
	for _, a := range b.Acks {
		ops = a.Sub.(*Subscription).settle(a.Tag, a.Nack, ops, &nk)
	}
	var after func()
	if len(topics) > 0 {
		after = func() {
			for _, m := range topics {
				if m.ID == "" {
					m.ID = n.topicIDPrefix + strconv.FormatUint(n.topicSeq.Add(1), 10)
				}
				n.fanOut(m)
			}
		}
	}
	n.commit(ops, nk, b.Sync, after, done)
	return nil
}

// Barrier calls done once everything applied before is on disk.
func (n *Node) Barrier(done func(error)) {
	if n.rep == nil {
		n.st.Barrier(done)
		return
	}
	local, quorum := join2(done)
	n.write(nil, true, local, quorum)
}

// submit queues internal writes (deletes, delivery counts) without sync. A
// failure fails the store, which stops the node; it is logged here too.
func (n *Node) submit(ops []store.Op) {
	if len(ops) > 0 {
		n.write(ops, false, n.internalDone, nil)
	}
}

func (n *Node) internalDone(err error) {
	if err != nil {
		n.log.Error("store write failed", "err", err)
	}
}

func (n *Node) fanOut(m *Message) {
	n.m.published.WithLabelValues("topic").Inc()
	n.mu.Lock()
	d := n.dests[m.Dest]
	n.mu.Unlock()
	if d == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, s := range d.subs {
		if !s.active {
			continue
		}
		if s.unwritten >= n.cfg.TopicBuffer || len(s.inflight) >= n.cfg.TopicBuffer ||
			(len(s.inflight) > 0 && s.inflightBytes >= n.cfg.MaxUnackedBytes) ||
			(s.opts.Prefetch > 0 && s.opts.Ack != AckAuto && len(s.inflight) >= s.opts.Prefetch) {
			n.m.dropped.Inc()
			continue
		}
		s.deliverLocked(m)
	}
}

// Destinations describes every destination, sorted by name.
func (n *Node) Destinations() []DestinationInfo {
	n.mu.Lock()
	ds := make([]*destination, 0, len(n.dests))
	for _, d := range n.dests {
		ds = append(ds, d)
	}
	n.mu.Unlock()
	out := make([]DestinationInfo, 0, len(ds))
	for _, d := range ds {
		d.mu.Lock()
		info := DestinationInfo{Name: d.name, Kind: d.kind.String(), Pending: int(d.readyLen()),
			Consumers: len(d.subs), Bytes: d.readyBytes(), InMemory: d.memLen()}
		for _, s := range d.subs {
			info.InFlight += len(s.inflight)
		}
		d.mu.Unlock()
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (n *Node) sweepLoop() {
	defer n.wg.Done()
	t := time.NewTicker(n.cfg.ExpirySweep)
	defer t.Stop()
	rotated := time.Now() // housekeeping on the real clock, not Config.Now
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
			n.sweep()
			if now := time.Now(); n.rep != nil && n.cfg.TombstoneTTL > 0 && now.Sub(rotated) >= n.cfg.TombstoneTTL {
				rotated = now
				// A node's own housekeeping: not replicated (each node
				// forgets its tombstones on its own clock).
				n.st.Submit([]store.Op{{Kind: store.OpRotateTombstones}}, false, n.internalDone)
			}
		}
	}
}

// sweep drops expired pending messages held in memory, releases the
// read-ahead window of queues without subscribers, and removes queues
// idle for IdleDeleteAfter. Expired messages still on disk are dropped
// when they are read in.
func (n *Node) sweep() {
	n.mu.Lock()
	ds := make([]*destination, 0, len(n.dests))
	for _, d := range n.dests {
		ds = append(ds, d)
	}
	n.mu.Unlock()
	now := n.cfg.Now()
	for _, d := range ds {
		if d.kind != KindQueue {
			continue
		}
		d.mu.Lock()
		ops := d.expireLocked(now)
		d.releaseLocked()
		idle := d.idleLocked()
		if !idle {
			d.idleSince = time.Time{}
		} else if d.idleSince.IsZero() {
			d.idleSince = now
		}
		remove := idle && n.cfg.IdleDeleteAfter > 0 && now.Sub(d.idleSince) >= n.cfg.IdleDeleteAfter
		d.mu.Unlock()
		n.submit(ops)
		if remove {
			n.removeIdle(d)
		}
	}
}

// removeIdle removes queue d, if it is still idle, and its store bucket.
// wmu is held from before the check to after the bucket's delete is
// submitted: a message to a new queue of this name, which can only be
// created once d is out of the map, takes its key and submits its write
// after the delete (lock order wmu, Node.mu, destination.mu; commit never
// holds the other two while taking wmu).
func (n *Node) removeIdle(d *destination) {
	if n.keepIdle != nil && n.keepIdle(d.name) {
		return
	}
	if !n.removeIdleLocked(d) {
		return
	}
	if n.onRemoved != nil {
		n.onRemoved(d.name)
	}
}

// removeIdleLocked is removeIdle's work under wmu; it reports whether d
// was removed.
func (n *Node) removeIdleLocked(d *destination) bool {
	n.wmu.Lock()
	defer n.wmu.Unlock()
	n.mu.Lock()
	d.mu.Lock()
	ok := n.dests[d.name] == d && d.idleLocked()
	if ok {
		delete(n.dests, d.name)
		d.removed = true
	}
	d.mu.Unlock()
	n.mu.Unlock()
	if !ok {
		return false
	}
	n.log.Debug("idle queue removed", "dest", d.name)
	n.m.idleRemoved.Inc()
	n.write([]store.Op{{Kind: store.OpDeleteBucket, Bucket: d.name}}, false, n.internalDone, nil)
	return true
}

// QueueExists reports whether queue name exists here. A queue exists
// once a message has been stored in it or it has had a subscriber, until
// the sweeper removes it as idle (queue.idle_delete_after), and while its
// store bucket is there: across a restart, and, with a Replicator, on the
// replica that takes it over (Adopt) if that replica holds a copy of it.
// A queue only ever subscribed to and never written to has no bucket: it
// does not outlive its node's memory. Topics always exist. With a
// Replicator, name is adopted first (as any use of the queue does).
func (n *Node) QueueExists(name string) bool {
	if k, err := ParseDestination(name); err != nil || k != KindQueue {
		return err == nil
	}
	d := n.lockDestination(name, KindQueue)
	ok := d.existsLocked()
	d.mu.Unlock()
	if !ok {
		n.dropUncreated(d)
	}
	return ok
}

// dropUncreated forgets queue d if it still does not exist: it came
// into the map only to be refused (NoCreate). No store bucket to delete.
// wmu is held throughout, as by removeIdle: an Adopt of the same name in
// progress finishes first, so what it read is not lost with d.
func (n *Node) dropUncreated(d *destination) {
	n.wmu.Lock()
	n.mu.Lock()
	d.mu.Lock()
	dropped := n.dests[d.name] == d && !d.existsLocked()
	if dropped {
		delete(n.dests, d.name)
		d.removed = true
	}
	d.mu.Unlock()
	n.mu.Unlock()
	n.wmu.Unlock()
	if dropped && n.onRemoved != nil {
		n.onRemoved(d.name)
	}
}

// TagOf finds the outstanding delivery of message id, for STOMP 1.0 and
// 1.1 clients, which acknowledge by message-id.
func (s *Subscription) TagOf(id string) (uint64, bool) {
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	if s.byID != nil {
		t, ok := s.byID[id]
		return t, ok
	}
	var best uint64
	for t, e := range s.inflight {
		if e.msg.ID == id && t > best {
			best = t
		}
	}
	return best, best != 0
}
