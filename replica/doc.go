// Package replica holds the destinations of a node: queues and topics,
// their subscriptions, dispatch, acknowledgement, redelivery, expiry and
// dead-lettering, on top of the node's store.
//
// This is the single-node implementation. Placement of destinations on
// replica sets of active members, owner dispatch and replication across
// nodes, as DESIGN.md draws them, build on it in later changes.
//
// Invariants:
//   - A queued message becomes visible to consumers only after its record
//     is committed to the store, so a consumer never sees a message a crash
//     could take back.
//   - Every queued message is, at any time, in exactly one of: pending
//     (fresh or requeued), in flight on one subscription, or acknowledged
//     (deleted from memory, and from the store once the delete commits).
//   - Messages are dispatched from one destination in the order their
//     records committed; requeued messages go before fresh ones, lowest
//     sequence first.
//
// Locks: Node.mu guards the destination map; destination.mu guards the
// destination, its subscriptions and their in-flight messages. Node.mu is
// taken before destination.mu, never the other way. Deliver callbacks run
// with destination.mu held: they must not block or call into the Node.
package replica
