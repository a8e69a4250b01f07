package node

// The admin HTTP server's bounds: a client, or many, cannot hold its
// connections, goroutines and buffers without limit.

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// shorten sets *v to d for the test.
func shorten[T any](t *testing.T, v *T, d T) {
	old := *v
	*v = d
	t.Cleanup(func() { *v = old })
}

// silentConns opens k TCP connections to addr that send nothing.
func silentConns(t *testing.T, addr string, k int) []net.Conn {
	t.Helper()
	var cs []net.Conn
	for i := 0; i < k; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		cs = append(cs, c)
	}
	return cs
}

func TestAdminConnectionsCapped(t *testing.T) {
	shorten(t, &adminMaxConns, 4)
	n, _ := startAdminNode(t, adminTestConfig(t))
	addr := n.AdminAddr()
	held := silentConns(t, addr, 4)
	time.Sleep(200 * time.Millisecond) // accepted, each waiting for its headers

	got := make(chan error, 1)
	go func() {
		resp, err := (&http.Client{Timeout: 20 * time.Second}).Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("a fifth connection was served (%v) while 4 (the cap) were held", err)
	case <-time.After(500 * time.Millisecond):
	}
	held[0].Close()
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("GET /healthz once a held connection closed: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("GET /healthz not answered 10 s after a held connection closed")
	}
}

func TestAdminSilentConnectionDropped(t *testing.T) {
	shorten(t, &adminHeaderTimeout, 300*time.Millisecond)
	n, _ := startAdminNode(t, adminTestConfig(t))
	c := silentConns(t, n.AdminAddr(), 1)[0]
	if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n"); err != nil { // never ends its headers
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil && !strings.Contains(err.Error(), "reset") {
		t.Fatalf("a connection that never finished its headers: %v (read %q), want it closed", err, b)
	}
}

// getOnConn sends one keep-alive GET of path on a new raw connection to
// addr, reads the answer and returns its status and the reader, from
// which the test reads what comes next (EOF: the server closed it).
func getOnConn(t *testing.T, addr, path string) (int, *bufio.Reader) {
	t.Helper()
	c := silentConns(t, addr, 1)[0]
	if _, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, br
}

func TestAdminIdleKeepAliveClosed(t *testing.T) {
	shorten(t, &adminIdleTimeout, 300*time.Millisecond)
	n, _ := startAdminNode(t, adminTestConfig(t))
	code, br := getOnConn(t, n.AdminAddr(), "/healthz")
	if code != http.StatusOK {
		t.Fatalf("GET /healthz: %d", code)
	}
	start := time.Now()
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("an idle keep-alive connection: read %v after %v, want EOF (closed by the server)", err, time.Since(start))
	}
}

// The write deadline spares the cluster page's event stream.
func TestAdminStreamOutlivesWriteTimeout(t *testing.T) {
	shorten(t, &adminWriteTimeout, 300*time.Millisecond)
	n, _ := startAdminNode(t, adminTestConfig(t))
	resp, err := (&http.Client{Timeout: 20 * time.Second}).Get("http://" + n.AdminAddr() + "/v1/overview/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/overview/stream: %s", resp.Status)
	}
	br := bufio.NewReader(resp.Body)
	events := 0
	deadline := time.Now().Add(2500 * time.Millisecond)
	for time.Now().Before(deadline) {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("the stream ended after %d events: %v", events, err)
		}
		if strings.HasPrefix(line, "data:") {
			events++
		}
	}
	if events < 2 {
		t.Fatalf("%d events in 2.5 s, want one a second", events)
	}
}

// A refused request's connection is closed: clients without credentials
// cannot hold the admin server's connections (adminMaxConns) with
// keep-alives.
func TestAdminRefusedConnectionClosed(t *testing.T) {
	cfg := adminTestConfig(t)
	cfg.Admin.TokenFile = writeToken(t, filepath.Join(t.TempDir(), "admin.token"), testAdminToken)
	n, _ := startAdminNode(t, cfg)
	code, br := getOnConn(t, n.AdminAddr(), "/v1/cluster")
	if code != http.StatusUnauthorized {
		t.Fatalf("GET /v1/cluster without a token: %d", code)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("after a 401: read %v, want EOF (the server closes a refused client's connection)", err)
	}
}

// One address cannot take every connection: beyond adminMaxConnsPerIP
// its connections are closed at once, and others are still served.
func TestAdminConnectionsPerIPCapped(t *testing.T) {
	shorten(t, &adminMaxConnsPerIP, 2)
	n, _ := startAdminNode(t, adminTestConfig(t))
	addr := n.AdminAddr()
	held := silentConns(t, addr, 2)
	time.Sleep(200 * time.Millisecond)
	extra := silentConns(t, addr, 1)[0]
	_ = extra.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := extra.Read(make([]byte, 1)); err != io.EOF && !strings.Contains(fmt.Sprint(err), "reset") {
		t.Fatalf("a third connection from one address while 2 (the per-address cap) are held: read %v, want it closed", err)
	}
	held[0].Close()
	waitFor(t, 5*time.Second, "GET /healthz once a held connection closed", func() string {
		resp, err := (&http.Client{Timeout: 2 * time.Second}).Get("http://" + addr + "/healthz")
		if err != nil {
			return err.Error()
		}
		resp.Body.Close()
		return ""
	})
}

// The answer's write deadline counts from its first byte: a handler that
// works longer than adminWriteTimeout (a purge) still answers.
func TestAdminWriteDeadlineFromFirstByte(t *testing.T) {
	shorten(t, &adminWriteTimeout, 200*time.Millisecond)
	srv := httptest.NewServer(adminWriteDeadline(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(600 * time.Millisecond)
		_, _ = io.WriteString(w, "purged 3")
	})))
	defer srv.Close()
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Post(srv.URL+"/v1/queues/q/purge", "text/plain", nil)
	if err != nil {
		t.Fatalf("an answer after 600 ms of work with a 200 ms write bound: %v", err)
	}
	defer resp.Body.Close()
	if b, _ := io.ReadAll(resp.Body); string(b) != "purged 3" {
		t.Fatalf("answer %q", b)
	}
}
