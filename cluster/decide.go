package cluster

import "time"

// Seat is one node's own claim, which it gossips.
type Seat struct {
	Active      bool
	ActiveSince int64 // ms since the epoch, 0 when not active
	// PendingSince is when this observer first found itself in the agreed
	// set (zero when it is not pending); local, not gossiped.
	PendingSince time.Time
}

// Decision is what a node concludes from one view.
type Decision struct {
	Set  ActiveSet
	Seat Seat
	// Epoch is the epoch to advertise.
	Epoch uint64
	// Promoted is true when this decision takes a seat.
	Promoted bool
}

// Decide computes a node's next seat and epoch from the view (which must
// include the node itself, with its current seat), the wanted M, the set
// and epoch it computed last time, the highest epoch advertised in the
// view, and now. An observer in the agreed set takes its seat once it has
// been there for delay; an active member out of it steps down at once.
//
// graced are active members that failed less than delay ago. They keep
// their place in the published set (so a member that flaps, declared dead
// and back within the delay, changes neither the set nor the epoch) but
// not in the seat decisions, so the observer that will replace a member
// that is really gone starts its wait at once and takes the seat when the
// grace ends.
func Decide(self string, seat Seat, view, graced []Member, m int, prevSet ActiveSet, epoch, maxEpoch uint64, now time.Time, delay time.Duration) Decision {
	target := Agree(view, m)
	d := Decision{Seat: seat, Epoch: max(epoch, maxEpoch)}
	in := target.Contains(self)
	switch {
	case !in:
		d.Seat = Seat{}
	case seat.Active:
		d.Seat.PendingSince = time.Time{}
	case seat.PendingSince.IsZero():
		d.Seat.PendingSince = now
		if delay <= 0 {
			d.Seat = Seat{Active: true, ActiveSince: now.UnixMilli()}
			d.Promoted = true
		}
	case now.Sub(seat.PendingSince) >= delay:
		d.Seat = Seat{Active: true, ActiveSince: now.UnixMilli()}
		d.Promoted = true
	}
	d.Set = target
	if len(graced) > 0 {
		// Publish the set as if the graced members were still there, with
		// this node's new seat.
		all := make([]Member, 0, len(view)+len(graced))
		for _, mb := range view {
			if mb.ID == self {
				mb.Active, mb.ActiveSince = d.Seat.Active, d.Seat.ActiveSince
			}
			all = append(all, mb)
		}
		d.Set = Agree(append(all, graced...), m)
	}
	if prevSet == nil || d.Set.Hash() != prevSet.Hash() {
		d.Epoch++
	}
	return d
}
