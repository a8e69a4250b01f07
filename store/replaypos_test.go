package store

import (
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// group is a commit that puts, overwrites and deletes, so that replaying
// it or not changes the state.
func group(i uint64) []Op {
	ops := []Op{put("/queue/a", i, fmt.Sprint("v", i)), putMeta("last", fmt.Sprint(i))}
	if i%3 == 0 && i > 2 {
		ops = append(ops, del("/queue/a", i-2))
	}
	if i%4 == 0 {
		ops = append(ops, put("/queue/b", i%7, strings.Repeat("o", int(i%50)+1)))
	}
	return ops
}

// TestReplaySkipsApplied: after a crash, Open applies only the records
// the applier had not copied into bbolt (it recorded how far it got in
// the same transaction), whether that point is in the newer segment or
// in the older one, and the state and stats are exact.
func TestReplaySkipsApplied(t *testing.T) {
	for _, tc := range []struct {
		name    string
		walSize int64
		applied uint64 // groups applied to bbolt before the crash
		total   uint64 // groups logged before the crash (0: until a switch and 5 more)
	}{
		{"one segment", 256 << 10, 30, 50},
		{"older segment", 64 << 10, 40, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t.TempDir())
			cfg.WALSize = tc.walSize
			s := open(t, cfg)
			s.ap.flushBytes = 1 << 40 // only reads put records into bbolt
			s.Start()
			m := newModel()
			gen0 := s.walGen()
			var i, switchedAt uint64
			for i = 1; ; i++ {
				apply(t, s, m, group(i)...)
				if i == tc.applied {
					checkStats(t, s, m, weighLen) // a read: the applier catches up
				}
				if switchedAt == 0 && s.walGen() != gen0 {
					switchedAt = i
				}
				if tc.total > 0 && i == tc.total {
					break
				}
				if tc.total == 0 && switchedAt > 0 && i == switchedAt+5 {
					break
				}
			}
			if tc.total == 0 && switchedAt <= tc.applied {
				t.Fatalf("switched segments at group %d, want after the %d applied", switchedAt, tc.applied)
			}
			if err := s.crash(); err != nil {
				t.Fatal(err)
			}
			s = open(t, cfg)
			defer s.Close()
			rs := s.Replay()
			if want := int(i - tc.applied); rs.Records != want || rs.Skipped != int(tc.applied) || rs.SkippedBytes == 0 {
				t.Fatalf("replay %+v: want %d records applied and %d skipped (already in bbolt)", rs, want, tc.applied)
			}
			checkContents(t, s, m)
			checkStats(t, s, m, weighLen)
		})
	}
}

// TestReplayIsIdempotentOverAppliedLog: a replay records its position
// too, so records are not applied twice when Open is interrupted after
// applying them (here: the replayed log put back and opened again).
func TestReplayIsIdempotentOverAppliedLog(t *testing.T) {
	cfg := testConfig(t.TempDir())
	s := open(t, cfg)
	s.Start()
	m := newModel()
	for i := uint64(1); i <= 20; i++ {
		apply(t, s, m, group(i)...)
	}
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	logBytes, err := os.ReadFile(cfg.Path + ".wal")
	if err != nil {
		t.Fatal(err)
	}
	s = open(t, cfg)
	if rs := s.Replay(); rs.Records != 20 || rs.Skipped != 0 {
		t.Fatalf("first replay %+v, want 20 records", rs)
	}
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	// Put the replayed log back, as if Open had crashed after applying it
	// and before starting its new generation.
	if err := os.WriteFile(cfg.Path+".wal", logBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	s = open(t, cfg)
	defer s.Close()
	if rs := s.Replay(); rs.Records != 0 || rs.Skipped != 20 {
		t.Fatalf("second replay %+v, want 20 skipped, none applied", rs)
	}
	checkContents(t, s, m)
	checkStats(t, s, m, weighLen)
}

// TestLostLogDoesNotHideRecords: a log that was removed is created again
// with generations above the position bbolt recorded, so the records
// logged after it are replayed, not taken for applied ones.
func TestLostLogDoesNotHideRecords(t *testing.T) {
	cfg := testConfig(t.TempDir())
	s := open(t, cfg)
	s.Start()
	m := newModel()
	for i := uint64(1); i <= 30; i++ {
		apply(t, s, m, group(i)...)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(cfg.Path + ".wal"); err != nil {
		t.Fatal(err)
	}
	s = open(t, cfg)
	s.Start()
	for i := uint64(31); i <= 40; i++ {
		apply(t, s, m, group(i)...)
	}
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	s = open(t, cfg)
	defer s.Close()
	if rs := s.Replay(); rs.Records != 10 || rs.Skipped != 0 {
		t.Fatalf("replay %+v, want the 10 records logged after the log was created again", rs)
	}
	checkContents(t, s, m)
	checkStats(t, s, m, weighLen)
}

// TestOpensFileWithoutFreelist: a bbolt file written without a persisted
// freelist (as before it was persisted) opens with its data, and keeps
// working.
func TestOpensFileWithoutFreelist(t *testing.T) {
	cfg := testConfig(t.TempDir())
	s := open(t, cfg)
	s.Start()
	m := newModel()
	for i := uint64(1); i <= 200; i++ {
		apply(t, s, m, put("/queue/a", i, strings.Repeat("f", 1000)))
	}
	for i := uint64(1); i <= 150; i++ {
		apply(t, s, m, del("/queue/a", i)) // free pages
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(cfg.Path, 0o600, &bolt.Options{NoFreelistSync: true, FreelistType: bolt.FreelistMapType})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put([]byte("old"), []byte("x")) }); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	m.meta["old"] = "x"
	s = open(t, cfg)
	s.Start()
	checkContents(t, s, m)
	for i := uint64(201); i <= 300; i++ {
		apply(t, s, m, put("/queue/a", i, strings.Repeat("g", 1000)))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, cfg)
	defer s.Close()
	checkContents(t, s, m)
	checkStats(t, s, m, weighLen)
}

// The applier waits longer after a long transaction.
func TestApplyWaitFollowsTransactionTime(t *testing.T) {
	a := newApplier(nil, 10*time.Millisecond, 1<<20)
	if got := a.wait(); got != 10*time.Millisecond {
		t.Fatalf("wait %v before any transaction, want the interval", got)
	}
	a.lastTx = time.Millisecond
	if got := a.wait(); got != 10*time.Millisecond {
		t.Fatalf("wait %v after a 1ms transaction, want the interval", got)
	}
	a.lastTx = 100 * time.Millisecond
	if got := a.wait(); got != applyBackoff*100*time.Millisecond {
		t.Fatalf("wait %v after a 100ms transaction, want %v", got, applyBackoff*100*time.Millisecond)
	}
}

// TestScanWaitsOnlyForWhatItReads: a Scan forces a bbolt transaction only
// when a commit not yet in bbolt changes a key it would read (above its
// starting key, in its bucket); a consumer's acknowledgements of what it
// has read, or writes to other buckets, do not hold it up. Every Scan
// sees every acknowledged commit.
func TestScanWaitsOnlyForWhatItReads(t *testing.T) {
	cfg := testConfig(t.TempDir())
	var txs atomic.Int64
	cfg.hooks = &hooks{update: func(db *bolt.DB, fn func(*bolt.Tx) error) error {
		txs.Add(1)
		return db.Update(fn)
	}}
	s := open(t, cfg)
	s.ap.flushBytes = 1 << 40 // only reads put records into bbolt
	s.Start()
	defer s.Close()
	m := newModel()
	keys := func(bucket string, after uint64) []uint64 {
		t.Helper()
		var out []uint64
		if err := s.Scan(bucket, after, 0, 0, func(k uint64, v []byte) error {
			if want := m.data[entry{bucket, k}]; string(v) != want {
				t.Errorf("%s key %d = %q, want %q", bucket, k, v, want)
			}
			out = append(out, k)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return out
	}
	check := func(bucket string, after uint64, wantTx bool, want ...uint64) {
		t.Helper()
		before := txs.Load()
		got := keys(bucket, after)
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("Scan(%q, %d) = %v, want %v", bucket, after, got, want)
		}
		if tx := txs.Load() != before; tx != wantTx {
			t.Fatalf("Scan(%q, %d): bbolt transaction %v, want %v", bucket, after, tx, wantTx)
		}
	}
	for k := uint64(1); k <= 10; k++ {
		apply(t, s, m, put("q", k, fmt.Sprint("v", k)))
	}
	check("q", 0, true, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
	// Acknowledge what was read up to 5; another queue gets a message.
	apply(t, s, m, del("q", 1), del("q", 2), del("q", 3))
	apply(t, s, m, del("q", 4), del("q", 5), put("other", 1, "o"), putMeta("x", "y"))
	check("q", 5, false, 6, 7, 8, 9, 10)
	check("q", 10, false)
	// From the start, the deletes matter.
	check("q", 0, true, 6, 7, 8, 9, 10)
	check("other", 0, false, 1)
	// A new message above the starting key, in a group with others.
	apply(t, s, m, put("z", 1, "z"), del("q", 6), put("q", 11, "v11"))
	check("q", 9, true, 10, 11)
	// An overwrite above the starting key.
	apply(t, s, m, put("q", 10, "new"))
	check("q", 9, true, 10, 11)
	// A deleted bucket, whatever the starting key.
	apply(t, s, m, Op{Kind: OpDeleteBucket, Bucket: "q"})
	check("q", 1000, true)
	// A group touching more buckets than the summary keeps: waits.
	var ops []Op
	for i := 0; i <= maxTouched; i++ {
		ops = append(ops, put(fmt.Sprint("b", i), 1, "b"))
	}
	apply(t, s, m, ops...)
	check("q", 1000, true)
	checkContents(t, s, m)
}
