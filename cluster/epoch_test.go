package cluster

import (
	"fmt"
	"math/rand"
	"reflect"
	"testing"
	"time"
)

// TestDecideEpoch is the epoch rule, one view at a time. Five nodes a..e
// joined in that order; a, b, c took their seats at 100, 100, 200 under
// epoch 5.
func TestDecideEpoch(t *testing.T) {
	t0 := time.UnixMilli(1_000_000)
	delay := 500 * time.Millisecond
	a, b, c := act("a", 100, 1), act("b", 100, 2), act("c", 200, 3)
	d, e := obs("d", 4), obs("e", 5)
	e5 := ep(5, "a", "b", "c")
	// Split {a,b,d} | {c,e}: each side lost an active member and
	// promoted an observer at 1000; each moved to counter 6.
	d1000, e1000 := act("d", 1000, 4), act("e", 1000, 5)
	side1, side2 := ep(6, "a", "b", "d"), ep(6, "c", "e")
	merged := append(claiming(side1, a, b, d1000), claiming(side2, c, e1000)...)
	cases := []struct {
		name    string
		self    string
		seat    Seat
		view    []Member
		graced  []Member
		prev    EpochID
		wantSet ActiveSet
		want    EpochID
	}{
		{
			name: "first start, alone: counter 1",
			self: "a", view: []Member{obs("a", 1)},
			wantSet: ActiveSet{"a"}, want: ep(1, "a"),
		},
		{
			name: "steady state: nothing moves",
			self: "a", seat: Seat{Active: true, ActiveSince: 100}, view: claiming(e5, a, b, c, d, e), prev: e5,
			wantSet: ActiveSet{"a", "b", "c"}, want: e5,
		},
		{
			name: "a joining observer with its own low epoch changes nothing",
			self: "a", seat: Seat{Active: true, ActiveSince: 100}, view: append(claiming(e5, a, b, c), Member{ID: "x", JoinedAt: 9, Epoch: ep(1, "x")}), prev: e5,
			wantSet: ActiveSet{"a", "b", "c"}, want: e5,
		},
		// (a) A node restarts with a persisted epoch above the view's.
		{
			name: "restart: persisted counter of another set above the view's: above both",
			self: "d", view: append(claiming(e5, a, b, c), d), prev: ep(12, "d"),
			wantSet: ActiveSet{"a", "b", "c"}, want: ep(13, "a", "b", "c"),
		},
		{
			name: "restart: persisted counter of the same set above the view's: kept",
			self: "d", view: append(claiming(e5, a, b, c), d), prev: ep(12, "a", "b", "c"),
			wantSet: ActiveSet{"a", "b", "c"}, want: ep(12, "a", "b", "c"),
		},
		{
			name: "the others adopt the restarted node's counter for their set",
			self: "a", seat: Seat{Active: true, ActiveSince: 100}, view: append(claiming(e5, a, b, c), Member{ID: "d", JoinedAt: 4, Epoch: ep(13, "a", "b", "c")}), prev: e5,
			wantSet: ActiveSet{"a", "b", "c"}, want: ep(13, "a", "b", "c"),
		},
		// (b), (c) Both sides changed their set once, to the same counter.
		{
			name: "split, side {a,b,d}: c gone, d fills in, counter 6",
			self: "a", seat: Seat{Active: true, ActiveSince: 100}, view: claiming(e5, a, b, d), graced: nil, prev: e5,
			wantSet: ActiveSet{"a", "b", "d"}, want: side1,
		},
		{
			name: "split, side {c,e}: counter 6 too, another set",
			self: "c", seat: Seat{Active: true, ActiveSince: 200}, view: claiming(e5, c, e), prev: e5,
			wantSet: ActiveSet{"c", "e"}, want: side2,
		},
		{
			name: "merge, seen from side 1: above both sides",
			self: "a", seat: Seat{Active: true, ActiveSince: 100}, view: merged, prev: side1,
			wantSet: ActiveSet{"a", "b", "c"}, want: ep(7, "a", "b", "c"),
		},
		{
			name: "merge, seen from side 2: the same epoch",
			self: "c", seat: Seat{Active: true, ActiveSince: 200}, view: merged, prev: side2,
			wantSet: ActiveSet{"a", "b", "c"}, want: ep(7, "a", "b", "c"),
		},
		{
			name: "merge after side 2 churned more: above its counter",
			self: "a", seat: Seat{Active: true, ActiveSince: 100}, view: append(claiming(side1, a, b, d1000), claiming(ep(9, "c", "e"), c, e1000)...), prev: side1,
			wantSet: ActiveSet{"a", "b", "c"}, want: ep(10, "a", "b", "c"),
		},
		{
			name: "merge, a late switcher takes the counter already chosen, no cascade",
			self: "d", seat: Seat{Active: true, ActiveSince: 1000}, view: append(claiming(ep(7, "a", "b", "c"), a, b, c), append(claiming(side1, d1000), claiming(side2, e1000)...)...), prev: side1,
			wantSet: ActiveSet{"a", "b", "c"}, want: ep(7, "a", "b", "c"),
		},
		{
			name: "split {a,b,c} | {d,e}, merge: the side that kept its set waits for the other",
			self: "a", seat: Seat{Active: true, ActiveSince: 100}, view: append(claiming(e5, a, b, c), claiming(ep(6, "d", "e"), d1000, e1000)...), prev: e5,
			wantSet: ActiveSet{"a", "b", "c"}, want: e5,
		},
		{
			name: "split {a,b,c} | {d,e}, merge: the other side jumps above both",
			self: "d", seat: Seat{Active: true, ActiveSince: 1000}, view: append(claiming(e5, a, b, c), claiming(ep(6, "d", "e"), d1000, e1000)...), prev: ep(6, "d", "e"),
			wantSet: ActiveSet{"a", "b", "c"}, want: ep(7, "a", "b", "c"),
		},
		{
			name: "an unchanged set ignores a higher counter claimed for another set",
			self: "a", seat: Seat{Active: true, ActiveSince: 100}, view: append(claiming(e5, a, b, c), Member{ID: "x", JoinedAt: 9, Epoch: ep(40, "x", "y")}), prev: e5,
			wantSet: ActiveSet{"a", "b", "c"}, want: e5,
		},
		// (d) A member that flaps within the promotion delay.
		{
			name: "flap: b declared dead, within the delay: nothing changes",
			self: "d", view: claiming(e5, a, c, d, e), graced: claiming(e5, b), prev: e5,
			wantSet: ActiveSet{"a", "b", "c"}, want: e5,
		},
		{
			name: "flap: b back within the delay: nothing changes",
			self: "d", view: claiming(e5, a, b, c, d, e), prev: e5,
			wantSet: ActiveSet{"a", "b", "c"}, want: e5,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := Decide(tc.self, tc.seat, tc.view, tc.graced, 3, tc.prev, t0, delay)
			if !reflect.DeepEqual(got.Set, tc.wantSet) || got.Epoch != tc.want {
				t.Fatalf("Decide = set %v epoch %v, want %v %v", got.Set, got.Epoch, tc.wantSet, tc.want)
			}
			if got.Epoch.Compare(tc.prev) < 0 {
				t.Fatalf("epoch went back: %v after %v", got.Epoch, tc.prev)
			}
		})
	}

	// (c) The two sides of the split reached the same counter with
	// different sets: their EpochIDs differ, and every node orders them the
	// same way; the merged epoch is above both.
	if side1.Counter != side2.Counter || side1 == side2 || side1.Compare(side2) == 0 || side1.Compare(side2) != -side2.Compare(side1) {
		t.Fatalf("sides %v and %v: want equal counters, distinct and ordered", side1, side2)
	}
	m := ep(7, "a", "b", "c")
	if m.Compare(side1) <= 0 || m.Compare(side2) <= 0 {
		t.Fatalf("merged %v not above %v and %v", m, side1, side2)
	}
}

func TestEpochIDCompare(t *testing.T) {
	cases := []struct {
		a, b EpochID
		want int
	}{
		{EpochID{}, EpochID{}, 0},
		{EpochID{}, EpochID{Counter: 1}, -1},
		{EpochID{Counter: 2, Set: 1}, EpochID{Counter: 1, Set: 9}, 1},
		{EpochID{Counter: 2, Set: 1}, EpochID{Counter: 2, Set: 9}, -1},
		{EpochID{Counter: 2, Set: 9}, EpochID{Counter: 2, Set: 9}, 0},
	}
	for _, tc := range cases {
		if got := tc.a.Compare(tc.b); got != tc.want {
			t.Errorf("%v.Compare(%v) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
		if got := tc.b.Compare(tc.a); got != -tc.want {
			t.Errorf("%v.Compare(%v) = %d, want %d", tc.b, tc.a, got, -tc.want)
		}
	}
}

func TestEpochIDText(t *testing.T) {
	for _, e := range []EpochID{{}, ep(1, "a"), {Counter: 1<<64 - 1, Set: 1<<64 - 1}} {
		b, err := e.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		var got EpochID
		if err := got.UnmarshalText(b); err != nil || got != e {
			t.Errorf("%q: got %v, %v; want %v", b, got, err, e)
		}
	}
	for _, bad := range []string{"", "7", "7/", "/0123456789abcdef", "x/0123456789abcdef", "7/0123", "7/0123456789abcdeg", "-1/0123456789abcdef"} {
		var e EpochID
		if err := e.UnmarshalText([]byte(bad)); err == nil {
			t.Errorf("%q parsed as %v", bad, e)
		}
	}
	if s := ActiveSet([]string{"b", "a"}); s.Hash() != fmt.Sprintf("%016x", s.Sum64()) || ep(3, "a", "b").String() != "3/"+s.Hash() {
		t.Errorf("Hash %s, Sum64 %x, String %s", s.Hash(), s.Sum64(), ep(3, "a", "b"))
	}
	// Hash is what it was before Sum64 existed (nodes of both versions
	// compare it): FNV-1a 64 of the sorted IDs joined by NUL.
	if got := (ActiveSet{"b", "a"}).Hash(); got != "e5d29919042666b2" {
		t.Errorf("Hash = %s", got)
	}
}

// TestNextEpochProperties checks the rule on random claims: the epoch never
// goes back, a new set's counter is above every counter claimed for another
// set, an unchanged set keeps the highest counter claimed for it, and the
// order of the claims does not matter.
func TestNextEpochProperties(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	sets := []uint64{ActiveSet{"a"}.Sum64(), ActiveSet{"a", "b"}.Sum64(), ActiveSet{"b", "c"}.Sum64()}
	pick := func() EpochID {
		if rng.Intn(8) == 0 {
			return EpochID{}
		}
		return EpochID{Counter: uint64(rng.Intn(10)), Set: sets[rng.Intn(len(sets))]}
	}
	for i := 0; i < 10000; i++ {
		set, prev := sets[rng.Intn(len(sets))], pick()
		claims := make([]EpochID, rng.Intn(5))
		for j := range claims {
			claims[j] = pick()
		}
		got := nextEpoch(set, prev, claims)
		if got.Set != set || got.Compare(prev) < 0 {
			t.Fatalf("nextEpoch(%x, %v, %v) = %v: wrong set or went back", set, prev, claims, got)
		}
		for _, c := range append([]EpochID{prev}, claims...) {
			switch {
			case c.Set == set && c.Counter > got.Counter:
				t.Fatalf("nextEpoch(%x, %v, %v) = %v: below %v, claimed for the same set", set, prev, claims, got, c)
			case prev.Set != set && !c.IsZero() && c.Set != set && c.Counter >= got.Counter:
				t.Fatalf("nextEpoch(%x, %v, %v) = %v: a new set's counter not above %v", set, prev, claims, got, c)
			}
		}
		if prev.Set != set && got.Counter <= prev.Counter {
			t.Fatalf("nextEpoch(%x, %v, %v) = %v: changed set, counter not above prev", set, prev, claims, got)
		}
		rev := make([]EpochID, len(claims))
		for j, c := range claims {
			rev[len(rev)-1-j] = c
		}
		if got2 := nextEpoch(set, prev, rev); got2 != got {
			t.Fatalf("claim order matters: %v vs %v", got, got2)
		}
	}
}
