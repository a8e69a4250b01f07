package store

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestScanSeesAcked: concurrent puts and deletes (some unsynced, in
// groups with other buckets, some touching more than maxTouched buckets)
// and Scans from random keys: a Scan returns every key above its start
// whose put was acknowledged before it began and whose delete was not yet
// submitted when it ended, and no key whose delete was acknowledged before.
func TestScanSeesAcked(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.WALSize = 64 << 10
	cfg.ApplyInterval = 20 * time.Millisecond
	s := start(t, cfg)
	const n = 6000
	var putAcked, delSubmitted, delAcked [n + 1]atomic.Bool
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewPCG(1, 2))
		next := uint64(1)
		var pending sync.WaitGroup
		for next <= n {
			k := next
			next++
			ops := []Op{put("q", k, "v")}
			switch r.IntN(10) {
			case 0:
				for i := 0; i <= maxTouched; i++ {
					ops = append(ops, put(fmt.Sprint("o", i), k, "x"))
				}
			case 1:
				ops = append(ops, put("other", k+1000000, "x"))
			}
			// delete an older key now and then
			if k > 20 && r.IntN(3) == 0 {
				d := k - uint64(1+r.IntN(20))
				if !delSubmitted[d].Swap(true) {
					ops = append(ops, del("q", d))
					pending.Add(1)
					s.Submit([]Op{del("q", d)}, r.IntN(2) == 0, func(err error) {
						if err != nil {
							t.Error(err)
						}
						delAcked[d].Store(true)
						pending.Done()
					})
				}
			}
			pending.Add(1)
			s.Submit(ops[:1+len(ops)-1-boolInt(ops[len(ops)-1].Kind == OpDelete)], r.IntN(2) == 0, func(err error) {
				if err != nil {
					t.Error(err)
				}
				putAcked[k].Store(true)
				pending.Done()
			})
			if k%200 == 0 {
				pending.Wait()
			}
		}
		pending.Wait()
		close(stop)
	}()
	for reader := 0; reader < 4; reader++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, 3))
			for {
				select {
				case <-stop:
					return
				default:
				}
				var mustSee, mustNot []uint64
				for k := 1; k <= n; k++ {
					if delAcked[k].Load() {
						mustNot = append(mustNot, uint64(k))
					} else if putAcked[k].Load() {
						mustSee = append(mustSee, uint64(k))
					}
				}
				if len(mustSee) == 0 {
					continue
				}
				after := mustSee[r.IntN(len(mustSee))] - 1
				got := map[uint64]bool{}
				if err := s.Scan("q", after, 0, 0, func(k uint64, _ []byte) error { got[k] = true; return nil }); err != nil {
					t.Error(err)
					return
				}
				for _, k := range mustSee {
					if k > after && !got[k] && !delSubmitted[k].Load() {
						t.Errorf("Scan(q, %d) misses key %d, acknowledged before it", after, k)
						return
					}
				}
				for _, k := range mustNot {
					if k > after && got[k] {
						t.Errorf("Scan(q, %d) returns key %d, deleted (acknowledged) before it", after, k)
						return
					}
				}
			}
		}(uint64(reader))
	}
	wg.Wait()
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
