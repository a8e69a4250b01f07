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

var (
	// ErrQueueFull is a SEND refused because its queue is at queue.max_length
	// or queue.max_bytes with overflow reject-publish. Nothing was stored.
	ErrQueueFull = errors.New("queue full")
	// ErrLowDisk is a SEND refused while free space on the data directory's
	// filesystem is below store.min_free_bytes. Nothing was stored.
	ErrLowDisk = errors.New("broker low on disk space")
	// ErrNoSuchQueue is a SEND or SUBSCRIBE that may not create its queue
	// (Message.NoCreate, SubOptions.NoCreate) naming a queue that does not
	// exist (see Node.QueueExists). Nothing was changed. It comes as a
	// *NoSuchQueueError, which names the queue.
	ErrNoSuchQueue = errors.New("queue does not exist")
)

// NoSuchQueueError is ErrNoSuchQueue for the queue Dest.
type NoSuchQueueError struct{ Dest string }

func (e *NoSuchQueueError) Error() string { return ErrNoSuchQueue.Error() + ": " + e.Dest }

// Is makes errors.Is(err, ErrNoSuchQueue) true.
func (e *NoSuchQueueError) Is(target error) bool { return target == ErrNoSuchQueue }
