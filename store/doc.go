// Package store is the node's bbolt file: the durable copy of every queued
// message and a few node-level records.
//
// The store knows nothing of STOMP. It keeps opaque values under
// (bucket, key) pairs, where a bucket is a destination name and a key a
// per-node sequence number, plus a small meta bucket.
//
// Writes are group-committed: Submit hands a batch of operations to a single
// writer goroutine, which puts every batch that arrived while the previous
// commit was in flight into one bbolt transaction and, when Sync is
// SyncAlways, one fsync. Completion callbacks run on one goroutine in the
// order the batches were submitted, after their commit.
//
// Caveats: values passed to the ForEach callback are only valid inside the
// callback (bbolt memory); copy them out.
package store
