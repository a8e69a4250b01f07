package replica

import (
	"fmt"
	"testing"
)

func TestPreferredOwner(t *testing.T) {
	for _, tc := range []struct {
		name     string
		set      []string
		draining []string
		want     string
	}{
		{"empty set", nil, nil, ""},
		{"none draining: the first", []string{"a", "b", "c"}, nil, "a"},
		{"first draining: the next", []string{"a", "b", "c"}, []string{"a"}, "b"},
		{"two draining: the third", []string{"a", "b", "c"}, []string{"a", "b"}, "c"},
		{"a later one draining: the first", []string{"a", "b", "c"}, []string{"b"}, "a"},
		{"all draining: the first still", []string{"a", "b"}, []string{"a", "b"}, "a"},
		{"draining outside the set", []string{"a", "b"}, []string{"z"}, "a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dr := map[string]bool{}
			for _, id := range tc.draining {
				dr[id] = true
			}
			if got := PreferredOwner(tc.set, func(id string) bool { return dr[id] }); got != tc.want {
				t.Fatalf("PreferredOwner(%v, draining %v) = %q, want %q", tc.set, tc.draining, got, tc.want)
			}
		})
	}
}

// TestPreferredOwnerDrainMovesOnlyItsQueues: draining one of five members
// (R=3) moves the ownership of exactly the queues it owned, each to the
// second of its replica set, which holds a copy; no other queue changes
// owner, and the replica sets do not change.
func TestPreferredOwnerDrainMovesOnlyItsQueues(t *testing.T) {
	active := []string{"n1", "n2", "n3", "n4", "n5"}
	none := func(string) bool { return false }
	drained := func(id string) bool { return id == "n3" }
	moved, owned := 0, 0
	for i := range 5000 {
		dest := fmt.Sprintf("/queue/q%d", i)
		set := ReplicaSet(dest, active, 3)
		before, after := PreferredOwner(set, none), PreferredOwner(set, drained)
		if before == "n3" {
			owned++
			if after != set[1] {
				t.Fatalf("%s: owner %s drained; new owner %s, want the second replica %s", dest, before, after, set[1])
			}
			moved++
			continue
		}
		if after != before {
			t.Fatalf("%s: owner moved from %s to %s though %s is not draining", dest, before, after, before)
		}
	}
	if owned == 0 || moved != owned {
		t.Fatalf("owned by the drained member %d, moved %d", owned, moved)
	}
}
