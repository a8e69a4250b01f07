package node

import (
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
)

// A queue removed as idle (queue.idle_delete_after) leaves the router's
// owned table (replica.Node.SetOnRemoved; the watch also sweeps every
// 10 s): owned does not grow with every queue name ever used (reply
// queues named per request, say). The name used again is taken over anew
// and works.
func TestForgetRemovedIdleQueue(t *testing.T) {
	rn := &r6Net{addrs: map[string]string{}}
	a := startR6(t, "node-a", rn, []string{"node-a"}, nil, r6Opts{r: 1, w: 1, idleDelete: 100 * time.Millisecond})
	owned := func(q string) bool {
		a.rt.omu.Lock()
		defer a.rt.omu.Unlock()
		return a.rt.owned[q] != nil
	}
	var qs []string
	for i := 0; i < 5; i++ {
		q := "/queue/forget-idle-" + string(rune('a'+i))
		qs = append(qs, q)
		if err := waitErr(t, "SEND", a.apply(t, sendBatch(q, "m")), 10*time.Second); err != nil {
			t.Fatal(err)
		}
		var rec recorder
		sub, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckAuto, Deliver: rec.deliver})
		if err != nil {
			t.Fatal(err)
		}
		if got := rec.waitN(1, 5*time.Second); len(got) != 1 {
			t.Fatalf("%s: got %v", q, got)
		}
		sub.Return()
		if !owned(q) {
			t.Fatalf("%s not owned after its use", q)
		}
	}
	waitUntil(t, "the replica removes the idle queues, and the router forgets them", func() bool {
		for _, q := range qs {
			if a.rep.Adopted(q) || owned(q) {
				return false
			}
		}
		return true
	})
	// Used again: taken over anew, and it works.
	q := qs[0]
	if err := waitErr(t, "SEND again", a.apply(t, sendBatch(q, "again")), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	var rec recorder
	sub, err := a.rt.Subscribe(replica.SubOptions{Dest: q, Ack: replica.AckClientIndividual, Deliver: rec.deliver})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if got := rec.waitN(1, 5*time.Second); len(got) != 1 || got[0] != "again" {
		t.Fatalf("the queue used again after its removal: got %v, want [again]", got)
	}
	if !owned(q) || !a.rep.Adopted(q) {
		t.Fatalf("the queue used again is not taken over (owned %v, adopted %v)", owned(q), a.rep.Adopted(q))
	}
}
