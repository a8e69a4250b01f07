//go:build !brokerd_proto2

package cluster

// The protocol versions this build speaks (see version.go): version 1
// only. Build with -tags brokerd_proto2 for the next version's build
// (proto_next.go).
const (
	// MinProtocol is the lowest protocol version this build speaks.
	MinProtocol = 1
	// MaxProtocol is the highest protocol version this build speaks.
	MaxProtocol = 1
)
