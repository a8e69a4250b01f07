package node

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync/atomic"

	"github.com/brokerd/brokerd/config"
)

// minAdminToken is the shortest token admin.token_file may hold.
const minAdminToken = 16

// adminAuth decides who may use the admin API. A request is authenticated
// by a bearer token equal to the one in admin.token_file, or by a client
// certificate that admin.tls.client_ca_file signed (the TLS handshake
// verified it: a certificate it cannot verify fails the handshake).
// /healthz is public, and /metrics with admin.metrics_public. With neither
// a token file nor a client CA the API is open: config validation allows
// that on loopback addresses only.
type adminAuth struct {
	tokenFile     string
	token         atomic.Pointer[[sha256.Size]byte] // the token's digest; nil without a token file
	clientCerts   bool                              // admin.tls.client_ca_file is set
	metricsPublic bool
	log           *slog.Logger
	// sessionKey keys the cluster page's session cookies (see
	// sessionValue): random per process, so a restart ends them.
	sessionKey [32]byte
}

// newAdminAuth reads admin.token_file, if set.
func newAdminAuth(cfg config.Admin, log *slog.Logger) (*adminAuth, error) {
	a := &adminAuth{
		tokenFile:     cfg.TokenFile,
		clientCerts:   cfg.TLS.ClientCAFile != "",
		metricsPublic: cfg.MetricsPublic,
		log:           log.With("component", "admin"),
	}
	if _, err := rand.Read(a.sessionKey[:]); err != nil {
		return nil, fmt.Errorf("admin page session key: %w", err)
	}
	if err := a.reload(); err != nil {
		return nil, err
	}
	return a, nil
}

// open reports whether the API asks no credentials.
func (a *adminAuth) open() bool { return a.tokenFile == "" && !a.clientCerts }

// reload rereads the token file; on error the token in use is kept.
func (a *adminAuth) reload() error {
	if a.tokenFile == "" {
		return nil
	}
	tok, err := readAdminToken(a.tokenFile)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(tok)
	a.token.Store(&sum)
	return nil
}

// readAdminToken reads a token file: one line of at least minAdminToken
// printable characters, surrounding whitespace ignored.
func readAdminToken(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("admin.token_file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	switch {
	case tok == "":
		return nil, fmt.Errorf("admin.token_file: %s is empty", path)
	case len(tok) < minAdminToken:
		return nil, fmt.Errorf("admin.token_file: %s: token of %d characters, want at least %d (e.g. openssl rand -base64 32)", path, len(tok), minAdminToken)
	case strings.ContainsFunc(tok, func(r rune) bool { return r <= ' ' || r == 0x7f }):
		// It could not be sent in an Authorization header.
		return nil, fmt.Errorf("admin.token_file: %s: the token must be one word of printable characters", path)
	}
	return []byte(tok), nil
}

// public reports whether path is served without authentication. Paths
// are compared exactly: the mux redirects an unclean path to its clean
// form, which is then checked again. The cluster page's sign-in, sign-out
// and style sheet are public: they show nothing of the node.
func (a *adminAuth) public(path string) bool {
	switch path {
	case "/healthz", "/ui/login", "/ui/logout", "/ui/style.css":
		return true
	}
	return a.metricsPublic && path == "/metrics"
}

// check returns "" when r is authenticated, or why it is not.
func (a *adminAuth) check(r *http.Request) string {
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		return ""
	}
	want := a.token.Load()
	h := r.Header.Get("Authorization")
	if h == "" {
		if want == nil {
			return "no client certificate"
		}
		return "no bearer token"
	}
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "not a bearer token"
	}
	if want == nil {
		return "tokens are not accepted (no admin.token_file), only client certificates"
	}
	if !a.tokenOK(tok) {
		return "wrong bearer token"
	}
	return ""
}

// tokenOK reports whether tok (surrounding whitespace ignored) is the
// admin token; false without a token file.
func (a *adminAuth) tokenOK(tok string) bool {
	want := a.token.Load()
	if want == nil {
		return false
	}
	// Digests have the same length whatever was sent, so the comparison
	// takes the same time whether the length or the content differs.
	got := sha256.Sum256([]byte(strings.TrimSpace(tok)))
	return subtle.ConstantTimeCompare(got[:], want[:]) == 1
}

// wrap returns h behind authentication (an open API: h itself), and
// refuses a browser's cross-site request that would change something
// (crossSite), open API or not.
func (a *adminAuth) wrap(h http.Handler) http.Handler {
	inner := a.wrapAuth(h)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if a.open() && r.URL.Path != "/healthz" && !loopbackHost(r.Host) {
			// DNS rebinding: a web page whose name now resolves to
			// 127.0.0.1 is same-origin with itself, Origin included.
			a.log.Warn("admin request refused", "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path, "reason", "open admin API asked for by a host name that is not loopback", "host", r.Host)
			w.Header().Set("Connection", "close") // a refused client holds no connection (adminMaxConns)
			http.Error(w, "the admin API has no credentials: ask for it by a loopback address (127.0.0.1, [::1], localhost)", http.StatusForbidden)
			return
		}
		if crossSite(r) {
			a.log.Warn("admin request refused", "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path, "reason", "cross-site request from a browser", "origin", r.Header.Get("Origin"))
			w.Header().Set("Connection", "close")
			http.Error(w, "cross-site request refused", http.StatusForbidden)
			return
		}
		inner.ServeHTTP(w, r)
	})
}

// crossSite reports a request that changes something (not GET, HEAD or
// OPTIONS) sent by a browser from a page of another site: a forged form
// or a no-cors fetch, which needs no preflight. An open admin API
// (loopback) would otherwise purge or drain for any web page its
// operator visits. Browsers say where the request comes from (Origin,
// Sec-Fetch-Site); clients that are not browsers send neither.
func crossSite(r *http.Request) bool {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return false
	}
	if r.Header.Get("Sec-Fetch-Site") == "cross-site" {
		return true
	}
	o := r.Header.Get("Origin")
	if o == "" {
		return false
	}
	u, err := url.Parse(o)
	if err != nil || u.Host == "" {
		return true // "null": a sandboxed frame, a file
	}
	return !strings.EqualFold(u.Host, r.Host)
}

// loopbackHost reports whether host (a request's Host, with or without
// a port) is a loopback IP or localhost: the names an open admin API,
// which listens on loopback only, is asked for by.
func loopbackHost(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func (a *adminAuth) wrapAuth(h http.Handler) http.Handler {
	if a.open() {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if a.public(r.URL.Path) {
			h.ServeHTTP(w, r)
			return
		}
		why := a.check(r)
		if why == "" || a.sessionOK(r) {
			// Long answers (the page's stream) check again, so that a
			// token reload ends them.
			h.ServeHTTP(w, withAuthCheck(r, func() bool { return a.check(r) == "" || a.sessionOK(r) }))
			return
		}
		if r.URL.Path == "/" && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
			// A browser opening the cluster page: the sign-in form. Wrong
			// credentials are logged as on any path (a browser sends none).
			if r.Header.Get("Authorization") != "" {
				a.log.Warn("admin request refused", "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path, "reason", why)
			}
			w.Header().Set("WWW-Authenticate", `Bearer realm="brokerd"`)
			a.serveLogin(w, http.StatusUnauthorized, "")
			return
		}
		a.log.Warn("admin request refused", "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path, "reason", why)
		w.Header().Set("WWW-Authenticate", `Bearer realm="brokerd"`)
		w.Header().Set("Connection", "close") // a refused client holds no connection (adminMaxConns)
		http.Error(w, why, http.StatusUnauthorized)
	})
}

// newAdminTLS reads admin.tls's files; nil without admin.tls.cert_file.
func newAdminTLS(cfg config.AdminTLS) (*tlsFiles, error) {
	if cfg.CertFile == "" {
		return nil, nil
	}
	return newTLSFiles("admin.tls", cfg.CertFile, cfg.KeyFile, cfg.ClientCAFile, "client_ca_file")
}

// adminListener serves HTTPS on ln with tf's current certificate. With a
// client CA it asks for a client certificate but does not require one, so
// that clients with a token connect too; a certificate the CA did not sign
// (or an expired one) fails the handshake.
func adminListener(ln net.Listener, tf *tlsFiles, clientCA bool) net.Listener {
	auth := tls.NoClientCert
	if clientCA {
		auth = tls.VerifyClientCertIfGiven
	}
	return tls.NewListener(ln, tf.serverConfig(auth))
}
