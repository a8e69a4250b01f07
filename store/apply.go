package store

import (
	"sync"
	"time"
)

// applier copies logged groups into bbolt on its own goroutine, several
// groups per transaction, at most one transaction per interval unless
// someone waits for it (a checkpoint, a read, Close) or the queue holds
// flushBytes. Its transactions are fsynced (except under SyncNone): bbolt
// with NoSync may write a meta page before the pages it points to, which a
// power failure turns into a corrupt file that no replay can repair.
type applier struct {
	s          *Store
	interval   time.Duration
	flushBytes int

	mu      sync.Mutex
	cond    sync.Cond // broadcast when applied or err changes, or on abandon
	queue   [][]byte  // logged payloads not yet in bbolt
	queued  int       // bytes in queue
	handed  uint64    // sequence number of the last queued payload
	applied uint64    // sequence number of the last payload committed to bbolt
	flushTo uint64    // commit up to here without waiting for the interval
	err     error     // sticky: bbolt or log failure
	stop    bool      // apply what is queued, then exit
	abandon bool      // exit now (crash simulation)

	wake   chan struct{}
	exited chan struct{}
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
func (a *applier) enqueue(p []byte, seq uint64) {
	a.mu.Lock()
	wasEmpty := len(a.queue) == 0
	a.queue = append(a.queue, p)
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

// waitCurrent returns once everything queued so far is in bbolt.
func (a *applier) waitCurrent() error { return a.waitApplied(a.lastHanded()) }

func (a *applier) failure() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.err
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

func (a *applier) run() {
	defer close(a.exited)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	last := time.Now()
	for {
		a.mu.Lock()
		if a.abandon || (a.stop && (len(a.queue) == 0 || a.err != nil)) {
			a.mu.Unlock()
			return
		}
		if len(a.queue) == 0 || a.err != nil {
			a.queue, a.queued = nil, 0
			a.mu.Unlock()
			<-a.wake
			continue
		}
		if !a.stop && a.flushTo <= a.applied && a.queued < a.flushBytes {
			if d := time.Until(last.Add(a.interval)); d > 0 {
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
		batch, upto := a.queue, a.handed
		a.queue, a.queued = nil, 0
		a.mu.Unlock()

		err := a.s.applyLogged(batch, upto)
		last = time.Now()

		a.mu.Lock()
		if err != nil {
			a.err = err
		} else {
			a.applied = upto
		}
		a.cond.Broadcast()
		a.mu.Unlock()
	}
}
