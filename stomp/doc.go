// Package stomp is the server side of STOMP 1.0, 1.1 and 1.2: the accept
// loop, one session per connection, frame validation, heart-beats, limits,
// transactions, and the translation of frames into calls on a Broker.
//
// Each session has three goroutines: the reader (which owns the session's
// subscription and transaction maps and handles frames in arrival order),
// the sequencer (which waits for each frame's effect to be durable, in
// order, and only then emits its RECEIPT) and the writer (which owns the
// connection's output and heart-beats). So a RECEIPT, including the one for
// DISCONNECT, goes out only when every earlier frame of the connection has
// taken effect.
//
// Each connection's outgoing queue is bounded (Config.MaxOutgoingBytes):
// before handling a frame the reader reserves room for what it will make
// the server send (its RECEIPT), and waits while the queue is full, so a
// client that sends without reading is slowed down by TCP rather than
// growing the server's memory. MESSAGE frames are not counted there (the
// replica hands them over under a lock and bounds them by its write
// window) and are never dropped. Every write runs under a deadline of
// Config.WriteTimeout: a client that reads nothing for that long while
// the server has something for it is disconnected, and its unacknowledged
// messages go back to their queues.
//
// Client frames are read by frameReader, which enforces Limits before it
// allocates; go-stomp's frame.Reader is not used on this edge because it
// allocates whatever content-length says, reads lines without bound and
// unescapes headers regardless of version.
package stomp
