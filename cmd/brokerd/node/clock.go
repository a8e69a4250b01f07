//go:build !chaos

package node

import "time"

// wallClock is the wall clock behind message keys (a hybrid logical
// clock), expiry and the times a node advertises in gossip. The chaos
// suite builds brokerd with -tags chaos to shift it (clock_chaos.go).
func wallClock(dataDir string) func() time.Time { return time.Now }
