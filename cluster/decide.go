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
func Decide(self string, seat Seat, view []Member, m int, prevSet ActiveSet, epoch, maxEpoch uint64, now time.Time, delay time.Duration) Decision {
	set := Agree(view, m)
	d := Decision{Set: set, Seat: seat, Epoch: max(epoch, maxEpoch)}
	in := set.Contains(self)
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
	if prevSet == nil || set.Hash() != prevSet.Hash() {
		d.Epoch++
	}
	return d
}
