package node

import (
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/store"
)

// Transactions over queues of several owners. A COMMIT whose SENDs go to
// queues with different owners cannot be applied in one step anywhere, so
// the node where it arrived (the coordinator) first records its queue
// messages durably in its own store (a meta record "txn/..."), then
// applies each owner's part. Once every part is applied the record is
// removed. A part that fails (its owner unreachable beyond the failover
// budget, its queue full, a disk low) does not undo the others: the client
// gets an ERROR saying the transaction is recorded, and the coordinator
// applies the remaining parts in the background, retrying with backoff
// until they are applied; a restart resumes every record left on disk. So
// a COMMIT's messages end up all applied, never some of them, as long as
// the coordinator's disk survives. A part applied again after a restart (or
// after an outcome that was unknown) may store a message twice, with the
// same message-id.
//
// ACKs and NACKs in the transaction, and its topic messages, are applied
// at commit as in any batch (an ACK's effect cannot be deferred: the
// delivery it names ends with its subscription).

const (
	txnPrefix = "txn/"
	// maxTxnPending and maxTxnPendingBytes (message bodies) bound the
	// transactions being applied or completed in the background; past
	// them a multi-owner COMMIT is refused, changing nothing (one is
	// always let through when none is pending).
	maxTxnPending      = 1024
	maxTxnPendingBytes = 256 << 20
	txnRetryMin        = 200 * time.Millisecond
	txnRetryMax        = 10 * time.Second
)

var errTxnBacklog = fmt.Errorf("%w: too many transactions over several queues' owners are still being completed", replica.ErrNoQuorum)

type txnRec struct {
	name     string
	bytes    int64
	msgs     []*replica.Message // what is left to apply (never in a queue: copies)
	next     time.Time
	backoff  time.Duration
	running  bool
	attempts int
}

type txnLog struct {
	rt      *router
	mu      sync.Mutex
	pending map[string]*txnRec
	bytes   int64 // bodies of pending
	seq     uint64
	wake    chan struct{}
}

func newTxnLog(rt *router) *txnLog {
	return &txnLog{rt: rt, pending: map[string]*txnRec{}, wake: make(chan struct{}, 1)}
}

// copies returns fresh copies of msgs, for an apply (an applied message
// belongs to its queue and must not be touched again).
func copies(msgs []*replica.Message) []*replica.Message {
	out := make([]*replica.Message, len(msgs))
	for i, m := range msgs {
		c := *m
		c.Seq = 0
		out[i] = &c
	}
	return out
}

// commit records sends (queue messages of several owners, each with its
// message-id assigned), applies them, and calls done: nil once every part
// is applied, or the first part's error (the rest then completes in the
// background). It returns an error, changing nothing, when the record
// cannot be taken.
func (tl *txnLog) commit(sends []*replica.Message, done func(error)) error {
	if tl.rt.st.LowDisk() {
		return fmt.Errorf("%w: free space on the data directory's filesystem is below the configured minimum; new messages are refused until it returns", replica.ErrLowDisk)
	}
	var size int64
	for _, m := range sends {
		size += int64(len(m.Body))
	}
	tl.mu.Lock()
	if len(tl.pending) > 0 && (len(tl.pending) >= maxTxnPending || tl.bytes+size > maxTxnPendingBytes) {
		tl.mu.Unlock()
		return errTxnBacklog
	}
	tl.seq++
	name := txnPrefix + tl.rt.prefix + "-" + strconv.FormatUint(tl.seq, 10)
	rec := &txnRec{name: name, bytes: size, msgs: copies(sends), running: true, backoff: txnRetryMin}
	tl.pending[name] = rec
	tl.bytes += size
	tl.mu.Unlock()
	// Later SENDs to these queues wait for this first attempt (as for a
	// retried SEND), so that one connection's SENDs keep their order.
	untrack := tl.rt.trackRetry(rec.msgs)
	body := encodeMessages(nil, rec.msgs)
	tl.rt.st.Submit([]store.Op{{Kind: store.OpPutMeta, Name: name, Value: body}}, true, func(err error) {
		if err != nil {
			tl.drop(rec)
			untrack()
			done(fmt.Errorf("recording the transaction: %w", err))
			return
		}
		// Off the store's completion goroutine (not goBackground: after
		// the router closed it would never run, and done must be called;
		// the record stays and the next start applies it).
		go tl.attempt(rec, time.Now(), func(err error) {
			untrack()
			if err != nil {
				err = fmt.Errorf("%w (the transaction is recorded; its remaining messages are applied as soon as their queues accept them)", err)
			}
			done(err)
		})
	})
	return nil
}

// drop forgets rec (complete, or never recorded).
func (tl *txnLog) drop(rec *txnRec) {
	tl.mu.Lock()
	if tl.pending[rec.name] == rec {
		delete(tl.pending, rec.name)
		tl.bytes -= rec.bytes
	}
	tl.mu.Unlock()
}

// attempt applies what is left of rec, grouped by owner in a fresh view;
// the messages of the parts that fail stay in rec. done gets the first
// part's error, or nil once rec is complete (its record is then removed).
func (tl *txnLog) attempt(rec *txnRec, since time.Time, done func(error)) {
	rt := tl.rt
	if len(rec.msgs) == 0 {
		tl.drop(rec)
		rt.st.Submit([]store.Op{{Kind: store.OpDeleteMeta, Name: rec.name}}, false, func(error) {})
		done(nil)
		return
	}
	rec.attempts++
	v := rt.refresh()
	byOwner := map[string][]*replica.Message{}
	for _, m := range rec.msgs {
		o := rt.ownerOf(v, m.Dest)
		byOwner[o] = append(byOwner[o], m)
	}
	var mu sync.Mutex
	var left []*replica.Message
	var first error
	all := replica.JoinN(len(byOwner), func(error) {
		mu.Lock()
		err := first
		rest := left
		mu.Unlock()
		tl.mu.Lock()
		rec.msgs = rest
		rec.running = false
		complete := len(rest) == 0
		if complete {
			if tl.pending[rec.name] == rec {
				delete(tl.pending, rec.name)
				tl.bytes -= rec.bytes
			}
		} else {
			rec.next = time.Now().Add(rec.backoff)
			rec.backoff = min(2*rec.backoff, txnRetryMax)
		}
		tl.mu.Unlock()
		if complete {
			rt.st.Submit([]store.Op{{Kind: store.OpDeleteMeta, Name: rec.name}}, false, func(error) {})
		} else {
			tl.signal()
		}
		done(err)
	})
	for o, ms := range byOwner {
		part := func(err error) {
			if errors.Is(err, replica.ErrNoSuchQueue) {
				// Refused for good, storing nothing: the queue was
				// there at COMMIT (checkExist) and has been removed
				// as idle since. Not retried.
				rt.log.Warn("a transaction's SENDs to a queue their user may not create were dropped: the queue was removed since COMMIT", "record", rec.name, "messages", len(ms))
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
				all(nil)
				return
			}
			if err != nil {
				if mayHaveStored(err) {
					// The next attempt stores this part marked
					// (maybeDelivered).
					ms = maybeDelivered(ms)
				}
				mu.Lock()
				left = append(left, ms...)
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
			all(nil)
		}
		batch := copies(ms)
		switch {
		case o == "":
			part(errNoActiveSet)
		case o != v.self:
			rt.forwardSends(o, batch, since, rec.attempts > 1, part)
		default:
			err := error(nil)
			for _, m := range batch {
				if err = rt.ensureOwned(m.Dest); err != nil {
					break
				}
			}
			if err == nil {
				err = rt.rep.Apply(&replica.Batch{Sends: batch, Sync: true}, rt.retryLocal(batch, since, part))
			}
			if err != nil {
				part(err)
			}
		}
	}
}

func (tl *txnLog) signal() {
	select {
	case tl.wake <- struct{}{}:
	default:
	}
}

// resume loads the records a previous run left (its coordinator stopped
// before every part was applied); they are applied by run.
func (tl *txnLog) resume() error {
	return tl.rt.st.MetaPrefix(txnPrefix, func(name string, value []byte) error {
		msgs, err := decodeMessages(value, 1<<30)
		if err != nil {
			tl.rt.log.Error("a recorded transaction cannot be read; left on disk", "record", name, "err", err)
			return nil
		}
		var size int64
		for _, m := range msgs {
			size += int64(len(m.Body))
		}
		// The previous run may have applied any part of it before it
		// stopped: what is applied again goes out marked.
		msgs = maybeDelivered(msgs)
		tl.mu.Lock()
		if tl.pending[name] == nil {
			tl.pending[name] = &txnRec{name: name, bytes: size, msgs: msgs, backoff: txnRetryMin}
			tl.bytes += size
		}
		tl.mu.Unlock()
		tl.rt.log.Info("resuming a transaction over several queues' owners", "record", name, "messages", len(msgs))
		return nil
	})
}

// run retries the transactions left incomplete until the router stops.
func (tl *txnLog) run(stop <-chan struct{}) {
	t := time.NewTicker(txnRetryMin)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		case <-tl.wake:
		}
		now := time.Now()
		var due []*txnRec
		tl.mu.Lock()
		for _, rec := range tl.pending {
			if !rec.running && !now.Before(rec.next) {
				rec.running = true
				due = append(due, rec)
			}
		}
		tl.mu.Unlock()
		for _, rec := range due {
			tl.attempt(rec, now, func(err error) {
				if err == nil {
					tl.rt.log.Info("a transaction over several queues' owners is complete", "record", rec.name)
				} else if !errors.Is(err, replica.ErrNoQuorum) {
					tl.rt.log.Warn("a transaction over several queues' owners is still incomplete; retrying", "record", rec.name, "err", err)
				}
			})
		}
	}
}

// incomplete returns how many transactions are being completed.
func (tl *txnLog) incomplete() int {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	return len(tl.pending)
}
