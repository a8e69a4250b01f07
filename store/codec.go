package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// A record's payload is its group's ops back to back:
//
//	kind byte (OpKind; | sameBucket when the bucket is the previous op's)
//	OpPut:     [bucket] uvarint key, uvarint len, value
//	OpDelete:  [bucket] uvarint key
//	OpPutMeta: uvarint len, name, uvarint len, value
//
// where [bucket] is uvarint len, name, absent with sameBucket.

const sameBucket = 0x80

// validateOp rejects what bbolt would refuse, so that every op that reaches
// the log can be applied (replay must never fail on a record it accepted).
func validateOp(op *Op) error {
	switch op.Kind {
	case OpPut, OpDelete:
		if len(queuePrefix)+len(op.Bucket) > bolt.MaxKeySize {
			return fmt.Errorf("bucket name of %d bytes is too long", len(op.Bucket))
		}
		if op.Kind == OpPut && len(op.Value) > bolt.MaxValueSize {
			return fmt.Errorf("bucket %q key %d: value of %d bytes is too long", op.Bucket, op.Key, len(op.Value))
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
	case OpPut, OpDelete:
		if e.haveBkt && e.bucket == op.Bucket {
			e.buf = append(e.buf, kind|sameBucket)
		} else {
			e.buf = append(e.buf, kind)
			e.buf = binary.AppendUvarint(e.buf, uint64(len(op.Bucket)))
			e.buf = append(e.buf, op.Bucket...)
			e.bucket, e.haveBkt = op.Bucket, true
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
		case OpPut, OpDelete:
			if kind&sameBucket != 0 {
				ok = haveBkt
			} else {
				op.bucket, ok = bytesOf()
				haveBkt = true
			}
			if ok {
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
		case OpPutMeta:
			ok = kind&sameBucket == 0
			if ok {
				op.name, ok = bytesOf()
			}
			if ok {
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

// txApplier applies decoded ops in one bbolt transaction.
type txApplier struct {
	tx      *bolt.Tx
	meta    *bolt.Bucket
	cur     *bolt.Bucket
	curName []byte
	name    []byte
	key     [8]byte
}

func (a *txApplier) apply(op *rawOp) error {
	switch op.kind {
	case OpPut, OpDelete:
		if a.cur == nil || !bytes.Equal(a.curName, op.bucket) {
			a.name = append(append(a.name[:0], queuePrefix...), op.bucket...)
			b, err := a.tx.CreateBucketIfNotExists(a.name)
			if err != nil {
				return fmt.Errorf("bucket %q: %w", op.bucket, err)
			}
			a.cur = b
			a.curName = append(a.curName[:0], op.bucket...)
		}
		binary.BigEndian.PutUint64(a.key[:], op.key)
		var err error
		if op.kind == OpPut {
			err = a.cur.Put(a.key[:], op.value)
		} else {
			err = a.cur.Delete(a.key[:])
		}
		if err != nil {
			return fmt.Errorf("bucket %q key %d: %w", op.bucket, op.key, err)
		}
	case OpPutMeta:
		if err := a.meta.Put(op.name, op.value); err != nil {
			return fmt.Errorf("meta %q: %w", op.name, err)
		}
	}
	return nil
}

// applyPayloads applies payloads, in order, in one bbolt transaction. The
// payloads must stay unchanged until it returns (bbolt keeps the values).
func applyPayloads(db *bolt.DB, payloads [][]byte) error {
	return db.Update(func(tx *bolt.Tx) error {
		a := &txApplier{tx: tx, meta: tx.Bucket(bucketMeta)}
		for _, p := range payloads {
			if err := decodeOps(p, a.apply); err != nil {
				return err
			}
		}
		return nil
	})
}
