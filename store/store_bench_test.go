package store

import (
	"path/filepath"
	"sync"
	"testing"
)

func openBench(b *testing.B, sync SyncMode) *Store {
	cfg := DefaultConfig(filepath.Join(b.TempDir(), "b.db"))
	cfg.Sync = sync
	s, err := Open(cfg)
	if err != nil {
		b.Fatal(err)
	}
	s.Start()
	b.Cleanup(func() { s.Close() })
	return s
}

// BenchmarkApplySerial is one producer waiting for each commit: the
// floor of a producer that waits for every RECEIPT.
func BenchmarkApplySerial(b *testing.B) {
	s := openBench(b, SyncAlways)
	val := make([]byte, 300)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := s.Apply([]Op{{Kind: OpPut, Bucket: "/queue/a", Key: uint64(i), Value: val}}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkApplyConcurrent is 64 writers at once: group commit at work.
func BenchmarkApplyConcurrent(b *testing.B) {
	s := openBench(b, SyncAlways)
	val := make([]byte, 300)
	var wg sync.WaitGroup
	ch := make(chan int)
	for w := 0; w < 64; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range ch {
				if err := s.Apply([]Op{{Kind: OpPut, Bucket: "/queue/a", Key: uint64(i), Value: val}}); err != nil {
					b.Error(err)
				}
			}
		}()
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ch <- i
	}
	close(ch)
	wg.Wait()
}
