package store

import (
	"sync"
	"testing"
	"time"
)

// TestCloseDuringReads: Close while Scans, Buckets and the map loop
// run; nothing hangs or panics, and reads after Close fail.
func TestCloseDuringReads(t *testing.T) {
	for round := 0; round < 30; round++ {
		cfg := testConfig(t.TempDir())
		cfg.WALSize = 32 << 10
		tick := make(chan time.Time)
		cfg.hooks = &hooks{mapTick: tick}
		s := open(t, cfg)
		s.releaseAbove = 0
		s.Start()
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for w := 0; w < 3; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				for i := uint64(0); ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					s.Submit([]Op{put("q", i*3+uint64(w), "vvvvvvvvvvvvvvvvvvvvvvvvvvv"), del("q", i)}, i%2 == 0, nil)
					s.Scan("q", i, 10, 0, func(uint64, []byte) error { return nil })
					s.Buckets()
				}
			}(w)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case tick <- time.Now():
				case <-stop:
					return
				}
			}
		}()
		time.Sleep(20 * time.Millisecond)
		done := make(chan error)
		go func() { done <- s.Close() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Close: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Close hangs")
		}
		close(stop)
		wg.Wait()
		if err := s.Scan("q", 0, 0, 0, func(uint64, []byte) error { return nil }); err == nil {
			t.Fatal("Scan after Close succeeded")
		}
	}
}
