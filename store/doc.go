// Package store is the node's bbolt file: the durable copy of every queued
// message and a few node-level records.
//
// The store knows nothing of STOMP. It keeps opaque values under
// (bucket, key) pairs, where a bucket is a destination name and a key a
// per-node sequence number, plus a small meta bucket.
//
// Writes are group-committed through a write-ahead log, as etcd does:
// Submit hands a batch of operations to a single writer goroutine, which
// encodes every batch that arrived while the previous commit was in flight
// into one record, writes it at the tail of a preallocated log file
// (Config.Path + ".wal", overwritten in place) and, when a batch asks for it
// under SyncAlways, fdatasyncs the log: one fdatasync of a file whose size
// and blocks never change, where a bbolt commit costs two. Completion
// callbacks run on one goroutine in the order the batches were submitted,
// after their commit.
//
// An applier goroutine copies logged records into bbolt, several per
// transaction and at most one transaction per Config.ApplyInterval. Its
// transactions are fsynced (bbolt without fsync can be left corrupt by a
// power failure, which no replay repairs), and before each it makes sure
// the log holds, durably, every record it applies. When the log is full, and
// on Close, the writer checkpoints: it waits until bbolt has every record,
// then starts a new generation of the log (a new header with a new random
// salt; records chain their checksums from it) and writes from the start
// again. Open replays the records of the current generation into bbolt
// (every op is a blind write, so records bbolt already has replay
// harmlessly), stopping at the first record that does not check, then
// starts a new generation. See wal.go for the format.
//
// ForEach and Meta first wait for the applier to catch up, so they see
// every commit whose callback has run. SetMeta is a commit of its own,
// fsynced whatever the SyncMode (a bbolt transaction before Start); it must
// not be called from a Submit callback.
//
// An I/O error on the log or in bbolt fails the store: that commit and
// every later one report it, and Close returns it. Whatever was logged is
// replayed by the next Open.
//
// Caveats: values passed to the ForEach callback are only valid inside the
// callback (bbolt memory); copy them out.
package store
