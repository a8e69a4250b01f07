package node

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/test/tlstest"
)

const (
	testAdminToken  = "s3cret-admin-token-0123456789"
	otherAdminToken = "another-admin-token-abcdefghij"
)

// lockedBuffer collects a node's log.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// adminTestConfig is a single node on free loopback ports.
func adminTestConfig(t *testing.T) config.Config {
	t.Helper()
	cfg := config.Default()
	cfg.Node.Name = "admin-test"
	cfg.Node.DataDir = t.TempDir()
	cfg.STOMP.Addr = "127.0.0.1:0"
	cfg.Admin.Addr = "127.0.0.1:0"
	cfg.Store.Sync = "none"
	return cfg
}

// startAdminNode starts a node with cfg; it is shut down when the test
// ends. Its log is returned.
func startAdminNode(t *testing.T, cfg config.Config) (*Node, *lockedBuffer) {
	t.Helper()
	logs := &lockedBuffer{}
	n, err := New(cfg, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := n.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = n.Shutdown(ctx)
	})
	return n, logs
}

// writeToken writes tok (with a trailing newline, as an editor would) to
// a 0600 file in dir.
func writeToken(t *testing.T, path, tok string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// answer is one admin response.
type answer struct {
	code   int
	body   string
	header http.Header
	err    error // transport error (a refused TLS handshake)
}

// adminDo sends method url with an Authorization header if auth != "".
func adminDo(t *testing.T, c *http.Client, method, url, auth string) answer {
	t.Helper()
	var body io.Reader
	if method == http.MethodPut {
		body = strings.NewReader(`{"value": 3}`)
	}
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := c.Do(req)
	if err != nil {
		return answer{err: err}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if len(b) > 200 {
		b = append(b[:200], "..."...)
	}
	return answer{code: resp.StatusCode, body: string(b), header: resp.Header}
}

// protectedRoutes are admin routes that need authentication, with a
// request each one answers 200 to.
var protectedRoutes = []struct{ method, path string }{
	{http.MethodGet, "/v1/cluster"},
	{http.MethodGet, "/v1/destinations"},
	{http.MethodPut, "/v1/cluster/active-members"},
	{http.MethodPost, "/v1/reload"},
	{http.MethodGet, "/metrics"},
	{http.MethodGet, "/debug/pprof/"},
	{http.MethodGet, "/debug/pprof/goroutine?debug=1"},
	{http.MethodGet, "/"}, // the cluster page; without credentials, its sign-in form
	{http.MethodGet, "/v1/overview"},
	{http.MethodGet, "/v1/queues"},   // ops.go
	{http.MethodGet, "/v1/drain"},    // ops.go
	{http.MethodPost, "/v1/undrain"}, // ops.go
	{http.MethodGet, "/ui/app.js"},
}

func TestAdminTokenRequired(t *testing.T) {
	cfg := adminTestConfig(t)
	cfg.Admin.TokenFile = writeToken(t, filepath.Join(t.TempDir(), "admin.token"), testAdminToken)
	n, logs := startAdminNode(t, cfg)
	base := "http://" + n.AdminAddr()
	c := &http.Client{Timeout: 10 * time.Second}

	if a := adminDo(t, c, http.MethodGet, base+"/healthz", ""); a.code != http.StatusOK {
		t.Fatalf("/healthz without a token: %d %q %v, want 200", a.code, a.body, a.err)
	}
	for _, r := range protectedRoutes {
		for _, bad := range []struct{ name, auth string }{
			{"no token", ""},
			{"wrong token", "Bearer " + otherAdminToken},
			{"token prefix", "Bearer " + testAdminToken[:len(testAdminToken)-1]},
			{"token with a suffix", "Bearer " + testAdminToken + "x"},
			{"basic auth", "Basic " + testAdminToken},
			{"scheme only", "Bearer"},
		} {
			a := adminDo(t, c, r.method, base+r.path, bad.auth)
			if a.code != http.StatusUnauthorized {
				t.Errorf("%s %s with %s: %d %v, want 401", r.method, r.path, bad.name, a.code, a.err)
				continue
			}
			if got := a.header.Get("WWW-Authenticate"); got != `Bearer realm="brokerd"` {
				t.Errorf("%s %s with %s: WWW-Authenticate %q", r.method, r.path, bad.name, got)
			}
			if strings.Contains(a.body, testAdminToken) || strings.Contains(a.body, otherAdminToken) {
				t.Errorf("%s %s with %s: the answer shows a token: %q", r.method, r.path, bad.name, a.body)
			}
		}
		for _, good := range []string{"Bearer " + testAdminToken, "bearer " + testAdminToken} {
			if a := adminDo(t, c, r.method, base+r.path, good); a.code != http.StatusOK {
				t.Errorf("%s %s with the token (%q): %d %q %v, want 200", r.method, r.path, good[:6], a.code, a.body, a.err)
			}
		}
	}
	// An unclean path that leads to a protected one is not public.
	if a := adminDo(t, c, http.MethodGet, base+"/healthz/../v1/cluster", ""); a.code == http.StatusOK {
		t.Errorf("/healthz/../v1/cluster without a token: 200")
	}

	log := logs.String()
	if !strings.Contains(log, "admin request refused") || !strings.Contains(log, "path=/v1/cluster") || !strings.Contains(log, "remote=127.0.0.1:") {
		t.Errorf("refusals not logged with path and remote address:\n%s", log)
	}
	if strings.Contains(log, testAdminToken) || strings.Contains(log, otherAdminToken) {
		t.Errorf("the log shows a token:\n%s", log)
	}
}

func TestAdminMetricsPublic(t *testing.T) {
	cfg := adminTestConfig(t)
	cfg.Admin.TokenFile = writeToken(t, filepath.Join(t.TempDir(), "admin.token"), testAdminToken)
	cfg.Admin.MetricsPublic = true
	n, _ := startAdminNode(t, cfg)
	base := "http://" + n.AdminAddr()
	c := &http.Client{Timeout: 10 * time.Second}
	if a := adminDo(t, c, http.MethodGet, base+"/metrics", ""); a.code != http.StatusOK || !strings.Contains(a.body, "# TYPE") {
		t.Errorf("/metrics without a token, metrics_public: %d %v", a.code, a.err)
	}
	for _, p := range []string{"/v1/cluster", "/debug/pprof/", "/metrics/../v1/cluster"} {
		if a := adminDo(t, c, http.MethodGet, base+p, ""); a.code == http.StatusOK {
			t.Errorf("%s without a token, metrics_public: 200, want it refused", p)
		}
	}
}

func TestAdminOpenWithoutTokenOnLoopback(t *testing.T) {
	n, _ := startAdminNode(t, adminTestConfig(t))
	c := &http.Client{Timeout: 10 * time.Second}
	for _, r := range protectedRoutes {
		if a := adminDo(t, c, r.method, "http://"+n.AdminAddr()+r.path, ""); a.code != http.StatusOK {
			t.Errorf("%s %s, no admin.token_file: %d %q %v, want 200 (open as before)", r.method, r.path, a.code, a.body, a.err)
		}
	}
}

// httpsClient trusts ca and presents cert, if any, whatever CAs the
// server says it accepts (with Certificates, crypto/tls would send none
// that the server's CAs did not sign).
func httpsClient(ca *tlstest.CA, cert *tlstest.Pair, t *testing.T) *http.Client {
	tc := &tls.Config{RootCAs: ca.Pool(), MinVersion: tls.VersionTLS12}
	if cert != nil {
		c := cert.TLS(t)
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &c, nil }
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: tc}}
}

func TestAdminHTTPSClientCertificate(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "admin-ca")
	other := tlstest.NewCA(t, dir, "other-ca")
	server := ca.Issue(t, "node", nil)
	operator := ca.Issue(t, "operator", nil)
	expired := ca.Issue(t, "expired", nil, tlstest.Expired())
	stranger := other.Issue(t, "stranger", nil)

	cfg := adminTestConfig(t)
	cfg.Admin.TokenFile = writeToken(t, filepath.Join(dir, "admin.token"), testAdminToken)
	cfg.Admin.TLS = config.AdminTLS{CertFile: server.CertFile, KeyFile: server.KeyFile, ClientCAFile: ca.CertFile}
	n, logs := startAdminNode(t, cfg)
	base := "https://" + n.AdminAddr()

	cases := []struct {
		name   string
		cert   *tlstest.Pair
		auth   string
		wantOK bool
	}{
		{"client certificate, no token", &operator, "", true},
		{"token, no certificate", nil, "Bearer " + testAdminToken, true},
		{"nothing", nil, "", false},
		{"wrong token, no certificate", nil, "Bearer " + otherAdminToken, false},
		{"certificate of another CA", &stranger, "", false},
		{"expired certificate", &expired, "", false},
		// A certificate the CA did not sign fails the handshake: the
		// right token does not help it.
		{"certificate of another CA with the token", &stranger, "Bearer " + testAdminToken, false},
	}
	for _, tc := range cases {
		c := httpsClient(ca, tc.cert, t)
		for _, p := range []string{"/v1/cluster", "/metrics"} {
			a := adminDo(t, c, http.MethodGet, base+p, tc.auth)
			if tc.wantOK && a.code != http.StatusOK {
				t.Errorf("%s, %s: %d %q %v, want 200", tc.name, p, a.code, a.body, a.err)
			}
			if !tc.wantOK && a.err == nil && a.code != http.StatusUnauthorized {
				t.Errorf("%s, %s: %d %q, want 401 or a refused handshake", tc.name, p, a.code, a.body)
			}
		}
		c.CloseIdleConnections()
	}
	if a := adminDo(t, httpsClient(ca, nil, t), http.MethodGet, base+"/healthz", ""); a.code != http.StatusOK {
		t.Errorf("/healthz over HTTPS without credentials: %d %v", a.code, a.err)
	}
	if a := adminDo(t, &http.Client{Timeout: 10 * time.Second}, http.MethodGet, "http://"+n.AdminAddr()+"/v1/cluster", "Bearer "+testAdminToken); a.code == http.StatusOK {
		t.Errorf("plain HTTP to the HTTPS admin address answered 200")
	}
	if log := logs.String(); !strings.Contains(log, "TLS handshake error") {
		t.Errorf("refused handshakes not logged:\n%s", log)
	}
}

func TestAdminClientCertificateOnly(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "admin-ca")
	server := ca.Issue(t, "node", nil)
	operator := ca.Issue(t, "operator", nil)
	cfg := adminTestConfig(t)
	cfg.Admin.TLS = config.AdminTLS{CertFile: server.CertFile, KeyFile: server.KeyFile, ClientCAFile: ca.CertFile}
	n, _ := startAdminNode(t, cfg)
	base := "https://" + n.AdminAddr()
	if a := adminDo(t, httpsClient(ca, &operator, t), http.MethodGet, base+"/v1/cluster", ""); a.code != http.StatusOK {
		t.Errorf("client certificate: %d %q %v", a.code, a.body, a.err)
	}
	for _, auth := range []string{"", "Bearer " + testAdminToken} {
		if a := adminDo(t, httpsClient(ca, nil, t), http.MethodGet, base+"/v1/cluster", auth); a.code != http.StatusUnauthorized {
			t.Errorf("no certificate, Authorization %q: %d %q %v, want 401", auth, a.code, a.body, a.err)
		}
	}
}

func TestAdminTokenFileRefusedAtStart(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name     string
		contents *string // nil: no file
		want     string
	}{
		{"missing", nil, "no such file"},
		{"empty", ptr(""), "is empty"},
		{"blank", ptr(" \n\t\n"), "is empty"},
		{"too short", ptr("short-token-15c"), "at least 16"},
		{"two words", ptr("first-half-of-it second-half-of-it"), "one word"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := adminTestConfig(t)
			cfg.Admin.TokenFile = filepath.Join(dir, "token"+string(rune('a'+i)))
			if tc.contents != nil {
				if err := os.WriteFile(cfg.Admin.TokenFile, []byte(*tc.contents), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			n, err := New(cfg, slog.New(slog.DiscardHandler))
			if err == nil {
				err = n.Start()
				if err == nil {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					defer cancel()
					_ = n.Shutdown(ctx)
				}
			}
			if err == nil || !strings.Contains(err.Error(), "admin.token_file") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("start with a %s token file: %v, want an error naming admin.token_file and saying %q", tc.name, err, tc.want)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

func TestAdminTokenReload(t *testing.T) {
	cfg := adminTestConfig(t)
	cfg.Admin.TokenFile = writeToken(t, filepath.Join(t.TempDir(), "admin.token"), testAdminToken)
	n, _ := startAdminNode(t, cfg)
	base := "http://" + n.AdminAddr()
	c := &http.Client{Timeout: 10 * time.Second}
	oldAuth, newAuth := "Bearer "+testAdminToken, "Bearer "+otherAdminToken

	// Rewriting the file changes nothing until the reload.
	writeToken(t, cfg.Admin.TokenFile, otherAdminToken)
	if a := adminDo(t, c, http.MethodGet, base+"/v1/cluster", newAuth); a.code != http.StatusUnauthorized {
		t.Fatalf("new token before the reload: %d, want 401", a.code)
	}
	if a := adminDo(t, c, http.MethodPost, base+"/v1/reload", oldAuth); a.code != http.StatusOK {
		t.Fatalf("POST /v1/reload with the old token: %d %q %v", a.code, a.body, a.err)
	}
	if a := adminDo(t, c, http.MethodGet, base+"/v1/cluster", newAuth); a.code != http.StatusOK {
		t.Errorf("new token after the reload: %d %q, want 200", a.code, a.body)
	}
	if a := adminDo(t, c, http.MethodGet, base+"/v1/cluster", oldAuth); a.code != http.StatusUnauthorized {
		t.Errorf("old token after the reload: %d, want 401", a.code)
	}

	// A reload that cannot read a good token keeps the one in force.
	for _, bad := range []string{"short", ""} {
		if err := os.WriteFile(cfg.Admin.TokenFile, []byte(bad), 0o600); err != nil {
			t.Fatal(err)
		}
		a := adminDo(t, c, http.MethodPost, base+"/v1/reload", newAuth)
		if a.code != http.StatusUnprocessableEntity || !strings.Contains(a.body, "admin.token_file") {
			t.Errorf("reload with a token file %q: %d %q, want 422 naming admin.token_file", bad, a.code, a.body)
		}
		if a := adminDo(t, c, http.MethodGet, base+"/v1/cluster", newAuth); a.code != http.StatusOK {
			t.Errorf("token in force after a failed reload: %d, want 200", a.code)
		}
	}
	if err := os.Remove(cfg.Admin.TokenFile); err != nil {
		t.Fatal(err)
	}
	if err := n.Reload(); err == nil || !strings.Contains(err.Error(), "admin.token_file") {
		t.Errorf("Reload with the token file gone: %v, want an error naming admin.token_file", err)
	}
	if a := adminDo(t, c, http.MethodGet, base+"/v1/cluster", newAuth); a.code != http.StatusOK {
		t.Errorf("token in force after the file went: %d, want 200", a.code)
	}
}

func TestAdminCertificateReload(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "admin-ca")
	first := ca.Issue(t, "node-1", nil)
	second := ca.Issue(t, "node-2", nil)
	certFile, keyFile := filepath.Join(dir, "admin.crt"), filepath.Join(dir, "admin.key")
	install := func(p tlstest.Pair) {
		t.Helper()
		if err := os.WriteFile(certFile, p.CertPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(keyFile, p.KeyPEM, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	install(first)
	cfg := adminTestConfig(t)
	cfg.Admin.TokenFile = writeToken(t, filepath.Join(dir, "admin.token"), testAdminToken)
	cfg.Admin.TLS = config.AdminTLS{CertFile: certFile, KeyFile: keyFile}
	n, _ := startAdminNode(t, cfg)
	served := func() string {
		t.Helper()
		conn, err := tls.Dial("tcp", n.AdminAddr(), &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost"})
		if err != nil {
			t.Fatalf("TLS dial: %v", err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	if cn := served(); cn != "node-1" {
		t.Fatalf("served %q, want node-1", cn)
	}
	install(second)
	c := httpsClient(ca, nil, t)
	if a := adminDo(t, c, http.MethodPost, "https://"+n.AdminAddr()+"/v1/reload", "Bearer "+testAdminToken); a.code != http.StatusOK {
		t.Fatalf("reload: %d %q %v", a.code, a.body, a.err)
	}
	if cn := served(); cn != "node-2" {
		t.Errorf("served %q after the reload, want node-2", cn)
	}
	// A broken key: the reload fails and the certificate in force stays.
	if err := os.WriteFile(keyFile, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := n.Reload()
	if err == nil || !strings.Contains(err.Error(), "admin.tls") {
		t.Errorf("reload with a broken key: %v, want an error naming admin.tls", err)
	}
	if cn := served(); cn != "node-2" {
		t.Errorf("served %q after a failed reload, want node-2", cn)
	}
}
