package cluster

import (
	"hash/fnv"
	"sort"
	"strings"
)

// Member is one alive node as the view shows it: its gossiped claims.
type Member struct {
	ID string
	// Active is the node's claim to hold a seat.
	Active bool
	// ActiveSince is when the node took its seat, in ms since the epoch;
	// 0 when it is not active.
	ActiveSince int64
	// JoinedAt is when the node first started, in ms since the epoch;
	// it is kept in the node's data directory, so it survives restarts.
	JoinedAt int64
	// Epoch is the epoch the node advertises (its Meta.Epoch and
	// Meta.SetHash); zero when it advertises none.
	Epoch EpochID
}

// ActiveSet is the agreed active members, by node ID, in rank order.
type ActiveSet []string

// Contains reports whether id is in the set.
func (s ActiveSet) Contains(id string) bool {
	for _, x := range s {
		if x == id {
			return true
		}
	}
	return false
}

// Hash identifies the set's members, whatever their order: Sum64 in 16
// hex digits.
func (s ActiveSet) Hash() string { return setHash(s.Sum64()) }

// Sum64 is the 64-bit FNV-1a hash of the set's sorted member IDs; it is
// EpochID.Set.
func (s ActiveSet) Sum64() uint64 {
	ids := append([]string(nil), s...)
	sort.Strings(ids)
	h := fnv.New64a()
	h.Write([]byte(strings.Join(ids, "\x00")))
	return h.Sum64()
}

// less ranks a before b: members already active first, then the longest
// active, then the oldest member, then the lowest node ID.
func less(a, b Member) bool {
	if a.Active != b.Active {
		return a.Active
	}
	if a.Active && a.ActiveSince != b.ActiveSince {
		return a.ActiveSince < b.ActiveSince
	}
	if a.JoinedAt != b.JoinedAt {
		return a.JoinedAt < b.JoinedAt
	}
	return a.ID < b.ID
}

// Agree returns the first m members of view by rank. It is a pure
// function: the same view and m give the same set on every node. view is
// not modified.
func Agree(view []Member, m int) ActiveSet {
	ranked := append([]Member(nil), view...)
	sort.Slice(ranked, func(i, j int) bool { return less(ranked[i], ranked[j]) })
	if m > len(ranked) {
		m = len(ranked)
	}
	if m < 0 {
		m = 0
	}
	out := make(ActiveSet, m)
	for i := range out {
		out[i] = ranked[i].ID
	}
	return out
}
