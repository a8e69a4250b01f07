package stomp

import (
	"net"
	"runtime"
	"testing"
	"time"
)

// TestReview12PerIPRefusalsUnbounded: a connection over
// limits.max_connections_per_ip is refused by a goroutine of its own
// (refuse: an ERROR, then up to 1 s of draining the client's input, 2 s
// of write deadline), with no bound on how many run at once. So the one
// address the cap is meant to bound gets a goroutine and a file
// descriptor per connection it opens beyond the cap, for up to 3 s each:
// at accept speed, tens of thousands, until the process runs out of
// descriptors and accept fails for every client. (The peer server bounds
// its refusals with a semaphore and closes the rest at once.)
func TestReview12PerIPRefusalsUnbounded(t *testing.T) {
	_, srv := testServerCfg(t, func(c *Config) { c.MaxConnectionsPerIP = 1 })
	addr := srv.Addr().String()
	held, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	time.Sleep(50 * time.Millisecond)
	base := runtime.NumGoroutine()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	const n = 300
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c) // never reads, never closes: drain waits
	}
	time.Sleep(100 * time.Millisecond)
	if grew := runtime.NumGoroutine() - base; grew > 64 {
		t.Fatalf("%d connections over the per-address cap from one address left %d goroutines (and descriptors) refusing them", n, grew)
	}
}
