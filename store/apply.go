package store

import (
	"sync"
	"sync/atomic"
	"time"
)

// applier copies logged groups into bbolt on its own goroutine, several
// groups per transaction, at most one transaction per interval unless
// someone waits for it (a segment switch, a read, Close) or the queue holds
// flushBytes. It applies only records the log holds durably (under
// SyncNone, every record written): if bbolt held a commit the log lost, a
// replay of the log's older records would bring back values that commit
// replaced. When it needs records that are written but not yet synced, it
// asks the writer, the only goroutine that syncs the log, and waits.
//
// Its transactions are fsynced by bbolt's commit (except under SyncNone):
// bbolt with NoSync may write a meta page before the pages it points to,
// which a power failure turns into a corrupt file that no replay can
// repair.
type applier struct {
	s          *Store
	interval   time.Duration
	flushBytes int
	// lastTx is the duration of the last transaction (applier goroutine
	// only); the next waits max(interval, applyBackoff x lastTx).
	lastTx time.Duration

	// wantSync is set by the applier when it waits for a sync of the log;
	// the writer clears it and wakes the applier after its next sync.
	wantSync atomic.Bool

	mu      sync.Mutex
	cond    sync.Cond // broadcast when applied or err changes, or on abandon
	queue   []logged  // logged payloads not yet in bbolt, in order
	taken   []logged  // the payloads of the transaction in progress
	queued  int       // bytes in queue
	handed  uint64    // sequence number of the last queued payload
	applied uint64    // sequence number of the last payload committed to bbolt
	flushTo uint64    // commit up to here without waiting for the interval
	err     error     // sticky: the store failed
	stop    bool      // apply what is queued, then exit
	abandon bool      // exit now (crash simulation)

	wake   chan struct{}
	exited chan struct{}
}

type logged struct {
	p   []byte
	seq uint64
	pos walPos // where the record ends in the log
	// touched is what the record changes that a Scan can see.
	touched touched
}

// touched summarises the queue entries a record changes: per bucket, the
// highest key it puts or deletes (all keys for a deleted bucket). A Scan
// of a bucket after some key waits only for records that change a key
// above it there. Past maxTouched buckets it gives up: all.
type touched struct {
	buckets []touch
	all     bool
}

type touch struct {
	bucket string
	maxKey uint64
}

const maxTouched = 8

func (t *touched) add(op *Op) {
	var k uint64
	switch op.Kind {
	case OpPut, OpDelete, OpTombstone:
		k = op.Key
	case OpDeleteBucket:
		k = ^uint64(0)
	default:
		return
	}
	if t.all {
		return
	}
	for i := range t.buckets {
		if t.buckets[i].bucket == op.Bucket {
			t.buckets[i].maxKey = max(t.buckets[i].maxKey, k)
			return
		}
	}
	if len(t.buckets) == maxTouched {
		t.buckets, t.all = nil, true
		return
	}
	t.buckets = append(t.buckets, touch{op.Bucket, k})
}

// affects reports whether the record may change what a Scan of bucket
// after key after returns.
func (t *touched) affects(bucket string, after uint64) bool {
	if t.all {
		return true
	}
	for i := range t.buckets {
		if t.buckets[i].bucket == bucket {
			return t.buckets[i].maxKey > after
		}
	}
	return false
}

// applyBackoff scales the last transaction's duration into the shortest
// wait before the next one that nobody waits for: bbolt work then takes at
// most 1/(applyBackoff+1) of the time. A bbolt commit writes the whole
// freelist, which after a large backlog drains holds millions of free
// pages, so a transaction can take far longer than ApplyInterval. Reads,
// segment switches, checkpoints and a quarter segment queued do not wait.
const applyBackoff = 4

// wait is the time between two transactions that nobody waits for.
func (a *applier) wait() time.Duration {
	return max(a.interval, applyBackoff*a.lastTx)
}

func newApplier(s *Store, interval time.Duration, flushBytes int) *applier {
	a := &applier{s: s, interval: interval, flushBytes: flushBytes, wake: make(chan struct{}, 1), exited: make(chan struct{})}
	a.cond.L = &a.mu
	return a
}

func (a *applier) signal() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// enqueue hands the applier the payload of record seq, which is written to
// the log (not necessarily synced).
func (a *applier) enqueue(p []byte, seq uint64, pos walPos, t touched) {
	a.mu.Lock()
	wasEmpty := len(a.queue) == 0
	a.queue = append(a.queue, logged{p, seq, pos, t})
	a.queued += len(p)
	a.handed = seq
	full := a.queued >= a.flushBytes && a.queued-len(p) < a.flushBytes
	a.mu.Unlock()
	if wasEmpty || full {
		a.signal()
	}
}

// lastHanded is the sequence number of the last queued payload.
func (a *applier) lastHanded() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.handed
}

// waitApplied returns once every payload up to seq is committed to bbolt,
// asking the applier not to wait for its interval.
func (a *applier) waitApplied(seq uint64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.applied >= seq || a.err != nil {
		return a.err
	}
	if seq > a.flushTo {
		a.flushTo = seq
		a.signal()
	}
	for a.applied < seq && a.err == nil && !a.abandon {
		a.cond.Wait()
	}
	if a.err == nil && a.applied < seq {
		return ErrClosed
	}
	return a.err
}

// appliedUpTo is the sequence number of the last payload in bbolt.
func (a *applier) appliedUpTo() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.applied
}

// waitCurrent returns once everything queued so far is in bbolt.
func (a *applier) waitCurrent() error { return a.waitApplied(a.lastHanded()) }

// waitScan returns once every payload queued so far that may change what
// a Scan of bucket after key after returns is in bbolt; a consumer whose
// acknowledgements (deletes of keys it has read) are all that is queued
// does not force a bbolt transaction to read on, unless flushBytes or
// more are queued: then it waits for them all.
func (a *applier) waitScan(bucket string, after uint64) error {
	a.mu.Lock()
	need := uint64(0)
	if a.queued >= a.flushBytes {
		// The applier is behind: the reader waits for it, which bounds
		// the records (and their memory) queued behind a fast consumer.
		need = a.handed
	}
	for _, l := range [2][]logged{a.queue, a.taken} {
		for i := len(l) - 1; i >= 0 && need == 0; i-- {
			if l[i].touched.affects(bucket, after) {
				need = l[i].seq
			}
		}
	}
	a.mu.Unlock()
	return a.waitApplied(need)
}

// fail records the store's failure: the applier stops, waiters return err.
func (a *applier) fail(err error) {
	a.mu.Lock()
	if a.err == nil {
		a.err = err
	}
	a.cond.Broadcast()
	a.mu.Unlock()
	a.signal()
}

// finish stops the applier once its queue is applied; abandon stops it at
// once, leaving the queue to replay.
func (a *applier) finish(abandon bool) {
	a.mu.Lock()
	a.stop = true
	a.abandon = a.abandon || abandon
	a.cond.Broadcast()
	a.mu.Unlock()
	a.signal()
	<-a.exited
}

// durableUpTo is the last record the applier may apply.
func (a *applier) durableUpTo() uint64 {
	if a.s.durable {
		return a.s.synced.Load()
	}
	return a.s.written.Load()
}

func (a *applier) run() {
	defer close(a.exited)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	last := time.Now()
	for {
		a.mu.Lock()
		if a.abandon || a.err != nil || (a.stop && len(a.queue) == 0) {
			a.queue, a.queued = nil, 0
			a.mu.Unlock()
			return
		}
		if len(a.queue) == 0 {
			a.mu.Unlock()
			<-a.wake
			continue
		}
		urgent := a.stop || a.flushTo > a.applied || a.queued >= a.flushBytes
		if !urgent {
			if d := time.Until(last.Add(a.wait())); d > 0 {
				a.mu.Unlock()
				timer.Reset(d)
				select {
				case <-a.wake:
				case <-timer.C:
				}
				timer.Stop()
				continue
			}
		}
		limit := a.durableUpTo()
		n, size := 0, 0
		for n < len(a.queue) && a.queue[n].seq <= limit {
			n++
			size += len(a.queue[n-1].p)
			if size >= a.flushBytes {
				// One transaction takes about flushBytes: its memory
				// (bbolt's nodes for every page it changes) stays
				// bounded; the rest is still urgent.
				break
			}
		}
		if n < len(a.queue) && a.queue[n].seq > limit {
			// Ask the writer to sync the rest; it wakes us after.
			a.wantSync.Store(true)
			a.s.requestSync()
			if n == 0 {
				a.mu.Unlock()
				if a.durableUpTo() < a.queue0() {
					<-a.wake
				}
				continue
			}
		}
		batch := make([][]byte, n)
		bytes := 0
		for i := range batch {
			batch[i] = a.queue[i].p
			bytes += len(batch[i])
		}
		upto, pos := a.queue[n-1].seq, a.queue[n-1].pos
		a.taken = a.queue[:n:n]
		a.queue = a.queue[n:]
		if len(a.queue) == 0 {
			a.queue = nil
		}
		a.queued -= bytes
		a.mu.Unlock()

		start := time.Now()
		err := a.s.applyLogged(batch, pos)
		last = time.Now()
		a.lastTx = last.Sub(start)

		a.mu.Lock()
		if err == nil {
			a.applied = upto
		}
		a.taken = nil
		a.cond.Broadcast()
		a.mu.Unlock()
		if err != nil {
			a.s.setFailed(err)
		}
	}
}

// queue0 is the sequence number of the first queued payload.
func (a *applier) queue0() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.queue) == 0 {
		return 0
	}
	return a.queue[0].seq
}
