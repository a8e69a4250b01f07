package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
)

// ProtocolVersion is the highest protocol version this build speaks
// (MaxProtocol, see version.go), gossiped as Meta.Proto.
const ProtocolVersion = MaxProtocol

// metaMaxSize is memberlist's limit on node metadata.
const metaMaxSize = 512

// Meta is what a node gossips about itself. Field names are short: it must
// fit in memberlist's 512 bytes with long addresses.
type Meta struct {
	ID          string `json:"id"`
	Name        string `json:"n"`
	STOMPAddr   string `json:"s,omitempty"`
	AdminAddr   string `json:"a,omitempty"`
	PeerAddr    string `json:"p,omitempty"`
	Active      bool   `json:"act,omitempty"`
	ActiveSince int64  `json:"as,omitempty"`
	JoinedAt    int64  `json:"j"`
	// Proto and ProtoMin are the protocol versions the node speaks
	// (ProtocolRange): Proto the highest, ProtoMin the lowest (absent in
	// the metadata of builds before ranges, which speak 1 to Proto).
	Proto    int `json:"v"`
	ProtoMin int `json:"vm,omitempty"`
	// SetHash (ActiveSet.Hash) and Epoch (the counter) are the node's
	// EpochID.
	SetHash string `json:"h,omitempty"`
	Epoch   uint64 `json:"e,omitempty"`
	// MVersion and M are the cluster-wide wanted number of active members:
	// the pair with the highest version wins (last writer wins; on a tie,
	// the higher M).
	MVersion uint64 `json:"mv,omitempty"`
	M        int    `json:"m"`
	// Leaving announces a graceful leave: the others drop the node from
	// their view at once and record it as "left", not "dead".
	Leaving bool `json:"bye,omitempty"`
	// Draining announces maintenance (brokerd drain): the node stays an
	// active member and a replica, but placement prefers an undrained
	// replica as the owner of its queues, and it takes no new clients.
	Draining bool `json:"dr,omitempty"`
}

var errMeta = errors.New("bad node metadata")

func (m *Meta) encode() ([]byte, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	if len(b) > metaMaxSize {
		return nil, fmt.Errorf("%w: %d bytes, over memberlist's %d", errMeta, len(b), metaMaxSize)
	}
	return b, nil
}

func decodeMeta(b []byte) (Meta, error) {
	var m Meta
	if err := json.Unmarshal(b, &m); err != nil {
		return Meta{}, fmt.Errorf("%w: %v", errMeta, err)
	}
	if m.ID == "" || m.Proto < 1 {
		return Meta{}, fmt.Errorf("%w: no id or protocol version", errMeta)
	}
	if !m.protocols().Valid() {
		return Meta{}, fmt.Errorf("%w: protocol versions %s", errMeta, m.protocols())
	}
	return m, nil
}

func (m Meta) member() Member {
	return Member{ID: m.ID, Active: m.Active, ActiveSince: m.ActiveSince, JoinedAt: m.JoinedAt, Epoch: m.epoch()}
}

// epoch is the epoch m advertises. A set hash that does not parse counts
// as a set of its own (Set 0), so the counter is still seen.
func (m Meta) epoch() EpochID {
	set, _ := parseSetHash(m.SetHash)
	return EpochID{Counter: m.Epoch, Set: set}
}

// newerM reports whether setting (v, m) beats (v2, m2).
func newerM(v uint64, m int, v2 uint64, m2 int) bool {
	if v != v2 {
		return v > v2
	}
	return m > m2
}
