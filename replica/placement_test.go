package replica

import (
	"fmt"
	"slices"
	"testing"
)

func nodes(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("node-%02d", i+1)
	}
	return out
}

// Every node computes the same replica set whatever the order in which it
// lists the active members.
func TestReplicaSetIndependentOfOrder(t *testing.T) {
	active := nodes(5)
	for i := 0; i < 200; i++ {
		dest := fmt.Sprintf("/queue/q%d", i)
		want := ReplicaSet(dest, active, 2)
		rev := slices.Clone(active)
		slices.Reverse(rev)
		if got := ReplicaSet(dest, rev, 2); !slices.Equal(got, want) {
			t.Fatalf("%s: %v in one order, %v in the other", dest, want, got)
		}
		if len(want) != 2 || want[0] == want[1] {
			t.Fatalf("%s: replica set %v", dest, want)
		}
	}
}

// Removing a member moves only the destinations it was a replica of, and
// adding one back restores the original sets.
func TestReplicaSetMinimalMovement(t *testing.T) {
	active := nodes(5)
	gone := active[2]
	without := slices.Delete(slices.Clone(active), 2, 3)
	moved := 0
	const n = 2000
	for i := 0; i < n; i++ {
		dest := fmt.Sprintf("/queue/q%d", i)
		before := ReplicaSet(dest, active, 2)
		after := ReplicaSet(dest, without, 2)
		if !slices.Contains(before, gone) {
			if !slices.Equal(before, after) {
				t.Fatalf("%s: %v became %v although %s was not a replica", dest, before, after, gone)
			}
			continue
		}
		moved++
		// The surviving replica stays, and ranks first if it did.
		for _, id := range before {
			if id != gone && !slices.Contains(after, id) {
				t.Fatalf("%s: surviving replica %s dropped: %v -> %v", dest, id, before, after)
			}
		}
	}
	// About R/M = 2/5 of the destinations had the member; allow wide noise.
	if moved < n*30/100 || moved > n*50/100 {
		t.Fatalf("%d of %d destinations had the removed member as a replica, want about 40%%", moved, n)
	}
}

// Load spreads over the members: each owns about 1/M of the destinations.
func TestReplicaSetSpread(t *testing.T) {
	active := nodes(3)
	owned := map[string]int{}
	const n = 3000
	for i := 0; i < n; i++ {
		owned[ReplicaSet(fmt.Sprintf("/queue/orders.%d", i), active, 2)[0]]++
	}
	for _, id := range active {
		if c := owned[id]; c < n/3-n/10 || c > n/3+n/10 {
			t.Fatalf("%s owns %d of %d destinations: %v", id, c, n, owned)
		}
	}
}

func TestReplicaSetCaps(t *testing.T) {
	if got := ReplicaSet("/queue/a", nodes(1), 2); len(got) != 1 {
		t.Fatalf("R=2 on one member: %v", got)
	}
	if got := ReplicaSet("/queue/a", nil, 2); got != nil {
		t.Fatalf("no members: %v", got)
	}
	if got := ReplicaSet("/queue/a", nodes(3), 0); got != nil {
		t.Fatalf("R=0: %v", got)
	}
}

func TestOwnerSkipsCatchingUp(t *testing.T) {
	set := []string{"a", "b", "c"}
	if got := Owner(set, func(id string) bool { return id != "a" }); got != "b" {
		t.Fatalf("owner %q, want b (a is catching up)", got)
	}
	if got := Owner(set, func(string) bool { return false }); got != "" {
		t.Fatalf("owner %q with nothing in sync", got)
	}
}

func TestWriteQuorum(t *testing.T) {
	for _, c := range []struct{ r, w, want int }{
		{1, 0, 1}, {2, 0, 2}, {3, 0, 2}, {5, 0, 3}, {3, 1, 1}, {3, 3, 3}, {2, 3, 2},
	} {
		if got := WriteQuorum(c.r, c.w); got != c.want {
			t.Errorf("WriteQuorum(%d, %d) = %d, want %d", c.r, c.w, got, c.want)
		}
	}
}
