package cluster

import (
	"cmp"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// EpochID names one active set for the replication layer: an owner acts
// under the EpochID its node advertises, and a replica refuses appends
// whose EpochID compares below the highest one it has seen.
//
// Counter is the epoch number (Status.Epoch, gossiped as Meta.Epoch); Set
// is ActiveSet.Sum64 of the set it was computed for (gossiped, in hex, as
// Meta.SetHash). Two different sets never carry the same EpochID (up to a
// collision of 64-bit FNV-1a hashes), but two sides of a partition can
// reach the same Counter with different sets: only the pair identifies a
// set, so compare EpochIDs with Compare, never by Counter alone.
//
// The zero EpochID is "none": it compares below every epoch a node
// advertises.
type EpochID struct {
	Counter uint64
	Set     uint64
}

// Compare orders epochs totally: by Counter, then by Set. It returns -1
// when e is older than o, 0 when they are the same epoch (the same set),
// and +1 when e is newer.
//
// Decide guarantees that once the view has converged on a set, its
// Counter is above the Counter of every epoch that any node in the view
// advertised for a different set; the tie-break on Set only orders the
// epochs of sides that were partitioned from each other, arbitrarily but
// the same way on every node.
func (e EpochID) Compare(o EpochID) int {
	if c := cmp.Compare(e.Counter, o.Counter); c != 0 {
		return c
	}
	return cmp.Compare(e.Set, o.Set)
}

// IsZero reports whether e is the zero EpochID, the epoch of a node that
// never advertised one.
func (e EpochID) IsZero() bool { return e == EpochID{} }

// String is the text form: the counter, a slash, and the set hash as
// ActiveSet.Hash writes it ("12/9f3a0c1d2e4b5a67").
func (e EpochID) String() string {
	return strconv.FormatUint(e.Counter, 10) + "/" + setHash(e.Set)
}

// MarshalText returns the text form (String). It is how Status shows the
// epoch in JSON and how the node persists it.
func (e EpochID) MarshalText() ([]byte, error) { return []byte(e.String()), nil }

// errEpochText is returned by UnmarshalText for text that is not an
// EpochID; New fails with it rather than start the epoch afresh.
var errEpochText = errors.New("bad epoch")

// UnmarshalText parses the text form.
func (e *EpochID) UnmarshalText(b []byte) error {
	c, s, ok := strings.Cut(string(b), "/")
	if !ok {
		return fmt.Errorf("%w %q: want counter/sethash", errEpochText, b)
	}
	counter, err := strconv.ParseUint(c, 10, 64)
	if err != nil {
		return fmt.Errorf("%w %q: counter: %v", errEpochText, b, err)
	}
	set, err := parseSetHash(s)
	if err != nil {
		return fmt.Errorf("%w %q: %v", errEpochText, b, err)
	}
	*e = EpochID{Counter: counter, Set: set}
	return nil
}

// setHash is the hex form of a set hash, as ActiveSet.Hash and
// Meta.SetHash carry it.
func setHash(sum uint64) string { return fmt.Sprintf("%016x", sum) }

// parseSetHash reads the hex form of a set hash.
func parseSetHash(s string) (uint64, error) {
	if len(s) != 16 {
		return 0, fmt.Errorf("set hash %q: want 16 hex digits", s)
	}
	return strconv.ParseUint(s, 16, 64)
}

// nextEpoch is the epoch rule (see Decide): the epoch for set, given the
// node's own last epoch prev and the epochs the others advertise (zero
// ones are ignored).
func nextEpoch(set uint64, prev EpochID, claims []EpochID) EpochID {
	var same, other uint64 // highest counters claimed for set, and for other sets
	note := func(c EpochID) {
		if c.Set == set {
			same = max(same, c.Counter)
		} else {
			other = max(other, c.Counter)
		}
	}
	note(prev)
	for _, c := range claims {
		if !c.IsZero() {
			note(c)
		}
	}
	if prev.Set == set {
		// Unchanged: adopt the highest counter claimed for this very set,
		// and ignore other sets, so that nodes that see each other but
		// keep disagreeing do not drive each other's counters up.
		return EpochID{Counter: same, Set: set}
	}
	// Changed (prev counted in other): above every counter claimed for
	// another set, or the counter others already took for this one.
	return EpochID{Counter: max(same, other+1), Set: set}
}
