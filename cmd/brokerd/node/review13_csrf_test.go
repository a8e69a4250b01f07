package node

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/go-stomp/stomp/v3"
)

// TestReview13OpenAdminRefusesCrossSitePosts: without a token file or a
// client CA the admin API is open (loopback only). A web page the
// operator visits can still send a POST to http://127.0.0.1:8613 (a
// form, or fetch with mode no-cors: no preflight), so any site could
// purge a queue (the messages are gone, tombstoned on every replica) or
// drain the node. A browser says where such a request comes from (Origin,
// Sec-Fetch-Site); a request that changes something and comes from
// another site is refused. The CLI sends neither header and is served.
func TestReview13OpenAdminRefusesCrossSitePosts(t *testing.T) {
	n := startOpsNode(t)
	c, err := stomp.Dial("tcp", n.STOMPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect()
	for i := 0; i < 3; i++ {
		if err := c.Send("/queue/csrf", "text/plain", []byte("x"), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	post := func(path string, hdr ...string) (int, string) {
		req, err := http.NewRequest(http.MethodPost, "http://"+n.AdminAddr()+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		cl := &http.Client{Timeout: 10 * time.Second}
		resp, err := cl.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, hdr := range [][]string{
		{"Origin", "https://evil.example"},
		{"Origin", "null"},
		{"Sec-Fetch-Site", "cross-site"},
		{"Origin", "http://localhost:1234"},
	} {
		if code, body := post("/v1/queues/csrf/purge", hdr...); code != http.StatusForbidden {
			t.Fatalf("purge with %s: %s: %d %s, want 403", hdr[0], hdr[1], code, body)
		}
		if code, body := post("/v1/drain", hdr...); code != http.StatusForbidden {
			t.Fatalf("drain with %s: %s: %d %s, want 403", hdr[0], hdr[1], code, body)
		}
	}
	// The same origin (the cluster page's own) and no browser headers
	// at all (the CLI) are served.
	if code, body := post("/v1/queues/csrf/purge", "Origin", "http://"+n.AdminAddr(), "Sec-Fetch-Site", "same-origin"); code != http.StatusOK || !strings.Contains(body, `"removed": 3`) {
		t.Fatalf("purge from the admin page's origin: %d %s, want 3 removed", code, body)
	}
	if code, body := post("/v1/queues/csrf/purge"); code != http.StatusOK || !strings.Contains(body, `"removed": 0`) {
		t.Fatalf("purge from the CLI: %d %s", code, body)
	}
}

// TestReview13OpenAdminRefusesForeignHostNames: DNS rebinding. A web
// page at evil.example whose name is made to resolve to 127.0.0.1 is
// same-origin with the open admin API as the browser sees it (its Origin
// and the Host it sends are both evil.example), so it could read every
// /v1 answer and purge or drain. An open API answers only requests that
// name it by a loopback address.
func TestReview13OpenAdminRefusesForeignHostNames(t *testing.T) {
	n := startOpsNode(t)
	do := func(method, path, host string, hdr ...string) int {
		req, err := http.NewRequest(method, "http://"+n.AdminAddr()+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	_, port, _ := strings.Cut(n.AdminAddr(), ":")
	evil := "evil.example:" + port
	if code := do(http.MethodGet, "/v1/queues", evil); code != http.StatusForbidden {
		t.Fatalf("GET /v1/queues asked for as %s: %d, want 403", evil, code)
	}
	if code := do(http.MethodPost, "/v1/drain", evil, "Origin", "http://"+evil); code != http.StatusForbidden {
		t.Fatalf("POST /v1/drain from a rebound page: %d, want 403", code)
	}
	for _, h := range []string{n.AdminAddr(), "localhost:" + port, "[::1]:" + port} {
		if code := do(http.MethodGet, "/v1/queues", h); code != http.StatusOK {
			t.Fatalf("GET /v1/queues asked for as %s: %d, want 200", h, code)
		}
	}
	if code := do(http.MethodGet, "/healthz", evil); code != http.StatusOK {
		t.Fatalf("/healthz asked for as %s: %d, want 200 (probes)", evil, code)
	}
}
