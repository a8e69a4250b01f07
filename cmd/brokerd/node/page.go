package node

// The cluster page: GET / on the admin address draws the members, the
// destinations and this node's traffic, and follows them by server-sent
// events (GET /v1/overview/stream) or, where those fail, by polling
// GET /v1/overview every second. The HTML, CSS and JS are embedded
// (ui/); the page needs no build step and loads nothing from elsewhere.
//
// A browser cannot send the admin bearer token, so the page has its own
// sign-in: POST /ui/login checks the token as the admin guard does and
// sets a session cookie, an HMAC of the token's digest keyed per process
// (see adminAuth.sessionOK). The cookie authenticates GET and HEAD only,
// so it can never authorize a change (reload, active members, gossip
// keys): a forged cross-site form gains nothing from it. A token reload,
// or a restart, ends every session.

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"embed"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"html/template"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/replica"
	"github.com/prometheus/client_golang/prometheus"
)

// Bounds of the page.
const (
	// pageSampleEvery is the sampler's interval and the stream's.
	pageSampleEvery = time.Second
	// pageSamples is how many samples the ring keeps: 10 minutes.
	pageSamples = 600
	// pageMaxStreams is the most GET /v1/overview/stream answered at
	// once; the next ones get 503 (the page then polls).
	pageMaxStreams = 16
	// pageMaxDestinations is the most destinations an overview lists; it
	// counts the others in destinations_more.
	pageMaxDestinations = 200
	// pageDestWait is how long a request waits for the first gathering
	// of the cluster's destinations.
	pageDestWait = 3 * time.Second
	// pageDestIdle: destinations are gathered (from every alive node)
	// only while someone asked for them within this time.
	pageDestIdle = 10 * time.Second
	// pageWriteTimeout bounds one event's write to a stream.
	pageWriteTimeout = 5 * time.Second
	// sessionTTL is how long a page session cookie is accepted.
	sessionTTL = 12 * time.Hour
	// sessionCookie starts the page session cookie's name; the admin
	// listener's port ends it (see sessionCookieName).
	sessionCookie = "brokerd_session"
	// pageCSP is the Content-Security-Policy of every page response: the
	// page's own files only, no inline script or style, no framing.
	pageCSP = "default-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)

//go:embed ui
var uiFiles embed.FS

var loginTmpl = template.Must(template.ParseFS(uiFiles, "ui/login.html"))

// pageState is what the page's handlers share: the traffic sampler, the
// cached cluster destinations and the count of open streams. start starts
// its goroutines; close stops them and ends every stream.
type pageState struct {
	n       *Node
	samples *sampler
	dests   *destCache
	streams atomic.Int32
	done    chan struct{}
	once    sync.Once
}

func newPageState(n *Node) *pageState {
	var g prometheus.Gatherer = n.reg
	if n.sampled != nil {
		g = n.sampled // only the sampled metrics (sampleRegisterer)
	}
	p := &pageState{n: n, samples: newSampler(g, pageSampleEvery, pageSamples), done: make(chan struct{})}
	p.dests = newDestCache(n.pageDestinations, p.done)
	return p
}

func (p *pageState) start() {
	p.samples.Start()
	p.dests.start()
}

// close stops the sampler and the destination gatherer, ends the streams,
// and waits for the goroutines it started.
func (p *pageState) close() {
	p.once.Do(func() { close(p.done) })
	p.samples.Close()
	p.dests.wait()
}

// pageDestinations is GET /v1/destinations's answer, in the cluster's
// form on a single node too (its queues owned by itself).
func (n *Node) pageDestinations() []DestInfo {
	if n.rt != nil {
		return n.rt.clusterDestinations()
	}
	var out []DestInfo
	for _, d := range n.rep.Destinations() {
		di := DestInfo{DestinationInfo: d}
		if d.Kind == replica.KindQueue.String() {
			di.Owner, di.OwnerName = n.id, n.cfg.Node.Name
			di.Replicas = []ReplicaInfo{{ID: n.id, Name: n.cfg.Node.Name, State: "owner"}}
		}
		out = append(out, di)
	}
	return out
}

// destCache gathers the destinations in the background, every second
// while someone looks, so that a slow or dead peer (each is asked with a
// 2 s timeout) delays only the destination table and never the members'
// states.
type destCache struct {
	fetch func() []DestInfo
	// maxWait is how long a get waits for a gathering (pageDestWait).
	maxWait time.Duration
	stop    <-chan struct{}
	kick    chan struct{}
	done    chan struct{}
	begun   atomic.Bool

	mu     sync.Mutex
	cur    []DestInfo
	at     time.Time     // when cur was gathered; zero before the first
	next   chan struct{} // closed (and replaced) when a gathering ends
	wanted time.Time     // the last get
	since  time.Time     // when the gathering in progress began; zero if none
}

func newDestCache(fetch func() []DestInfo, stop <-chan struct{}) *destCache {
	return &destCache{fetch: fetch, maxWait: pageDestWait, stop: stop, kick: make(chan struct{}, 1), done: make(chan struct{}), next: make(chan struct{})}
}

func (c *destCache) start() {
	c.begun.Store(true)
	go c.run()
}

// wait returns once run has returned (stop closed), at once if it never
// started.
func (c *destCache) wait() {
	if c.begun.Load() {
		<-c.done
	}
}

func (c *destCache) run() {
	defer close(c.done)
	t := time.NewTicker(pageSampleEvery)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		case <-c.kick:
		}
		c.mu.Lock()
		idle := time.Since(c.wanted) > pageDestIdle
		c.mu.Unlock()
		if idle {
			continue
		}
		c.mu.Lock()
		c.since = time.Now()
		c.mu.Unlock()
		ds := c.fetch()
		c.mu.Lock()
		c.cur, c.at, c.since = ds, time.Now(), time.Time{}
		close(c.next)
		c.next = make(chan struct{})
		c.mu.Unlock()
	}
}

// get returns the last gathered destinations (the caller must not modify
// them) and when they were gathered. When there are none yet, or the
// gatherer has idled (nobody asked for pageDestIdle), it waits up to
// pageDestWait for a fresh gathering; otherwise, or when a gathering has
// already taken longer than that, it does not wait, so that a slow peer
// never holds up the members' states.
func (c *destCache) get(ctx context.Context) ([]DestInfo, time.Time) {
	c.mu.Lock()
	c.wanted = time.Now()
	stale := c.at.IsZero() || time.Since(c.at) > pageDestIdle
	if !c.since.IsZero() && time.Since(c.since) > c.maxWait {
		stale = false // stuck on a peer: show what there is
	}
	next := c.next
	c.mu.Unlock()
	if stale {
		select {
		case c.kick <- struct{}{}:
		default:
		}
		t := time.NewTimer(c.maxWait)
		defer t.Stop()
		select {
		case <-next:
		case <-t.C:
		case <-ctx.Done():
		case <-c.stop:
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur, c.at
}

// pageMember is a member as the page shows it.
type pageMember struct {
	cluster.MemberStatus
	// Self marks the node serving the page.
	Self bool `json:"self"`
}

// pageSeries is the sampler's ring, or its tail.
type pageSeries struct {
	IntervalMS int64 `json:"interval_ms"`
	Capacity   int   `json:"capacity"`
	// Append: Samples follow the ones sent before (the stream's events
	// after the first, or ?since=); otherwise they replace them.
	Append  bool     `json:"append"`
	Samples []Sample `json:"samples"`
}

// overview is GET /v1/overview's answer.
type overview struct {
	NowMS               int64        `json:"now_ms"`
	NodeID              string       `json:"node_id"`
	NodeName            string       `json:"node_name"`
	ClusterName         string       `json:"cluster_name"`
	Clustered           bool         `json:"clustered"`
	Epoch               uint64       `json:"epoch"`
	Converged           bool         `json:"converged"`
	ActiveMembersWanted int          `json:"active_members_wanted"`
	ActiveSet           []string     `json:"active_set"`
	Members             []pageMember `json:"members"`
	Destinations        []DestInfo   `json:"destinations"`
	DestinationsTotal   int          `json:"destinations_total"`
	DestinationsMore    int          `json:"destinations_more"`
	DestinationsAtMS    int64        `json:"destinations_at_ms"`
	Series              pageSeries   `json:"series"`
}

// overview builds the page's data; samples after since (Unix ms) only,
// when since > 0.
func (p *pageState) overview(ctx context.Context, since int64) overview {
	n := p.n
	o := overview{
		NowMS: time.Now().UnixMilli(), NodeID: n.id, NodeName: n.cfg.Node.Name, Clustered: n.rt != nil,
		Members: []pageMember{}, Destinations: []DestInfo{},
	}
	if n.cl != nil {
		st := n.cl.Status()
		o.ClusterName, o.Epoch, o.Converged = st.ClusterName, st.Epoch, st.Converged
		o.ActiveMembersWanted, o.ActiveSet = st.ActiveMembersWanted, st.ActiveSet
		for _, m := range st.Members {
			o.Members = append(o.Members, pageMember{MemberStatus: m, Self: m.ID == n.id})
		}
	}
	ds, at := p.dests.get(ctx)
	o.DestinationsTotal = len(ds)
	if len(ds) > pageMaxDestinations {
		ds = ds[:pageMaxDestinations]
	}
	o.Destinations = append(o.Destinations, ds...)
	o.DestinationsMore = o.DestinationsTotal - len(o.Destinations)
	if !at.IsZero() {
		o.DestinationsAtMS = at.UnixMilli()
	}
	o.Series = pageSeries{
		IntervalMS: pageSampleEvery.Milliseconds(), Capacity: pageSamples,
		Append: since > 0, Samples: p.samples.Samples(since),
	}
	return o
}

// pageRoutes registers the cluster page and its data on the admin mux.
// The guard (adminAuth.wrap) lets /ui/login, /ui/logout and /ui/style.css
// through unauthenticated and answers an unauthenticated GET / with the
// sign-in form.
func (n *Node) pageRoutes(mux *http.ServeMux) {
	p := n.page
	if p == nil || n.guard == nil {
		return // no admin server
	}
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		serveUIFile(w, r, "ui/index.html", "text/html; charset=utf-8")
	})
	mux.HandleFunc("GET /ui/app.js", func(w http.ResponseWriter, r *http.Request) {
		serveUIFile(w, r, "ui/app.js", "text/javascript; charset=utf-8")
	})
	mux.HandleFunc("GET /ui/style.css", func(w http.ResponseWriter, r *http.Request) {
		serveUIFile(w, r, "ui/style.css", "text/css; charset=utf-8")
	})
	mux.HandleFunc("POST /ui/login", n.guard.login)
	mux.HandleFunc("POST /ui/logout", func(w http.ResponseWriter, r *http.Request) {
		http.SetCookie(w, &http.Cookie{Name: sessionCookieName(r), Value: "", Path: "/", MaxAge: -1, HttpOnly: true, Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode})
		http.Redirect(w, r, "/", http.StatusSeeOther)
	})
	mux.HandleFunc("GET /v1/overview", func(w http.ResponseWriter, r *http.Request) {
		var since int64
		if s := r.URL.Query().Get("since"); s != "" {
			v, err := strconv.ParseInt(s, 10, 64)
			if err != nil || v < 0 {
				http.Error(w, "since: want Unix milliseconds", http.StatusBadRequest)
				return
			}
			since = v
		}
		w.Header().Set("Cache-Control", "no-store")
		writeJSON(w, p.overview(r.Context(), since))
	})
	mux.HandleFunc("GET /v1/overview/stream", p.stream)
}

// stream sends an overview event every second until the client goes, the
// node stops, or the credentials that opened it no longer hold (a token
// reload ends the streams the old token or its sessions opened). The
// first event carries the whole series, the next ones the new samples.
func (p *pageState) stream(w http.ResponseWriter, r *http.Request) {
	if p.streams.Add(1) > pageMaxStreams {
		p.streams.Add(-1)
		w.Header().Set("Retry-After", "10")
		http.Error(w, fmt.Sprintf("too many overview streams (at most %d at once): poll GET /v1/overview instead", pageMaxStreams), http.StatusServiceUnavailable)
		return
	}
	defer p.streams.Add(-1)
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	send := func(o overview) error {
		b, err := json.Marshal(o)
		if err != nil {
			return err
		}
		_ = rc.SetWriteDeadline(time.Now().Add(pageWriteTimeout))
		if _, err := fmt.Fprintf(w, "event: overview\ndata: %s\n\n", b); err != nil {
			return err
		}
		return rc.Flush()
	}
	if _, err := fmt.Fprint(w, "retry: 2000\n\n"); err != nil {
		return
	}
	var last int64
	next := func() error {
		o := p.overview(r.Context(), last)
		if last == 0 {
			o.Series.Append = false
		}
		if k := len(o.Series.Samples); k > 0 {
			last = o.Series.Samples[k-1].T
		} else if last == 0 {
			last = 1 // the first event went: append from now on
		}
		return send(o)
	}
	if next() != nil {
		return
	}
	t := time.NewTicker(pageSampleEvery)
	defer t.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-p.done:
			return
		case <-t.C:
		}
		if !stillAuthorized(r) {
			return
		}
		if next() != nil {
			return
		}
	}
}

// serveUIFile writes an embedded file with the page's security headers.
func serveUIFile(w http.ResponseWriter, r *http.Request, name, ctype string) {
	b, err := uiFiles.ReadFile(name)
	if err != nil {
		http.Error(w, "page file missing: "+name, http.StatusInternalServerError)
		return
	}
	pageHeaders(w)
	w.Header().Set("Content-Type", ctype)
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	if r.Method == http.MethodHead {
		return
	}
	_, _ = w.Write(b)
}

func pageHeaders(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Security-Policy", pageCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
}

// serveLogin writes the sign-in form with status and an optional message.
func (a *adminAuth) serveLogin(w http.ResponseWriter, status int, msg string) {
	pageHeaders(w)
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if status != http.StatusOK {
		w.Header().Set("Connection", "close") // a refused client holds no connection (adminMaxConns)
	}
	w.WriteHeader(status)
	_ = loginTmpl.Execute(w, struct {
		Message   string
		CertsOnly bool
	}{msg, a.token.Load() == nil})
}

// login is POST /ui/login: a form with the admin token. The token is
// checked as a bearer token is; the answer sets the session cookie and
// sends the browser to the page.
func (a *adminAuth) login(w http.ResponseWriter, r *http.Request) {
	if a.open() {
		http.Redirect(w, r, "/", http.StatusSeeOther)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 4096)
	if err := r.ParseForm(); err != nil {
		a.serveLogin(w, http.StatusBadRequest, "The form could not be read.")
		return
	}
	if a.token.Load() == nil {
		a.serveLogin(w, http.StatusUnauthorized, "This node takes no token (no admin.token_file): use a client certificate.")
		return
	}
	if !a.tokenOK(r.PostForm.Get("token")) {
		a.log.Warn("admin request refused", "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path, "reason", "wrong token at sign-in")
		a.serveLogin(w, http.StatusUnauthorized, "Wrong token.")
		return
	}
	exp := time.Now().Add(sessionTTL)
	http.SetCookie(w, &http.Cookie{
		Name: sessionCookieName(r), Value: a.sessionValue(exp), Path: "/",
		Expires: exp, MaxAge: int(sessionTTL.Seconds()),
		HttpOnly: true, Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode,
	})
	a.log.Info("admin page session opened", "remote", r.RemoteAddr)
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

// sessionValue is the session cookie for the current token, valid until
// exp: "EXP.MAC", MAC an HMAC-SHA256 under the process's key of the
// expiry and the token's digest. It holds no secret, and changes with the
// token.
func (a *adminAuth) sessionValue(exp time.Time) string {
	d := a.token.Load()
	if d == nil {
		return ""
	}
	e := strconv.FormatInt(exp.Unix(), 10)
	return e + "." + base64.RawURLEncoding.EncodeToString(a.sessionMAC(e, d))
}

func (a *adminAuth) sessionMAC(exp string, digest *[sha256.Size]byte) []byte {
	m := hmac.New(sha256.New, a.sessionKey[:])
	m.Write([]byte("brokerd admin page session\x00"))
	m.Write([]byte(exp))
	m.Write([]byte{0})
	m.Write(digest[:])
	return m.Sum(nil)
}

// sessionCookieName is the session cookie's name for the admin listener
// r came in on: brokerd_session_PORT. Browsers keep cookies per host, not
// per port, so nodes on one host (127.0.0.1:8613, :8623, ...) would
// otherwise overwrite each other's session.
func sessionCookieName(r *http.Request) string {
	if a, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
		if _, port, err := net.SplitHostPort(a.String()); err == nil {
			return sessionCookie + "_" + port
		}
	}
	return sessionCookie
}

// sessionOK reports whether r is a GET or HEAD with a session cookie for
// the current token that has not expired. Other methods are never
// authorized by a cookie.
func (a *adminAuth) sessionOK(r *http.Request) bool {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return false
	}
	d := a.token.Load()
	if d == nil {
		return false
	}
	c, err := r.Cookie(sessionCookieName(r))
	if err != nil || len(c.Value) > 128 {
		return false
	}
	e, mac, ok := strings.Cut(c.Value, ".")
	if !ok {
		return false
	}
	exp, err := strconv.ParseInt(e, 10, 64)
	if err != nil || time.Now().Unix() >= exp {
		return false
	}
	got, err := base64.RawURLEncoding.DecodeString(mac)
	if err != nil {
		return false
	}
	return hmac.Equal(got, a.sessionMAC(e, d))
}

// authCheckKey keys the request context's re-check of its credentials.
type authCheckKey struct{}

// withAuthCheck returns r with a function that checks again whether its
// credentials hold (for long-lived answers such as streams).
func withAuthCheck(r *http.Request, ok func() bool) *http.Request {
	return r.WithContext(context.WithValue(r.Context(), authCheckKey{}, ok))
}

// stillAuthorized reports whether the credentials r came with still hold;
// true when the admin API is open.
func stillAuthorized(r *http.Request) bool {
	ok, _ := r.Context().Value(authCheckKey{}).(func() bool)
	return ok == nil || ok()
}
