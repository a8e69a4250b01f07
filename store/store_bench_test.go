package store

import (
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func openBench(b *testing.B, sync SyncMode) *Store {
	cfg := DefaultConfig(filepath.Join(b.TempDir(), "b.db"))
	cfg.Sync = sync
	cfg.Logger = slog.New(slog.DiscardHandler)
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

// commitLatency runs writers goroutines, each committing (synced, one put
// of valueSize bytes) until commits are done in all, and returns the
// latencies of the commits, sorted, the number of segment switches they
// spanned and how many of those waited for the applier.
func commitLatency(tb testing.TB, cfg Config, writers, commits, valueSize int) ([]time.Duration, uint64, float64) {
	s, err := Open(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	s.Start()
	defer s.Close()
	gen0 := s.walGen()
	val := make([]byte, valueSize)
	lat := make([]time.Duration, commits)
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(commits) {
					return
				}
				t0 := time.Now()
				if err := s.Apply([]Op{{Kind: OpPut, Bucket: "/queue/a", Key: uint64(i), Value: val}}); err != nil {
					tb.Error(err)
					return
				}
				lat[i] = time.Since(t0)
			}
		}()
	}
	wg.Wait()
	gens := s.walGen() - gen0
	slices.Sort(lat)
	return lat, gens, counterValue(tb, s.metrics.switchWaits)
}

// BenchmarkCommitLatencyWraps reports the p50, p99 and max latency of
// synced commits across many segment switches of a 4 MiB log (16 writers,
// 1 KiB values, 40000 commits at least), and how many switches waited for
// the applier.
func BenchmarkCommitLatencyWraps(b *testing.B) {
	cfg := DefaultConfig(filepath.Join(b.TempDir(), "lat.db"))
	cfg.WALSize = 4 << 20
	cfg.Logger = slog.New(slog.DiscardHandler)
	n := max(b.N, 40000)
	b.ResetTimer()
	lat, gens, waits := commitLatency(b, cfg, 16, n, 1024)
	b.StopTimer()
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds()), "max-µs")
	b.ReportMetric(float64(gens), "switches")
	b.ReportMetric(waits, "switch-waits")
}
