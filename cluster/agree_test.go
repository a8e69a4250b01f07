package cluster

import (
	"reflect"
	"testing"
	"time"
)

func act(id string, since, joined int64) Member {
	return Member{ID: id, Active: true, ActiveSince: since, JoinedAt: joined}
}
func obs(id string, joined int64) Member { return Member{ID: id, JoinedAt: joined} }

func TestAgree(t *testing.T) {
	// a..e joined in that order; a, b, c took their seats at 100, 100, 200.
	a, b, c := act("a", 100, 1), act("b", 100, 2), act("c", 200, 3)
	d, e := obs("d", 4), obs("e", 5)
	cases := []struct {
		name string
		view []Member
		m    int
		want ActiveSet
	}{
		{"first start of five: the three oldest", []Member{obs("e", 5), obs("c", 3), obs("a", 1), obs("d", 4), obs("b", 2)}, 3, ActiveSet{"a", "b", "c"}},
		{"first start, same start time: lowest IDs", []Member{obs("z", 1), obs("y", 1), obs("x", 1)}, 2, ActiveSet{"x", "y"}},
		{"steady state", []Member{e, d, c, b, a}, 3, ActiveSet{"a", "b", "c"}},
		{"one active fails: oldest observer fills the gap", []Member{a, c, d, e}, 3, ActiveSet{"a", "c", "d"}},
		{"two actives fail", []Member{c, d, e}, 3, ActiveSet{"c", "d", "e"}},
		{"old member rejoins as observer: does not push out its replacement", []Member{a, c, act("d", 300, 4), e, obs("b", 2)}, 3, ActiveSet{"a", "c", "d"}},
		{"M raised", []Member{a, b, c, d, e}, 4, ActiveSet{"a", "b", "c", "d"}},
		{"M lowered: the longest active stay", []Member{a, b, c, d, e}, 2, ActiveSet{"a", "b"}},
		{"M above the view: everyone", []Member{a, d}, 3, ActiveSet{"a", "d"}},
		{"two clusters of three merge: the longest active three", []Member{
			act("a", 100, 1), act("b", 150, 2), act("c", 300, 3),
			act("x", 120, 9), act("y", 400, 8), act("z", 500, 7)}, 3, ActiveSet{"a", "x", "b"}},
		{"partition side smaller than M: all of it", []Member{d, e}, 3, ActiveSet{"d", "e"}},
		{"empty view", nil, 3, ActiveSet{}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := Agree(tc.view, tc.m)
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("Agree = %v, want %v", got, tc.want)
			}
			// Order of the view does not matter.
			rev := make([]Member, len(tc.view))
			for i, m := range tc.view {
				rev[len(rev)-1-i] = m
			}
			if got2 := Agree(rev, tc.m); !reflect.DeepEqual(got2, got) {
				t.Fatalf("Agree depends on view order: %v vs %v", got2, got)
			}
		})
	}
}

func TestActiveSetHashIgnoresOrder(t *testing.T) {
	if (ActiveSet{"a", "b", "c"}).Hash() != (ActiveSet{"c", "a", "b"}).Hash() {
		t.Fatal("hash depends on order")
	}
	if (ActiveSet{"a", "b"}).Hash() == (ActiveSet{"a", "b", "c"}).Hash() {
		t.Fatal("different sets, same hash")
	}
}

// ep is the epoch with counter c for the set of ids.
func ep(c uint64, ids ...string) EpochID { return EpochID{Counter: c, Set: ActiveSet(ids).Sum64()} }

// claiming returns ms, each advertising e.
func claiming(e EpochID, ms ...Member) []Member {
	out := make([]Member, len(ms))
	for i, m := range ms {
		m.Epoch = e
		out[i] = m
	}
	return out
}

func TestDecide(t *testing.T) {
	t0 := time.UnixMilli(1_000_000)
	delay := 500 * time.Millisecond
	e7 := ep(7, "a", "b", "c")
	view := func(selfSeat Seat) []Member {
		return claiming(e7, act("a", 100, 1), act("c", 200, 3), Member{ID: "d", Active: selfSeat.Active, ActiveSince: selfSeat.ActiveSince, JoinedAt: 4}, obs("e", 5))
	}

	// b died: d is in the agreed set and starts waiting.
	d1 := Decide("d", Seat{}, view(Seat{}), nil, 3, e7, t0, delay)
	if d1.Seat.Active || d1.Seat.PendingSince != t0 || d1.Promoted {
		t.Fatalf("first decision: %+v, want pending since t0", d1)
	}
	if !reflect.DeepEqual(d1.Set, ActiveSet{"a", "c", "d"}) || d1.Epoch != ep(8, "a", "c", "d") {
		t.Fatalf("set %v epoch %v, want [a c d] 8", d1.Set, d1.Epoch)
	}
	// Before the delay: still waiting, same epoch.
	d2 := Decide("d", d1.Seat, view(d1.Seat), nil, 3, d1.Epoch, t0.Add(delay/2), delay)
	if d2.Seat.Active || d2.Epoch != d1.Epoch {
		t.Fatalf("before delay: %+v", d2)
	}
	// After the delay: takes the seat.
	d3 := Decide("d", d2.Seat, view(d2.Seat), nil, 3, d2.Epoch, t0.Add(delay), delay)
	if !d3.Seat.Active || !d3.Promoted || d3.Seat.ActiveSince != t0.Add(delay).UnixMilli() {
		t.Fatalf("after delay: %+v", d3)
	}
	// b comes back within the delay (a flap, keeping its seat claim): d,
	// still pending, drops out and never took a seat.
	flap := claiming(e7, act("a", 100, 1), act("b", 100, 2), act("c", 200, 3), Member{ID: "d", JoinedAt: 4}, obs("e", 5))
	d4 := Decide("d", d1.Seat, flap, nil, 3, d1.Epoch, t0.Add(delay/2), delay)
	if d4.Seat.Active || !d4.Seat.PendingSince.IsZero() || d4.Promoted {
		t.Fatalf("flap: %+v, want observer, not pending", d4)
	}
	// An active member outside the agreed set (merge, M lowered) steps down at once.
	e3 := ep(3, "a", "b", "c")
	d5 := Decide("c", Seat{Active: true, ActiveSince: 200}, claiming(e3, act("a", 100, 1), act("b", 100, 2), act("c", 200, 3)), nil, 2, e3, t0, delay)
	if d5.Seat.Active || d5.Epoch != ep(4, "a", "b") {
		t.Fatalf("step down: %+v", d5)
	}
	// The epoch follows the highest one advertised for the same set.
	d6 := Decide("a", Seat{Active: true, ActiveSince: 100}, []Member{act("a", 100, 1), {ID: "b", JoinedAt: 2, Epoch: ep(9, "a")}}, nil, 1, ep(2, "a"), t0, delay)
	if d6.Epoch != ep(9, "a") {
		t.Fatalf("epoch %v, want 9", d6.Epoch)
	}
}

// TestDecideGrace: a failed active member keeps its place in the published
// set for the delay, so a flap changes neither the set nor the epoch, while
// its replacement's wait starts at once.
func TestDecideGrace(t *testing.T) {
	t0 := time.UnixMilli(1_000_000)
	delay := 500 * time.Millisecond
	prev := ActiveSet{"a", "b", "c"}
	e7 := ep(7, prev...)
	b := act("b", 100, 2)
	b.Epoch = e7
	view := claiming(e7, act("a", 100, 1), act("c", 200, 3), obs("d", 4), obs("e", 5))
	// b just failed: d starts waiting, the published set and epoch stay.
	d1 := Decide("d", Seat{}, view, []Member{b}, 3, e7, t0, delay)
	if d1.Seat.PendingSince != t0 || d1.Seat.Active {
		t.Fatalf("replacement: %+v, want pending since t0", d1.Seat)
	}
	if d1.Set.Hash() != prev.Hash() || d1.Epoch != e7 {
		t.Fatalf("during grace: set %v epoch %v, want %v and 7", d1.Set, d1.Epoch, prev)
	}
	// b comes back within the delay: nothing changed at all.
	back := append([]Member{b}, view...)
	d2 := Decide("d", d1.Seat, back, nil, 3, d1.Epoch, t0.Add(delay/2), delay)
	if d2.Seat.Active || !d2.Seat.PendingSince.IsZero() || d2.Set.Hash() != prev.Hash() || d2.Epoch != e7 {
		t.Fatalf("after the flap: %+v", d2)
	}
	// b stays dead: when the grace ends, d takes the seat, one set change.
	d3 := Decide("d", d1.Seat, view, nil, 3, d1.Epoch, t0.Add(delay), delay)
	if !d3.Promoted || !reflect.DeepEqual(d3.Set, ActiveSet{"a", "c", "d"}) || d3.Epoch != ep(8, "a", "c", "d") {
		t.Fatalf("after the grace: %+v", d3)
	}
}
