package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// A record's payload is its group's ops back to back:
//
//	kind byte (OpKind; | sameBucket when the bucket is the previous op's)
//	OpPut:     [bucket] uvarint key, uvarint len, value
//	OpDelete:  [bucket] uvarint key
//	OpDeleteBucket: [bucket]
//	OpPutMeta: uvarint len, name, uvarint len, value
//	OpTombstone: [bucket] uvarint key
//	OpRotateTombstones: nothing more
//	OpDeleteMeta: uvarint len, name
//
// where [bucket] is uvarint len, name, absent with sameBucket.

const sameBucket = 0x80

// validateOp rejects what bbolt would refuse, so that every op that reaches
// the log can be applied (replay must never fail on a record it accepted).
func validateOp(op *Op) error {
	switch op.Kind {
	case OpRotateTombstones:
	case OpPut, OpDelete, OpDeleteBucket, OpTombstone:
		if len(op.Bucket) > MaxBucketName {
			return fmt.Errorf("bucket name of %d bytes is too long (at most %d)", len(op.Bucket), MaxBucketName)
		}
		if op.Kind == OpPut && len(op.Value) > bolt.MaxValueSize {
			return fmt.Errorf("bucket %q key %d: value of %d bytes is too long", op.Bucket, op.Key, len(op.Value))
		}
	case OpDeleteMeta:
		if op.Name == "" || len(op.Name) > bolt.MaxKeySize {
			return fmt.Errorf("meta name of %d bytes", len(op.Name))
		}
	case OpPutMeta:
		if op.Name == "" || len(op.Name) > bolt.MaxKeySize {
			return fmt.Errorf("meta name of %d bytes", len(op.Name))
		}
		if len(op.Value) > bolt.MaxValueSize {
			return fmt.Errorf("meta %q: value of %d bytes is too long", op.Name, len(op.Value))
		}
	default:
		return fmt.Errorf("unknown op kind %d", op.Kind)
	}
	return nil
}

// MaxBucketName bounds a bucket's name: its bbolt key ("q:" + name) and
// its tombstones' keys (uvarint length + name + 8 bytes) must fit
// bbolt's key limit. (Replay accepts the older, looser bound, so a log
// written before it still replays.)
const MaxBucketName = bolt.MaxKeySize - binary.MaxVarintLen64 - 8

// opSize is an upper bound on the encoded size of op.
func opSize(op *Op) int {
	return 1 + 3*binary.MaxVarintLen64 + len(op.Bucket) + len(op.Name) + len(op.Value)
}

// encoder appends ops to a payload.
type encoder struct {
	buf     []byte
	bucket  string
	haveBkt bool
}

func (e *encoder) append(op *Op) {
	kind := byte(op.Kind)
	switch op.Kind {
	case OpRotateTombstones:
		e.buf = append(e.buf, kind)
	case OpPut, OpDelete, OpDeleteBucket, OpTombstone:
		if e.haveBkt && e.bucket == op.Bucket {
			e.buf = append(e.buf, kind|sameBucket)
		} else {
			e.buf = append(e.buf, kind)
			e.buf = binary.AppendUvarint(e.buf, uint64(len(op.Bucket)))
			e.buf = append(e.buf, op.Bucket...)
			e.bucket, e.haveBkt = op.Bucket, true
		}
		if op.Kind == OpDeleteBucket {
			break
		}
		e.buf = binary.AppendUvarint(e.buf, op.Key)
		if op.Kind == OpPut {
			e.buf = binary.AppendUvarint(e.buf, uint64(len(op.Value)))
			e.buf = append(e.buf, op.Value...)
		}
	case OpPutMeta:
		e.buf = append(e.buf, kind)
		e.buf = binary.AppendUvarint(e.buf, uint64(len(op.Name)))
		e.buf = append(e.buf, op.Name...)
		e.buf = binary.AppendUvarint(e.buf, uint64(len(op.Value)))
		e.buf = append(e.buf, op.Value...)
	case OpDeleteMeta:
		e.buf = append(e.buf, kind)
		e.buf = binary.AppendUvarint(e.buf, uint64(len(op.Name)))
		e.buf = append(e.buf, op.Name...)
	}
}

// rawOp is a decoded op; its slices point into the payload.
type rawOp struct {
	kind   OpKind
	bucket []byte
	key    uint64
	name   []byte
	value  []byte
}

var errBadPayload = errors.New("malformed payload")

// decodeOps calls fn for each op of payload p. The same *rawOp is reused.
func decodeOps(p []byte, fn func(*rawOp) error) error {
	var op rawOp
	haveBkt := false
	bytesOf := func() ([]byte, bool) {
		n, k := binary.Uvarint(p)
		if k <= 0 || n > uint64(len(p)-k) {
			return nil, false
		}
		b := p[k : k+int(n) : k+int(n)]
		p = p[k+int(n):]
		return b, true
	}
	for i := 0; len(p) > 0; i++ {
		kind := p[0]
		p = p[1:]
		op.kind = OpKind(kind &^ sameBucket)
		ok := true
		switch op.kind {
		case OpRotateTombstones:
			ok = kind&sameBucket == 0
		case OpPut, OpDelete, OpDeleteBucket, OpTombstone:
			if kind&sameBucket != 0 {
				ok = haveBkt
			} else {
				op.bucket, ok = bytesOf()
				haveBkt = true
			}
			op.key = 0
			if ok && op.kind != OpDeleteBucket {
				var k int
				op.key, k = binary.Uvarint(p)
				ok = k > 0
				if ok {
					p = p[k:]
				}
			}
			if ok && op.kind == OpPut {
				op.value, ok = bytesOf()
			}
			ok = ok && len(queuePrefix)+len(op.bucket) <= bolt.MaxKeySize
		case OpPutMeta, OpDeleteMeta:
			ok = kind&sameBucket == 0
			if ok {
				op.name, ok = bytesOf()
			}
			if ok && op.kind == OpPutMeta {
				op.value, ok = bytesOf()
			}
			ok = ok && len(op.name) > 0 && len(op.name) <= bolt.MaxKeySize
		default:
			ok = false
		}
		if !ok {
			return fmt.Errorf("op %d: %w", i, errBadPayload)
		}
		if err := fn(&op); err != nil {
			return err
		}
	}
	return nil
}

// checkOps reports whether payload p decodes.
func checkOps(p []byte) error { return decodeOps(p, func(*rawOp) error { return nil }) }

// Each queue bucket "q:<dest>" has a stats record under the same name in
// the stats bucket: count (u64), bytes (i64) and the key hash (u64, the
// XOR of keyMix over the bucket's keys), big-endian. The applier keeps it
// exact in the transaction that changes the entries: an op changes the
// stats only by what it changes in the bucket, so replaying a record bbolt
// already holds leaves them exact too. Two copies of a queue with the same
// count, bytes and key hash hold the same keys (up to a 2^-64 chance).
// Records of statsLenV1 bytes (no hash) are upgraded by Open.
const (
	statsLen   = 24
	statsLenV1 = 16
)

func decodeStats(v []byte) (count, bytes int64, hash uint64) {
	if len(v) != statsLen && len(v) != statsLenV1 {
		return 0, 0, 0
	}
	count, bytes = int64(binary.BigEndian.Uint64(v)), int64(binary.BigEndian.Uint64(v[8:]))
	if len(v) == statsLen {
		hash = binary.BigEndian.Uint64(v[16:])
	}
	return count, bytes, hash
}

// encodeStats returns a new record: bbolt keeps a Put's value until its
// transaction ends.
func encodeStats(count, bytes int64, hash uint64) []byte {
	b := make([]byte, statsLen)
	binary.BigEndian.PutUint64(b, uint64(count))
	binary.BigEndian.PutUint64(b[8:], uint64(bytes))
	binary.BigEndian.PutUint64(b[16:], hash)
	return b
}

// keyMix spreads a key over 64 bits (splitmix64's finaliser), so that the
// XOR of a set of keys is a good summary of the set.
func keyMix(k uint64) uint64 {
	k ^= k >> 30
	k *= 0xbf58476d1ce4e5b9
	k ^= k >> 27
	k *= 0x94d049bb133111eb
	k ^= k >> 31
	return k
}

// bucketStats is one bucket's stats while a transaction changes it.
type bucketStats struct {
	name         string // top-level bucket name, queuePrefix included
	count, bytes int64
	hash         uint64
}

// txApplier applies decoded ops in one bbolt transaction.
type txApplier struct {
	tx      *bolt.Tx
	meta    *bolt.Bucket
	stats   *bolt.Bucket
	weigh   func([]byte) int64
	cur     *bolt.Bucket // nil after a bucket switch or delete
	curC    *bolt.Cursor
	curSt   *bucketStats
	curName []byte
	name    []byte
	key     [8]byte
	touched map[string]*bucketStats // stats to write back at the end
	tombs   tombTx
}

func weighLen(v []byte) int64 { return int64(len(v)) }

// queueFillPercent is how full bbolt fills the pages it splits in a queue
// bucket. A little room is left for a rare out-of-order key or a value
// rewritten larger.
const queueFillPercent = 0.95

// bucket makes op's bucket current. With create false a missing bucket
// leaves cur nil.
func (a *txApplier) bucket(name []byte, create bool) error {
	if a.cur != nil && bytes.Equal(a.curName, name) {
		return nil
	}
	a.cur, a.curC, a.curSt = nil, nil, nil
	a.name = append(append(a.name[:0], queuePrefix...), name...)
	b := a.tx.Bucket(a.name)
	st := a.touched[string(a.name)]
	if b == nil {
		if !create {
			return nil
		}
		var err error
		if b, err = a.tx.CreateBucket(a.name); err != nil {
			return fmt.Errorf("bucket %q: %w", name, err)
		}
		st = &bucketStats{name: string(a.name)}
		a.touched[st.name] = st
	} else if st == nil {
		st = &bucketStats{name: string(a.name)}
		st.count, st.bytes, st.hash = decodeStats(a.stats.Get(a.name))
		a.touched[st.name] = st
	}
	// Keys within a queue bucket only grow (per-node sequence numbers,
	// appended at the end, deleted from the front): split pages full,
	// not half full (bbolt's default), or every page stays half empty.
	b.FillPercent = queueFillPercent
	a.cur, a.curC, a.curSt = b, b.Cursor(), st
	a.curName = append(a.curName[:0], name...)
	return nil
}

// old returns the value under key in the current bucket, and whether it
// is there. (Bucket.Get cannot tell a nil value from a missing key.)
func (a *txApplier) old(key []byte) ([]byte, bool) {
	k, v := a.curC.Seek(key)
	return v, k != nil && bytes.Equal(k, key)
}

func (a *txApplier) apply(op *rawOp) error {
	switch op.kind {
	case OpPut, OpDelete, OpTombstone:
		if op.kind == OpTombstone {
			if err := a.tombs.add(op.bucket, op.key); err != nil {
				return err
			}
		} else if op.kind == OpPut {
			dead, err := a.tombs.has(op.bucket, op.key)
			if err != nil {
				return err
			}
			if dead {
				return nil // removed for good: a stale copy
			}
		}
		if err := a.bucket(op.bucket, op.kind == OpPut); err != nil {
			return err
		}
		if a.cur == nil {
			return nil // delete in a missing bucket
		}
		binary.BigEndian.PutUint64(a.key[:], op.key)
		old, had := a.old(a.key[:])
		var err error
		if op.kind == OpPut {
			if had {
				a.curSt.bytes -= a.weigh(old)
			} else {
				a.curSt.count++
				a.curSt.hash ^= keyMix(op.key)
			}
			a.curSt.bytes += a.weigh(op.value)
			err = a.cur.Put(a.key[:], op.value)
		} else if had {
			a.curSt.count--
			a.curSt.bytes -= a.weigh(old)
			a.curSt.hash ^= keyMix(op.key)
			err = a.cur.Delete(a.key[:])
		}
		if err != nil {
			return fmt.Errorf("bucket %q key %d: %w", op.bucket, op.key, err)
		}
	case OpDeleteBucket:
		a.cur, a.curC, a.curSt = nil, nil, nil
		a.name = append(append(a.name[:0], queuePrefix...), op.bucket...)
		if err := a.tx.DeleteBucket(a.name); err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
			return fmt.Errorf("delete bucket %q: %w", op.bucket, err)
		}
		delete(a.touched, string(a.name))
		if err := a.stats.Delete(a.name); err != nil {
			return fmt.Errorf("delete stats of %q: %w", op.bucket, err)
		}
	case OpPutMeta:
		if err := a.meta.Put(op.name, op.value); err != nil {
			return fmt.Errorf("meta %q: %w", op.name, err)
		}
	case OpRotateTombstones:
		return a.tombs.rotate()
	case OpDeleteMeta:
		if err := a.meta.Delete(op.name); err != nil {
			return fmt.Errorf("delete meta %q: %w", op.name, err)
		}
	}
	return nil
}

// finish writes back the stats of the buckets the transaction touched.
func (a *txApplier) finish() error {
	for _, st := range a.touched {
		if err := a.stats.Put([]byte(st.name), encodeStats(st.count, st.bytes, st.hash)); err != nil {
			return fmt.Errorf("stats of %q: %w", st.name[len(queuePrefix):], err)
		}
	}
	return nil
}

func newTxApplier(tx *bolt.Tx, weigh func([]byte) int64) *txApplier {
	if weigh == nil {
		weigh = weighLen
	}
	a := &txApplier{tx: tx, meta: tx.Bucket(bucketMeta), stats: tx.Bucket(statsBucket), weigh: weigh, touched: map[string]*bucketStats{}}
	a.tombs.tx, a.tombs.stats = tx, a.stats
	return a
}

// applyPayloads applies payloads, in order, in one bbolt transaction. The
// payloads must stay unchanged until it returns (bbolt keeps the values).
// With pos set (a generation), the transaction also records that the log
// is applied up to pos, the position of the last payload: a replay skips
// the records up to there.
func applyPayloads(db *bolt.DB, cfg *Config, payloads [][]byte, pos walPos) error {
	return cfg.update(db, func(tx *bolt.Tx) error {
		a := newTxApplier(tx, cfg.Weigh)
		for _, p := range payloads {
			if err := decodeOps(p, a.apply); err != nil {
				return err
			}
		}
		if err := a.finish(); err != nil {
			return err
		}
		if pos.gen == 0 {
			return nil
		}
		if err := a.stats.Put(walAppliedKey, pos.encode()); err != nil {
			return fmt.Errorf("log position: %w", err)
		}
		return nil
	})
}

// walAppliedKey, in the stats bucket (whose per-bucket keys all start
// with queuePrefix), holds the log position bbolt is applied up to.
var walAppliedKey = []byte("wal-applied")

// readWALApplied returns the log position recorded in bbolt (zero: none).
func readWALApplied(tx *bolt.Tx) walPos {
	if b := tx.Bucket(statsBucket); b != nil {
		return decodeWALPos(b.Get(walAppliedKey))
	}
	return walPos{}
}

// initStats creates the stats bucket if it is missing, counting the
// entries of every queue bucket (a store written before stats existed),
// and adds the key hash to stats records written before it existed.
func initStats(tx *bolt.Tx, weigh func([]byte) int64) error {
	if st := tx.Bucket(statsBucket); st != nil {
		return upgradeStats(tx, st)
	}
	if weigh == nil {
		weigh = weighLen
	}
	stats, err := tx.CreateBucket(statsBucket)
	if err != nil {
		return err
	}
	return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
		if !bytes.HasPrefix(name, []byte(queuePrefix)) {
			return nil
		}
		var count, n int64
		var hash uint64
		if err := b.ForEach(func(k, v []byte) error {
			count++
			n += weigh(v)
			if len(k) == 8 {
				hash ^= keyMix(binary.BigEndian.Uint64(k))
			}
			return nil
		}); err != nil {
			return err
		}
		return stats.Put(name, encodeStats(count, n, hash))
	})
}

// upgradeStats computes the key hash of every bucket whose stats record
// has none (a store written before it existed): one pass over the keys.
func upgradeStats(tx *bolt.Tx, stats *bolt.Bucket) error {
	var old [][]byte
	c := stats.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if bytes.HasPrefix(k, []byte(queuePrefix)) && len(v) == statsLenV1 {
			old = append(old, bytes.Clone(k))
		}
	}
	for _, name := range old {
		count, n, _ := decodeStats(stats.Get(name))
		var hash uint64
		if b := tx.Bucket(name); b != nil {
			bc := b.Cursor()
			for k, _ := bc.First(); k != nil; k, _ = bc.Next() {
				if len(k) == 8 {
					hash ^= keyMix(binary.BigEndian.Uint64(k))
				}
			}
		}
		if err := stats.Put(name, encodeStats(count, n, hash)); err != nil {
			return err
		}
	}
	return nil
}
