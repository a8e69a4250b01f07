package replica

import (
	"cmp"
	"slices"

	"github.com/cespare/xxhash/v2"
)

// Placement of destinations on the active members.
//
// A destination's replica set is the top R active members by rendezvous
// (highest random weight) hashing of (destination, node ID): every node
// that sees the same active set computes the same replica set, without
// talking, and when a member joins or leaves the set only the destinations
// that member ranks high for move (about R/M of them), the others keep
// their replicas. The owner, which dispatches the destination's messages,
// is the first replica in that order that is in sync; a member that has
// just joined a replica set is catching up and is passed over until it has
// copied what the others hold.

// Weight is the rendezvous weight of node for dest: xxhash64 of the
// destination, a zero byte and the node ID, finalised with a 64-bit mixer
// so that IDs differing in one character spread over the whole range.
func Weight(dest, node string) uint64 {
	var d xxhash.Digest
	d.Reset()
	_, _ = d.WriteString(dest)
	_, _ = d.Write([]byte{0})
	_, _ = d.WriteString(node)
	return mix64(d.Sum64())
}

// mix64 is the splitmix64 finaliser.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// ReplicaSet returns the replica set of dest among the active members
// (node IDs, in any order, without duplicates): the r with the highest
// weight, highest first, ties broken by the smaller ID. r is capped at
// len(active); r < 1 returns nil.
func ReplicaSet(dest string, active []string, r int) []string {
	r = min(r, len(active))
	if r < 1 {
		return nil
	}
	type ranked struct {
		id string
		w  uint64
	}
	all := make([]ranked, len(active))
	for i, id := range active {
		all[i] = ranked{id, Weight(dest, id)}
	}
	slices.SortFunc(all, func(a, b ranked) int {
		if c := cmp.Compare(b.w, a.w); c != 0 {
			return c
		}
		return cmp.Compare(a.id, b.id)
	})
	out := make([]string, r)
	for i := range out {
		out[i] = all[i].id
	}
	return out
}

// Owner returns the first member of set (in its order) for which inSync
// is true, or "" when none is.
func Owner(set []string, inSync func(id string) bool) string {
	for _, id := range set {
		if inSync(id) {
			return id
		}
	}
	return ""
}

// WriteQuorum is the number of durable copies a SEND needs before its
// RECEIPT: w when 1 <= w <= r, else a majority of r (r/2 + 1).
func WriteQuorum(r, w int) int {
	if w >= 1 && w <= r {
		return w
	}
	return r/2 + 1
}

// PreferredOwner returns the first member of set (in its order) for which
// draining is false, or set's first member when every one is draining, or
// "" for an empty set. A draining member (in maintenance) keeps its seat
// in the replica set, so the R copies stay, but hands ownership to the
// next replica; every node that sees the same set and the same draining
// members names the same owner.
func PreferredOwner(set []string, draining func(id string) bool) string {
	if len(set) == 0 {
		return ""
	}
	for _, id := range set {
		if !draining(id) {
			return id
		}
	}
	return set[0]
}
