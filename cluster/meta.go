package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
)

// ProtocolVersion is the highest protocol version this build speaks
// (MaxProtocol, see version.go), gossiped as Meta.Proto.
const ProtocolVersion = MaxProtocol

// metaMaxSize is memberlist's limit on node metadata.
const metaMaxSize = 512

// Meta is what a node gossips about itself. Field names are short: it must
// fit in memberlist's 512 bytes with long addresses.
type Meta struct {
	ID   string `json:"id"`
	Name string `json:"n"`
	// STOMPAddr, STOMPTLS, STOMPWS and STOMPWSS are where clients reach
	// the node's STOMP listeners (plain, TLS, WebSocket, secure
	// WebSocket), "" for none. All but the first non-empty one are stored
	// as ":port" when they share its host, so that four long DNS names do
	// not fill the 512 bytes: read them with ClientAddrs.
	STOMPAddr   string `json:"s,omitempty"`
	STOMPTLS    string `json:"st,omitempty"`
	STOMPWS     string `json:"sw,omitempty"`
	STOMPWSS    string `json:"ss,omitempty"`
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

// ClientAddrs are where clients reach a node's STOMP listeners, host:port
// each, "" for a listener the node does not have.
type ClientAddrs struct {
	TCP, TLS, WS, WSS string
}

// setClientAddrs stores a in m, each address after the first non-empty
// one as ":port" when it has that one's host.
func (m *Meta) setClientAddrs(a ClientAddrs) {
	all := [4]string{a.TCP, a.TLS, a.WS, a.WSS}
	base := ""
	for i, addr := range all {
		if addr == "" {
			continue
		}
		host, port, err := net.SplitHostPort(addr)
		switch {
		case base == "":
			if err == nil {
				base = host
			}
		case err == nil && host == base:
			all[i] = ":" + port
		}
	}
	m.STOMPAddr, m.STOMPTLS, m.STOMPWS, m.STOMPWSS = all[0], all[1], all[2], all[3]
}

// ClientAddrs returns the addresses m advertises for its STOMP listeners,
// each as host:port.
func (m Meta) ClientAddrs() ClientAddrs {
	all := [4]string{m.STOMPAddr, m.STOMPTLS, m.STOMPWS, m.STOMPWSS}
	base := ""
	for i, addr := range all {
		if addr == "" {
			continue
		}
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			continue
		}
		if base == "" {
			base = host
		} else if host == "" {
			all[i] = net.JoinHostPort(base, port)
		}
	}
	return ClientAddrs{TCP: all[0], TLS: all[1], WS: all[2], WSS: all[3]}
}

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
