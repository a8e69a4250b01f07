package store

import (
	"testing"
	"time"
)

// TestCloseBeforeStartWithFullQueue: more Submits before Start than
// reqs holds; Close (without Start) must return and fail them all.
func TestCloseBeforeStartWithFullQueue(t *testing.T) {
	cfg := testConfig(t.TempDir())
	s := open(t, cfg)
	go func() {
		for i := uint64(0); i < 1100; i++ {
			s.Submit([]Op{put("q", i, "v")}, false, nil)
		}
	}()
	time.Sleep(100 * time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- s.Close() }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close before Start hangs behind a Submit blocked on the full request queue")
	}
}
