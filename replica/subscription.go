package replica

import (
	"sort"

	"github.com/brokerd/brokerd/store"
)

type inflight struct {
	msg     *Message
	written bool
	// acked: removed from the queue while in flight here (RemoveKeys):
	// its ACK writes nothing more, and it is dropped, not returned, when
	// the delivery ends otherwise.
	acked bool
}

// Subscription is one subscriber of one destination.
type Subscription struct {
	d    *destination
	opts SubOptions

	// guarded by d.mu
	nextTag       uint64
	inflight      map[uint64]*inflight
	inflightBytes int               // body bytes in inflight
	byID          map[string]uint64 // message-id to its latest tag, with SubOptions.ByMessageID
	unwritten     int
	closed        bool
	active        bool // topic subscriptions receive from when their SUBSCRIBE took effect in store order
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
	if len(s.inflight) > 0 && s.inflightBytes >= s.d.n.cfg.MaxUnackedBytes {
		return false
	}
	return s.opts.Prefetch <= 0 || len(s.inflight) < s.opts.Prefetch
}

func (s *Subscription) deliverLocked(m *Message) {
	s.nextTag++
	s.inflight[s.nextTag] = &inflight{msg: m}
	s.inflightBytes += len(m.Body)
	if s.byID != nil {
		s.byID[m.ID] = s.nextTag
	}
	s.unwritten++
	s.d.n.m.delivered.Inc()
	inherited := m.Seq > 0 && m.Seq <= s.d.inheritedTo
	if inherited && m.Deliveries == 0 {
		s.d.n.m.inherited.Inc()
	}
	s.opts.Deliver(Delivery{Msg: m, Sub: s, Tag: s.nextTag, Redelivered: m.Deliveries > 0 || inherited, Count: m.Deliveries})
}

// removeLocked takes delivery tag (entry e) out of the in-flight set.
func (s *Subscription) removeLocked(tag uint64, e *inflight) {
	delete(s.inflight, tag)
	s.inflightBytes -= len(e.msg.Body)
	if s.byID != nil && s.byID[e.msg.ID] == tag {
		delete(s.byID, e.msg.ID)
	}
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
			s.removeLocked(tag, e)
			if e.acked {
				continue
			}
			d.n.m.acked.Inc()
			if d.kind == KindQueue {
				ops = append(ops, d.removeOp(e.msg.Seq))
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

// settle removes the acknowledged (or rejected) deliveries, appending the
// store writes to ops and dead-letter moves to nk.
func (s *Subscription) settle(tag uint64, nack bool, ops []store.Op, nk *newKeys) []store.Op {
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
	for _, t := range tags {
		e := s.inflight[t]
		s.removeLocked(t, e)
		if !e.written {
			s.unwritten--
		}
		switch {
		case d.kind == KindTopic:
			if !nack {
				d.n.m.acked.Inc()
			}
		case e.acked:
			// Removed already (RemoveKeys): nothing to return or write.
		case nack:
			ops = d.requeueLocked(e.msg, true, true, ops, nk)
		default:
			d.n.m.acked.Inc()
			ops = append(ops, d.removeOp(e.msg.Seq))
		}
	}
	ops = append(ops, d.dispatchLocked()...)
	d.flushRewritesLocked()
	return ops
}

// Close ends the subscription because its client failed (its connection
// was lost). Its unacknowledged messages go back to the queue (marked
// redelivered if they reached the wire) and to the other subscribers;
// each that reached the wire counts a failed delivery toward
// MaxRedeliveries, as a NACK does. Topic messages are dropped. The store
// writes this makes (delivery counts, dead-letter moves) are submitted
// before Close returns, so a later Barrier covers them.
func (s *Subscription) Close() { s.close(nil, true) }

// Return ends the subscription for any other reason: the client
// unsubscribed or disconnected, or the broker ended it (a shutdown, the
// queue moved, the subscriber's node was lost). Its unacknowledged
// messages go back as with Close, marked redelivered if they reached the
// wire, but their delivery counts only rise from 0 to 1 (the mark): they
// do not count toward MaxRedeliveries, which a churning cluster or a
// consumer that prefetches and leaves would otherwise exhaust for
// messages nobody failed to process.
func (s *Subscription) Return() { s.close(nil, false) }

// CloseFailed is Close for a client that failed holding only the
// deliveries tags (those it had received; a subscriber's node knows
// which): they count toward MaxRedeliveries, the others return as with
// Return.
func (s *Subscription) CloseFailed(tags []uint64) {
	set := make(map[uint64]bool, len(tags))
	for _, t := range tags {
		set[t] = true
	}
	s.close(set, false)
}

// close ends s; a delivery's return counts as a failure when all is set
// or its tag is in failed.
func (s *Subscription) close(failed map[uint64]bool, all bool) {
	d := s.d
	d.mu.Lock()
	if s.closed {
		d.mu.Unlock()
		return
	}
	s.closed = true
	d.removeSub(s)
	var ops []store.Op
	var nk newKeys
	if d.kind == KindQueue {
		tags := make([]uint64, 0, len(s.inflight))
		for t := range s.inflight {
			tags = append(tags, t)
		}
		sort.Slice(tags, func(i, j int) bool { return tags[i] < tags[j] })
		for _, t := range tags {
			e := s.inflight[t]
			if e.acked {
				continue // removed already (RemoveKeys)
			}
			ops = d.requeueLocked(e.msg, e.written, all || failed[t], ops, &nk)
		}
	}
	s.inflight = nil
	s.byID = nil
	s.unwritten = 0
	s.inflightBytes = 0
	ops = append(ops, d.dispatchLocked()...)
	d.flushRewritesLocked()
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
	if len(ops) == 0 && len(nk.msgs) == 0 {
		return
	}
	d.n.commit(ops, nk, false, nil, nil)
}
