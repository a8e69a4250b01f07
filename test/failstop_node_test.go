package test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	"github.com/go-stomp/stomp/v3/frame"
)

// memberStateOf is the state of the member named name in b's cluster view,
// "" when b does not list it.
func memberStateOf(b *broker, name string) string {
	for _, m := range b.node.Cluster().Status().Members {
		if m.Name == name {
			return m.State
		}
	}
	return ""
}

// TestNodeFailStopOnStoreFailure: an in-process node whose data directory
// (a 16 MiB tmpfs) fills up while a peer watches it. Once its store fails
// the node reports it (Failed, Err), answers /healthz with 503 and the
// cause, stops accepting STOMP connections, and leaves the gossip: the peer
// sees it "left" (a graceful leave, so a replacement is promoted at once),
// not "dead" after failure detection. The process-level exit is
// TestProcessFailStopDiskFull.
func TestNodeFailStopOnStoreFailure(t *testing.T) {
	mnt := mountTmpfs(t, "16m")
	a := startBroker(t, func(c *config.Config) {
		c.Node.Name = "full"
		c.Node.DataDir = filepath.Join(mnt, "data")
		c.Store.Sync = "always"
		c.Store.WALSize = 1 << 20
		c.Store.MinFreeBytes = 0
		c.Cluster.GossipAddr = freeAddr(t)
	})
	b := startBroker(t, func(c *config.Config) {
		c.Node.Name = "peer"
		c.Cluster.GossipAddr = freeAddr(t)
		c.Cluster.Join = []string{a.cfg.Cluster.GossipAddr}
	})
	deadline := time.Now().Add(10 * time.Second)
	for memberStateOf(b, "full") != "alive" {
		if time.Now().After(deadline) {
			t.Fatalf("peer does not see the node alive: %+v", b.node.Cluster().Status().Members)
		}
		time.Sleep(20 * time.Millisecond)
	}

	sc, err := connectClient(a.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer sc.close()
	q := uniqueQueue(t)
	refused := false
	for i := 0; i < 2000 && !refused; i++ {
		id := fmt.Sprintf("m-%05d", i)
		f, err := sc.send(q, id, body(id, 64<<10))
		refused = err != nil || f.Command != frame.RECEIPT
	}
	if !refused {
		t.Fatal("2000 messages of 64 KiB accepted on a 16 MiB tmpfs")
	}

	select {
	case <-a.node.Failed():
	case <-time.After(10 * time.Second):
		t.Fatal("the node did not report its store failure within 10 s")
	}
	if err := a.node.Err(); err == nil || !strings.Contains(err.Error(), "no space left on device") {
		t.Errorf("Err() = %v, want the cause (no space left on device)", err)
	}

	resp, err := http.Get("http://" + a.node.AdminAddr() + "/healthz")
	if err != nil {
		t.Fatalf("GET /healthz: %v", err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var h map[string]string
	_ = json.Unmarshal(raw, &h)
	if resp.StatusCode != http.StatusServiceUnavailable || h["status"] != "failed" || !strings.Contains(h["error"], "no space left on device") {
		t.Errorf("/healthz after the store failed: %d %s, want 503 failed with the cause", resp.StatusCode, raw)
	}

	if c, err := connectClient(a.addr()); err == nil {
		c.close()
		t.Errorf("STOMP accepts connections after the store failed")
	}

	deadline = time.Now().Add(5 * time.Second)
	for memberStateOf(b, "full") != "left" {
		if time.Now().After(deadline) {
			t.Fatalf("peer sees the failed node as %q, want left: %+v", memberStateOf(b, "full"), b.node.Cluster().Status().Members)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
