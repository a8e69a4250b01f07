package store

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"

	bolt "go.etcd.io/bbolt"
)

// Tombstones make removals and puts of a queue's entries commute: a
// replica can receive an acknowledgement before the copy of the message
// it removes (a catch-up chunk read earlier, a peer's copy pulled at a
// take-over, a stale owner's rewrite), and the message must stay removed.
// OpTombstone removes the entry and records its key; a put of a recorded
// key is ignored. So the state of a bucket is every key ever put minus
// every key tombstoned, whatever the order the ops arrive in, which is
// what lets the copies of a queue merge.
//
// Tombstones are kept in two generations, top-level buckets "t:0" and
// "t:1" holding keys uvarint(len(bucket)) bucket key(8 bytes, big-endian)
// so that one queue's tombstones are adjacent and in key order. New ones
// go into the current generation (named by tombCurKey in the stats
// bucket); OpRotateTombstones drops the other generation whole and makes
// it current. Rotating every period P keeps each tombstone between P and
// 2P: a copy that missed an acknowledgement for longer than that brings
// the message back (a duplicate, marked redelivered, never a loss).
// Rotation goes through the log like every other op, so a replay gives
// the same result.

var tombCurKey = []byte("tomb-cur")

// tombValue is the value of every tombstone (bbolt keeps a Put's value
// until its transaction ends; this one never changes).
var tombValue = []byte{1}

// tombFillPercent: one queue's tombstones mostly arrive in key order.
const tombFillPercent = 0.9

func tombBucketName(gen byte) []byte { return []byte{'t', ':', '0' + gen} }

// appendTombKey appends the tombstone key of (bucket, key) to dst.
func appendTombKey(dst, bucket []byte, key uint64) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(bucket)))
	dst = append(dst, bucket...)
	return binary.BigEndian.AppendUint64(dst, key)
}

// tombTx is the tombstones as one write transaction sees them.
type tombTx struct {
	tx     *bolt.Tx
	stats  *bolt.Bucket
	loaded bool
	cur    byte
	b      [2]*bolt.Bucket // nil when the generation is empty
	key    []byte
}

func (t *tombTx) load() {
	if t.loaded {
		return
	}
	t.loaded = true
	if v := t.stats.Get(tombCurKey); len(v) == 1 && v[0] <= 1 {
		t.cur = v[0]
	}
	for g := range t.b {
		t.b[g] = t.tx.Bucket(tombBucketName(byte(g)))
	}
}

// has reports whether (bucket, key) has a tombstone.
func (t *tombTx) has(bucket []byte, key uint64) (bool, error) {
	t.load()
	if t.b[0] == nil && t.b[1] == nil {
		return false, nil
	}
	t.key = appendTombKey(t.key[:0], bucket, key)
	for _, b := range t.b {
		if b != nil && b.Get(t.key) != nil {
			return true, nil
		}
	}
	return false, nil
}

// add records a tombstone for (bucket, key) in the current generation.
func (t *tombTx) add(bucket []byte, key uint64) error {
	t.load()
	b := t.b[t.cur]
	if b == nil {
		var err error
		if b, err = t.tx.CreateBucket(tombBucketName(t.cur)); err != nil {
			return fmt.Errorf("tombstones: %w", err)
		}
		t.b[t.cur] = b
	}
	b.FillPercent = tombFillPercent
	t.key = appendTombKey(t.key[:0], bucket, key)
	if err := b.Put(t.key, tombValue); err != nil {
		return fmt.Errorf("tombstone of %q key %d: %w", bucket, key, err)
	}
	return nil
}

// rotate drops the older generation and makes it the current one.
func (t *tombTx) rotate() error {
	t.load()
	next := 1 - t.cur
	if t.b[next] != nil {
		if err := t.tx.DeleteBucket(tombBucketName(next)); err != nil {
			return fmt.Errorf("tombstones: %w", err)
		}
		t.b[next] = nil
	}
	t.cur = next
	if err := t.stats.Put(tombCurKey, []byte{next}); err != nil {
		return fmt.Errorf("tombstones: %w", err)
	}
	return nil
}

// ScanTombstones calls fn with the keys of bucket's tombstones above
// after, in key order, at most limit of them (limit <= 0: all). It sees
// every commit whose callback ran before it was called.
func (s *Store) ScanTombstones(bucket string, after uint64, limit int, fn func(key uint64) error) error {
	if after == ^uint64(0) {
		return nil
	}
	if err := s.ap.waitCurrent(); err != nil {
		return err
	}
	var keys []uint64
	err := s.db.View(func(tx *bolt.Tx) error {
		prefix := appendTombKey(nil, []byte(bucket), 0)
		prefix = prefix[:len(prefix)-8]
		seek := appendTombKey(nil, []byte(bucket), after+1)
		for g := range byte(2) {
			b := tx.Bucket(tombBucketName(g))
			if b == nil {
				continue
			}
			c := b.Cursor()
			n := 0
			for k, _ := c.Seek(seek); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
				if len(k) != len(prefix)+8 {
					return fmt.Errorf("tombstones of %q: key of %d bytes", bucket, len(k))
				}
				keys = append(keys, binary.BigEndian.Uint64(k[len(prefix):]))
				n++
				if limit > 0 && n >= limit {
					break
				}
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	slices.Sort(keys)
	keys = slices.Compact(keys)
	if limit > 0 && len(keys) > limit {
		keys = keys[:limit]
	}
	for _, k := range keys {
		if err := fn(k); err != nil {
			return err
		}
	}
	return nil
}
