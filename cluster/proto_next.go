//go:build brokerd_proto2

package cluster

// The protocol versions of the next version's build (go build -tags
// brokerd_proto2): it speaks version 2 to members that all speak it and
// version 1 to a cluster that still has version-1 nodes, so it can replace
// them one at a time (README, Rolling upgrades). Version 2 adds a CRC-32C
// of every peer request's body, checked by the receiving node (stomp,
// PeerServer).
const (
	// MinProtocol is the lowest protocol version this build speaks.
	MinProtocol = 1
	// MaxProtocol is the highest protocol version this build speaks.
	MaxProtocol = 2
)
