package store

import (
	"errors"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// TestFailStopOrder: a log or bbolt fault at a random moment under a
// concurrent mixed load: once any callback reported an error, no later
// callback reports success, and every commit acknowledged synced is back
// after a reopen.
func TestFailStopOrder(t *testing.T) {
	for seed := uint64(1); seed <= 30; seed++ {
		r := rand.New(rand.NewPCG(seed, 9))
		cfg := testConfig(t.TempDir())
		cfg.WALSize = 32 << 10
		cfg.ApplyInterval = time.Millisecond
		fw := withFaultyWAL(&cfg)
		fu := &failingUpdate{}
		var boltFail sync.Mutex
		boltErr := false
		cfg.hooks.update = func(db *bolt.DB, fn func(*bolt.Tx) error) error {
			boltFail.Lock()
			b := boltErr
			boltFail.Unlock()
			if b {
				return errBoltFault
			}
			return db.Update(fn)
		}
		_ = fu
		s := open(t, cfg)
		s.Start()
		var mu sync.Mutex
		var order []int // callback order: commit index
		results := map[int]error{}
		syncedOK := map[int]bool{}
		var wg sync.WaitGroup
		n := 400
		failAt := 50 + r.IntN(300)
		kind := r.IntN(3)
		for i := 0; i < n; i++ {
			if i == failAt {
				switch kind {
				case 0:
					(*fw).set(nil, syscall.EIO)
				case 1:
					(*fw).set(syscall.EIO, nil)
				case 2:
					boltFail.Lock()
					boltErr = true
					boltFail.Unlock()
				}
			}
			synced := r.IntN(2) == 0
			wg.Add(1)
			s.Submit([]Op{put("q", uint64(i), "v")}, synced, func(err error) {
				mu.Lock()
				order = append(order, i)
				results[i] = err
				if err == nil && synced {
					syncedOK[i] = true
				}
				mu.Unlock()
				wg.Done()
			})
			if r.IntN(15) == 0 {
				s.Scan("q", uint64(r.IntN(n)), 1, 0, func(uint64, []byte) error { return nil })
			}
		}
		wg.Wait()
		failed := -1
		for j, i := range order {
			if i != j {
				t.Fatalf("seed %d: callback %d for commit %d", seed, j, i)
			}
			if results[i] != nil && failed < 0 {
				failed = i
			}
			if failed >= 0 && results[i] == nil {
				t.Fatalf("seed %d (fault kind %d at %d): commit %d reported success after commit %d failed (%v)", seed, kind, failAt, i, failed, results[failed])
			}
		}
		s.Close()
		cfg.hooks = nil
		s2 := open(t, cfg)
		got := contents(t, s2, nil)
		for i := range syncedOK {
			if _, ok := got.data[entry{"q", uint64(i)}]; !ok {
				t.Fatalf("seed %d: synced commit %d acknowledged, missing after reopen", seed, i)
			}
		}
		s2.Close()
		_ = errors.Is
	}
}
