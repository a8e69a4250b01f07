//go:build chaos

package node

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// In the chaos suite's build (go build -tags chaos), the wall clock of a
// node can jump: the suite writes a duration ("1h", "-20m", "0s") to
// chaos-clock-offset in the node's data directory, and from then on the
// node's wall clock (message keys, expiry, the JoinedAt and ActiveSince
// it advertises) reads the real time plus that offset. Timers that do not
// read this clock (heart-beats, the promotion delay, failure detection)
// keep the monotonic clock, as they do when an operator or NTP steps a real
// clock. The release build has none of this (clock.go).

var (
	clockOnce   sync.Once
	clockOffset atomic.Int64 // nanoseconds
)

const clockFile = "chaos-clock-offset"

func wallClock(dataDir string) func() time.Time {
	clockOnce.Do(func() {
		path := filepath.Join(dataDir, clockFile)
		go func() {
			var last time.Duration
			for range time.Tick(100 * time.Millisecond) {
				b, err := os.ReadFile(path)
				if err != nil {
					continue
				}
				d, err := time.ParseDuration(strings.TrimSpace(string(b)))
				if err != nil || d == last {
					continue
				}
				clockOffset.Store(int64(d))
				last = d
				fmt.Fprintf(os.Stderr, "chaos: wall clock offset %s\n", d)
			}
		}()
	})
	return func() time.Time {
		// Add moves the monotonic reading with the wall: an interval
		// measured across the step sees it, which a real step would not
		// show (harsher, never milder); intervals on one side of it do
		// not.
		return time.Now().Add(time.Duration(clockOffset.Load()))
	}
}
