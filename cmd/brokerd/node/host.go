package node

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/store"
)

// The host holds, on a queue's owner, the subscriptions that clients of
// any node (this one included) have on the queue: one
// replica.Subscription each, whose deliveries wait in a bounded buffer
// until the subscriber's node polls for them. A poll names each
// subscription with its credit (how many more messages the subscriber's
// session can take); it is answered as soon as some subscription with
// credit has deliveries, or after pollWait with none.
//
// Messages handed out in a poll answer count as written: in the client
// ack modes they stay in flight until acknowledged (bounded by the
// subscription's prefetch), and if the subscriber goes away they return
// marked redelivered; in auto mode handing out acknowledges them, as
// RabbitMQ's auto-ack does on sending.

var (
	errNotOwner   = errors.New("not the owner of this queue")
	errUnknownSub = errors.New("unknown subscription")
)

const (
	pollWait = 250 * time.Millisecond
	// subIdle: a subscription whose node has not polled for it this long
	// is closed (its node died or was cut off, or its unsubscribe was
	// lost); its messages return.
	subIdle = 10 * time.Second
	// maxHostSubs bounds the subscriptions one node may hold here.
	maxHostSubs = 1 << 16
	// maxGone bounds the subscriptions one poll answer names gone: their
	// IDs share one header line (peer limit 8 KiB; IDs are ~40 bytes).
	maxGone = 64
	// pollBytes bounds one poll answer's bodies.
	pollBytes = 1 << 20
)

type host struct {
	rt *router

	qmu    sync.Mutex
	queues map[string]*workQueue // per peer: forwarded SENDs, in order

	mu      sync.Mutex
	subs    map[string]*hostSub      // by requester + "\x00" + id
	perPeer map[string]int           // subscriptions per requester
	signal  map[string]chan struct{} // per requester: deliveries arrived
	polled  map[string]time.Time     // per requester: last poll
	byDest  map[string]map[*hostSub]bool
}

type hostSub struct {
	key, peer, id, dest string
	rs                  *replica.Subscription
	auto                bool
	polled              time.Time // last named in a poll (or made); guarded by host.mu

	mu   sync.Mutex
	buf  []replica.Delivery
	gone bool
}

func newHost(rt *router) *host {
	return &host{rt: rt, queues: map[string]*workQueue{}, subs: map[string]*hostSub{}, perPeer: map[string]int{}, signal: map[string]chan struct{}{}, polled: map[string]time.Time{}, byDest: map[string]map[*hostSub]bool{}}
}

func subKey(peer, id string) string { return peer + "\x00" + id }

func (h *host) sig(peer string) chan struct{} {
	c := h.signal[peer]
	if c == nil {
		c = make(chan struct{}, 1)
		h.signal[peer] = c
	}
	return c
}

// subscribe opens subscription id of peer on dest, which this node must
// own. Subscribing again with the same id is a no-op.
func (h *host) subscribe(peer, id, dest string, mode replica.AckMode, prefetch int, noCreate bool) error {
	// A fresh view (it becomes the cached one): ensureOwned takes the
	// queue over again if nodes appeared since it was taken over, and a
	// new subscription must not start on an unmerged queue.
	v := h.rt.refresh()
	if o := h.rt.ownerOf(v, dest); o != v.self {
		return fmt.Errorf("%w: %s is owned by %s", errNotOwner, dest, o)
	}
	if err := h.rt.ensureOwned(dest); err != nil {
		return err
	}
	key := subKey(peer, id)
	h.mu.Lock()
	if h.subs[key] != nil {
		h.mu.Unlock()
		return nil
	}
	if h.perPeer[peer] >= maxHostSubs {
		h.mu.Unlock()
		return fmt.Errorf("too many subscriptions from %s (%d)", peer, maxHostSubs)
	}
	hs := &hostSub{key: key, peer: peer, id: id, dest: dest, auto: mode == replica.AckAuto, polled: time.Now()}
	h.subs[key] = hs
	h.perPeer[peer]++
	if h.byDest[dest] == nil {
		h.byDest[dest] = map[*hostSub]bool{}
	}
	h.byDest[dest][hs] = true
	h.polled[peer] = time.Now()
	c := h.sig(peer)
	h.mu.Unlock()
	rs, err := h.rt.rep.Subscribe(replica.SubOptions{
		Dest: dest, Ack: mode, Prefetch: prefetch, NoCreate: noCreate,
		// Under the queue's lock: append and signal, never block.
		Deliver: func(d replica.Delivery) {
			hs.mu.Lock()
			hs.buf = append(hs.buf, d)
			hs.mu.Unlock()
			select {
			case c <- struct{}{}:
			default:
			}
		},
	})
	if err != nil {
		h.remove(hs)
		return err
	}
	hs.mu.Lock()
	hs.rs = rs
	gone := hs.gone
	hs.mu.Unlock()
	if gone {
		rs.Return() // nothing was handed out yet
	}
	return nil
}

// remove forgets hs; it returns false if it was already gone.
func (h *host) remove(hs *hostSub) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.subs[hs.key] != hs {
		return false
	}
	delete(h.subs, hs.key)
	h.perPeer[hs.peer]--
	if h.perPeer[hs.peer] <= 0 {
		delete(h.perPeer, hs.peer)
	}
	delete(h.byDest[hs.dest], hs)
	if len(h.byDest[hs.dest]) == 0 {
		delete(h.byDest, hs.dest)
	}
	return true
}

// end closes hs: its undelivered buffer and in-flight messages return to
// the queue (marked redelivered once handed out). failed: the subscriber's
// client failed holding these deliveries (their tags here), which count
// toward queue.max_redeliveries (replica.Subscription.CloseFailed); the
// others (and all of them when failed is empty: the broker or the client
// ended it) are only marked (Return).
func (h *host) end(hs *hostSub, failed []uint64) {
	if !h.remove(hs) {
		return
	}
	hs.mu.Lock()
	hs.gone = true
	rs := hs.rs
	hs.buf = nil
	hs.mu.Unlock()
	switch {
	case rs == nil:
	case len(failed) == 1 && failed[0] == allFailed[0]:
		rs.Close()
	case len(failed) > 0:
		rs.CloseFailed(failed)
	default:
		rs.Return()
	}
}

// allFailed, as end's failed, counts every handed-out delivery (tag 0 is
// never a delivery's).
var allFailed = []uint64{0}

func (h *host) unsubscribe(peer, id string, failed []uint64) {
	h.mu.Lock()
	hs := h.subs[subKey(peer, id)]
	h.mu.Unlock()
	if hs != nil {
		h.end(hs, failed)
	}
}

// closeDest ends every subscription of dest (ownership moved): their
// nodes see them gone and subscribe at the new owner. The replica's
// Release then drops the queue without writes.
func (h *host) closeDest(dest string) {
	h.mu.Lock()
	var hss []*hostSub
	for hs := range h.byDest[dest] {
		hss = append(hss, hs)
	}
	h.mu.Unlock()
	for _, hs := range hss {
		if h.remove(hs) {
			hs.mu.Lock()
			hs.gone = true
			hs.buf = nil
			hs.mu.Unlock()
		}
	}
	h.mu.Lock()
	for _, hs := range hss {
		if c := h.signal[hs.peer]; c != nil {
			select {
			case c <- struct{}{}:
			default:
			}
		}
	}
	h.mu.Unlock()
}

func (h *host) closeAll() {
	h.mu.Lock()
	var hss []*hostSub
	for _, hs := range h.subs {
		hss = append(hss, hs)
	}
	h.mu.Unlock()
	for _, hs := range hss {
		h.end(hs, nil)
	}
}

// sweep ends the subscriptions their nodes stopped polling for: the node
// died or was cut off, or it ended the subscription and its unsubscribe
// was lost (a poller names every subscription it holds in every poll, at
// least once a second).
func (h *host) sweep(stop chan struct{}, wg *sync.WaitGroup) {
	defer wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		now := time.Now()
		h.mu.Lock()
		var idle []*hostSub
		for _, hs := range h.subs {
			if now.Sub(hs.polled) > subIdle {
				idle = append(idle, hs)
			}
		}
		for p, at := range h.polled {
			if now.Sub(at) > subIdle && h.perPeer[p] == 0 {
				delete(h.polled, p)
				delete(h.signal, p)
			}
		}
		h.mu.Unlock()
		for _, hs := range idle {
			h.rt.log.Info("closing a forwarded subscription: its node stopped polling for it", "peer", hs.peer, "dest", hs.dest, "sub", hs.id)
			h.end(hs, nil) // the broker's failure, not the client's
		}
	}
}

func (h *host) lookup(peer, id string) *hostSub {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.subs[subKey(peer, id)]
}

// ack acknowledges (or rejects) delivery tag of subscription id of peer.
func (h *host) ack(peer, id string, tag uint64, nack, sync bool, done func(error)) error {
	hs := h.lookup(peer, id)
	if hs == nil {
		return fmt.Errorf("%w %q", errUnknownSub, id)
	}
	hs.mu.Lock()
	rs := hs.rs
	hs.mu.Unlock()
	if rs == nil {
		return fmt.Errorf("%w %q", errUnknownSub, id)
	}
	return h.rt.rep.Apply(&replica.Batch{Acks: []replica.AckOp{{Sub: rs, Tag: tag, Nack: nack}}, Sync: sync}, done)
}

type pollItem struct {
	id     string
	credit int
}

type pollResult struct {
	body []byte
	n    int
	gone []string
}

// parsePoll reads "id credit" lines.
func parsePoll(b []byte) ([]pollItem, error) {
	var items []pollItem
	for _, line := range bytes.Split(b, []byte{'\n'}) {
		if len(line) == 0 {
			continue
		}
		id, c, ok := strings.Cut(string(line), " ")
		credit, err := strconv.Atoi(c)
		if !ok || err != nil || credit < 0 || id == "" || len(items) >= maxHostSubs {
			return nil, errBadBody
		}
		items = append(items, pollItem{id, min(credit, 1<<16)})
	}
	return items, nil
}

func joinIDs(ids []string) string { return strings.Join(ids, ",") }

// poll hands out the deliveries waiting for peer's subscriptions, up to
// each one's credit, waiting up to pollWait for some; keyed, with each
// message's key (appendKeyedDelivery).
func (h *host) poll(peer string, items []pollItem, keyed bool) pollResult {
	deadline := time.NewTimer(pollWait)
	defer deadline.Stop()
	h.mu.Lock()
	now := time.Now()
	for _, it := range items {
		if hs := h.subs[subKey(peer, it.id)]; hs != nil {
			hs.polled = now
		}
	}
	h.mu.Unlock()
	for {
		h.mu.Lock()
		h.polled[peer] = time.Now()
		c := h.sig(peer)
		h.mu.Unlock()
		var res pollResult
		for _, it := range items {
			hs := h.lookup(peer, it.id)
			if hs == nil {
				// At most maxGone per answer (a header line is bounded);
				// the rest are named by the next polls.
				if len(res.gone) < maxGone {
					res.gone = append(res.gone, it.id)
				}
				continue
			}
			if it.credit == 0 || len(res.body) >= pollBytes {
				continue
			}
			hs.mu.Lock()
			k := 0
			var tags []uint64
			for k < len(hs.buf) && k < it.credit && len(res.body) < pollBytes {
				d := hs.buf[k]
				if keyed {
					res.body = appendKeyedDelivery(res.body, it.id, d.Tag, d)
				} else {
					res.body = appendDelivery(res.body, it.id, d.Tag, d)
				}
				tags = append(tags, d.Tag)
				k++
			}
			hs.buf = hs.buf[k:]
			if len(hs.buf) == 0 {
				hs.buf = nil
			}
			rs := hs.rs
			hs.mu.Unlock()
			if len(tags) > 0 && rs != nil {
				res.n += len(tags)
				rs.Written(tags...)
			}
		}
		if res.n > 0 || len(res.gone) > 0 {
			return res
		}
		select {
		case <-c:
		case <-deadline.C:
			return res
		}
	}
}

// pullChunk reads dest's stored messages after key after, for a new
// owner taking the queue over.
func (h *host) pullChunk(dest string, after uint64) (body []byte, n int, last uint64, more bool, err error) {
	var ops []store.Op
	size := 0
	err = h.rt.st.Scan(dest, after, pullMessages+1, pullBytes, func(k uint64, v []byte) error {
		if len(ops) == pullMessages || size >= pullBytes {
			more = true
			return nil
		}
		ops = append(ops, store.Op{Kind: store.OpPut, Bucket: dest, Key: k, Value: append([]byte(nil), v...)})
		size += len(v)
		last = k
		return nil
	})
	if err != nil {
		return nil, 0, 0, false, err
	}
	more = more || len(ops) >= pullMessages || size >= pullBytes
	if len(ops) == 0 {
		return nil, 0, after, false, nil
	}
	return replica.AppendOps(nil, ops), len(ops), last, more, nil
}

// pullTombstones reads dest's tombstones above key after, for a new
// owner taking the queue over: it applies them, so that copies of
// messages removed here (acknowledged, expired, dead-lettered) are not
// delivered again.
func (h *host) pullTombstones(dest string, after uint64) (body []byte, n int, last uint64, more bool, err error) {
	var ops []store.Op
	// Bounded by bytes too: each op carries the queue's name.
	limit := max(1, min(pullTombstones, pullBytes/(len(dest)+1+2*binary.MaxVarintLen64)))
	err = h.rt.st.ScanTombstones(dest, after, limit+1, func(k uint64) error {
		if len(ops) == limit {
			more = true
			return nil
		}
		ops = append(ops, store.Op{Kind: store.OpTombstone, Bucket: dest, Key: k})
		last = k
		return nil
	})
	if err != nil || len(ops) == 0 {
		return nil, 0, after, false, err
	}
	return replica.AppendOps(nil, ops), len(ops), last, more, nil
}

// workQueue runs functions one at a time in push order on its own
// goroutine, which ends when the queue is empty. Its length is bounded by
// the peer server's requests in flight per connection.
type workQueue struct {
	mu      sync.Mutex
	q       []func()
	running bool
}

func (h *host) sendQueue(peer string) *workQueue {
	h.qmu.Lock()
	defer h.qmu.Unlock()
	w := h.queues[peer]
	if w == nil {
		w = &workQueue{}
		h.queues[peer] = w
	}
	return w
}

func (w *workQueue) push(f func()) {
	w.mu.Lock()
	w.q = append(w.q, f)
	if w.running {
		w.mu.Unlock()
		return
	}
	w.running = true
	w.mu.Unlock()
	go func() {
		for {
			w.mu.Lock()
			if len(w.q) == 0 {
				w.running = false
				w.q = nil
				w.mu.Unlock()
				return
			}
			f := w.q[0]
			w.q[0] = nil
			w.q = w.q[1:]
			w.mu.Unlock()
			f()
		}
	}()
}
