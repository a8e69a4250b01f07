package node

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/test/netsim"
	"github.com/brokerd/brokerd/test/tlstest"
	gostomp "github.com/go-stomp/stomp/v3"
	"github.com/hashicorp/memberlist"
)

// pageGet sends method path to n's admin address with the given cookie
// (the session value, "" for none) and bearer token ("" for none).
func pageDo(t *testing.T, c *http.Client, method, url, cookie, bearer string, body io.Reader) answer {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	if cookie != "" {
		req.AddCookie(&http.Cookie{Name: cookieName(req.URL.Port()), Value: cookie})
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := c.Do(req)
	if err != nil {
		return answer{err: err}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return answer{code: resp.StatusCode, body: string(b), header: resp.Header}
}

// cookieName is the session cookie's name on the admin port.
func cookieName(port string) string { return sessionCookie + "_" + port }

// noRedirects is a client that shows redirects instead of following them.
func noRedirects() *http.Client {
	return &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// getOverview fetches and decodes GET /v1/overview from n.
func getOverview(t *testing.T, n *Node, query string) overview {
	t.Helper()
	a := pageDo(t, &http.Client{Timeout: 10 * time.Second}, http.MethodGet, "http://"+n.AdminAddr()+"/v1/overview"+query, "", "", nil)
	if a.err != nil || a.code != http.StatusOK {
		t.Fatalf("GET /v1/overview%s: %d %q %v", query, a.code, a.body, a.err)
	}
	var o overview
	if err := json.Unmarshal([]byte(a.body), &o); err != nil {
		t.Fatalf("GET /v1/overview: %v: %s", err, a.body)
	}
	return o
}

// waitFor polls cond every 50 ms until it returns "" or d passes, then
// fails with what it last said.
func waitFor(t *testing.T, d time.Duration, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		why := cond()
		if why == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %s", what, d, why)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestPageServedWithCSPAndAssets(t *testing.T) {
	n, _ := startAdminNode(t, adminTestConfig(t))
	base := "http://" + n.AdminAddr()
	c := &http.Client{Timeout: 10 * time.Second}

	// No admin.token_file on loopback: the page just works.
	a := pageDo(t, c, http.MethodGet, base+"/", "", "", nil)
	if a.code != http.StatusOK || !strings.HasPrefix(a.header.Get("Content-Type"), "text/html") {
		t.Fatalf("GET /: %d %q %v", a.code, a.header.Get("Content-Type"), a.err)
	}
	if csp := a.header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'self'") || strings.Contains(csp, "unsafe-inline") {
		t.Errorf("GET /: Content-Security-Policy %q, want default-src 'self' without unsafe-inline", csp)
	}
	for _, want := range []string{`id="updated"`, `id="members"`, `id="destinations"`, `src="/ui/app.js"`, `href="/ui/style.css"`} {
		if !strings.Contains(a.body, want) {
			t.Errorf("GET /: the page lacks %s", want)
		}
	}
	if strings.Contains(a.body, "<script>") || strings.Contains(a.body, "http://") || strings.Contains(a.body, "https://") {
		t.Errorf("GET /: an inline script or an outside address in the page:\n%s", a.body)
	}

	for _, f := range []struct{ path, ctype string }{
		{"/ui/app.js", "text/javascript"},
		{"/ui/style.css", "text/css"},
	} {
		a := pageDo(t, c, http.MethodGet, base+f.path, "", "", nil)
		if a.code != http.StatusOK || !strings.HasPrefix(a.header.Get("Content-Type"), f.ctype) || a.header.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("GET %s: %d, Content-Type %q, X-Content-Type-Options %q; want 200 %s nosniff", f.path, a.code, a.header.Get("Content-Type"), a.header.Get("X-Content-Type-Options"), f.ctype)
		}
		if len(a.body) < 200 {
			t.Errorf("GET %s: %d bytes", f.path, len(a.body))
		}
	}
	// The script shows every value with textContent: destination names
	// come from clients.
	js := pageDo(t, c, http.MethodGet, base+"/ui/app.js", "", "", nil).body
	for _, sink := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"} {
		if strings.Contains(js, sink) {
			t.Errorf("app.js uses %s", sink)
		}
	}
	if !strings.Contains(js, "textContent") || !strings.Contains(js, "EventSource") {
		t.Errorf("app.js neither sets textContent nor opens an EventSource")
	}
	if a := pageDo(t, c, http.MethodGet, base+"/ui/", "", "", nil); a.code != http.StatusNotFound {
		t.Errorf("GET /ui/: %d, want 404 (no listing)", a.code)
	}
}

// pageCluster is three nodes whose gossip runs over a netsim network
// with fast failure detection, so that a killed member is dead within a
// second; peer links on loopback TCP, refused across a partition.
type pageCluster struct {
	netw  *netsim.Network
	nodes map[string]*Node
	names []string
}

func startPageCluster(t *testing.T, names ...string) *pageCluster {
	t.Helper()
	pc := &pageCluster{netw: netsim.New(), nodes: map[string]*Node{}}
	var mu sync.Mutex
	byPeer := map[string]string{}
	for i, name := range names {
		h := pc.netw.Host(name)
		cfg := config.Default()
		cfg.Node.Name = name
		cfg.Node.DataDir = t.TempDir()
		cfg.STOMP.Addr = "127.0.0.1:0"
		cfg.Admin.Addr = "127.0.0.1:0"
		cfg.Store.Sync = "none"
		cfg.Cluster.GossipAddr = h.Addr()
		cfg.Cluster.AllowPlaintextGossip = true
		cfg.Cluster.PeerAddr = "127.0.0.1:0"
		cfg.Cluster.ActiveMembers = 3
		cfg.Cluster.PromotionDelay = 200 * time.Millisecond
		cfg.Replica.Factor = 2
		if i > 0 {
			cfg.Cluster.Join = []string{pc.netw.Host(names[0]).Addr()}
		}
		from := name
		n, err := NewWithOptions(cfg, slog.New(slog.DiscardHandler), Options{
			Cluster: func(c *cluster.Config) {
				c.Transport = h.Transport()
				c.RejoinInterval = 300 * time.Millisecond
				c.Tick = 20 * time.Millisecond
				c.Memberlist = func(mc *memberlist.Config) {
					mc.ProbeInterval = 100 * time.Millisecond
					mc.ProbeTimeout = 50 * time.Millisecond
					mc.GossipInterval = 20 * time.Millisecond
					mc.SuspicionMult = 2
					mc.PushPullInterval = time.Second
					mc.TCPTimeout = 200 * time.Millisecond
					mc.GossipToTheDeadTime = 2 * time.Second
				}
			},
			PeerDial: func(ctx context.Context, addr string) (net.Conn, error) {
				mu.Lock()
				to := byPeer[addr]
				mu.Unlock()
				if !pc.netw.Reachable(from, to) {
					return nil, fmt.Errorf("dial %s (%s): unreachable", addr, to)
				}
				var d net.Dialer
				return d.DialContext(ctx, "tcp", addr)
			},
		})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := n.Start(); err != nil {
			t.Fatalf("%s: start: %v", name, err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = n.Shutdown(ctx)
		})
		mu.Lock()
		byPeer[n.PeerAddr()] = name
		mu.Unlock()
		pc.nodes[name] = n
		pc.names = append(pc.names, name)
	}
	waitFor(t, 15*time.Second, "the cluster agrees", func() string {
		for _, name := range pc.names {
			st := pc.nodes[name].Cluster().Status()
			alive := 0
			for _, m := range st.Members {
				if m.State == "alive" && m.Role == "active" {
					alive++
				}
			}
			if !st.Converged || alive != len(pc.names) {
				return fmt.Sprintf("%s: converged %v, %d active alive", name, st.Converged, alive)
			}
		}
		return ""
	})
	return pc
}

func memberStates(o overview) map[string]string {
	m := map[string]string{}
	for _, x := range o.Members {
		m[x.Name] = x.State + "/" + x.Role
	}
	return m
}

func TestPageOverviewCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("a 3-node cluster")
	}
	pc := startPageCluster(t, "a", "b", "c")
	a := pc.nodes["a"]

	conn, err := gostomp.Dial("tcp", a.STOMPAddr(), gostomp.ConnOpt.HeartBeat(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Disconnect()
	// A client-chosen name with markup in it: the page must show it as
	// text (app.js uses textContent; the JSON carries it as is).
	const dest = "/queue/page-<b>bold</b>"
	const sent = 7
	for i := range sent {
		if err := conn.Send(dest, "text/plain", []byte(fmt.Sprint("m", i)), gostomp.SendOpt.Receipt); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}

	// Every node's page lists every member, alive and active, and the
	// queue at its owner with its replicas and pending count.
	var owner string
	for _, name := range pc.names {
		waitFor(t, 20*time.Second, "overview of "+name, func() string {
			o := getOverview(t, pc.nodes[name], "")
			if !o.Clustered || o.NodeName != name || o.Epoch == 0 {
				return fmt.Sprintf("node %q clustered %v epoch %d", o.NodeName, o.Clustered, o.Epoch)
			}
			ms := memberStates(o)
			for _, want := range pc.names {
				if ms[want] != "alive/active" {
					return fmt.Sprintf("members %v", ms)
				}
			}
			selfs := 0
			for _, m := range o.Members {
				if m.Self {
					selfs++
					if m.Name != name {
						return fmt.Sprintf("self is %s", m.Name)
					}
				}
				if m.STOMPAddr == "" || m.AdminAddr == "" || m.PeerAddr == "" {
					return fmt.Sprintf("member %s without addresses: %+v", m.Name, m.MemberStatus)
				}
			}
			if selfs != 1 {
				return fmt.Sprintf("%d members marked self", selfs)
			}
			for _, d := range o.Destinations {
				if d.Name != dest {
					continue
				}
				if d.Pending != sent || d.Owner == "" || len(d.Replicas) != 2 {
					return fmt.Sprintf("destination %+v", d)
				}
				states := map[string]bool{}
				for _, r := range d.Replicas {
					states[r.State] = true
				}
				if !states["owner"] || !(states["in-sync"] || states["catching-up"]) {
					return fmt.Sprintf("replica states %+v", d.Replicas)
				}
				owner = d.OwnerName
				return ""
			}
			// GET /v1/destinations, for the failure message: the page's
			// source, asked directly.
			direct := pageDo(t, &http.Client{Timeout: 10 * time.Second}, http.MethodGet, "http://"+pc.nodes[name].AdminAddr()+"/v1/destinations", "", "", nil)
			return fmt.Sprintf("%s not among %d destinations (GET /v1/destinations: %d %.300s)", dest, len(o.Destinations), direct.code, direct.body)
		})
	}

	// The owner's series counts the sends; a's, where the receipts were
	// written, their latency. The series grows by a sample a second.
	on := pc.nodes[owner]
	first := len(getOverview(t, on, "").Series.Samples)
	waitFor(t, 10*time.Second, "the owner's series", func() string {
		o := getOverview(t, on, "")
		var total float64
		for _, s := range o.Series.Samples {
			total += s.Sent * float64(o.Series.IntervalMS) / 1000
		}
		if len(o.Series.Samples) < first+2 || math.Round(total) < sent {
			return fmt.Sprintf("%d samples (first %d), %.1f sent", len(o.Series.Samples), first, total)
		}
		return ""
	})
	o := getOverview(t, a, "")
	var latency bool
	for _, s := range o.Series.Samples {
		if s.Receipts > 0 && s.P50 != nil && s.P99 != nil && *s.P50 > 0 && *s.P99 >= *s.P50 {
			latency = true
		}
	}
	if !latency {
		t.Errorf("a's series has no receipt latency: %+v", o.Series.Samples)
	}
	// ?since= gives only the newer samples.
	if k := len(o.Series.Samples); k > 1 {
		last := o.Series.Samples[k-2].T
		tail := getOverview(t, a, fmt.Sprint("?since=", last))
		if !tail.Series.Append || len(tail.Series.Samples) == 0 || tail.Series.Samples[0].T <= last {
			t.Errorf("?since=%d: append %v, %d samples", last, tail.Series.Append, len(tail.Series.Samples))
		}
	}

	// A member that dies shows as dead within a few seconds.
	pc.netw.Kill("c")
	start := time.Now()
	seen := map[string]bool{}
	waitFor(t, 10*time.Second, "c shown dead on a's page", func() string {
		st := memberStates(getOverview(t, a, ""))["c"]
		seen[st] = true
		if !strings.HasPrefix(st, "dead/") {
			return "c is " + st
		}
		return ""
	})
	t.Logf("c dead on the page after %v; states seen %v", time.Since(start).Round(time.Millisecond), seen)
}

func TestPageDestinationsCapped(t *testing.T) {
	n, _ := startAdminNode(t, adminTestConfig(t))
	conn, err := gostomp.Dial("tcp", n.STOMPAddr(), gostomp.ConnOpt.HeartBeat(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Disconnect()
	const queues = pageMaxDestinations + 5
	for i := range queues {
		if err := conn.Send(fmt.Sprintf("/queue/cap-%03d", i), "text/plain", []byte("x"), gostomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, "the cap", func() string {
		o := getOverview(t, n, "")
		if len(o.Destinations) != pageMaxDestinations || o.DestinationsTotal != queues || o.DestinationsMore != queues-pageMaxDestinations {
			return fmt.Sprintf("%d listed, total %d, more %d", len(o.Destinations), o.DestinationsTotal, o.DestinationsMore)
		}
		d := o.Destinations[0]
		if d.OwnerName != "admin-test" || len(d.Replicas) != 1 || d.Pending != 1 {
			return fmt.Sprintf("single node destination %+v", d)
		}
		return ""
	})
}

// sseEvent is one server-sent event.
type sseEvent struct{ name, data string }

// sseStream is an open GET /v1/overview/stream.
type sseStream struct {
	resp   *http.Response
	events chan sseEvent
	cancel context.CancelFunc
}

// openStream opens the overview stream; it returns the response status
// and, when 200, the stream.
func openStream(t *testing.T, base, cookie string) (int, *sseStream) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/overview/stream", nil)
	if cookie != "" {
		req.AddCookie(&http.Cookie{Name: cookieName(req.URL.Port()), Value: cookie})
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		cancel()
		t.Fatalf("stream: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		cancel()
		return resp.StatusCode, nil
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("stream Content-Type %q", ct)
	}
	s := &sseStream{resp: resp, events: make(chan sseEvent, 64), cancel: cancel}
	go func() {
		defer close(s.events)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		var ev sseEvent
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if ev.data != "" {
					s.events <- ev
				}
				ev = sseEvent{}
			case strings.HasPrefix(line, "event: "):
				ev.name = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				ev.data += strings.TrimPrefix(line, "data: ")
			}
		}
	}()
	t.Cleanup(s.close)
	return resp.StatusCode, s
}

func (s *sseStream) close() {
	s.cancel()
	s.resp.Body.Close()
}

// next returns the next overview, or fails after d; ok is false when the
// stream ended.
func (s *sseStream) next(t *testing.T, d time.Duration) (overview, bool) {
	t.Helper()
	select {
	case ev, ok := <-s.events:
		if !ok {
			return overview{}, false
		}
		if ev.name != "overview" {
			t.Fatalf("event %q, want overview", ev.name)
		}
		var o overview
		if err := json.Unmarshal([]byte(ev.data), &o); err != nil {
			t.Fatalf("event data: %v", err)
		}
		return o, true
	case <-time.After(d):
		t.Fatalf("no event within %v", d)
		return overview{}, false
	}
}

func TestPageStreamUpdatesAndCap(t *testing.T) {
	cfg := adminTestConfig(t)
	n, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = n.Shutdown(context.Background())
		}
	})
	base := "http://" + n.AdminAddr()

	_, s := openStream(t, base, "")
	first, ok := s.next(t, 5*time.Second)
	if !ok || first.Series.Append || len(first.Members) != 1 || first.Members[0].Name != "admin-test" || first.Members[0].State != "alive" {
		t.Fatalf("first event: ok %v append %v members %+v", ok, first.Series.Append, first.Members)
	}
	last := int64(0)
	if k := len(first.Series.Samples); k > 0 {
		last = first.Series.Samples[k-1].T
	}
	// The next events carry the new samples only, a second apart.
	got := 0
	for got < 2 {
		o, ok := s.next(t, 5*time.Second)
		if !ok {
			t.Fatal("stream ended")
		}
		if !o.Series.Append || o.NowMS < first.NowMS {
			t.Fatalf("later event: append %v now %d (first %d)", o.Series.Append, o.NowMS, first.NowMS)
		}
		for _, x := range o.Series.Samples {
			if x.T <= last {
				t.Fatalf("sample at %d sent again (last %d)", x.T, last)
			}
			last = x.T
			got++
		}
	}

	// At most pageMaxStreams at once: the next is refused with 503.
	streams := []*sseStream{s}
	for len(streams) < pageMaxStreams {
		code, s := openStream(t, base, "")
		if code != http.StatusOK {
			t.Fatalf("stream %d: %d", len(streams)+1, code)
		}
		streams = append(streams, s)
	}
	if code, _ := openStream(t, base, ""); code != http.StatusServiceUnavailable {
		t.Fatalf("stream %d: %d, want 503", pageMaxStreams+1, code)
	}
	// GET /v1/overview still answers: the page polls instead.
	getOverview(t, n, "")
	// A closed stream frees its place.
	streams[0].close()
	streams = streams[1:]
	waitFor(t, 5*time.Second, "a place after a stream closed", func() string {
		code, s := openStream(t, base, "")
		if code != http.StatusOK {
			return fmt.Sprint(code)
		}
		streams = append(streams, s)
		return ""
	})

	// Shutdown ends the streams rather than waiting for them.
	start := time.Now()
	stopped = true
	if err := n.Shutdown(context.Background()); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Shutdown with %d streams open took %v", len(streams), d)
	}
	for _, s := range streams {
		deadline := time.After(5 * time.Second)
		for open := true; open; {
			select {
			case _, open = <-s.events:
			case <-deadline:
				t.Fatal("a stream still open after Shutdown")
			}
		}
	}
}

// loginCookie signs in with tok and returns the session cookie set.
func loginCookie(t *testing.T, c *http.Client, base, tok string) (answer, *http.Cookie) {
	t.Helper()
	a := pageDo(t, c, http.MethodPost, base+"/ui/login", "", "", strings.NewReader(url.Values{"token": {tok}}.Encode()))
	resp := http.Response{Header: a.header}
	u, _ := url.Parse(base)
	for _, ck := range resp.Cookies() {
		if ck.Name == cookieName(u.Port()) && ck.Value != "" {
			return a, ck
		}
	}
	return a, nil
}

func TestPageAuthCookie(t *testing.T) {
	cfg := adminTestConfig(t)
	cfg.Admin.TokenFile = writeToken(t, filepath.Join(t.TempDir(), "admin.token"), testAdminToken)
	n, logs := startAdminNode(t, cfg)
	base := "http://" + n.AdminAddr()
	c := noRedirects()

	// Unauthenticated: / is the sign-in form, with no data and no secret.
	a := pageDo(t, c, http.MethodGet, base+"/", "", "", nil)
	if a.code != http.StatusUnauthorized || !strings.Contains(a.body, `action="/ui/login"`) || !strings.Contains(a.body, `name="token"`) {
		t.Fatalf("GET / without credentials: %d %q, want 401 with the sign-in form", a.code, a.body)
	}
	if !strings.Contains(a.header.Get("Content-Security-Policy"), "default-src 'self'") {
		t.Errorf("sign-in form without the CSP: %q", a.header.Get("Content-Security-Policy"))
	}
	if strings.Contains(a.body, testAdminToken) || strings.Contains(a.body, "app.js") || strings.Contains(a.body, n.ID()) {
		t.Errorf("the sign-in form shows the token, the node or the page's script: %q", a.body)
	}
	if a := pageDo(t, c, http.MethodGet, base+"/ui/style.css", "", "", nil); a.code != http.StatusOK {
		t.Errorf("style sheet without credentials: %d, want 200 (the form uses it)", a.code)
	}
	for _, p := range []string{"/v1/overview", "/v1/overview/stream", "/ui/app.js"} {
		if a := pageDo(t, c, http.MethodGet, base+p, "", "", nil); a.code != http.StatusUnauthorized {
			t.Errorf("GET %s without credentials: %d, want 401", p, a.code)
		}
	}

	// A wrong token signs nobody in.
	for _, bad := range []string{otherAdminToken, "", testAdminToken[:len(testAdminToken)-1]} {
		a, ck := loginCookie(t, c, base, bad)
		if a.code != http.StatusUnauthorized || ck != nil || !strings.Contains(a.body, "Wrong token") {
			t.Errorf("sign-in with a wrong token: %d, cookie %v, want 401 and no cookie", a.code, ck)
		}
	}
	if !strings.Contains(logs.String(), "wrong token at sign-in") {
		t.Errorf("refused sign-in not logged")
	}

	// The right token: a session cookie, HttpOnly, SameSite=Strict, not
	// the token itself; then back to the page.
	a, ck := loginCookie(t, c, base, testAdminToken)
	if a.code != http.StatusSeeOther || a.header.Get("Location") != "/" || ck == nil {
		t.Fatalf("sign-in with the token: %d Location %q cookie %v", a.code, a.header.Get("Location"), ck)
	}
	if !ck.HttpOnly || ck.SameSite != http.SameSiteStrictMode || ck.Path != "/" || ck.Secure {
		t.Errorf("session cookie %+v: want HttpOnly, SameSite=Strict, Path=/, not Secure over plain HTTP", ck)
	}
	if strings.Contains(ck.Value, testAdminToken) || strings.Contains(ck.Raw, testAdminToken) {
		t.Errorf("the cookie holds the token: %q", ck.Raw)
	}
	cookie := ck.Value

	// The cookie reads: the page, its data, the admin API's GETs.
	for _, p := range []string{"/", "/ui/app.js", "/v1/overview", "/v1/cluster", "/v1/destinations", "/metrics"} {
		if a := pageDo(t, c, http.MethodGet, base+p, cookie, "", nil); a.code != http.StatusOK {
			t.Errorf("GET %s with the cookie: %d %q, want 200", p, a.code, a.body)
		}
	}
	if a := pageDo(t, c, http.MethodHead, base+"/", cookie, "", nil); a.code != http.StatusOK {
		t.Errorf("HEAD / with the cookie: %d", a.code)
	}
	if a := pageDo(t, c, http.MethodGet, base+"/", cookie, "", nil); !strings.Contains(a.body, `id="updated"`) {
		t.Errorf("GET / with the cookie is not the cluster page: %q", a.body)
	}

	// ...and never changes anything: a forged form posting with the
	// cookie is refused.
	for _, w := range []struct{ method, path string }{
		{http.MethodPost, "/v1/reload"},
		{http.MethodPut, "/v1/cluster/active-members"},
		{http.MethodPost, "/v1/gossip-keys/install"},
		{http.MethodDelete, "/v1/overview"},
	} {
		if a := pageDo(t, c, w.method, base+w.path, cookie, "", strings.NewReader(`{"value": 3}`)); a.code != http.StatusUnauthorized {
			t.Errorf("%s %s with the cookie: %d %q, want 401", w.method, w.path, a.code, a.body)
		}
	}

	// Wrong cookies are refused: altered, truncated, expired, from another
	// process (another key), or made for another token.
	other, err := newAdminAuth(cfg.Admin, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	e, mac, _ := strings.Cut(cookie, ".")
	flipped := []byte(mac)
	flipped[3] ^= 1
	if flipped[3] == '.' {
		flipped[3] = 'A'
	}
	for _, bad := range []struct{ name, value string }{
		{"altered MAC", e + "." + string(flipped)},
		{"later expiry, same MAC", fmt.Sprint(time.Now().Add(48*time.Hour).Unix()) + "." + mac},
		{"MAC only", mac},
		{"truncated", cookie[:len(cookie)-4]},
		{"expired", n.guard.sessionValue(time.Now().Add(-time.Minute))},
		{"another process's", other.sessionValue(time.Now().Add(time.Hour))},
		{"the token itself", testAdminToken},
		{"huge", strings.Repeat("1", 4000)},
	} {
		if a := pageDo(t, c, http.MethodGet, base+"/v1/overview", bad.value, "", nil); a.code != http.StatusUnauthorized {
			t.Errorf("GET /v1/overview with a cookie (%s): %d, want 401", bad.name, a.code)
		}
		if a := pageDo(t, c, http.MethodGet, base+"/", bad.value, "", nil); a.code != http.StatusUnauthorized || strings.Contains(a.body, `id="updated"`) {
			t.Errorf("GET / with a cookie (%s): %d, want the sign-in form", bad.name, a.code)
		}
	}

	// A stream opened with the cookie, then a token reload: the stream
	// ends and the cookie no longer reads.
	code, s := openStream(t, base, cookie)
	if code != http.StatusOK {
		t.Fatalf("stream with the cookie: %d", code)
	}
	if _, ok := s.next(t, 5*time.Second); !ok {
		t.Fatal("stream with the cookie ended at once")
	}
	writeToken(t, cfg.Admin.TokenFile, otherAdminToken)
	if a := pageDo(t, c, http.MethodPost, base+"/v1/reload", "", testAdminToken, nil); a.code != http.StatusOK {
		t.Fatalf("reload: %d %q", a.code, a.body)
	}
	if a := pageDo(t, c, http.MethodGet, base+"/v1/overview", cookie, "", nil); a.code != http.StatusUnauthorized {
		t.Errorf("the cookie after a token reload: %d, want 401", a.code)
	}
	deadline := time.After(5 * time.Second)
	for open := true; open; {
		select {
		case _, open = <-s.events:
		case <-deadline:
			t.Fatal("the stream opened with the cookie still runs after the token reload")
		}
	}
	// The new token signs in again.
	if _, ck := loginCookie(t, c, base, otherAdminToken); ck == nil {
		t.Error("sign-in with the new token: no cookie")
	} else if a := pageDo(t, c, http.MethodGet, base+"/v1/overview", ck.Value, "", nil); a.code != http.StatusOK {
		t.Errorf("the new session: %d", a.code)
	}
	if strings.Contains(logs.String(), testAdminToken) || strings.Contains(logs.String(), otherAdminToken) {
		t.Error("the log shows a token")
	}
}

func TestPageAuthHTTPS(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "admin-ca")
	server := ca.Issue(t, "node", nil)
	operator := ca.Issue(t, "operator", nil)
	cfg := adminTestConfig(t)
	cfg.Admin.TokenFile = writeToken(t, filepath.Join(dir, "admin.token"), testAdminToken)
	cfg.Admin.TLS = config.AdminTLS{CertFile: server.CertFile, KeyFile: server.KeyFile, ClientCAFile: ca.CertFile}
	n, _ := startAdminNode(t, cfg)
	base := "https://" + n.AdminAddr()

	// A browser with a client certificate gets the page as is.
	withCert := httpsClient(ca, &operator, t)
	if a := pageDo(t, withCert, http.MethodGet, base+"/", "", "", nil); a.code != http.StatusOK || !strings.Contains(a.body, `id="updated"`) {
		t.Errorf("GET / with a client certificate: %d", a.code)
	}
	if a := pageDo(t, withCert, http.MethodGet, base+"/v1/overview", "", "", nil); a.code != http.StatusOK {
		t.Errorf("GET /v1/overview with a client certificate: %d", a.code)
	}
	// Over HTTPS the session cookie is Secure.
	plain := httpsClient(ca, nil, t)
	plain.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	a, ck := loginCookie(t, plain, base, testAdminToken)
	if ck == nil || !ck.Secure || !ck.HttpOnly || ck.SameSite != http.SameSiteStrictMode {
		t.Fatalf("sign-in over HTTPS: %d, cookie %+v, want Secure, HttpOnly, SameSite=Strict", a.code, ck)
	}
	if a := pageDo(t, plain, http.MethodGet, base+"/v1/overview", ck.Value, "", nil); a.code != http.StatusOK {
		t.Errorf("GET /v1/overview with the cookie over HTTPS: %d", a.code)
	}
	if a := pageDo(t, plain, http.MethodPost, base+"/v1/reload", ck.Value, "", nil); a.code != http.StatusUnauthorized {
		t.Errorf("POST /v1/reload with the cookie over HTTPS: %d, want 401", a.code)
	}
}

func TestPageAuthCertificatesOnly(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "admin-ca")
	server := ca.Issue(t, "node", nil)
	cfg := adminTestConfig(t)
	cfg.Admin.TLS = config.AdminTLS{CertFile: server.CertFile, KeyFile: server.KeyFile, ClientCAFile: ca.CertFile}
	n, _ := startAdminNode(t, cfg)
	c := httpsClient(ca, nil, t)
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	base := "https://" + n.AdminAddr()
	if a := pageDo(t, c, http.MethodGet, base+"/", "", "", nil); a.code != http.StatusUnauthorized || !strings.Contains(a.body, "client certificate") || strings.Contains(a.body, `name="token"`) {
		t.Errorf("GET / without a certificate, no token file: %d %q, want 401 saying a certificate is needed", a.code, a.body)
	}
	if a, ck := loginCookie(t, c, base, testAdminToken); a.code != http.StatusUnauthorized || ck != nil {
		t.Errorf("sign-in without a token file: %d cookie %v, want 401", a.code, ck)
	}
}

func TestPageBucketQuantile(t *testing.T) {
	inf := math.Inf(1)
	bounds := []float64{0.001, 0.01, 0.1, inf}
	cases := []struct {
		name string
		q    float64
		cum  []uint64
		want float64
	}{
		{"all in the first bucket, median", 0.5, []uint64{10, 10, 10, 10}, 0.0005},
		{"second bucket", 0.5, []uint64{0, 10, 10, 10}, 0.0055},
		{"p99 in the third", 0.99, []uint64{50, 90, 100, 100}, 0.01 + 0.09*0.9},
		{"in +Inf: highest finite bound", 0.99, []uint64{0, 0, 1, 10}, 0.1},
	}
	for _, tc := range cases {
		if got := bucketQuantile(tc.q, bounds, tc.cum); math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
	if got := bucketQuantile(0.5, bounds, []uint64{0, 0, 0, 0}); !math.IsNaN(got) {
		t.Errorf("no observations: %v, want NaN", got)
	}
}

func TestPageSamplerRing(t *testing.T) {
	s := newSampler(nil, time.Second, 3)
	for i := range 5 {
		s.push(Sample{T: int64(i + 1)})
	}
	var ts []int64
	for _, x := range s.Samples(0) {
		ts = append(ts, x.T)
	}
	if fmt.Sprint(ts) != "[3 4 5]" {
		t.Errorf("ring of 3 after 5 samples: %v, want [3 4 5]", ts)
	}
	if got := s.Samples(4); len(got) != 1 || got[0].T != 5 {
		t.Errorf("Samples(4): %+v", got)
	}
	s.Close() // never started: returns
}

// A gathering of the destinations stuck on a slow peer holds up the first
// overview by the wait at most, and the next ones not at all: the members'
// states keep coming.
func TestPageDestCacheSlowPeer(t *testing.T) {
	release := make(chan struct{})
	var mu sync.Mutex
	calls := 0
	stop := make(chan struct{})
	c := newDestCache(func() []DestInfo {
		mu.Lock()
		calls++
		first := calls == 1
		mu.Unlock()
		if first {
			<-release
		}
		return []DestInfo{{Owner: "x"}}
	}, stop)
	c.maxWait = 300 * time.Millisecond
	c.start()
	defer func() { close(stop); c.wait() }()
	ctx := context.Background()

	start := time.Now()
	if ds, _ := c.get(ctx); len(ds) != 0 {
		t.Fatalf("first get while the gathering hangs: %v", ds)
	}
	if d := time.Since(start); d < c.maxWait || d > c.maxWait+2*time.Second {
		t.Errorf("first get returned after %v, want about %v", d, c.maxWait)
	}
	time.Sleep(c.maxWait)
	start = time.Now()
	c.get(ctx)
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Errorf("get while a gathering has hung longer than the wait took %v, want no wait", d)
	}
	close(release)
	waitFor(t, 5*time.Second, "destinations after the peer answered", func() string {
		if ds, at := c.get(ctx); len(ds) != 1 || at.IsZero() {
			return fmt.Sprintf("%d destinations", len(ds))
		}
		return ""
	})
}
