package node

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// routedSub is a session's queue subscription (replica.Sub). Its queue's
// owner holds the real subscription (host.go); a poller of this node
// reads its deliveries. Delivery tags are this node's own, mapped to the
// owner's, so that a subscription that moves to a new owner (failover,
// re-placement) keeps unique tags: deliveries of a former owner that
// were not acknowledged are redelivered by the new one, and an ACK of
// such a delivery is accepted and has no effect there.
type routedSub struct {
	rt   *router
	id   string
	opts replica.SubOptions

	mu       sync.Mutex
	owner    string
	gen      uint64 // increments with each bind
	p        *poller
	nextTag  uint64
	inflight map[uint64]*flight
	byID     map[string]uint64
	// redirected holds tags of current deliveries already acknowledged
	// through an ACK of a former binding's delivery of the same message:
	// the client's own ACK of them is then a no-op, not an error.
	redirected map[uint64]struct{}
	// dupIDs: two deliveries with one message-id have been in flight at
	// once (the copies of a retried SEND), so forget looks for another.
	dupIDs    bool
	unwritten int
	closed    bool
	rebinding bool
	// bound: a bind has succeeded. Until then every bind carries
	// opts.NoCreate; after, the queue has existed, and a rebind at a new
	// owner (which may not know it, as a queue only ever subscribed to
	// has no bucket to take over) carries none.
	bound bool
}

type flight struct {
	gen   uint64
	otag  uint64 // the owner's tag
	id    string
	write bool
	msg   *replica.Message // auto mode: republished if it never reaches the wire
	key   uint64           // the message's key in its queue (see ackKeys)
}

// window bounds the deliveries handed to the session and not written.
func (rs *routedSub) window() int { return 256 }

// ownerID is the subscription's ID at its owner for generation gen.
func (rs *routedSub) ownerID(gen uint64) string { return rs.id + "." + strconv.FormatUint(gen, 10) }

// bind subscribes at the queue's current owner.
func (rs *routedSub) bind() error {
	rt := rs.rt
	deadline := time.Now().Add(notOwnerRetry)
	v := rt.view()
	for {
		owner := rt.ownerOf(v, rs.opts.Dest)
		if owner == "" {
			if time.Now().After(deadline) {
				return errNoActiveSet
			}
			time.Sleep(50 * time.Millisecond)
			v = rt.refresh()
			continue
		}
		rs.mu.Lock()
		if rs.closed {
			rs.mu.Unlock()
			return replica.ErrSubscriptionClosed
		}
		gen := rs.gen + 1
		rs.mu.Unlock()
		err := rs.subscribeAt(owner, v, gen)
		if err == nil {
			rs.mu.Lock()
			rs.owner, rs.gen, rs.bound = owner, gen, true
			closed := rs.closed
			rs.mu.Unlock()
			if closed {
				rs.unsubscribeAt(owner, gen, nil)
				return replica.ErrSubscriptionClosed
			}
			return rt.attach(owner, rs, gen)
		}
		if !isNotOwner(err) && !errors.Is(err, errNotOwner) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
		v = rt.refresh()
	}
}

func (rs *routedSub) subscribeAt(owner string, v viewSnap, gen uint64) error {
	rt := rs.rt
	prefetch := rs.opts.Prefetch
	rs.mu.Lock()
	noCreate := rs.opts.NoCreate && !rs.bound
	rs.mu.Unlock()
	if owner == v.self {
		return rt.host.subscribe(v.self, rs.ownerID(gen), rs.opts.Dest, rs.opts.Ack, prefetch, noCreate)
	}
	errc := make(chan error, 1)
	// Ends with the router: a re-bind in the background must not hold a
	// stopping node (a binding the owner makes anyway is never polled,
	// and the owner ends it after subIdle).
	ctx, cancel := context.WithTimeout(rt.ctx, forwardTimeout)
	defer cancel()
	hdrs := []string{
		frame.Destination, rs.opts.Dest, hdrSub, rs.ownerID(gen), frame.Ack, rs.opts.Ack.String(), hdrPrefetch, strconv.Itoa(max(prefetch, 0)),
	}
	if noCreate {
		hdrs = append(hdrs, hdrNoCreate, "1")
	}
	err := rt.fwd.request(ctx, owner, opSubscribe, hdrs, nil, func(_ *frame.Frame, err error) { errc <- err })
	if err != nil {
		return peerErr(err)
	}
	select {
	case err = <-errc:
	case <-rt.stop:
		return fmt.Errorf("%w: the node is stopping", replica.ErrNoQuorum)
	}
	if err != nil {
		if isNotOwner(err) {
			return err
		}
		return peerErr(err)
	}
	return nil
}

// unsubscribeAt ends the subscription's binding gen at owner, without
// waiting: an owner that is down or slow ends it itself once this node
// stops polling for it (subIdle).
//
// failed: the client failed holding these deliveries (tags at the
// owner), which count toward queue.max_redeliveries
// (replica.Subscription.CloseFailed); the rest return marked only.
func (rs *routedSub) unsubscribeAt(owner string, gen uint64, failed []uint64) {
	rt := rs.rt
	if owner == rt.view().self {
		rt.host.unsubscribe(owner, rs.ownerID(gen), failed)
		return
	}
	hdrs := []string{hdrSub, rs.ownerID(gen)}
	var body []byte
	if len(failed) > 0 {
		hdrs = append(hdrs, hdrFailed, "1")
		body = encodeTags(nil, failed)
	}
	rt.goBackground(func() {
		ctx, cancel := context.WithTimeout(context.Background(), forwardTimeout)
		defer cancel()
		done := make(chan struct{})
		if err := rt.fwd.request(ctx, owner, opUnsubscribe, hdrs, body, func(*frame.Frame, error) { close(done) }); err != nil {
			return
		}
		select {
		case <-done:
		case <-ctx.Done():
		case <-rt.stop:
		}
	})
}

// lost is called by the poller when the owner no longer has the
// subscription or cannot be reached: bind again, in the background, at
// whoever owns the queue now.
func (rs *routedSub) lost(gen uint64) {
	rs.mu.Lock()
	if rs.closed || rs.gen != gen || rs.rebinding {
		rs.mu.Unlock()
		return
	}
	rs.rebinding = true
	old, p := rs.owner, rs.p
	rs.p = nil
	rs.mu.Unlock()
	if p != nil {
		p.remove(rs)
	}
	rs.rt.goBackground(func() {
		rs.unsubscribeAt(old, gen, nil) // the binding was lost: the broker's doing
		rs.rebind()
	})
}

// rebindLater binds rs in the background: its first bind failed.
func (rs *routedSub) rebindLater(gen uint64) {
	rs.mu.Lock()
	if rs.closed || rs.gen != gen || rs.rebinding {
		rs.mu.Unlock()
		return
	}
	rs.rebinding = true
	rs.mu.Unlock()
	rs.rt.goBackground(rs.rebind)
}

// rebind binds rs until it succeeds, rs is closed or the router stops.
func (rs *routedSub) rebind() {
	{
		backoff := 100 * time.Millisecond
		for {
			err := rs.bind()
			if err == nil || errors.Is(err, replica.ErrSubscriptionClosed) {
				break
			}
			if errors.Is(err, replica.ErrNoSuchQueue) {
				// Its first bind failed (the owner was unreachable), and
				// the queue does not exist: it waits until it does.
				rs.rt.log.Info("a subscription whose user may not create its queue waits for the queue to exist", "dest", rs.opts.Dest)
			} else {
				rs.rt.log.Info("a subscription lost its queue's owner; subscribing again", "dest", rs.opts.Dest, "err", err)
			}
			select {
			case <-rs.rt.stop:
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 2*time.Second)
		}
		rs.mu.Lock()
		rs.rebinding = false
		rs.mu.Unlock()
	}
}

// credit is how many more deliveries the session can take now.
func (rs *routedSub) credit() int {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.closed {
		return 0
	}
	return max(rs.window()-rs.unwritten, 0)
}

// deliver hands one delivery of generation gen to the session.
func (rs *routedSub) deliver(gen uint64, w wireDelivery) {
	rs.mu.Lock()
	if rs.closed || rs.gen != gen {
		rs.mu.Unlock()
		if rs.opts.Ack == replica.AckAuto {
			// The owner counted it acknowledged when it handed it out.
			rs.rt.republish(w.msg, false) // never handed to the session
		}
		return
	}
	rs.nextTag++
	tag := rs.nextTag
	f := &flight{gen: gen, otag: w.tag, id: w.msg.ID, key: w.key}
	if rs.opts.Ack == replica.AckAuto {
		f.msg = w.msg
	}
	rs.inflight[tag] = f
	if rs.byID != nil {
		if old, ok := rs.byID[w.msg.ID]; ok && rs.inflight[old] != nil {
			rs.dupIDs = true // two copies of one SEND (a retry) in flight
		}
		rs.byID[w.msg.ID] = tag
	}
	rs.unwritten++
	rs.mu.Unlock()
	rs.opts.Deliver(replica.Delivery{Msg: w.msg, Sub: rs, Tag: tag, Redelivered: w.redelivered, Count: w.count})
}

func (rs *routedSub) forget(tag uint64, f *flight) {
	delete(rs.inflight, tag)
	if rs.byID != nil && rs.byID[f.id] == tag {
		delete(rs.byID, f.id)
		if rs.dupIDs {
			// Another copy with the same message-id may still be in
			// flight: it is the one to find now.
			for t, g := range rs.inflight {
				if g.id == f.id {
					rs.byID[f.id] = t
					break
				}
			}
		}
	}
}

// TagOf implements replica.Sub.
func (rs *routedSub) TagOf(id string) (uint64, bool) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	t, ok := rs.byID[id]
	return t, ok
}

// Written implements replica.Sub.
func (rs *routedSub) Written(tags ...uint64) { rs.wrote(tags, false) }

// Tried implements replica.Sub: the owner already counts handed-out
// messages as written (they come back marked redelivered); in auto mode,
// where handing out acknowledged them, they are published again.
func (rs *routedSub) Tried(tags ...uint64) { rs.wrote(tags, true) }

func (rs *routedSub) wrote(tags []uint64, tried bool) {
	rs.mu.Lock()
	wake := rs.unwritten >= rs.window()
	var again []*replica.Message
	for _, t := range tags {
		f := rs.inflight[t]
		if f == nil || f.write {
			continue
		}
		f.write = true
		rs.unwritten--
		if rs.opts.Ack == replica.AckAuto {
			if tried && f.msg != nil {
				again = append(again, f.msg)
			}
			rs.forget(t, f)
		}
	}
	p := rs.p
	rs.mu.Unlock()
	for _, m := range again {
		rs.rt.republish(m, true) // the write failed part way
	}
	if wake && p != nil {
		p.wake()
	}
}

// Check implements replica.Sub.
func (rs *routedSub) Check(tag uint64) error {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.closed {
		return replica.ErrSubscriptionClosed
	}
	if _, ok := rs.redirected[tag]; ok {
		return nil
	}
	if rs.inflight[tag] == nil || rs.opts.Ack == replica.AckAuto {
		return replica.ErrUnknownAck
	}
	return nil
}

// ack forwards an ACK or NACK of tag to the owner. In client mode it
// covers every earlier delivery too.
//
// A delivery of a binding that has ended (the owner released the queue,
// or could not be reached, and the subscription is bound again or being
// bound) has no subscription at its owner any more: its message is back
// in the queue. In client-individual mode its ACK is redirected to the
// current binding's delivery of the same message-id when there is one;
// otherwise the message is removed from the queue by its key at the
// queue's current owner (ackKeys), and the ACK's outcome is that
// removal's: a RECEIPT means it took effect. A NACK of such a delivery
// does nothing (the message is back already).
func (rs *routedSub) ack(tag uint64, nack, sync bool, done func(error)) {
	rs.mu.Lock()
	f := rs.inflight[tag]
	if f == nil {
		delete(rs.redirected, tag)
		rs.mu.Unlock()
		done(nil) // settled by an earlier cumulative ACK, or redirected
		return
	}
	// cur: keys of the current binding's deliveries this ACK settles;
	// former: those of ended bindings.
	var cur, former []uint64
	if rs.opts.Ack == replica.AckClient {
		for t, g := range rs.inflight {
			if t <= tag {
				if !g.write {
					rs.unwritten--
				}
				rs.forget(t, g)
				if g.gen == rs.gen && !rs.rebinding {
					cur = append(cur, g.key)
				} else {
					former = append(former, g.key)
				}
			}
		}
	} else {
		if !f.write {
			rs.unwritten--
		}
		rs.forget(tag, f)
	}
	current := f.gen == rs.gen && !rs.rebinding
	if !current && !nack && !rs.rebinding && rs.opts.Ack == replica.AckClientIndividual && len(rs.redirected) < 4*rs.window() {
		// A delivery of a former binding: its owner gave the message
		// back, and the current binding may have it again, under
		// another tag. Acknowledge that delivery instead: the client
		// meant this message. (Not in client mode, where the owner's
		// ACK is cumulative and would cover deliveries the client has
		// not acknowledged.)
		if t, ok := rs.byID[f.id]; ok && t != tag {
			if g := rs.inflight[t]; g != nil && g.gen == rs.gen {
				if !g.write {
					rs.unwritten--
				}
				rs.forget(t, g)
				if rs.redirected == nil {
					rs.redirected = map[uint64]struct{}{}
				}
				rs.redirected[t] = struct{}{}
				f, current = g, true
			}
		}
	}
	if rs.opts.Ack != replica.AckClient {
		if current {
			cur = []uint64{f.key}
		} else {
			former = []uint64{f.key}
		}
	}
	owner, id, dest := rs.owner, rs.ownerID(f.gen), rs.opts.Dest
	rs.mu.Unlock()
	rt := rs.rt
	if nack {
		// The former bindings' deliveries are back in the queue.
		former = nil
	}
	// A delivery whose owner did not send its key (a node of an earlier
	// version) cannot be removed by key: its ACK takes no effect, as
	// before.
	former = slices.DeleteFunc(former, func(k uint64) bool { return k == 0 })
	cur = slices.DeleteFunc(cur, func(k uint64) bool { return k == 0 })
	if !current {
		if len(former) == 0 {
			done(nil)
			return
		}
		rt.ackKeys(dest, former, done)
		return
	}
	if len(former) > 0 {
		// Client mode: earlier deliveries of ended bindings as well.
		all := replica.JoinN(2, done)
		rt.ackKeys(dest, former, all)
		done = all
	}
	// The owner ended the subscription (it released the queue) before
	// this node heard: the message is back in the queue, and is removed
	// by key as above.
	gone := func() {
		if nack || len(cur) == 0 {
			done(nil)
			return
		}
		rt.ackKeys(dest, cur, done)
	}
	v := rt.view()
	if owner == v.self {
		if err := rt.host.ack(owner, id, f.otag, nack, sync, done); err != nil {
			if errors.Is(err, errUnknownSub) {
				gone()
				return
			}
			done(err)
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), forwardTimeout)
	n := "0"
	if nack {
		n = "1"
	}
	// Unsynced unless the client asked for a receipt: the next barrier
	// of this node syncs it at the owner (ackbarrier.go).
	sy := "1"
	unsynced := !sync && rt.markAckUnsynced(owner, dest, false)
	if unsynced {
		sy = "0"
	}
	err := rt.fwd.request(ctx, owner, opAck, []string{hdrSub, id, hdrTag, strconv.FormatUint(f.otag, 10), hdrNack, n, hdrSync, sy}, nil, func(_ *frame.Frame, err error) {
		cancel()
		var pe *stomp.PeerError
		if errors.As(err, &pe) && pe.Code == codeUnknownSub {
			gone()
			return
		}
		done(peerErr(err))
	})
	if unsynced {
		// Again, now that the ACK is queued on the link: a barrier that
		// took the pair between the two calls was sent before it.
		rt.markAckUnsynced(owner, dest, true)
	}
	if err != nil {
		cancel()
		done(peerErr(err))
	}
}

// ackKeys removes the messages stored under keys from queue dest at the
// queue's current owner (replica.Node.RemoveKeys): the ACK of a delivery
// whose binding has ended. Keys are unique in the cluster and a
// take-over keeps them, so the owner finds the message wherever it is
// now (pending, on disk, or handed out again), and a copy not merged yet
// stays removed when it arrives. A removal is idempotent, so a failure
// (an owner that refuses as not its own while views differ, a link that
// is down, no write quorum yet) is tried again with a fresh view for up
// to notOwnerRetry, as ownership settles. done gets the outcome, in the
// background.
func (rt *router) ackKeys(dest string, keys []uint64, done func(error)) {
	rt.pmu.Lock()
	closed := rt.closed
	if !closed {
		rt.wg.Add(1)
	}
	rt.pmu.Unlock()
	if closed {
		done(fmt.Errorf("%w: the node is stopping", replica.ErrNoQuorum))
		return
	}
	go func() {
		defer rt.wg.Done()
		deadline := time.Now().Add(notOwnerRetry)
		v := rt.view()
		for {
			remote, err := rt.ackKeysAt(v, dest, keys)
			if remote {
				if isNotOwner(err) {
					err = fmt.Errorf("%w: %w", errNotOwner, err)
				} else {
					err = peerErr(err)
				}
			}
			if err == nil || errors.Is(err, replica.ErrBadDestination) || time.Now().After(deadline) {
				if errors.Is(err, errNotOwner) {
					err = fmt.Errorf("%w: %w", replica.ErrNoQuorum, err)
				}
				done(err)
				return
			}
			select {
			case <-rt.stop:
				done(fmt.Errorf("%w: the node is stopping", replica.ErrNoQuorum))
				return
			case <-time.After(50 * time.Millisecond):
			}
			v = rt.refresh()
		}
	}()
}

// ackKeysAt asks the owner of dest in view v to remove keys; remote says
// whether the error came from the peer link.
func (rt *router) ackKeysAt(v viewSnap, dest string, keys []uint64) (remote bool, err error) {
	switch owner := rt.ownerOf(v, dest); owner {
	case "":
		return false, errNoActiveSet
	case v.self:
		return false, rt.removeKeysHere(dest, keys)
	default:
		body := make([]byte, 0, len(keys)*binary.MaxVarintLen64)
		for _, k := range keys {
			body = binary.AppendUvarint(body, k)
		}
		errc := make(chan error, 1)
		ctx, cancel := context.WithTimeout(context.Background(), forwardTimeout)
		defer cancel()
		if err := rt.fwd.request(ctx, owner, opAckKeys, []string{frame.Destination, dest}, body, func(_ *frame.Frame, err error) { errc <- err }); err != nil {
			return true, err
		}
		select {
		case err := <-errc:
			return true, err
		case <-time.After(forwardTimeout):
			return true, fmt.Errorf("%s: no answer within %v", owner, forwardTimeout)
		case <-rt.stop:
			return true, stomp.ErrPeerClosed
		}
	}
}

// removeKeysHere removes keys from dest, which this node must own.
func (rt *router) removeKeysHere(dest string, keys []uint64) error {
	v := rt.refresh()
	if o := rt.ownerOf(v, dest); o != v.self {
		return fmt.Errorf("%w: %s is owned by %s", errNotOwner, dest, o)
	}
	if err := rt.ensureOwned(dest); err != nil {
		return err
	}
	ch := make(chan error, 1)
	if err := rt.rep.RemoveKeys(dest, keys, func(err error) { ch <- err }); err != nil {
		return err
	}
	return <-ch
}

// Close implements replica.Sub: the subscription ends because its client
// failed. The owner closes its subscription, and the messages in flight
// return to the queue; those the client had received count toward
// queue.max_redeliveries.
func (rs *routedSub) Close() { rs.close(true) }

// Return ends the subscription for another reason: its messages return
// marked redelivered, not counted (replica.Subscription.Return).
func (rs *routedSub) Return() { rs.close(false) }

func (rs *routedSub) close(failed bool) {
	rs.mu.Lock()
	if rs.closed {
		rs.mu.Unlock()
		return
	}
	rs.closed = true
	owner, gen, p := rs.owner, rs.gen, rs.p
	var again []*replica.Message
	var written []uint64 // the current binding's deliveries the client got
	for _, f := range rs.inflight {
		if f.msg != nil && !f.write {
			again = append(again, f.msg) // auto mode, never on the wire
		}
		if failed && f.write && f.gen == gen && !rs.rebinding && f.otag != 0 && len(written) < maxForwardMessages {
			written = append(written, f.otag)
		}
	}
	rs.inflight = map[uint64]*flight{}
	rs.byID = nil
	rs.mu.Unlock()
	// After rs.mu: republish takes the router's lock (order: pmu, rs.mu).
	for _, m := range again {
		rs.rt.republish(m, false) // the session never wrote it
	}
	if p != nil {
		p.remove(rs)
	}
	if owner != "" {
		rs.unsubscribeAt(owner, gen, written)
	}
}

// poller reads the deliveries of this node's subscriptions at one owner.
type poller struct {
	rt    *router
	owner string
	ctx   context.Context
	stopF context.CancelFunc
	sig   chan struct{}

	mu      sync.Mutex
	subs    map[string]*routedSub // by ID at the owner
	gens    map[string]uint64
	stopped bool
}

func newPoller(rt *router, owner string) *poller {
	p := &poller{rt: rt, owner: owner, sig: make(chan struct{}, 1), subs: map[string]*routedSub{}, gens: map[string]uint64{}}
	p.ctx, p.stopF = context.WithCancel(context.Background())
	return p
}

func (p *poller) cancel() { p.stopF() }

func (p *poller) wake() {
	select {
	case p.sig <- struct{}{}:
	default:
	}
}

func (p *poller) remove(rs *routedSub) {
	p.mu.Lock()
	for id, s := range p.subs {
		if s == rs {
			delete(p.subs, id)
			delete(p.gens, id)
		}
	}
	p.mu.Unlock()
	p.wake()
}

// run polls the owner while this node has subscriptions there.
func (p *poller) run() {
	defer p.rt.wg.Done()
	backoff := 50 * time.Millisecond
	for {
		if p.rt.pollerDone(p) {
			return
		}
		p.mu.Lock()
		var b strings.Builder
		ids := make(map[string]*routedSub, len(p.subs))
		gens := make(map[string]uint64, len(p.subs))
		anyCredit := false
		for id, rs := range p.subs {
			c := rs.credit()
			anyCredit = anyCredit || c > 0
			b.WriteString(id)
			b.WriteByte(' ')
			b.WriteString(strconv.Itoa(c))
			b.WriteByte('\n')
			ids[id] = rs
			gens[id] = p.gens[id]
		}
		p.mu.Unlock()
		if !anyCredit {
			// Nothing to ask for: wait for the sessions to write, but
			// poll at least every second so the owner keeps the
			// subscriptions (see subIdle).
			select {
			case <-p.ctx.Done():
				return
			case <-p.sig:
			case <-time.After(time.Second):
			}
		}
		res, err := p.poll([]byte(b.String()))
		if p.ctx.Err() != nil {
			return
		}
		if err != nil {
			// The owner is down or unreachable: every subscription binds
			// again, at the same owner or the one that replaces it.
			p.rt.log.Debug("poll failed", "owner", p.owner, "err", err)
			for id, rs := range ids {
				rs.lost(gens[id])
			}
			select {
			case <-p.ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 50 * time.Millisecond
		for _, id := range res.gone {
			if rs := ids[id]; rs != nil {
				rs.lost(gens[id])
			}
		}
		for _, d := range res.dels {
			if rs := ids[d.sub]; rs != nil {
				rs.deliver(gens[d.sub], d)
			}
		}
	}
}

type pollAnswer struct {
	gone []string
	dels []wireDelivery
}

func (p *poller) poll(body []byte) (pollAnswer, error) {
	rt := p.rt
	v := rt.view()
	items, err := parsePoll(body)
	if err != nil {
		return pollAnswer{}, err
	}
	if p.owner == v.self {
		res := rt.host.poll(v.self, items, true)
		dels, err := decodeKeyedDeliveries(res.body, true)
		return pollAnswer{gone: res.gone, dels: dels}, err
	}
	type answer struct {
		f   *frame.Frame
		err error
	}
	ch := make(chan answer, 1)
	ctx, cancel := context.WithTimeout(p.ctx, forwardTimeout)
	defer cancel()
	if err := rt.fwd.request(ctx, p.owner, opPoll, []string{hdrKeys, "1"}, body, func(f *frame.Frame, err error) { ch <- answer{f, err} }); err != nil {
		return pollAnswer{}, err
	}
	var a answer
	select {
	case a = <-ch:
	case <-p.ctx.Done():
		return pollAnswer{}, p.ctx.Err()
	}
	if a.err != nil {
		return pollAnswer{}, a.err
	}
	dels, err := decodeKeyedDeliveries(a.f.Body, a.f.Header.Get(hdrKeys) == "1")
	if err != nil {
		return pollAnswer{}, err
	}
	var gone []string
	if g := a.f.Header.Get(hdrGone); g != "" {
		gone = strings.Split(g, ",")
	}
	return pollAnswer{gone: gone, dels: dels}, nil
}
