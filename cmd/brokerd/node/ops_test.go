package node

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	"github.com/go-stomp/stomp/v3"
)

// startOpsNode starts a single node with STOMP and admin on free ports.
func startOpsNode(t *testing.T) *Node {
	t.Helper()
	cfg := config.Default()
	cfg.Node.Name = "ops"
	cfg.Node.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.STOMP.Addr = "127.0.0.1:0"
	cfg.Admin.Addr = "127.0.0.1:0"
	cfg.Store.Sync = "none"
	n, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = n.Shutdown(ctx)
	})
	return n
}

// admin calls n's admin API; it returns the status and the body.
func admin(t *testing.T, n *Node, method, path string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+n.AdminAddr()+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// GET /v1/queues lists a queue with its pending and in-flight counts and
// its owner; POST /v1/queues/{name}/purge removes the ready messages
// only, whether the name is escaped (/queue/x as %2Fqueue%2Fx) or bare;
// an unknown queue is 404, a topic 400.
func TestOpsQueuesAndPurge(t *testing.T) {
	n := startOpsNode(t)
	c, err := stomp.Dial("tcp", n.STOMPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect()
	for i := range 10 {
		if err := c.Send("/queue/ops-purge", "text/plain", []byte(fmt.Sprint(i)), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	sub, err := c.Subscribe("/queue/ops-purge", stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "2"))
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		select {
		case <-sub.C:
		case <-time.After(5 * time.Second):
			t.Fatal("no delivery")
		}
	}
	code, body := admin(t, n, http.MethodGet, "/v1/queues")
	var qs []QueueInfo
	if code != 200 || json.Unmarshal([]byte(body), &qs) != nil {
		t.Fatalf("GET /v1/queues: %d %s", code, body)
	}
	if len(qs) != 1 || qs[0].Name != "/queue/ops-purge" || qs[0].Pending != 8 || qs[0].InFlight != 2 || qs[0].Owner != n.ID() {
		t.Fatalf("GET /v1/queues: %+v, want /queue/ops-purge with 8 pending, 2 in flight, owned by %s", qs, n.ID())
	}

	code, body = admin(t, n, http.MethodPost, "/v1/queues/"+url.PathEscape("/queue/ops-purge")+"/purge")
	if code != 200 || !strings.Contains(body, `"removed": 8`) {
		t.Fatalf("purge: %d %s, want 8 removed", code, body)
	}
	code, body = admin(t, n, http.MethodPost, "/v1/queues/ops-purge/purge")
	if code != 200 || !strings.Contains(body, `"removed": 0`) || !strings.Contains(body, `"queue": "/queue/ops-purge"`) {
		t.Fatalf("purge by bare name: %d %s, want 0 removed from /queue/ops-purge", code, body)
	}
	if code, body := admin(t, n, http.MethodPost, "/v1/queues/"+url.PathEscape("/queue/nope")+"/purge"); code != http.StatusNotFound || !strings.Contains(body, "no such queue: /queue/nope") {
		t.Fatalf("purge of an unknown queue: %d %s, want 404 naming it", code, body)
	}
	if code, body := admin(t, n, http.MethodPost, "/v1/queues/"+url.PathEscape("/topic/x")+"/purge"); code != http.StatusBadRequest {
		t.Fatalf("purge of a topic: %d %s, want 400", code, body)
	}
	if code, body := admin(t, n, http.MethodGet, "/v1/queues"); code != 200 || !strings.Contains(body, `"pending": 0`) || !strings.Contains(body, `"in_flight": 2`) {
		t.Fatalf("GET /v1/queues after the purge: %d %s, want 0 pending, 2 in flight", code, body)
	}
}

// A single node cannot drain: nobody could take its queues or clients.
// It keeps serving and /healthz stays ok.
func TestOpsDrainRefusedSingleNode(t *testing.T) {
	n := startOpsNode(t)
	code, body := admin(t, n, http.MethodPost, "/v1/drain")
	if code != http.StatusConflict || !strings.Contains(body, "drain refused: not clustered") {
		t.Fatalf("POST /v1/drain on a single node: %d %s, want 409 drain refused", code, body)
	}
	if code, body := admin(t, n, http.MethodGet, "/healthz"); code != 200 || !strings.Contains(body, `"ok"`) {
		t.Fatalf("/healthz after a refused drain: %d %s", code, body)
	}
	c, err := stomp.Dial("tcp", n.STOMPAddr())
	if err != nil {
		t.Fatalf("CONNECT after a refused drain: %v", err)
	}
	_ = c.Disconnect()
}
