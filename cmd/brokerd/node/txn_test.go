package node

import (
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/store"
)

// A transaction recorded by a coordinator that stopped before applying
// every part (kill -9 between the record and the forwards) is applied
// when the node starts again, and its record removed.
func TestTxnResumedAtStart(t *testing.T) {
	const id = "node-a"
	log := slog.New(slog.DiscardHandler)
	scfg := store.DefaultConfig(filepath.Join(t.TempDir(), "r.db"))
	scfg.Weigh = replica.StoredBodyLen
	scfg.Logger = log
	st, err := store.Open(scfg)
	if err != nil {
		t.Fatal(err)
	}
	rec := encodeMessages(nil, []*replica.Message{
		{Dest: "/queue/tx-x", ID: "m-1", Body: []byte("one")},
		{Dest: "/queue/tx-y", ID: "m-2", Body: []byte("two")},
	})
	if err := st.SetMeta(txnPrefix+"earlier-run-1", rec); err != nil {
		t.Fatal(err)
	}
	st.Start()
	rcfg := replica.DefaultConfig()
	rcfg.NodeID = id
	rcfg.Logger = log
	rep := replica.New(rcfg, st)
	status := func() cluster.Status {
		return cluster.Status{NodeID: id, ActiveSet: []string{id}, EpochID: cluster.EpochID{Counter: 1, Set: 1}}
	}
	fwd := newFwdLinks(stompClientCfg(id, log), func(string) string { return "" })
	rt := newRouter(rep, st, 1, status, fwd, log, nil)
	if err := rep.Recover(); err != nil {
		t.Fatal(err)
	}
	rep.Start()
	rt.start()
	t.Cleanup(func() {
		rt.close()
		fwd.close()
		rep.Close()
		st.Close()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		x, err1 := st.Bucket("/queue/tx-x")
		y, err2 := st.Bucket("/queue/tx-y")
		left := 0
		err3 := st.MetaPrefix(txnPrefix, func(string, []byte) error { left++; return nil })
		if err1 != nil || err2 != nil || err3 != nil {
			t.Fatal(err1, err2, err3)
		}
		if x.Count == 1 && y.Count == 1 && left == 0 && rt.txn.incomplete() == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 10 s: /queue/tx-x holds %d, /queue/tx-y %d, %d records left", x.Count, y.Count, left)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
