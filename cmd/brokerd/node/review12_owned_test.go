package node

import (
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	gostomp "github.com/go-stomp/stomp/v3"
)

// TestReview12RefusedNamesLeakOwnedState: a SEND (or SUBSCRIBE, or the
// exists op) to a queue that does not exist, by a user who may not create
// it, is refused and "changes nothing" at the replica level
// (dropUncreated), but the router takes the queue over first
// (ensureOwned: a store barrier, a scan of every bucket's stats, a pull
// request per peer for its tombstones and another for its messages) and
// keeps an entry in rt.owned for the name until the view changes. So an
// unprivileged user grows the owner's state without bound, one entry per
// name tried, and costs it O(peers + buckets) work per name (and, at the
// next view change, a merge request per leaked name).
func TestReview12RefusedNamesLeakOwnedState(t *testing.T) {
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	files := newAuthTestFiles(t, "alice", "bob")
	files.write("", "alice all #\nbob read,write /queue/#\n")
	cfg := clusterTestConfig(t, "a", writeKeyFile(t, key))
	cfg.Cluster.ActiveMembers, cfg.Replica.Factor = 1, 1
	cfg.Auth.UsersFile = files.users
	cfg.Auth.ACLFile = files.acl
	a := startCluster(t, cfg)[0]
	waitAgreement(t, 20*time.Second, []*clusterNode{a})

	owned := func() int {
		a.n.rt.omu.Lock()
		defer a.n.rt.omu.Unlock()
		return len(a.n.rt.owned)
	}
	before := owned()
	const names = 30
	for i := 0; i < names; i++ {
		c, err := gostomp.Dial("tcp", a.n.STOMPAddr(), gostomp.ConnOpt.Login("bob", "secret"), gostomp.ConnOpt.HeartBeat(0, 0), gostomp.ConnOpt.Logger(quietLog{}))
		if err != nil {
			t.Fatal(err)
		}
		err = c.Send(fmt.Sprintf("/queue/review12-nope.%d", i), "text/plain", []byte("x"), gostomp.SendOpt.Receipt)
		if err == nil {
			t.Fatal("bob created a queue")
		}
		_ = c.MustDisconnect()
	}
	if got := owned() - before; got > 0 {
		t.Fatalf("%d refused SENDs to queues that do not exist left %d entries in the router's owned map (and took each over)", names, got)
	}
}
