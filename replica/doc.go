// Package replica holds the destinations of a node: queues and topics,
// their subscriptions, dispatch, acknowledgement, redelivery, expiry,
// dead-lettering and limits, on top of the node's store.
//
// This is the single-node implementation. Placement of destinations on
// replica sets of active members, owner dispatch and replication across
// nodes, as docs/DESIGN.md draws them, build on it in later changes.
//
// A queue is a store bucket: each message is stored under a key taken from
// the node's sequence, and acknowledging it deletes the key. A queue's
// backlog stays in the store; memory holds a read-ahead window of pending
// messages, the messages returned by NACK or a closed session, the
// messages in flight, and counters (see destination in queue.go).
//
// Invariants:
//   - A queued message becomes visible to consumers only after its record
//     is committed to the store, so a consumer never sees a message a crash
//     could take back.
//   - Keys are taken and submitted under Node.wmu, so within a bucket keys
//     commit in increasing order; every pending message with a key at most
//     a queue's loadedTo is in memory, and the loader reads the rest by key
//     from there without skipping any.
//   - Every stored message is, at any time, in exactly one of: pending in
//     memory (window or requeued), pending on disk (counted in onDisk), in
//     flight on one subscription, or acknowledged (deleted from memory, and
//     from the store once the delete commits).
//   - Messages are dispatched from one queue requeued first (lowest key
//     first), then in key order, which is commit order.
//   - Apply either returns an error having changed nothing, or submits all
//     of the batch's writes in one store commit.
//
// Locks: Node.mu guards the destination map; destination.mu guards the
// destination, its subscriptions and their in-flight messages. Node.mu is
// taken before destination.mu, never the other way. Node.wmu (keys and
// their Submit) is taken with no destination lock held, and no store
// callback takes it. Deliver callbacks run with destination.mu held: they
// must not block or call into the Node.
package replica
