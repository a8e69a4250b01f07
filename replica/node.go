package replica

import (
	"container/heap"
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

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
	// ExpirySweep is how often pending messages are checked for expiry.
	ExpirySweep time.Duration
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
		NodeID:          "node",
		MaxRedeliveries: 5,
		DLQPrefix:       "/queue/DLQ.",
		WriteWindow:     256,
		TopicBuffer:     10000,
		ExpirySweep:     time.Second,
		Logger:          slog.Default(),
		Now:             time.Now,
	}
}

// Delivery is one message handed to a subscription.
type Delivery struct {
	Msg *Message
	Sub *Subscription
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
	Prefetch int // unacknowledged messages at most; 0 is unlimited
	// Deliver hands a message to the subscriber. It runs with the
	// destination's lock held: it must not block or call into the Node.
	// The subscriber calls Subscription.Written once the message is on the
	// wire.
	Deliver func(Delivery)
}

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
	Sub  *Subscription
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
}

// Node is the set of destinations of one broker node.
type Node struct {
	cfg Config
	st  *store.Store
	log *slog.Logger
	m   *metrics
	seq atomic.Uint64
	// seqCeil is the sequence number recorded in the store: after a
	// restart numbering resumes above it, so message IDs are never reused
	// even when every message was acknowledged and deleted.
	seqCeil atomic.Uint64
	// Topic messages are not stored: their IDs are unique by a prefix
	// naming this process's start and a counter.
	topicIDPrefix string
	topicSeq      atomic.Uint64

	mu     sync.Mutex
	dests  map[string]*destination
	closed bool

	stop chan struct{}
	wg   sync.WaitGroup
}

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
	if cfg.ExpirySweep <= 0 {
		cfg.ExpirySweep = def.ExpirySweep
	}
	if cfg.DLQPrefix == "" {
		cfg.DLQPrefix = def.DLQPrefix
	}
	n := &Node{
		topicIDPrefix: cfg.NodeID + "-t" + strconv.FormatInt(cfg.Now().UnixMilli(), 36) + "-",
		cfg:           cfg,
		st:            st,
		log:           cfg.Logger.With("component", "replica"),
		dests:         make(map[string]*destination),
		stop:          make(chan struct{}),
	}
	n.m = newMetrics(cfg.Registerer, n)
	return n
}

const (
	metaSeq = "seq"
	// seqReserve is how far ahead of use the recorded sequence runs, so
	// that only one commit in seqReserve records it.
	seqReserve = 1 << 16
)

// reserve returns the store write that records a new ceiling when seq
// passed the recorded one.
func (n *Node) reserve(seq uint64) (store.Op, bool) {
	for {
		c := n.seqCeil.Load()
		if seq <= c {
			return store.Op{}, false
		}
		if n.seqCeil.CompareAndSwap(c, seq+seqReserve) {
			return store.Op{Kind: store.OpPutMeta, Name: metaSeq, Value: strconv.AppendUint(nil, seq+seqReserve, 10)}, true
		}
	}
}

// Recover loads every stored message into its queue. Messages come back
// pending, in sequence order, with their delivery counts.
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
	count := 0
	err := n.st.ForEach(func(bucket string, key uint64, value []byte) error {
		m, err := decodeMessage(bucket, key, value)
		if err != nil {
			return fmt.Errorf("queue %q message %d: %w", bucket, key, err)
		}
		d := n.destination(bucket, KindQueue)
		d.mu.Lock()
		d.fresh = append(d.fresh, m)
		if m.Expires > 0 {
			d.expiring++
		}
		d.mu.Unlock()
		if key > maxSeq {
			maxSeq = key
		}
		count++
		return nil
	})
	if err != nil {
		return fmt.Errorf("recover: %w", err)
	}
	n.seq.Store(maxSeq)
	n.seqCeil.Store(maxSeq)
	n.log.Info("recovered messages", "count", count, "seq", maxSeq)
	return nil
}

// Start starts the expiry sweeper.
func (n *Node) Start() {
	n.wg.Add(1)
	go n.sweepLoop()
}

// Close stops the sweeper. Callers close subscriptions first; the store is
// closed by its owner after Close returns.
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

func (n *Node) destination(name string, kind Kind) *destination {
	n.mu.Lock()
	defer n.mu.Unlock()
	d := n.dests[name]
	if d == nil {
		d = &destination{name: name, kind: kind, n: n}
		n.dests[name] = d
	}
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
	// Find the destination and join it under Node.mu, so that the last
	// subscriber of a topic leaving cannot delete it between the two.
	n.mu.Lock()
	d := n.dests[opts.Dest]
	if d == nil {
		d = &destination{name: opts.Dest, kind: kind, n: n}
		n.dests[opts.Dest] = d
	}
	s := &Subscription{d: d, opts: opts, inflight: make(map[uint64]*inflight)}
	d.mu.Lock()
	n.mu.Unlock()
	d.subs = append(d.subs, s)
	ops := d.dispatchLocked()
	d.mu.Unlock()
	n.submit(ops)
	return s, nil
}

// Apply validates b, then applies it: acknowledgements at once in memory,
// store writes in one group commit, new queue messages visible once
// committed, topic messages fanned out. done is called once every effect is
// durable (or failed). An invalid ACK makes Apply return an error and
// change nothing.
func (n *Node) Apply(b *Batch, done func(error)) error {
	for _, a := range b.Acks {
		if err := a.Sub.Check(a.Tag); err != nil {
			return err
		}
	}
	kinds := make([]Kind, len(b.Sends))
	for i, m := range b.Sends {
		k, err := ParseDestination(m.Dest)
		if err != nil {
			return err
		}
		kinds[i] = k
	}
	var ops []store.Op
	var after []func()
	for _, a := range b.Acks {
		o, f := a.Sub.settle(a.Tag, a.Nack)
		ops = append(ops, o...)
		after = append(after, f...)
	}
	var queued, topics []*Message
	var last uint64
	for i, m := range b.Sends {
		if kinds[i] == KindTopic {
			if m.ID == "" {
				m.ID = n.topicIDPrefix + strconv.FormatUint(n.topicSeq.Add(1), 10)
			}
			topics = append(topics, m)
			continue
		}
		m.Seq = n.seq.Add(1)
		last = m.Seq
		if m.ID == "" {
			m.ID = n.cfg.NodeID + "-" + strconv.FormatUint(m.Seq, 10)
		}
		ops = append(ops, store.Op{Kind: store.OpPut, Bucket: m.Dest, Key: m.Seq, Value: m.encode()})
		queued = append(queued, m)
	}
	if op, ok := n.reserve(last); ok {
		ops = append(ops, op)
	}
	finish := func(err error) {
		if err == nil {
			for _, m := range queued {
				n.enqueue(m)
			}
			for _, f := range after {
				f()
			}
			for _, m := range topics {
				n.fanOut(m)
			}
		} else {
			n.log.Error("store commit failed", "err", err)
		}
		if done != nil {
			done(err)
		}
	}
	if len(ops) == 0 {
		if b.Sync {
			// Nothing to write, but the caller's receipt still promises
			// that earlier unsynced writes are on disk.
			n.st.Barrier(finish)
			return nil
		}
		finish(nil)
		return nil
	}
	n.st.Submit(ops, b.Sync, finish)
	return nil
}

// Barrier calls done once everything applied before is on disk.
func (n *Node) Barrier(done func(error)) { n.st.Barrier(done) }

func (n *Node) submit(ops []store.Op) {
	if len(ops) > 0 {
		n.st.Submit(ops, false, nil)
	}
}

func (n *Node) enqueue(m *Message) {
	d := n.destination(m.Dest, KindQueue)
	d.mu.Lock()
	d.fresh = append(d.fresh, m)
	if m.Expires > 0 {
		d.expiring++
	}
	ops := d.dispatchLocked()
	d.mu.Unlock()
	n.m.published.WithLabelValues("queue").Inc()
	n.submit(ops)
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
		if s.unwritten >= n.cfg.TopicBuffer || len(s.inflight) >= n.cfg.TopicBuffer ||
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
		info := DestinationInfo{Name: d.name, Kind: d.kind.String(), Pending: d.pendingLen(), Consumers: len(d.subs)}
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
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
			n.sweep()
		}
	}
}

// sweep drops expired pending messages of every queue holding any.
func (n *Node) sweep() {
	n.mu.Lock()
	var ds []*destination
	for _, d := range n.dests {
		ds = append(ds, d)
	}
	n.mu.Unlock()
	now := n.cfg.Now()
	for _, d := range ds {
		d.mu.Lock()
		if d.expiring == 0 {
			d.mu.Unlock()
			continue
		}
		var ops []store.Op
		keep := d.fresh[:0]
		for _, m := range d.fresh[d.head:] {
			if m.Expired(now) {
				ops = append(ops, d.expireLocked(m))
				continue
			}
			keep = append(keep, m)
		}
		for i := len(keep); i < len(d.fresh); i++ {
			d.fresh[i] = nil
		}
		d.fresh, d.head = keep, 0
		var rq msgHeap
		for _, m := range d.requeued {
			if m.Expired(now) {
				ops = append(ops, d.expireLocked(m))
				continue
			}
			rq = append(rq, m)
		}
		heap.Init(&rq)
		d.requeued = rq
		d.mu.Unlock()
		n.submit(ops)
	}
}

// destination is one queue or topic.
type destination struct {
	name string
	kind Kind
	n    *Node

	mu       sync.Mutex
	fresh    []*Message // committed, never delivered, in commit order from head
	head     int
	requeued msgHeap // returned messages, lowest sequence first
	expiring int     // pending messages with an expiry
	subs     []*Subscription
	rr       int
}

func (d *destination) pendingLen() int { return len(d.fresh) - d.head + len(d.requeued) }

func (d *destination) pop() *Message {
	if len(d.requeued) > 0 {
		return heap.Pop(&d.requeued).(*Message)
	}
	m := d.fresh[d.head]
	d.fresh[d.head] = nil
	d.head++
	if d.head == len(d.fresh) {
		d.fresh, d.head = d.fresh[:0], 0
	} else if d.head > 1024 && d.head*2 > len(d.fresh) {
		d.fresh = append(d.fresh[:0], d.fresh[d.head:]...)
		d.head = 0
	}
	return m
}

func (d *destination) expireLocked(m *Message) store.Op {
	if m.Expires > 0 {
		d.expiring--
	}
	d.n.m.expired.Inc()
	return store.Op{Kind: store.OpDelete, Bucket: d.name, Key: m.Seq}
}

// dispatchLocked hands pending messages to subscriptions with room, round
// robin, and returns the store writes it needs (deletes of expired messages).
func (d *destination) dispatchLocked() []store.Op {
	if d.kind != KindQueue {
		return nil
	}
	var ops []store.Op
	now := d.n.cfg.Now()
	for d.pendingLen() > 0 && len(d.subs) > 0 {
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
		if m.Expired(now) {
			ops = append(ops, d.expireLocked(m))
			continue
		}
		if m.Expires > 0 {
			d.expiring--
		}
		s.deliverLocked(m)
	}
	return ops
}

// requeueLocked returns m to pending, or moves it to the dead-letter queue
// when it has been delivered too often. It returns the store writes and,
// for a dead-lettered message, what to run once they commit.
func (d *destination) requeueLocked(m *Message, delivered bool) ([]store.Op, func()) {
	n := d.n
	if delivered {
		m.Deliveries++
		n.m.redelivered.Inc()
	}
	if delivered && n.cfg.MaxRedeliveries > 0 && m.Deliveries > n.cfg.MaxRedeliveries &&
		!isDLQ(d.name, n.cfg.DLQPrefix) {
		dl := &Message{
			Dest:    n.cfg.DLQPrefix + d.name[len(QueuePrefix):],
			Seq:     n.seq.Add(1),
			ID:      m.ID,
			Headers: append(append([]string(nil), m.Headers...), "x-original-destination", d.name),
			Body:    m.Body,
			Expires: 0,
		}
		n.m.deadLettered.Inc()
		ops := []store.Op{
			{Kind: store.OpPut, Bucket: dl.Dest, Key: dl.Seq, Value: dl.encode()},
			{Kind: store.OpDelete, Bucket: d.name, Key: m.Seq},
		}
		if op, ok := n.reserve(dl.Seq); ok {
			ops = append(ops, op)
		}
		return ops, func() { n.enqueue(dl) }
	}
	heap.Push(&d.requeued, m)
	if m.Expires > 0 {
		d.expiring++
	}
	if !delivered {
		return nil, nil
	}
	// Keep the delivery count across restarts.
	return []store.Op{{Kind: store.OpPut, Bucket: d.name, Key: m.Seq, Value: m.encode()}}, nil
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

type inflight struct {
	msg     *Message
	written bool
}

// Subscription is one subscriber of one destination.
type Subscription struct {
	d    *destination
	opts SubOptions

	// guarded by d.mu
	nextTag   uint64
	inflight  map[uint64]*inflight
	unwritten int
	closed    bool
}

// Dest returns the destination name.
func (s *Subscription) Dest() string { return s.d.name }

// Kind returns the destination's kind.
func (s *Subscription) Kind() Kind { return s.d.kind }

// AckMode returns the subscription's ack mode.
func (s *Subscription) AckMode() AckMode { return s.opts.Ack }

func (s *Subscription) hasRoom() bool {
	if s.closed || s.unwritten >= s.d.n.cfg.WriteWindow {
		return false
	}
	return s.opts.Prefetch <= 0 || len(s.inflight) < s.opts.Prefetch
}

func (s *Subscription) deliverLocked(m *Message) {
	s.nextTag++
	s.inflight[s.nextTag] = &inflight{msg: m}
	s.unwritten++
	s.d.n.m.delivered.Inc()
	s.opts.Deliver(Delivery{Msg: m, Sub: s, Tag: s.nextTag, Redelivered: m.Deliveries > 0, Count: m.Deliveries})
}

// Written records that the deliveries tags are on the wire. In AckAuto
// mode that acknowledges them.
func (s *Subscription) Written(tags ...uint64) {
	d := s.d
	var ops []store.Op
	d.mu.Lock()
	for _, tag := range tags {
		e := s.inflight[tag]
		if e == nil || e.written {
			continue
		}
		e.written = true
		s.unwritten--
		if s.opts.Ack == AckAuto {
			delete(s.inflight, tag)
			d.n.m.acked.Inc()
			if d.kind == KindQueue {
				ops = append(ops, store.Op{Kind: store.OpDelete, Bucket: d.name, Key: e.msg.Seq})
			}
		}
	}
	ops = append(ops, d.dispatchLocked()...)
	d.mu.Unlock()
	d.n.submit(ops)
}

// Tried records that the deliveries tags may have reached the client
// (the write failed part way): without acknowledging them, even in
// AckAuto mode, so that they come back marked redelivered.
func (s *Subscription) Tried(tags ...uint64) {
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, tag := range tags {
		if e := s.inflight[tag]; e != nil && !e.written {
			e.written = true
			s.unwritten--
		}
	}
}

// Check returns ErrUnknownAck unless tag is outstanding on s.
func (s *Subscription) Check(tag uint64) error {
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	if s.closed {
		return ErrSubscriptionClosed
	}
	if s.inflight[tag] == nil || s.opts.Ack == AckAuto {
		return ErrUnknownAck
	}
	return nil
}

// settle removes the acknowledged (or rejected) deliveries and returns the
// store writes and the work to run after they commit.
func (s *Subscription) settle(tag uint64, nack bool) ([]store.Op, []func()) {
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	var tags []uint64
	if s.opts.Ack == AckClient {
		for t := range s.inflight {
			if t <= tag {
				tags = append(tags, t)
			}
		}
		sort.Slice(tags, func(i, j int) bool { return tags[i] < tags[j] })
	} else if s.inflight[tag] != nil {
		tags = []uint64{tag}
	}
	var ops []store.Op
	var after []func()
	for _, t := range tags {
		e := s.inflight[t]
		delete(s.inflight, t)
		if !e.written {
			s.unwritten--
		}
		switch {
		case d.kind == KindTopic:
			if !nack {
				d.n.m.acked.Inc()
			}
		case nack:
			o, f := d.requeueLocked(e.msg, true)
			ops = append(ops, o...)
			if f != nil {
				after = append(after, f)
			}
		default:
			d.n.m.acked.Inc()
			ops = append(ops, store.Op{Kind: store.OpDelete, Bucket: d.name, Key: e.msg.Seq})
		}
	}
	ops = append(ops, d.dispatchLocked()...)
	return ops, after
}

// Close ends the subscription. Its unacknowledged messages go back to the
// queue (marked redelivered if they reached the wire) and to the other
// subscribers; topic messages are dropped.
func (s *Subscription) Close() {
	d := s.d
	d.mu.Lock()
	if s.closed {
		d.mu.Unlock()
		return
	}
	s.closed = true
	d.removeSub(s)
	var ops []store.Op
	var after []func()
	if d.kind == KindQueue {
		tags := make([]uint64, 0, len(s.inflight))
		for t := range s.inflight {
			tags = append(tags, t)
		}
		sort.Slice(tags, func(i, j int) bool { return tags[i] < tags[j] })
		for _, t := range tags {
			e := s.inflight[t]
			o, f := d.requeueLocked(e.msg, e.written)
			ops = append(ops, o...)
			if f != nil {
				after = append(after, f)
			}
		}
	}
	s.inflight = nil
	s.unwritten = 0
	ops = append(ops, d.dispatchLocked()...)
	empty := d.kind == KindTopic && len(d.subs) == 0
	d.mu.Unlock()
	if empty {
		n := d.n
		n.mu.Lock()
		d.mu.Lock()
		if len(d.subs) == 0 && n.dests[d.name] == d {
			delete(n.dests, d.name)
		}
		d.mu.Unlock()
		n.mu.Unlock()
	}
	if len(ops) == 0 {
		for _, f := range after {
			f()
		}
		return
	}
	d.n.st.Submit(ops, false, func(err error) {
		if err != nil {
			return
		}
		for _, f := range after {
			f()
		}
	})
}

// msgHeap orders messages by sequence.
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

// TagOf finds the outstanding delivery of message id, for STOMP 1.0 and
// 1.1 clients, which acknowledge by message-id.
func (s *Subscription) TagOf(id string) (uint64, bool) {
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	var best uint64
	for t, e := range s.inflight {
		if e.msg.ID == id && t > best {
			best = t
		}
	}
	return best, best != 0
}
