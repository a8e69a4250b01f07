package replica

import "errors"

var (
	// ErrBadDestination is a destination name that is neither /queue/NAME nor /topic/NAME.
	ErrBadDestination = errors.New("bad destination")
	// ErrUnknownAck is an ACK or NACK for a message that is not outstanding on the subscription.
	ErrUnknownAck = errors.New("no such message outstanding")
	// ErrSubscriptionClosed is an operation on a subscription after Close.
	ErrSubscriptionClosed = errors.New("subscription closed")
	// ErrClosed is an operation on a Node after Close.
	ErrClosed = errors.New("broker closed")
)
