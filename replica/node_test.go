package replica

import (
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/brokerd/brokerd/store"
)

func testNode(t *testing.T) *Node {
	scfg := store.DefaultConfig(filepath.Join(t.TempDir(), "r.db"))
	scfg.Sync = store.SyncNone
	st, err := store.Open(scfg)
	if err != nil {
		t.Fatal(err)
	}
	st.Start()
	t.Cleanup(func() { st.Close() })
	cfg := DefaultConfig()
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	n := New(cfg, st)
	n.Start()
	t.Cleanup(n.Close)
	return n
}

func TestTopicMessageIDsUnique(t *testing.T) {
	n := testNode(t)
	var mu sync.Mutex
	var ids []string
	_, _ = n.Subscribe(SubOptions{Dest: "/topic/t", Deliver: func(d Delivery) { mu.Lock(); ids = append(ids, d.Msg.ID); mu.Unlock() }})
	for i := 0; i < 3; i++ {
		ch := make(chan error, 1)
		n.Apply(&Batch{Sends: []*Message{{Dest: "/topic/t"}}}, func(err error) { ch <- err })
		<-ch
	}
	if len(ids) != 3 || ids[0] == ids[1] || ids[1] == ids[2] || ids[0] == ids[2] {
		t.Fatalf("three topic messages, message-ids %v: want three distinct", ids)
	}
}

// A topic subscriber that subscribes while the last other subscriber
// leaves must not land on a destination being removed: it would never
// receive anything.
func TestTopicSubscribeWhileLastLeaves(t *testing.T) {
	n := testNode(t)
	lost := 0
	for i := 0; i < 2000 && lost == 0; i++ {
		a, _ := n.Subscribe(SubOptions{Dest: "/topic/r", Deliver: func(Delivery) {}})
		var got atomic.Int32
		var b *Subscription
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); a.Close() }()
		go func() {
			defer wg.Done()
			b, _ = n.Subscribe(SubOptions{Dest: "/topic/r", Deliver: func(d Delivery) { got.Add(1) }})
		}()
		wg.Wait()
		ch := make(chan error, 1)
		n.Apply(&Batch{Sends: []*Message{{Dest: "/topic/r"}}}, func(err error) { ch <- err })
		<-ch
		if got.Load() == 0 {
			lost++
			t.Errorf("iteration %d: live subscriber got nothing (orphaned destination)", i)
		}
		b.Close()
	}
}
