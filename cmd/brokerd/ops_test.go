package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/brokerd/brokerd/cluster"
	"github.com/go-stomp/stomp/v3"
)

// The operator commands against a node with an HTTPS admin API and a
// token: what they print, and the exit status of each kind of refusal.
func TestOpsCommands(t *testing.T) {
	a := startAdminNode(t)
	c, err := stomp.Dial("tcp", a.n.STOMPAddr())
	if err != nil {
		t.Fatal(err)
	}
	for range 7 {
		if err := c.Send("/queue/cli-purge", "text/plain", []byte("x"), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	_ = c.Disconnect()
	auth := []string{"--admin-addr", a.addr, "--token-file", a.tokenFile, "--ca-file", a.ca.CertFile}
	for _, tc := range []struct {
		name       string
		args       []string
		wantCode   int
		wantOut    string
		wantErrOut string
	}{
		{"queues", append([]string{"queues"}, auth...), 0, "/queue/cli-purge  7", ""},
		{"queues --json", append([]string{"queues", "--json"}, auth...), 0, `"pending": 7`, ""},
		{"purge", append([]string{"purge", "/queue/cli-purge"}, auth...), 0, "purged /queue/cli-purge: 7 messages removed", ""},
		{"purge again, bare name", append([]string{"purge", "cli-purge"}, auth...), 0, "purged /queue/cli-purge: 0 messages removed", ""},
		{"purge an unknown queue", append([]string{"purge", "nope"}, auth...), exitNotFound, "", "no such queue: /queue/nope"},
		{"purge without the token", []string{"purge", "cli-purge", "--admin-addr", a.addr, "--ca-file", a.ca.CertFile}, exitAuth, "", "401 Unauthorized"},
		{"purge without the CA", []string{"purge", "cli-purge", "--admin-addr", "https://" + a.addr, "--token-file", a.tokenFile}, exitAuth, "", "certificate signed by unknown authority"},
		{"queues from a closed port", []string{"queues", "--admin-addr", "127.0.0.1:1"}, exitUnreachable, "", "connection refused"},
		{"drain a single node", append([]string{"drain", "cli-test"}, auth...), exitRefused, "", "drain refused: not clustered"},
		{"drain an unknown node", append([]string{"drain", "nobody"}, auth...), exitNotFound, "", `no node named "nobody" in the cluster (members: cli-test)`},
		{"undrain an unknown node", append([]string{"undrain", "nobody"}, auth...), exitNotFound, "", `no node named "nobody"`},
		{"undrain", append([]string{"undrain", "cli-test"}, auth...), 0, "node cli-test (" + a.n.ID() + ") undrained", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := brokerd(tc.args...)
			if code != tc.wantCode || !strings.Contains(out, tc.wantOut) || !strings.Contains(errOut, tc.wantErrOut) {
				t.Fatalf("brokerd %s: exit %d, stdout %q, stderr %q; want exit %d, stdout with %q, stderr with %q",
					strings.Join(tc.args, " "), code, out, errOut, tc.wantCode, tc.wantOut, tc.wantErrOut)
			}
		})
	}
}

// fakeCluster is the admin APIs of two nodes, a and b, for the drain
// commands: after a POST /v1/drain at b, b's GET /v1/drain reports the
// queues still owned, one fewer each time down to stopAt, and a's view
// shows b draining when aFollows.
type fakeCluster struct {
	mu              sync.Mutex
	aAddr, bAddr    string
	owned, stopAt   int
	draining, aSees bool
	aFollows        bool
	calls           []string
}

func (f *fakeCluster) status(self string, bDraining bool) cluster.Status {
	return cluster.Status{NodeName: self, Members: []cluster.MemberStatus{
		{ID: "id-a", Name: "a", State: "alive", AdminAddr: f.aAddr},
		{ID: "id-b", Name: "b", State: "alive", AdminAddr: f.bAddr, Draining: bDraining},
		{ID: "id-c", Name: "c", State: "dead", AdminAddr: "127.0.0.1:1"},
	}}
}

func (f *fakeCluster) a() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		if r.URL.Path != "/v1/cluster" {
			http.Error(w, "not here", http.StatusTeapot)
			return
		}
		_ = json.NewEncoder(w).Encode(f.status("a", f.aSees))
	})
}

func (f *fakeCluster) b() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.calls = append(f.calls, r.Method+" "+r.URL.Path)
		switch r.Method + " " + r.URL.Path {
		case "GET /v1/cluster":
			_ = json.NewEncoder(w).Encode(f.status("b", f.draining))
			return
		case "POST /v1/drain", "POST /v1/undrain":
			f.draining = r.URL.Path == "/v1/drain"
			if f.aFollows {
				f.aSees = f.draining
			}
		case "GET /v1/drain":
			if f.owned > f.stopAt {
				f.owned--
			}
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"node_id": "id-b", "node_name": "b", "draining": f.draining, "owned_queues": f.owned, "clients": 0, "clients_closed": 2})
	})
}

// drain NODE finds the node in the cluster as --admin-addr sees it and
// calls that node's own admin address; it waits for the hand-off and for
// every alive node to see the drain, and exits 75 when either does not
// come within --wait.
func TestOpsDrainCallsTheNamedNode(t *testing.T) {
	f := &fakeCluster{owned: 3, aFollows: true}
	as := httptest.NewServer(f.a())
	defer as.Close()
	bs := httptest.NewServer(f.b())
	defer bs.Close()
	f.aAddr, f.bAddr = strings.TrimPrefix(as.URL, "http://"), strings.TrimPrefix(bs.URL, "http://")

	code, out, errOut := brokerd("drain", "b", "--admin-addr", f.aAddr, "--wait", "10s")
	if code != 0 || !strings.Contains(out, "node b (id-b) drained: it owns no queue, takes no new client, 2 client sessions ended") {
		t.Fatalf("drain b: exit %d, %q %q", code, out, errOut)
	}
	f.mu.Lock()
	calls := strings.Join(f.calls, ",")
	f.mu.Unlock()
	if !strings.HasPrefix(calls, "POST /v1/drain,GET /v1/drain") {
		t.Fatalf("calls at b: %s", calls)
	}

	f.mu.Lock()
	f.owned, f.stopAt = 3, 2
	f.mu.Unlock()
	code, _, errOut = brokerd("drain", "id-b", "--admin-addr", f.aAddr, "--wait", "300ms")
	if code != exitRefused || !strings.Contains(errOut, "node b is draining but still owns 2 queues after 300ms: do not stop it yet") {
		t.Fatalf("drain with a hand-off not done in time: exit %d, %q; want %d", code, errOut, exitRefused)
	}
	f.mu.Lock()
	f.owned, f.stopAt, f.aFollows, f.aSees = 0, 0, false, false
	f.mu.Unlock()
	code, _, errOut = brokerd("drain", "b", "--admin-addr", f.aAddr, "--wait", "300ms")
	if code != exitRefused || !strings.Contains(errOut, "node b: not every node sees it draining yet (a)") {
		t.Fatalf("drain that a does not see: exit %d, %q; want %d", code, errOut, exitRefused)
	}
	code, _, errOut = brokerd("drain", "c", "--admin-addr", f.aAddr)
	if code != exitUnreachable || !strings.Contains(errOut, "node c (id-c) is dead in a's view") {
		t.Fatalf("drain of a dead node: exit %d, %q; want %d", code, errOut, exitUnreachable)
	}
	f.mu.Lock()
	f.aFollows, f.aSees = true, true
	f.mu.Unlock()
	code, out, errOut = brokerd("undrain", "b", "--admin-addr", f.aAddr)
	if code != 0 || !strings.Contains(out, "node b (id-b) undrained") {
		t.Fatalf("undrain b: exit %d, %q %q", code, out, errOut)
	}
}

// brokerd status marks a draining member in its STATE column.
func TestStatusShowsDraining(t *testing.T) {
	var b strings.Builder
	printStatus(&b, cluster.Status{NodeName: "a", Members: []cluster.MemberStatus{
		{ID: "id-a", Name: "a", Role: "active", State: "alive"},
		{ID: "id-b", Name: "b", Role: "active", State: "alive", Draining: true},
	}}, nil)
	out := b.String()
	if !strings.Contains(out, "alive,draining") || strings.Count(out, "draining") != 1 {
		t.Fatalf("status table:\n%s\nwant b alive,draining and a not", out)
	}
}
