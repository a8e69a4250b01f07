package store

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// faultyWAL is the log file with faults switched on by the test.
type faultyWAL struct {
	walFile
	mu       sync.Mutex
	writeErr error // returned by WriteAt while set
	syncErr  error // returned by Sync while set
}

func (f *faultyWAL) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	err := f.writeErr
	f.mu.Unlock()
	if err != nil {
		return 0, err
	}
	return f.walFile.WriteAt(p, off)
}

func (f *faultyWAL) Sync() error {
	f.mu.Lock()
	err := f.syncErr
	f.mu.Unlock()
	if err != nil {
		return err
	}
	return f.walFile.Sync()
}

func (f *faultyWAL) set(writeErr, syncErr error) {
	f.mu.Lock()
	f.writeErr, f.syncErr = writeErr, syncErr
	f.mu.Unlock()
}

// withFaultyWAL makes cfg's log a faultyWAL and returns it (valid once
// Open returned).
func withFaultyWAL(cfg *Config) **faultyWAL {
	var fw *faultyWAL
	if cfg.hooks == nil {
		cfg.hooks = &hooks{}
	}
	cfg.hooks.wrapWAL = func(f walFile) walFile {
		fw = &faultyWAL{walFile: f}
		return fw
	}
	return &fw
}

// waitFailed waits for the store to fail; the deadline only bounds a
// broken test.
func waitFailed(t *testing.T, s *Store) {
	t.Helper()
	select {
	case <-s.Failed():
	case <-time.After(20 * time.Second):
		t.Fatal("store did not fail")
	}
}

// submitAll submits n groups at once (one group commit or a few) and
// returns their outcomes.
func submitAll(s *Store, n int, synced bool, key0 uint64) []error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	wg.Add(n)
	for i := 0; i < n; i++ {
		s.Submit([]Op{put("q", key0+uint64(i), "v")}, synced, func(err error) { errs[i] = err; wg.Done() })
	}
	wg.Wait()
	return errs
}

// checkFailedForGood checks that the store reports err from now on: a
// commit, a read, Close.
func checkFailedForGood(t *testing.T, s *Store, want error) {
	t.Helper()
	if err := s.Err(); !errors.Is(err, want) {
		t.Fatalf("Err() = %v, want %v", err, want)
	}
	for i, err := range submitAll(s, 10, true, 900) {
		if !errors.Is(err, want) {
			t.Fatalf("commit %d after the failure: %v, want %v", i, err, want)
		}
	}
	for i, err := range submitAll(s, 10, false, 950) {
		if !errors.Is(err, want) {
			t.Fatalf("unsynced commit %d after the failure: %v, want %v", i, err, want)
		}
	}
	if err := s.ForEach(func(string, uint64, []byte) error { return nil }); !errors.Is(err, want) {
		t.Fatalf("ForEach after the failure: %v", err)
	}
	if _, err := s.Buckets(); !errors.Is(err, want) {
		t.Fatalf("Buckets after the failure: %v", err)
	}
	if err := s.Close(); !errors.Is(err, want) {
		t.Fatalf("Close after the failure: %v, want %v", err, want)
	}
}

// TestLogWriteFails: the commit whose write fails gets the error, and so
// does every later one, even once the file works again; the next Open has
// every commit acknowledged before.
func TestLogWriteFails(t *testing.T) {
	cfg := testConfig(t.TempDir())
	fw := withFaultyWAL(&cfg)
	s := open(t, cfg)
	s.Start()
	m := newModel()
	apply(t, s, m, put("q", 1, "before"))
	select {
	case <-s.Failed():
		t.Fatal("Failed closed before any failure")
	default:
	}
	(*fw).set(syscall.EIO, nil)
	if err := s.Apply([]Op{put("q", 2, "lost")}); !errors.Is(err, syscall.EIO) {
		t.Fatalf("commit whose write failed: %v", err)
	}
	waitFailed(t, s)
	(*fw).set(nil, nil)
	checkFailedForGood(t, s, syscall.EIO)
	s = open(t, withoutHooks(cfg))
	defer s.Close()
	checkContents(t, s, m)
}

func withoutHooks(cfg Config) Config { cfg.hooks = nil; return cfg }

// TestLogSyncFails: a group whose fdatasync fails was written, but no
// callback of it or of anything after it reports success.
func TestLogSyncFails(t *testing.T) {
	cfg := testConfig(t.TempDir())
	fw := withFaultyWAL(&cfg)
	s := open(t, cfg)
	s.Start()
	m := newModel()
	apply(t, s, m, put("q", 1, "before"))
	(*fw).set(nil, syscall.EIO)
	for i, err := range submitAll(s, 50, true, 100) {
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("synced commit %d in or after the failed sync: %v", i, err)
		}
	}
	waitFailed(t, s)
	(*fw).set(nil, nil)
	checkFailedForGood(t, s, syscall.EIO)
	s = open(t, withoutHooks(cfg))
	defer s.Close()
	// The groups whose sync failed were written; the OS may still have
	// them, which is fine (none was acknowledged). What was acknowledged
	// must be there.
	got := contents(t, s, nil)
	if got.data[entry{"q", 1}] != "before" {
		t.Fatalf("acknowledged commit lost: %v", got.data)
	}
}

// TestBatchSyncFails: under SyncBatch the periodic sync belongs to the
// writer too, and its failure fails the store.
func TestBatchSyncFails(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.Sync = SyncBatch
	cfg.SyncInterval = time.Millisecond
	fw := withFaultyWAL(&cfg)
	s := open(t, cfg)
	s.Start()
	(*fw).set(nil, syscall.EIO)
	for i, err := range submitAll(s, 5, false, 1) {
		if err != nil && !errors.Is(err, syscall.EIO) {
			t.Fatalf("commit %d: %v", i, err)
		}
	}
	waitFailed(t, s)
	checkFailedForGood(t, s, syscall.EIO)
}

// TestNilCallbackFailureFailsStore: an internal Submit without callback
// whose write fails still fails the store.
func TestNilCallbackFailureFailsStore(t *testing.T) {
	cfg := testConfig(t.TempDir())
	fw := withFaultyWAL(&cfg)
	s := open(t, cfg)
	s.Start()
	(*fw).set(syscall.ENOSPC, nil)
	s.Submit([]Op{put("q", 1, "x")}, false, nil)
	waitFailed(t, s)
	(*fw).set(nil, nil)
	checkFailedForGood(t, s, syscall.ENOSPC)
}

var errBoltFault = errors.New("injected bbolt fault")

// failingUpdate makes the store's bbolt transactions fail once armed:
// with written, after bbolt committed (as a failed fsync would), else
// before.
type failingUpdate struct {
	mu      sync.Mutex
	armed   bool
	written bool
}

func (f *failingUpdate) update(db *bolt.DB, fn func(*bolt.Tx) error) error {
	f.mu.Lock()
	armed, written := f.armed, f.written
	f.mu.Unlock()
	if !armed {
		return db.Update(fn)
	}
	if written {
		if err := db.Update(fn); err != nil {
			return err
		}
	}
	return errBoltFault
}

func (f *failingUpdate) arm(written bool) {
	f.mu.Lock()
	f.armed, f.written = true, written
	f.mu.Unlock()
}

// TestBoltApplyFails: the applier's transaction fails (before or after
// bbolt wrote); the store fails, the commit logged before stays
// acknowledged and comes back from the log, later commits fail.
func TestBoltApplyFails(t *testing.T) {
	for _, written := range []bool{false, true} {
		t.Run(fmt.Sprint("written=", written), func(t *testing.T) {
			cfg := testConfig(t.TempDir())
			fu := &failingUpdate{}
			cfg.hooks = &hooks{update: fu.update}
			s := open(t, cfg)
			s.Start()
			m := newModel()
			apply(t, s, m, put("q", 1, "one"), putMeta("m", "1"))
			fu.arm(written)
			// The applier waits an hour; a read makes it apply now.
			if err := s.ForEach(func(string, uint64, []byte) error { return nil }); !errors.Is(err, errBoltFault) {
				t.Fatalf("ForEach over a failing apply: %v", err)
			}
			waitFailed(t, s)
			checkFailedForGood(t, s, errBoltFault)
			s = open(t, withoutHooks(cfg))
			defer s.Close()
			checkContents(t, s, m)
		})
	}
}

// TestBoltFailsBetweenWriterCommits: the applier fails on its own (its
// interval) between two commits of the writer; the second must fail.
func TestBoltFailsBetweenWriterCommits(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.ApplyInterval = time.Millisecond
	fu := &failingUpdate{}
	cfg.hooks = &hooks{update: fu.update}
	s := open(t, cfg)
	s.Start()
	fu.arm(true)
	if err := s.Apply([]Op{put("q", 1, "one")}); err != nil {
		t.Fatalf("first commit: %v", err)
	}
	waitFailed(t, s) // the applier met the fault after the first commit
	if err := s.Apply([]Op{put("q", 2, "two")}); !errors.Is(err, errBoltFault) {
		t.Fatalf("commit after the applier failed: %v", err)
	}
	checkFailedForGood(t, s, errBoltFault)
}

// TestCommitDirectFails: a group too large for the log goes to bbolt
// directly; its failure fails the store.
func TestCommitDirectFails(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.WALSize = 64 << 10
	fu := &failingUpdate{}
	cfg.hooks = &hooks{update: fu.update}
	s := open(t, cfg)
	s.Start()
	var big []Op
	for i := uint64(0); i < 100; i++ {
		big = append(big, put("big", i, strings.Repeat("B", 1000)))
	}
	fu.arm(false)
	if err := s.Apply(big); !errors.Is(err, errBoltFault) {
		t.Fatalf("large group over a failing bbolt: %v", err)
	}
	checkFailedForGood(t, s, errBoltFault)
}

// corruptLog writes 20 groups, crashes, and flips a payload byte of record
// bad (counting from 0). It returns the states after each group.
func corruptLog(t *testing.T, cfg Config, bad int) []*model {
	t.Helper()
	var groups [][]Op
	for i := uint64(1); i <= 20; i++ {
		groups = append(groups, []Op{put("q", i, strings.Repeat("v", 50+int(i))), del("q", i-1), putMeta("last", fmt.Sprint(i))})
	}
	states := crashWith(t, cfg, groups)
	path := cfg.Path + ".wal"
	_, recs, _ := records(t, path)
	off := int64(walDataStart)
	for _, r := range recs[:bad] {
		off += recHeaderLen + int64(len(r))
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	data[off+recHeaderLen+3] ^= 0x40
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return states
}

// TestCorruptMiddleRefused: a record in the middle that fails its
// checksum, with valid records after it, is corruption: Open refuses,
// naming the file and the offset, and changes nothing.
func TestCorruptMiddleRefused(t *testing.T) {
	cfg := testConfig(t.TempDir())
	corruptLog(t, cfg, 5)
	_, err := Open(cfg)
	if !errors.Is(err, ErrCorruptLog) {
		t.Fatalf("Open over a corrupt log: %v", err)
	}
	if !strings.Contains(err.Error(), cfg.Path+".wal") || !strings.Contains(err.Error(), "byte offset") || !strings.Contains(err.Error(), "record 5 ") {
		t.Fatalf("error does not name the file, record and offset: %v", err)
	}
	// Refusing must not have touched the log: it refuses again.
	if _, err := Open(cfg); !errors.Is(err, ErrCorruptLog) {
		t.Fatalf("second Open: %v", err)
	}
}

// TestCorruptMiddleTruncate: with RecoverTruncate, Open drops the bad
// record and all after it, says so, and opens the state before it.
func TestCorruptMiddleTruncate(t *testing.T) {
	cfg := testConfig(t.TempDir())
	states := corruptLog(t, cfg, 5)
	var logBuf bytes.Buffer
	cfg.Recover = RecoverTruncate
	cfg.Logger = slog.New(slog.NewTextHandler(&logBuf, nil))
	s := open(t, cfg)
	rs := s.Replay()
	if rs.Records != 5 || rs.DroppedRecords != 15 || rs.DroppedBytes == 0 {
		t.Fatalf("replay %+v, want 5 records and 15 dropped", rs)
	}
	checkContents(t, s, states[5])
	if !strings.Contains(logBuf.String(), "dropped corrupt write-ahead log records") || !strings.Contains(logBuf.String(), "records=15") {
		t.Fatalf("log does not say what was dropped:\n%s", logBuf.String())
	}
	if !strings.Contains(logBuf.String(), "replayed write-ahead log") {
		t.Fatalf("no replay summary:\n%s", logBuf.String())
	}
	s.Close()
	// The dropped records are gone for good: a plain Open is clean.
	s = open(t, withoutHooks(Config{Path: cfg.Path, WALSize: cfg.WALSize}))
	defer s.Close()
	checkContents(t, s, states[5])
}

// TestTornTailIsNotCorruption: the last record failing its checksum is a
// torn write: cut, whatever Config.Recover says, and the summary counts
// the records before it.
func TestTornTailIsNotCorruption(t *testing.T) {
	cfg := testConfig(t.TempDir())
	states := corruptLog(t, cfg, 19)
	var logBuf bytes.Buffer
	cfg.Logger = slog.New(slog.NewTextHandler(&logBuf, nil))
	s := open(t, cfg)
	defer s.Close()
	if rs := s.Replay(); rs.Records != 19 || rs.DroppedRecords != 0 {
		t.Fatalf("replay %+v, want 19 records, none dropped", rs)
	}
	checkContents(t, s, states[19])
	if !strings.Contains(logBuf.String(), "records=19") {
		t.Fatalf("replay summary:\n%s", logBuf.String())
	}
}
