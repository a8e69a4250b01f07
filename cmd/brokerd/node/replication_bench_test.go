package node

import (
	"strconv"
	"sync"
	"testing"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/replica"
)

// BenchmarkReplicatedSend measures receipted 256-byte SENDs on an owner
// whose every message needs a durable copy on a second node over a real
// peer link (R = 2, W = 2, both stores fdatasync), with 64 SENDs in
// flight as a producer with a window of 64 would have; compare with
// -bench 'ReplicatedSend/local' (the same owner without a replica).
//
// The w1 cases keep one SEND in flight, as a producer waiting on each
// receipt: their ns/op is the receipt latency (an fdatasync here, and the
// peer link's round trip with the replica's fdatasync).
func BenchmarkReplicatedSend(b *testing.B) {
	for _, c := range []struct {
		mode   string
		window int
	}{{"local", 64}, {"replicated", 64}, {"local/w1", 1}, {"replicated/w1", 1}} {
		mode := c.mode
		b.Run(mode, func(b *testing.B) {
			active := []string{"a", "b"}
			if mode == "local" || mode == "local/w1" {
				active = []string{"a"}
			}
			net := &repNet{active: active, epoch: cluster.EpochID{Counter: 1, Set: 1}, addrs: map[string]string{}}
			a := startRepMember(b, "a", net)
			startRepMember(b, "b", net)
			const q = "/queue/bench"
			if err := a.n.Adopt(q); err != nil {
				b.Fatal(err)
			}
			body := make([]byte, 256)
			sem := make(chan struct{}, c.window)
			var wg sync.WaitGroup
			var mu sync.Mutex
			var firstErr error
			b.SetBytes(256)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				sem <- struct{}{}
				wg.Add(1)
				m := &replica.Message{Dest: q, Body: body, Headers: []string{"i", strconv.Itoa(i)}}
				err := a.n.Apply(&replica.Batch{Sends: []*replica.Message{m}, Sync: true}, func(err error) {
					if err != nil {
						mu.Lock()
						if firstErr == nil {
							firstErr = err
						}
						mu.Unlock()
					}
					<-sem
					wg.Done()
				})
				if err != nil {
					b.Fatal(err)
				}
			}
			wg.Wait()
			b.StopTimer()
			if firstErr != nil {
				b.Fatal(firstErr)
			}
		})
	}
}
