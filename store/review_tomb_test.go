package store

import (
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// TestReviewTombLongBucketNameBricksStore: validateOp accepts an
// OpTombstone whose bucket name fits a queue bucket ("q:" + name <=
// bolt.MaxKeySize), but the tombstone key is uvarint(len) + name + 8
// bytes, which is then over bbolt's key limit. The applier's Put fails:
// the store fails for good, and since the record is in the log, every
// replay fails again (the node cannot restart). validateOp must refuse
// what the applier cannot apply ("replay must never fail on a record it
// accepted"). A peer can send such a tombstone (replica decodeWire allows
// 64 KiB names), and so can an ACK on a queue with such a name.
func TestReviewTombLongBucketNameBricksStore(t *testing.T) {
	cfg := testConfig(t.TempDir())
	s := open(t, cfg)
	s.Start()
	name := "/queue/" + strings.Repeat("x", bolt.MaxKeySize-len(queuePrefix)-len("/queue/"))
	if err := s.Apply([]Op{{Kind: OpTombstone, Bucket: name, Key: 1}}); err == nil {
		// Accepted: it must then be applicable. Force it into bbolt.
		_, _ = s.Buckets()
	}
	failed := s.Err()
	s.Close()
	s2, reopenErr := Open(cfg)
	if s2 != nil {
		s2.Close()
	}
	if failed != nil || reopenErr != nil {
		t.Fatalf("an accepted tombstone of a %d-byte queue name failed the store for good (%s); reopen: %s",
			len(name), reviewTombShort(failed), reviewTombShort(reopenErr))
	}
}

func reviewTombShort(err error) string {
	if err == nil {
		return "ok"
	}
	s := err.Error()
	if len(s) > 160 {
		s = s[:80] + "..." + s[len(s)-60:]
	}
	return s
}
