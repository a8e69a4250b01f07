package store

import (
	"bufio"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// TestMeasureBacklog is a measurement, not a check: with
// STORE_MEASURE=<messages> it fills one queue with that many 300-byte
// values (about a 256-byte STOMP message with its headers), kills the
// store (no checkpoint), and prints the data directory's bytes per
// message, Open's duration and the resident file pages it left, then
// drains the queue through Scan and deletes and prints the duration of
// the applier's transactions afterwards. Skipped without STORE_MEASURE.
//
//	STORE_MEASURE=1000000 go test -run TestMeasureBacklog -v -timeout 30m ./store/
func TestMeasureBacklog(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("STORE_MEASURE"))
	if n <= 0 {
		t.Skip("set STORE_MEASURE=<messages> to measure")
	}
	dir := os.Getenv("STORE_MEASURE_DIR")
	if dir == "" {
		dir = t.TempDir()
	}
	var (
		mu  sync.Mutex
		txs []time.Duration
	)
	cfg := DefaultConfig(filepath.Join(dir, "m.db"))
	cfg.Logger = slog.New(slog.DiscardHandler)
	cfg.hooks = &hooks{update: func(db *bolt.DB, fn func(*bolt.Tx) error) error {
		t0 := time.Now()
		err := db.Update(fn)
		mu.Lock()
		txs = append(txs, time.Since(t0))
		mu.Unlock()
		return err
	}}
	s, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	val := make([]byte, 300)
	const group = 64
	t0 := time.Now()
	var wg sync.WaitGroup
	for k := 0; k < n; k += group {
		ops := make([]Op, 0, group)
		for i := k; i < min(n, k+group); i++ {
			ops = append(ops, Op{Kind: OpPut, Bucket: "/queue/m", Key: uint64(i + 1), Value: val})
		}
		wg.Add(1)
		s.Submit(ops, true, func(err error) {
			if err != nil {
				t.Error(err)
			}
			wg.Done()
		})
		if k%(group*256) == 0 {
			wg.Wait()
		}
	}
	wg.Wait()
	fill := time.Since(t0)
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	dbSize, walSize := fileSize(t, cfg.Path), fileSize(t, cfg.Path+".wal")
	t.Logf("fill: %d messages in %v (%.0f msg/s); bbolt %d bytes (%.0f per message), log %d bytes; data directory %.0f bytes per message",
		n, fill.Round(time.Millisecond), float64(n)/fill.Seconds(), dbSize, float64(dbSize)/float64(n), walSize, float64(dbSize+walSize)/float64(n))

	rss0 := rssFile(t)
	t0 = time.Now()
	s, err = Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	open := time.Since(t0)
	t.Logf("open after kill: %v, RssFile +%d KiB, replay %+v", open.Round(time.Millisecond), rssFile(t)-rss0, s.Replay())
	s.Start()

	var peakHeap atomic.Uint64
	stopSample := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tk := time.NewTicker(20 * time.Millisecond)
		defer tk.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peakHeap.Load() {
				peakHeap.Store(ms.HeapInuse)
			}
			select {
			case <-tk.C:
			case <-stopSample:
				return
			}
		}
	}()
	t0 = time.Now()
	after := uint64(0)
	for {
		var ops []Op
		if err := s.Scan("/queue/m", after, 256, 0, func(key uint64, _ []byte) error {
			ops = append(ops, Op{Kind: OpDelete, Bucket: "/queue/m", Key: key})
			after = key
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if len(ops) == 0 {
			break
		}
		wg.Add(1)
		s.Submit(ops, true, func(err error) {
			if err != nil {
				t.Error(err)
			}
			wg.Done()
		})
	}
	wg.Wait()
	drain := time.Since(t0)
	if _, err := s.Buckets(); err != nil { // every delete into bbolt
		t.Fatal(err)
	}
	drainApplied := time.Since(t0)
	close(stopSample)
	<-sampled
	t.Logf("drain: peak Go heap in use %d MiB", peakHeap.Load()>>20)
	t.Logf("drain: %v (%.0f msg/s), %v with every delete in bbolt, RssFile %d KiB after", drain.Round(time.Millisecond),
		float64(n)/drain.Seconds(), drainApplied.Round(time.Millisecond), rssFile(t))

	// Steady light traffic on the drained store: the applier's
	// transactions now write a freelist of every page the backlog used.
	mu.Lock()
	txs = nil
	mu.Unlock()
	for i := 0; i < 200; i++ {
		key := uint64(n + 1 + i)
		if err := s.Apply([]Op{{Kind: OpPut, Bucket: "/queue/m", Key: key, Value: val}}); err != nil {
			t.Fatal(err)
		}
		if err := s.Apply([]Op{{Kind: OpDelete, Bucket: "/queue/m", Key: key}}); err != nil {
			t.Fatal(err)
		}
		if i%10 == 9 {
			if _, err := s.Buckets(); err != nil { // a transaction
				t.Fatal(err)
			}
		}
	}
	if _, err := s.Buckets(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	d := slices.Clone(txs)
	mu.Unlock()
	slices.Sort(d)
	if len(d) > 0 {
		t.Logf("after drain: %d apply transactions for 400 commits (a read every 20), p50 %v, max %v; %d free pages",
			len(d), d[len(d)/2].Round(time.Microsecond), d[len(d)-1].Round(time.Microsecond), s.db.Stats().FreePageN)
	}
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	s2, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("open after drain and kill: %v", time.Since(t0).Round(time.Millisecond))
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
}

func fileSize(t *testing.T, path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

func rssFile(t *testing.T) int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "RssFile:"); ok {
			var kb int64
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &kb)
			return kb
		}
	}
	return 0
}
