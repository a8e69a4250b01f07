package store

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// plWAL records every write since the last successful Sync, with the bytes
// it overwrote, so that a test can simulate a power loss: unsynced writes
// are reverted, wholly or page by page.
type plWAL struct {
	walFile
	mu    sync.Mutex
	undo  []plWrite
	syncs int
}

type plWrite struct {
	off      int64
	old, new []byte
}

func (f *plWAL) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	old := make([]byte, len(p))
	f.walFile.ReadAt(old, off)
	f.undo = append(f.undo, plWrite{off, old, append([]byte(nil), p...)})
	return f.walFile.WriteAt(p, off)
}

func (f *plWAL) Sync() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.walFile.Sync(); err != nil {
		return err
	}
	f.undo = nil
	f.syncs++
	return nil
}

// powerLoss rewrites the closed log at path as a power loss would leave it:
// the synced image, plus each unsynced 4 KiB page kept with probability
// keep (0: every unsynced write lost).
func (f *plWAL) powerLoss(t *testing.T, path string, r *rand.Rand, keep float64) (dirty, kept int) {
	t.Helper()
	cur, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	synced := append([]byte(nil), cur...)
	for i := len(f.undo) - 1; i >= 0; i-- {
		copy(synced[f.undo[i].off:], f.undo[i].old)
	}
	pages := map[int64]bool{}
	for _, w := range f.undo {
		for p := w.off / 4096; p <= (w.off+int64(len(w.new))-1)/4096; p++ {
			pages[p] = true
		}
	}
	out := synced
	for p := range pages {
		dirty++
		if r.Float64() < keep {
			kept++
			end := min((p+1)*4096, int64(len(cur)))
			copy(out[p*4096:end], cur[p*4096:end])
		}
	}
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
	return dirty, kept
}

type plCommit struct {
	ops  []Op
	sync bool
	err  error
	done bool
}

// runPowerLoss runs a random workload with synced and unsynced commits,
// reads and groups larger than a segment, then a power loss, and checks
// that Open gives the state after some prefix of the commits that holds
// every commit acknowledged before a synced one.
func runPowerLoss(t *testing.T, seed uint64, keep float64, interval time.Duration, walSize int64, tail int, mode ...SyncMode) (corrupt bool) {
	r := rand.New(rand.NewPCG(seed, 7))
	cfg := testConfig(t.TempDir())
	cfg.WALSize = walSize
	cfg.ApplyInterval = interval
	cfg.Weigh = testWeigh
	if len(mode) > 0 {
		cfg.Sync = mode[0]
		cfg.SyncInterval = 5 * time.Millisecond
	}
	var pl *plWAL
	cfg.hooks = &hooks{wrapWAL: func(f walFile) walFile { pl = &plWAL{walFile: f}; return pl }}
	s := open(t, cfg)
	if interval == time.Hour {
		s.ap.flushBytes = 1 << 40 // only reads and switches put records into bbolt
	}
	s.Start()
	var commits []*plCommit
	var mu sync.Mutex
	var wg sync.WaitGroup
	n := 100 + r.IntN(300)
	for i := 0; i < n; i++ {
		ops := randomOps(r)
		if r.IntN(60) == 0 {
			// larger than a segment: applied directly
			for j := 0; j < 40; j++ {
				ops = append(ops, put("/queue/big", uint64(j), strings.Repeat("B", 300)))
			}
		}
		c := &plCommit{ops: ops, sync: r.IntN(3) == 0}
		commits = append(commits, c)
		wg.Add(1)
		s.Submit(ops, c.sync, func(err error) {
			mu.Lock()
			c.err, c.done = err, true
			mu.Unlock()
			wg.Done()
		})
		if r.IntN(10) == 0 {
			s.Scan(fmt.Sprint("/queue/", r.IntN(4)), uint64(r.IntN(40)), 0, 0, func(uint64, []byte) error { return nil })
		}
		if r.IntN(20) == 0 {
			wg.Wait()
		}
	}
	// A burst of unsynced commits at the end (a consumer's acks, say).
	for i := 0; i < tail; i++ {
		ops := []Op{put("/queue/tail", uint64(i), strings.Repeat("t", 200+r.IntN(900)))}
		c := &plCommit{ops: ops}
		commits = append(commits, c)
		wg.Add(1)
		s.Submit(ops, false, func(err error) {
			mu.Lock()
			c.err, c.done = err, true
			mu.Unlock()
			wg.Done()
		})
	}
	wg.Wait()
	mustHave := 0
	for i, c := range commits {
		if c.err != nil {
			t.Fatalf("commit %d: %v", i, c.err)
		}
		if c.sync && cfg.Sync == SyncAlways {
			mustHave = i + 1
		}
	}
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	dirty, kept := pl.powerLoss(t, cfg.Path+".wal", r, keep)
	cfg.hooks = nil
	if testing.Verbose() {
		t.Logf("seed %d: %d unsynced pages, %d kept", seed, dirty, kept)
	}
	s2, err := Open(cfg)
	if errors.Is(err, ErrCorruptLog) {
		t.Logf("seed %d: Open after a power loss (%d unsynced pages, %d kept): %v", seed, dirty, kept, err)
		return true
	}
	if err != nil {
		t.Fatalf("seed %d: Open: %v", seed, err)
	}
	defer s2.Close()
	got := contents(t, s2, nil)
	gotStats, err := s2.Buckets()
	if err != nil {
		t.Fatal(err)
	}
	m := newModel()
	for i := 0; i <= len(commits); i++ {
		if i > 0 {
			m.apply(commits[i-1].ops)
		}
		if i < mustHave {
			continue
		}
		if diff(got, m) == "" {
			want := m.stats(testWeigh)
			if !reflect.DeepEqual(gotStats, want) && !(len(gotStats) == 0 && len(want) == 0) {
				t.Fatalf("seed %d: state of prefix %d but stats\n got %+v\nwant %+v", seed, i, gotStats, want)
			}
			return false
		}
	}
	t.Fatalf("seed %d: state after a power loss is no prefix of at least %d of the %d commits", seed, mustHave, len(commits))
	return false
}

// TestPowerLossLosesOnlyUnsynced: every unsynced write is lost.
func TestPowerLossLosesOnlyUnsynced(t *testing.T) {
	for seed := uint64(1); seed <= 40; seed++ {
		if runPowerLoss(t, seed, 0, time.Millisecond, 32<<10, 0) {
			t.Fatalf("seed %d: ErrCorruptLog with every unsynced write dropped", seed)
		}
	}
}

// TestPowerLossReorderedPages: unsynced pages reach the disk in any
// order (a disk's volatile cache, writeback): the log must open.
func TestPowerLossReorderedPages(t *testing.T) {
	corrupt := 0
	for seed := uint64(121); seed <= 200; seed++ { // 200 was refused before log format 3
		if runPowerLoss(t, seed, 0.5, time.Hour, 1<<20, 60) {
			corrupt++
		}
	}
	if corrupt > 0 {
		t.Fatalf("%d of 80 power losses left a log that Open refuses as corrupt (RecoverRefuse)", corrupt)
	}
}

// TestPowerLossLosesMiddlePageOfUnsyncedGroup: two unsynced commits
// (a group of three pages, then a small one), a power loss that writes
// every page but the group's middle one. Nothing of this was fsynced, so
// it is a torn tail (the small record's durable end says so): Open cuts
// it rather than refuse the log as corrupt.
func TestPowerLossLosesMiddlePageOfUnsyncedGroup(t *testing.T) {
	cfg := testConfig(t.TempDir())
	var pl *plWAL
	cfg.hooks = &hooks{wrapWAL: func(f walFile) walFile { pl = &plWAL{walFile: f}; return pl }}
	s := open(t, cfg)
	s.ap.flushBytes = 1 << 40
	s.Start()
	m := newModel()
	apply(t, s, m, put("q", 1, "synced"))
	var wg sync.WaitGroup
	wg.Add(1)
	s.Submit([]Op{put("q", 2, strings.Repeat("a", 3000)), put("q", 3, strings.Repeat("b", 3000)), put("q", 4, strings.Repeat("c", 3000))}, false, func(err error) { wg.Done() })
	wg.Wait() // its own record
	wg.Add(1)
	s.Submit([]Op{put("q", 5, "small")}, false, func(err error) { wg.Done() })
	wg.Wait()
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	// The group's record starts right after the first one.
	_, recs, _ := records(t, cfg.Path+".wal")
	if len(recs) != 3 {
		t.Fatalf("%d records", len(recs))
	}
	groupStart := int64(walDataStart) + recHeaderLen + int64(len(recs[0]))
	lost := (groupStart + recHeaderLen + 4096) / 4096 // a page inside the group's payload
	cur, _ := os.ReadFile(cfg.Path + ".wal")
	synced := append([]byte(nil), cur...)
	for i := len(pl.undo) - 1; i >= 0; i-- {
		copy(synced[pl.undo[i].off:], pl.undo[i].old)
	}
	copy(cur[lost*4096:(lost+1)*4096], synced[lost*4096:(lost+1)*4096])
	os.WriteFile(cfg.Path+".wal", cur, 0o600)
	cfg.hooks = nil
	s2, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open after a power loss that lost an unsynced page: %v", err)
	}
	defer s2.Close()
	checkContents(t, s2, m) // the synced commit; the unsynced ones may go
}

// TestPowerLossBatch: the same under SyncBatch, every unsynced write lost
// or unsynced pages kept at random.
func TestPowerLossBatch(t *testing.T) {
	corrupt := 0
	for seed := uint64(1); seed <= 25; seed++ {
		if runPowerLoss(t, seed, 0, time.Millisecond, 32<<10, 10, SyncBatch) {
			corrupt++
		}
		if runPowerLoss(t, seed, 0.5, time.Millisecond, 256<<10, 40, SyncBatch) {
			corrupt++
		}
	}
	if corrupt > 0 {
		t.Fatalf("%d of 50 power losses left a log that Open refuses as corrupt (RecoverRefuse)", corrupt)
	}
}
