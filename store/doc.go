// Package store is the node's bbolt file: the durable copy of every queued
// message and a few node-level records.
//
// The store knows nothing of STOMP. It keeps opaque values under
// (bucket, key) pairs, where a bucket is a destination name and a key a
// per-node sequence number, plus a small meta bucket.
//
// # Commits
//
// Writes are group-committed through a write-ahead log, as etcd does:
// Submit hands a batch of operations to a single writer goroutine, which
// encodes every batch that arrived while the previous commit was in flight
// into one record, writes it at the tail of a preallocated log file
// (Config.Path + ".wal", overwritten in place) and, when a batch asks for it
// under SyncAlways, fdatasyncs the log: one pwrite and one fdatasync of a
// file whose size and blocks never change, where a bbolt commit costs two
// fsyncs. Completion callbacks run on one goroutine in the order the
// batches were submitted, after their commit. A group larger than a log
// segment is applied to bbolt directly, after a checkpoint (below).
//
// # Log segments
//
// The log is two segments of one file (see wal.go for the format). The
// writer fills one; an applier goroutine copies logged records into bbolt,
// several per transaction, at most one transaction per
// max(Config.ApplyInterval, 4 x the last transaction's duration) unless
// someone waits for it (a read, below; a segment switch; a checkpoint) or a
// quarter of a segment is queued: bbolt's commit writes its whole freelist,
// which after a large backlog drains lists every page the backlog used,
// and the wait keeps bbolt to at most a fifth of the time when nobody
// waits. Each transaction also records, in bbolt, the log position
// (generation and end offset) of the last record it applied. When the
// segment is full the writer syncs it and starts a new generation in
// the other segment, whose header names the generation it follows and
// where that one ends; it waits only if the applier has not yet applied
// the other segment's old records, which it counts in
// brokerd_store_wal_switch_waits_total. A checkpoint (on Close,
// and before a group too large for a segment) waits until bbolt has every
// record and starts a generation that follows nothing.
//
// # Who syncs what
//
// The writer goroutine is the only one that fdatasyncs the log: for synced
// commits, before a segment switch or checkpoint, and when asked by the
// SyncBatch loop (every SyncInterval) or by the applier. The applier
// applies only records the log holds durably (under SyncNone, every
// record written); when it needs more, it asks the writer and waits. Were
// bbolt to hold a commit the log lost, a replay of the log's older records
// would bring back values that commit replaced. bbolt's file is synced by
// bbolt's own commit (except under SyncNone): bbolt without fsync can be
// left corrupt by a power failure, which no replay repairs.
//
// # Failure
//
// Storage fails stop. The first failed write or fsync of the log, or
// failed bbolt transaction (the applier's or a direct group's), fails the
// store for good: that commit and every later one (including those
// already queued, and unsynced ones with no callback) report the error,
// reads return it, Failed is closed, Err returns it and Close returns it.
// No callback reports success for a commit that is not known durable
// under its sync setting; a group written but whose fdatasync failed
// reports the error. The node is expected to stop: the next Open replays
// whatever the log holds. A Submit whose ops are invalid fails alone and
// does not fail the store.
//
// # Replay
//
// Open replays the log into bbolt, then starts a new generation. It reads
// the older segment's records (when the newer one follows it), which must
// end exactly where the newer header says, then the newer segment's
// records while they are valid. It applies only the records after the log
// position bbolt recorded (generations only grow, and a log created anew
// starts above that position's, so positions order records in time); the
// earlier ones are read and their checksums checked, which is cheap next
// to applying them and keeps damage among them detected, but they are
// neither decoded nor applied, and ReplayStats counts them as Skipped
// (damage among them is still damage, below, although bbolt has them).
// Replay's own transactions record the position too. Every op is a blind
// write whose effect on the stats depends only on bbolt's content, so a
// record applied twice (a file written before positions were recorded)
// replays harmlessly. The first invalid record of the newer segment ends
// the replay: the torn write of a group never acknowledged, or the tail.
//
// Each record also names the offset up to which a completed fdatasync had
// made its segment durable when it was written (log format 3). A record
// whose checksum fails while its header is intact (its length fits, it
// names the generation) is, in this order:
//
//   - replayed, with a logged warning, when the next record checks chained
//     from the bad one's computed CRC: its payload is proven intact and only
//     its stored CRC field is damaged;
//   - logged and read past (counted as Skipped), chaining on from its stored
//     CRC, when it is at or before the position bbolt recorded: bbolt holds
//     it, and the acknowledged records after it are kept;
//   - damage when records after it check (chained from its stored CRC) and
//     the last of them names a durable offset at or past the bad record's
//     end: it had been synced, so this is not a power loss;
//   - otherwise a write never synced, torn by a power loss (unsynced pages
//     reach the disk in any order): it and the valid records after it are
//     cut as a torn tail, and the cut is logged (none of them was
//     acknowledged as synced).
//
// A record of the older segment that does not check (the first two cases
// aside: that segment was synced whole before the newer began), or a
// missing older segment, is damage too. Damage fails Open with
// ErrCorruptLog naming the file and byte offset, unless Config.Recover is
// RecoverTruncate, which drops the damaged record and everything after it
// and logs what it dropped (ReplayStats.DroppedRecords, all after the
// applied position). In the newer segment, damage to a record's length or
// generation field looks like a tail and is cut. Under SyncNone the log is
// fdatasynced only by SetMeta, so a bad record past the last such sync is
// cut, never damage. Each Open logs a
// summary (records, bytes, duration) through Config.Logger, also returned
// by Replay. A log of an earlier format (the one-segment version 1, or
// version 2, whose records name no durable offset and where a bad record
// followed by a valid one is damage whatever was synced) is replayed by its
// rules and replaced.
//
// # bbolt's file
//
// bbolt's freelist is persisted, so Open reads it rather than visiting
// every page of the file (seconds, and the whole file resident, at a
// backlog of millions); a file written without it gets it on its first
// Open. The freelist is the hashmap type: it allocates from a map of free
// spans, where the array type scans and moves every free id. Queue
// buckets fill the pages they split to 95% (keys only grow within a
// bucket), not bbolt's default half. A started store gives bbolt's map
// pages back to the page cache every 250 ms while the data is above
// 64 MiB (madvise DONTNEED inside a read transaction, which holds
// bbolt's mmap lock), so the pages a consumer drained stop counting in the
// broker's resident set; a later read of them is a minor fault.
//
// # Reads and stats
//
// ForEach, Buckets and Meta first wait for the applier to apply every
// record handed to it when they are called, so they see every commit
// whose callback ran before. Scan waits only for the records that change
// a key it can return (in its bucket, above its starting key; the writer
// notes per record the highest key it touches in up to 8 buckets, and a
// record touching more counts for all), so a consumer reading on through
// a backlog while its acknowledgements (deletes of keys it has read) are
// queued does not force a bbolt transaction, each of which writes the
// freelist, per read. Once a quarter of a segment is queued the applier
// is behind, and Scan waits for every record, as the others do. Scan pages through one bucket by key;
// Buckets returns each bucket's entry count, bytes (Config.Weigh) and
// first and last key without reading its entries: the applier keeps a
// stats record per bucket in the same bbolt transaction as the entries
// (a new key adds, an overwrite adjusts the bytes, a delete of a present
// key subtracts, OpDeleteBucket removes bucket and record), so the stats
// are exact after a crash and a replay. A file written before stats
// existed has them counted once at Open. SetMeta is a commit of its own,
// fsynced whatever the SyncMode (a bbolt transaction before Start); it
// must not be called from a Submit callback.
//
// # Low disk
//
// With Config.MinFreeBytes set, a started store measures every second the
// free space for its data: the filesystem's available bytes plus bbolt's
// free pages (bbolt never shrinks its file; deleting messages frees pages
// that new data reuses). LowDisk is true from when that falls below
// MinFreeBytes until it is back at MinFreeBytes plus an eighth, and
// brokerd_store_disk_alarm and brokerd_store_free_bytes show it. The store
// itself refuses nothing: the replica layer refuses new messages while
// LowDisk is true.
//
// # Caveats
//
// Values passed to the ForEach and Scan callbacks are only valid inside
// the callback (bbolt memory); copy them out. Config.Weigh must stay the
// same function across restarts: the stats keep sums of its results.
package store
