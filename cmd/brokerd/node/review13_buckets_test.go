package node

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/brokerd/brokerd/store"
)

// TestReview13BucketsAnswerFitsThePeerLink: the answer to the peer op
// buckets (GET /v1/queues's idle queues) listed up to 10000 copies
// whatever their names' length. Queue names may be up to a header line
// (8 KiB), so 10000 copies could make tens of MiB of JSON: more than a
// peer link carries (16 MiB), the answer was replaced by a failure and
// the node's copies left out of brokerd queues without a word (a user
// who may create queues could so hide every idle queue of a node). The
// list is now also bounded in bytes.
func TestReview13BucketsAnswerFitsThePeerLink(t *testing.T) {
	scfg := store.DefaultConfig(filepath.Join(t.TempDir(), "r.db"))
	scfg.Sync = store.SyncNone
	scfg.Logger = slog.New(slog.DiscardHandler)
	st, err := store.Open(scfg)
	if err != nil {
		t.Fatal(err)
	}
	st.Start()
	t.Cleanup(func() { st.Close() })
	long := strings.Repeat("n", 7000)
	var ops []store.Op
	for i := range 2600 { // 2600 names of 7 KiB: about 18 MiB
		ops = append(ops, store.Op{Kind: store.OpPut, Bucket: fmt.Sprintf("%s%s.%d", replica.QueuePrefix, long, i), Key: 1, Value: []byte("x")})
	}
	done := make(chan error, 1)
	st.Submit(ops, false, func(err error) { done <- err })
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	rt := &router{st: st}
	bs := rt.localBuckets()
	b, err := json.Marshal(bs)
	if err != nil {
		t.Fatal(err)
	}
	if lim := stomp.DefaultPeerLimits().MaxBodySize; len(b) > lim {
		t.Fatalf("the buckets answer lists %d copies in %d bytes: more than a peer link's %d", len(bs), len(b), lim)
	}
	if len(bs) == 0 {
		t.Fatal("no copy listed")
	}
}
