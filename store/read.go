package store

import (
	"bytes"
	"encoding/binary"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// BucketStats describes one bucket (destination).
type BucketStats struct {
	Name     string
	Count    int64  // entries
	Bytes    int64  // sum of Config.Weigh(value) over entries (len(value) when Weigh is nil)
	FirstKey uint64 // 0 when empty
	LastKey  uint64 // 0 when empty
	// KeyHash is the XOR of a mix of every key: equal counts, bytes and
	// key hashes mean the same keys (copies of a queue compare them).
	KeyHash uint64
}

// Buckets returns the stats of every bucket, sorted by name. It reads one
// stats record per bucket and the first and last key of each (a cursor
// descent), never the entries. It sees every commit whose callback ran
// before it was called.
func (s *Store) Buckets() ([]BucketStats, error) {
	if err := s.ap.waitCurrent(); err != nil {
		return nil, err
	}
	var out []BucketStats
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(statsBucket).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if !bytes.HasPrefix(k, []byte(queuePrefix)) {
				continue
			}
			st := BucketStats{Name: string(k[len(queuePrefix):])}
			st.Count, st.Bytes, st.KeyHash = decodeStats(v)
			if b := tx.Bucket(k); b != nil {
				bc := b.Cursor()
				if first, _ := bc.First(); len(first) == 8 {
					st.FirstKey = binary.BigEndian.Uint64(first)
				}
				if last, _ := bc.Last(); len(last) == 8 {
					st.LastKey = binary.BigEndian.Uint64(last)
				}
			}
			out = append(out, st)
		}
		return nil
	})
	return out, err
}

// Scan calls fn with the entries of bucket whose key is > after, in key
// order, stopping after limit entries or once the weights (Config.Weigh)
// of the values passed reach maxBytes; at least one entry is passed when
// one exists. limit <= 0 or maxBytes <= 0 is no limit. value is only
// valid during the call. An error from fn stops the scan and is returned.
// It sees every commit whose callback ran before it was called: it waits
// for the applier to copy into bbolt those that change a key of bucket
// above after (a put, a delete, or the bucket's deletion), not the others
// (a consumer's deletes of keys it has read, other buckets) unless the
// applier is a quarter of a log segment behind. A missing
// bucket is empty, not an error.
func (s *Store) Scan(bucket string, after uint64, limit int, maxBytes int, fn func(key uint64, value []byte) error) error {
	if after == ^uint64(0) {
		return nil
	}
	if err := s.ap.waitScan(bucket, after); err != nil {
		return err
	}
	weigh := s.cfg.Weigh
	if weigh == nil {
		weigh = weighLen
	}
	return s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte(queuePrefix + bucket))
		if b == nil {
			return nil
		}
		var seek [8]byte
		binary.BigEndian.PutUint64(seek[:], after+1)
		c := b.Cursor()
		n, size := 0, int64(0)
		for k, v := c.Seek(seek[:]); k != nil; k, v = c.Next() {
			if len(k) != 8 {
				return fmt.Errorf("bucket %q: key of %d bytes", bucket, len(k))
			}
			if err := fn(binary.BigEndian.Uint64(k), v); err != nil {
				return err
			}
			n++
			size += weigh(v)
			if (limit > 0 && n >= limit) || (maxBytes > 0 && size >= int64(maxBytes)) {
				return nil
			}
		}
		return nil
	})
}

// HasBucket reports whether bucket name is there, even empty: its queue
// was written to and not removed since. It sees every commit whose
// callback ran before it was called that creates or deletes the bucket
// (it waits as a Scan of the whole bucket does, not for other buckets).
func (s *Store) HasBucket(name string) (bool, error) {
	if err := s.ap.waitScan(name, 0); err != nil {
		return false, err
	}
	ok := false
	err := s.db.View(func(tx *bolt.Tx) error {
		ok = tx.Bucket([]byte(queuePrefix+name)) != nil
		return nil
	})
	return ok, err
}

// Bucket returns the stats of one bucket (zero, with its name, when it
// does not exist). It sees every commit whose callback ran before it was
// called.
func (s *Store) Bucket(name string) (BucketStats, error) {
	st := BucketStats{Name: name}
	if err := s.ap.waitCurrent(); err != nil {
		return st, err
	}
	err := s.db.View(func(tx *bolt.Tx) error {
		k := []byte(queuePrefix + name)
		st.Count, st.Bytes, st.KeyHash = decodeStats(tx.Bucket(statsBucket).Get(k))
		if b := tx.Bucket(k); b != nil {
			bc := b.Cursor()
			if first, _ := bc.First(); len(first) == 8 {
				st.FirstKey = binary.BigEndian.Uint64(first)
			}
			if last, _ := bc.Last(); len(last) == 8 {
				st.LastKey = binary.BigEndian.Uint64(last)
			}
		}
		return nil
	})
	return st, err
}
