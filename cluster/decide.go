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
	// Epoch is the epoch to advertise for Set. The node must persist it
	// before it advertises it or acts under it.
	Epoch EpochID
	// Promoted is true when this decision takes a seat.
	Promoted bool
}

// Decide computes a node's next seat and epoch from the view (which must
// include the node itself, with its current seat; each member carries the
// epoch it advertises), the wanted M, the epoch the node advertised last
// (prev, persisted: it survives restarts; zero at first start), and now.
// An observer in the agreed set takes its seat once it has been there for
// delay; an active member out of it steps down at once.
//
// graced are active members that failed less than delay ago. They keep
// their place in the published set (so a member that flaps, declared dead
// and back within the delay, changes neither the set nor the epoch) but
// not in the seat decisions, so the observer that will replace a member
// that is really gone starts its wait at once and takes the seat when the
// grace ends.
//
// The epoch rule. Let S be the published set and the claims be prev and
// the epochs advertised by every other member of view and graced. Then:
//
//   - S is prev's set (unchanged): the counter is the highest claimed for
//     S (at least prev's); claims for other sets are ignored.
//   - S is another set (changed, or first start): the counter is one above
//     the highest claimed for any other set (prev's included), or the
//     highest already claimed for S if that is more.
//
// So a node's epoch never goes back (neither its counter nor its place in
// Compare's order decreases); when it moves to a new set, its counter goes
// above every counter it has used and every one it sees claimed for
// another set; and once the nodes of a view advertise the same set, they
// advertise the same counter. After a partition heals, the nodes of a side
// whose set is replaced jump above every counter claimed in the union for
// another set (or take the surviving side's counter, if higher), and the
// others adopt that counter, so the merged epoch is above (in Compare's
// order and by counter) every epoch that any node of the merged view used
// for another set on either side. (A node that is not in the view, dead
// or still cut off, cannot be accounted for until it comes back.)
//
// The one epoch it may equal is the surviving side's own, when the merged
// set is that side's set and its counter was already the highest: the
// same set, so the same epoch, and nobody is fenced who should not be.
// That needs the side to have changed its set and changed back while
// split: a side that kept the set it split with is still at the split's
// counter, below the other side's, so the merged counter is above both.
//
// Sides of a partition can reach equal counters with different sets; their
// EpochIDs differ by Set. Ignoring other sets while S is unchanged keeps
// nodes that see each other but compute different sets (views in flux)
// from raising each other's counters without end; the one that changes
// set next jumps above them.
func Decide(self string, seat Seat, view, graced []Member, m int, prev EpochID, now time.Time, delay time.Duration) Decision {
	return DecideAt(self, seat, view, graced, m, prev, now, now, delay)
}

// DecideAt is Decide with the wall clock apart from the timers' clock:
// now times the promotion delay, wall is the ActiveSince a promoted node
// takes (and ranks itself by, in the set it publishes).
func DecideAt(self string, seat Seat, view, graced []Member, m int, prev EpochID, now, wall time.Time, delay time.Duration) Decision {
	target := Agree(view, m)
	d := Decision{Seat: seat}
	in := target.Contains(self)
	switch {
	case !in:
		d.Seat = Seat{}
	case seat.Active:
		d.Seat.PendingSince = time.Time{}
	case seat.PendingSince.IsZero():
		d.Seat.PendingSince = now
		if delay <= 0 {
			d.Seat = Seat{Active: true, ActiveSince: wall.UnixMilli()}
			d.Promoted = true
		}
	case now.Sub(seat.PendingSince) >= delay:
		d.Seat = Seat{Active: true, ActiveSince: wall.UnixMilli()}
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
	claims := make([]EpochID, 0, len(view)+len(graced))
	for _, mbs := range [][]Member{view, graced} {
		for _, mb := range mbs {
			if mb.ID != self {
				claims = append(claims, mb.Epoch)
			}
		}
	}
	d.Epoch = nextEpoch(d.Set.Sum64(), prev, claims)
	return d
}
