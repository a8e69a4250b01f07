package replica

import (
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/brokerd/brokerd/store"
)

// Anti-entropy: an owner periodically compares each queue it serves with
// every other replica's copy, by summary rather than by content. The
// summary is the bucket's count, body bytes and key hash (the XOR of a mix
// of its keys, kept exact by the store), taken after every write handed to
// Replicate so far has committed, and sent as a check on the same FIFO
// peer link as those writes, so the replica compares it with its copy as
// of the same writes. A queue written between the two is skipped this
// round (its writes keep the copies in step, and a failed one already
// starts a catch-up). The outcomes:
//
//   - equal: the copy is complete. A copy the owner knew nothing of (the
//     queue was not written since the replica set changed, a merge, a
//     restart) is then relied on without being copied again: so a quiet
//     queue costs one check, not a copy of its bucket.
//   - different (or no answer): the copy is rebuilt by a catch-up in the
//     background, which sends the owner's tombstones (removing what the
//     replica holds of removed messages) and messages.
//   - still different right after such a rebuild: the replica holds
//     messages the owner lacks (a catch-up never removes a message the
//     owner has no tombstone for: it may be the only copy of a receipted
//     one), so the owner merges them (OnExtra: take the queue over again,
//     pulling every copy).

// AntiEntropySource is where an owner reads its queues' summaries: its
// store.
type AntiEntropySource interface {
	Barrier(done func(error))
	Bucket(name string) (store.BucketStats, error)
}

type antiEntropy struct {
	src      AntiEntropySource
	owned    func() []string
	interval time.Duration
	onExtra  func(dest string)
}

// EnableAntiEntropy makes the replicator check, every interval (with up
// to a quarter of jitter), each queue owned() names against its other
// replicas' copies, and repair what differs (see above). onExtra, if not
// nil, is called (on its own goroutine) for a queue whose replica still
// differs after a rebuild. Call it after EnableCatchUp and before the
// first write; Close stops it.
func (p *PeerReplicator) EnableAntiEntropy(src AntiEntropySource, owned func() []string, interval time.Duration, onExtra func(dest string)) {
	p.cntMu.Lock()
	p.writes = map[string]uint64{}
	p.started = map[string]uint64{}
	p.cntMu.Unlock()
	p.stateMu.Lock()
	p.ae = &antiEntropy{src: src, owned: owned, interval: interval, onExtra: onExtra}
	p.diverged = map[[2]string]divergence{}
	if p.closed || p.src == nil {
		p.stateMu.Unlock()
		return
	}
	p.wg.Add(1)
	p.stateMu.Unlock()
	go p.antiEntropyLoop()
}

// divergence is a copy found different: the catch-up counter when it
// was, so that a second difference counts only after a rebuild.
type divergence struct{ gen uint64 }

// WriteStarting implements the Node's writeCounter: called under the
// node's rmu before the write's local commit.
func (p *PeerReplicator) WriteStarting(ops []store.Op) {
	p.cntMu.Lock()
	defer p.cntMu.Unlock()
	if p.started == nil {
		return
	}
	// Once per queue the write touches, as Replicate counts it.
	var seen []string
	for i := range ops {
		if b := ops[i].Bucket; wireKind(ops[i].Kind) != 0 && !slices.Contains(seen, b) {
			p.started[b]++
			seen = append(seen, b)
		}
	}
}

// quiet reports whether every write the node began on dest is handed to
// Replicate, and returns their count. Under cntMu.
func (p *PeerReplicator) quietLocked(dest string) (uint64, bool) {
	s := p.started[dest]
	return s, s == p.writes[dest]
}

func (p *PeerReplicator) antiEntropyLoop() {
	defer p.wg.Done()
	for {
		d := p.ae.interval + time.Duration(rand.Int64N(int64(p.ae.interval/4)+1))
		select {
		case <-p.stop:
			return
		case <-time.After(d):
		}
		p.AntiEntropyRound()
	}
}

// Forget stops tracking the other replicas' copies of dest, which this
// node no longer serves: running catch-ups of it end, and it is not
// checked. (Its next owner tracks them.)
func (p *PeerReplicator) Forget(dest string) {
	p.stateMu.Lock()
	defer p.stateMu.Unlock()
	if p.synced == nil {
		return
	}
	for _, m := range p.synced {
		delete(m, dest)
	}
	for k := range p.diverged {
		if k[1] == dest {
			delete(p.diverged, k)
		}
	}
}

// noteActiveLocked forgets what it knew of the copies on members that
// were not active at the last write or check: they missed the writes of
// the time in between. Under stateMu.
func (p *PeerReplicator) noteActiveLocked(v View) {
	active := make(map[string]bool, len(v.Active))
	for _, id := range v.Active {
		active[id] = true
		if !p.lastActive[id] {
			delete(p.synced, id)
		}
	}
	p.lastActive = active
}

// AntiEntropyRound runs one round of checks now and returns once they are
// answered (the repairs they start run on). It does nothing unless
// EnableAntiEntropy was called.
func (p *PeerReplicator) AntiEntropyRound() {
	var answered sync.WaitGroup
	defer answered.Wait()
	if p.ae == nil {
		return
	}
	type item struct {
		dest  string
		peers []string
		seq   uint64
	}
	v := p.view()
	owned := p.ae.owned()
	var items []item
	keep := make(map[string]bool, len(owned))
	p.sendMu.Lock()
	p.stateMu.Lock()
	p.noteActiveLocked(v)
	p.stateMu.Unlock()
	p.cntMu.Lock()
	for _, dest := range owned {
		keep[dest] = true
		// Served here: its writes go to the rest of its replica set.
		set := ReplicaSet(dest, v.Active, p.r)
		var others []string
		for _, id := range set {
			if id != v.Self {
				others = append(others, id)
			}
		}
		seq, quiet := p.quietLocked(dest)
		if quiet && len(others) > 0 && len(others) < len(set) {
			items = append(items, item{dest, others, seq})
		}
	}
	// Counters of queues not served here go, both together and only
	// when no write is between its two counts (one may be served by
	// now: adopted after owned() was read).
	for d := range p.started {
		if !keep[d] && p.started[d] == p.writes[d] {
			delete(p.started, d)
			delete(p.writes, d)
		}
	}
	for d := range p.writes {
		if _, ok := p.started[d]; !ok && !keep[d] {
			delete(p.writes, d)
		}
	}
	p.cntMu.Unlock()
	p.stateMu.Lock()
	for k := range p.diverged {
		if !keep[k[1]] {
			delete(p.diverged, k)
		}
	}
	p.stateMu.Unlock()
	p.sendMu.Unlock()
	if len(items) == 0 {
		return
	}
	ch := make(chan error, 1)
	p.ae.src.Barrier(func(err error) { ch <- err })
	if err := <-ch; err != nil {
		return
	}
	for _, it := range items {
		sum, err := p.ae.src.Bucket(it.dest)
		if err != nil {
			return
		}
		for _, peer := range it.peers {
			key := [2]string{peer, it.dest}
			p.sendMu.Lock()
			p.cntMu.Lock()
			seq, quiet := p.quietLocked(it.dest)
			p.cntMu.Unlock()
			if !quiet || seq != it.seq {
				p.sendMu.Unlock()
				break // written since the summary: next round
			}
			p.stateMu.Lock()
			info := p.synced[peer][it.dest]
			busy := p.running[key] || info.state == copyCatching || p.closed
			p.stateMu.Unlock()
			if busy {
				p.sendMu.Unlock()
				continue
			}
			answered.Add(1)
			p.peers.Append(peer, p.view().Epoch, appendCheck(nil, it.dest, sum), func(err error) {
				defer answered.Done()
				p.checked(peer, it.dest, info, err)
			})
			p.sendMu.Unlock()
		}
	}
}

// checked records the outcome of a check of dest's copy on peer, sent
// when the owner knew the copy as was.
func (p *PeerReplicator) checked(peer, dest string, was copyInfo, err error) {
	key := [2]string{peer, dest}
	p.stateMu.Lock()
	defer p.stateMu.Unlock()
	if p.closed {
		return
	}
	switch {
	case err == nil:
		p.checks[0].Add(1)
	case errors.Is(err, ErrDiverged):
		p.checks[1].Add(1)
	default:
		p.checks[2].Add(1)
	}
	cur, tracked := p.synced[peer][dest]
	if tracked && cur != was {
		return // a write or a catch-up changed what the owner knows since
	}
	if err == nil {
		delete(p.diverged, key)
		if p.synced[peer] == nil {
			p.synced[peer] = map[string]copyInfo{}
		}
		if cur.state != copySynced {
			p.log.Info("anti-entropy: a replica's copy matches the owner's; relied on without a copy", "peer", peer, "dest", dest)
		}
		p.synced[peer][dest] = copyInfo{copySynced, cur.gen}
		return
	}
	if errors.Is(err, ErrOwnedHere) {
		// The peer serves the queue itself (views differ while an
		// ownership moves): nothing to rebuild from here.
		delete(p.diverged, key)
		return
	}
	if errors.Is(err, ErrDiverged) {
		if d, seen := p.diverged[key]; seen && tracked && cur.state == copySynced && cur.gen > d.gen {
			// Rebuilt since the last check, and still different: the
			// replica holds messages the owner lacks.
			delete(p.diverged, key)
			if p.ae.onExtra != nil {
				p.log.Warn("anti-entropy: a replica holds messages the owner lacks; merging them", "peer", peer, "dest", dest, "err", err)
				go p.ae.onExtra(dest)
			}
			return
		}
		p.diverged[key] = divergence{gen: p.gen}
		p.log.Warn("anti-entropy: a replica's copy differs; rebuilding it", "peer", peer, "dest", dest, "err", err)
	} else {
		delete(p.diverged, key)
	}
	if p.synced[peer] == nil {
		p.synced[peer] = map[string]copyInfo{}
	}
	p.synced[peer][dest] = copyInfo{copyUnknown, 0}
	if !p.running[key] {
		p.running[key] = true
		p.wg.Add(1)
		go p.catchUp(peer, dest)
	}
}
