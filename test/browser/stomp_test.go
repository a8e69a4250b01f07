package browser

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"image/png"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/chromedp/chromedp"
	"github.com/go-stomp/stomp/v3"
)

// pageMessage is one message as the page's stompjs client received it.
type pageMessage struct {
	Headers map[string]string `json:"headers"`
	Body    string            `json:"body"`
	Bytes   []byte            `json:"-"`
	Raw     []int             `json:"bytes"`
}

// received returns what the page's subscription sub has received so far.
func received(t testing.TB, tb *tab, sub string) []pageMessage {
	t.Helper()
	msgs := mustEval[[]pageMessage](t, tb, call("(s => window.received[s] || [])", sub))
	for i := range msgs {
		msgs[i].Bytes = make([]byte, len(msgs[i].Raw))
		for j, v := range msgs[i].Raw {
			msgs[i].Bytes[j] = byte(v)
		}
	}
	return msgs
}

// waitReceived waits up to 10 s until the page's subscription sub has n
// messages and returns them.
func waitReceived(t testing.TB, tb *tab, sub string, n int) []pageMessage {
	t.Helper()
	var msgs []pageMessage
	waitFor(t, 10*time.Second, fmt.Sprintf("the page's subscription %s receives %d message(s)", sub, n), func() (bool, string) {
		msgs = received(t, tb, sub)
		return len(msgs) >= n, fmt.Sprintf("%d received", len(msgs))
	})
	return msgs
}

// queueOwnedBy returns a queue name, with prefix, whose owner in the
// cluster's active set is want.
func (c *testCluster) queueOwnedBy(t testing.TB, prefix string, want *node) string {
	t.Helper()
	for i := 0; i < 10000; i++ {
		q := "/queue/" + prefix + "-" + strconv.Itoa(i)
		if c.byID[replica.ReplicaSet(q, c.active, 2)[0]] == want {
			return q
		}
	}
	t.Fatalf("no queue %s-N owned by %s", prefix, want.name)
	return ""
}

// allBytes is every byte value, 0 to 255, then 255 down to 0: NULs,
// newlines and invalid UTF-8 included.
func allBytes() []byte {
	b := make([]byte, 512)
	for i := 0; i < 256; i++ {
		b[i] = byte(i)
		b[511-i] = byte(i)
	}
	return b
}

// receiveTCP waits up to 10 s for the next message of a go-stomp
// subscription.
func receiveTCP(t testing.TB, sub *stomp.Subscription, what string) *stomp.Message {
	t.Helper()
	select {
	case m := <-sub.C:
		if m.Err != nil {
			t.Fatalf("%s: %v", what, m.Err)
		}
		return m
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: nothing within 10 s", what)
		return nil
	}
}

// TestBrowserCluster: headless chromium runs a page with @stomp/stompjs 7
// against a 3-node cluster of real brokerd processes, over STOMP over
// WebSocket, while Go clients use plain TCP on the other nodes; then it
// loads the cluster page of node 1, sees every member alive, and sees a
// member killed with SIGKILL shown dead.
func TestBrowserCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 3 brokerd processes and chromium")
	}
	chromium, bundle := requirements(t)
	c := startCluster(t, 3, "BROKERD_STOMP_WS_ALLOWED_ORIGINS=127.0.0.1:*")
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	site := servePage(t, bundle)
	b := startBrowser(t, chromium)
	page := b.open(t, site.URL+"/")
	if v := mustEval[string](t, page, `typeof StompJs === "object" && typeof StompJs.Client === "function" ? StompJs.Versions.default.protocolVersions().join(",") : "no StompJs"`); !strings.Contains(v, "v12.stomp") {
		t.Fatalf("the stompjs bundle did not load: %s", v)
	}
	dumpOnFailure := func(t *testing.T, client string) {
		t.Cleanup(func() {
			if t.Failed() {
				log, _ := eval[[]string](page, call("(n => window.clients[n] ? window.clients[n].log : [])", client))
				t.Logf("stompjs %s debug log:\n  %s", client, strings.Join(log, "\n  "))
			}
		})
	}
	wsURL := func(n *node) string { return "ws://" + n.wsAddr + "/ws" }

	// One client for the message cases, without heart-beats.
	version := mustEval[string](t, page, call("connect", "main", wsURL(n1), 0))
	if version != "1.2" {
		t.Errorf("stompjs negotiated STOMP %q over ws, want 1.2", version)
	}

	t.Run("TextAcrossNodes", func(t *testing.T) {
		dumpOnFailure(t, "main")
		// The page subscribes on n1 to a queue n3 owns; a Go producer
		// sends it over TCP to n2.
		q := c.queueOwnedBy(t, "to-page", n3)
		mustEval[string](t, page, call("subscribe", "main", q, "text"))
		prod := n2.dial(t)
		body := "hello from TCP, ünïcödé ✓\nsecond line"
		if err := prod.Send(q, "text/plain;charset=utf-8", []byte(body),
			stomp.SendOpt.Receipt, stomp.SendOpt.Header("x-greeting", "a:b\\d")); err != nil {
			t.Fatalf("send over TCP to %s: %v", n2.name, err)
		}
		m := waitReceived(t, page, "text", 1)[0]
		if m.Body != body {
			t.Errorf("the page got body %q, want %q", m.Body, body)
		}
		for k, want := range map[string]string{
			"destination":  q,
			"content-type": "text/plain;charset=utf-8",
			// Escaped as a\cb\\d on both wires. (Not a backslash before
			// c, n or r: stompjs 7.5 unescapes \c before \\.)
			"x-greeting": "a:b\\d",
		} {
			if got := m.Headers[k]; got != want {
				t.Errorf("the page got header %s: %q, want %q (headers %v)", k, got, want, m.Headers)
			}
		}
		if m.Headers["message-id"] == "" || m.Headers["ack"] == "" {
			t.Errorf("the page's MESSAGE lacks message-id or ack: %v", m.Headers)
		}

		// The page sends over ws to n1 a message for a queue n2 owns; a
		// Go consumer on n3 gets it.
		q2 := c.queueOwnedBy(t, "from-page", n2)
		cons := n3.dial(t)
		sub, err := cons.Subscribe(q2, stomp.AckAuto)
		if err != nil {
			t.Fatal(err)
		}
		mustEval[string](t, page, call("send", "main", q2, "from the browser ✓", nil,
			map[string]string{"content-type": "text/plain", "x-from": "page:1"}))
		got := receiveTCP(t, sub, "Go consumer on "+n3.name)
		if string(got.Body) != "from the browser ✓" {
			t.Errorf("Go consumer got body %q", got.Body)
		}
		if ct := got.ContentType; ct != "text/plain" {
			t.Errorf("Go consumer got content-type %q, want text/plain", ct)
		}
		if v := got.Header.Get("x-from"); v != "page:1" {
			t.Errorf("Go consumer got x-from %q, want page:1", v)
		}
	})

	t.Run("BinaryBodies", func(t *testing.T) {
		dumpOnFailure(t, "main")
		want := allBytes()

		// Page to Go: a Uint8Array body over ws to n1, consumed on n3.
		q := c.queueOwnedBy(t, "bin-from-page", n2)
		cons := n3.dial(t)
		sub, err := cons.Subscribe(q, stomp.AckAuto)
		if err != nil {
			t.Fatal(err)
		}
		ints := make([]int, len(want))
		for i, v := range want {
			ints[i] = int(v)
		}
		mustEval[string](t, page, call("send", "main", q, "", ints,
			map[string]string{"content-type": "application/octet-stream"}))
		got := receiveTCP(t, sub, "Go consumer of the page's binary body")
		if !bytes.Equal(got.Body, want) {
			t.Errorf("Go consumer got %d bytes %v..., want the page's %d bytes 0..255,255..0 exactly", len(got.Body), head(got.Body), len(want))
		}
		if cl := got.Header.Get("content-length"); cl != strconv.Itoa(len(want)) {
			t.Errorf("content-length %q, want %d", cl, len(want))
		}

		// Go to page: sent over TCP to n2, received over ws on n1.
		q2 := c.queueOwnedBy(t, "bin-to-page", n3)
		mustEval[string](t, page, call("subscribe", "main", q2, "binary"))
		prod := n2.dial(t)
		if err := prod.Send(q2, "application/octet-stream", want, stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
		m := waitReceived(t, page, "binary", 1)[0]
		if !bytes.Equal(m.Bytes, want) {
			t.Errorf("the page got binaryBody of %d bytes %v..., want %d bytes 0..255,255..0 exactly", len(m.Bytes), head(m.Bytes), len(want))
		}
		if ct := m.Headers["content-type"]; ct != "application/octet-stream" {
			t.Errorf("the page got content-type %q", ct)
		}
	})

	t.Run("HeartBeats", func(t *testing.T) {
		dumpOnFailure(t, "hb")
		// A second client, to n2's ws listener, asks for heart-beats
		// every second both ways (stomp.heartbeat_min is 1s).
		mustEval[string](t, page, call("connect", "hb", wsURL(n2), 1000))
		hb := mustEval[string](t, page, `window.clients.hb.heartBeat`)
		var sx, sy int
		if _, err := fmt.Sscanf(hb, "%d,%d", &sx, &sy); err != nil || sx == 0 || sy == 0 {
			t.Fatalf("CONNECTED heart-beat %q: the server agreed to no heart-beats both ways", hb)
		}
		q := c.queueOwnedBy(t, "after-idle", n1)
		mustEval[string](t, page, call("subscribe", "hb", q, "idle"))
		before := map[string]int{}
		for _, line := range []string{">>> PING", "<<< PONG"} {
			before[line] = mustEval[int](t, page, call("count", "hb", line))
		}
		// Idle for 6 s: without heart-beats from the server, stompjs
		// closes the socket after 2 s of silence; without the page's,
		// the server drops the connection after its grace period.
		time.Sleep(6 * time.Second)
		for _, line := range []string{">>> PING", "<<< PONG"} {
			n := mustEval[int](t, page, call("count", "hb", line)) - before[line]
			if n < 3 {
				t.Errorf("%d %q heart-beats in 6 s idle, want at least 3 (one a second, agreed %q)", n, line, hb)
			}
			t.Logf("%d %q in 6 s idle (CONNECTED heart-beat:%s)", n, line, hb)
		}
		if n := mustEval[int](t, page, call("count", "hb", "did not receive server activity")); n != 0 {
			t.Errorf("stompjs saw the server silent past its heart-beat period %d times", n)
		}
		state := mustEval[map[string]any](t, page, `({connects: window.clients.hb.connects, closes: window.clients.hb.closes, connected: window.clients.hb.client.connected})`)
		if state["connected"] != true || state["connects"] != float64(1) {
			t.Fatalf("after 6 s idle with heart-beats: %v, want still on its first connection", state)
		}
		// The same connection still carries messages.
		prod := n3.dial(t)
		if err := prod.Send(q, "text/plain", []byte("after idle"), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
		if m := waitReceived(t, page, "idle", 1)[0]; m.Body != "after idle" {
			t.Errorf("after idle the page got %q", m.Body)
		}
		if n := mustEval[int](t, page, `window.clients.hb.connects`); n != 1 {
			t.Errorf("stompjs connected %d times, want 1", n)
		}
	})

	t.Run("ForeignOriginRefused", func(t *testing.T) {
		// The same page from an origin stomp.ws_allowed_origins does not
		// name (localhost, not 127.0.0.1) cannot open the WebSocket.
		foreign := b.open(t, strings.Replace(site.URL, "127.0.0.1", "localhost", 1)+"/")
		_, err := eval[string](foreign, call("connect", "foreign", wsURL(n1), 0))
		if err == nil {
			t.Fatalf("a page from origin localhost connected over ws to %s; only 127.0.0.1:* is allowed", n1.name)
		}
		if n := mustEval[int](t, foreign, `window.clients.foreign.connects`); n != 0 {
			t.Fatalf("the foreign page got CONNECTED %d times", n)
		}
		waitFor(t, 5*time.Second, n1.name+" logs the refused Origin", func() (bool, string) {
			return strings.Contains(n1.stderr.String(), "origin=http://localhost:"), "no log line with origin=http://localhost:"
		})
		t.Logf("refused as expected: %v", err)
	})

	t.Run("ClusterPage", func(t *testing.T) {
		// Traffic first, so that the page's charts have something.
		rounds := 4
		if os.Getenv("BROKERD_SCREENSHOT") != "" {
			rounds = 40 // a longer line on the charts of the README's picture
		}
		traffic(t, c, rounds)
		admin := b.open(t, "http://"+n1.adminAddr+"/")
		type row struct {
			Name  string `json:"name"`
			State string `json:"state"`
			Role  string `json:"role"`
			Text  string `json:"text"` // what a person reads in the row
		}
		rows := func() []row {
			return mustEval[[]row](t, admin, `Array.from(document.querySelectorAll("tr[data-member]")).map(r => ({name: r.dataset.member, state: r.dataset.state, role: r.dataset.role || "", text: r.innerText}))`)
		}
		show := func(rs []row) string {
			b, _ := json.Marshal(rs)
			return string(b)
		}
		waitFor(t, 15*time.Second, "the cluster page of n1 lists n1, n2 and n3 alive", func() (bool, string) {
			rs := rows()
			alive := map[string]bool{}
			for _, r := range rs {
				if r.State == "alive" && strings.Contains(r.Text, "alive") {
					alive[r.Name] = true
				}
			}
			return len(rs) == 3 && alive["n1"] && alive["n2"] && alive["n3"], show(rs)
		})
		if u := mustEval[string](t, admin, `(document.querySelector("#updated") || {}).textContent || ""`); strings.TrimSpace(u) == "" {
			t.Errorf("the cluster page shows no #updated time")
		}
		// Let the charts gather a few samples of the traffic.
		time.Sleep(3 * time.Second)
		shot := mustScreenshot(t, admin)
		out := os.Getenv("BROKERD_SCREENSHOT")
		if out == "" {
			out = filepath.Join(t.TempDir(), "cluster-page.png")
		}
		if err := os.WriteFile(out, shot, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot of the cluster page: %s", out)

		killed := time.Now()
		n3.kill()
		var seen []string
		last := ""
		waitFor(t, 15*time.Second, "the cluster page shows n3 dead after kill -9", func() (bool, string) {
			state := ""
			for _, r := range rows() {
				if r.Name == "n3" {
					state = r.State
					if !strings.Contains(r.Text, state) {
						state += " (not in the row's text)"
					}
				}
			}
			if state != last {
				seen = append(seen, fmt.Sprintf("%s after %v", state, time.Since(killed).Round(100*time.Millisecond)))
				last = state
			}
			return state == "dead", strings.Join(seen, ", ")
		})
		t.Logf("n3 on the page after kill -9: %s", strings.Join(seen, ", "))
		if ex := admin.uncaught(); len(ex) > 0 {
			t.Errorf("the cluster page threw: %v", ex)
		}
	})
}

// traffic sends messages with receipts over TCP through n1 to three
// queues, two of them owned by n1, one round a second for rounds seconds,
// and consumes the first on n3 as it goes, so that n1's rates (sent above
// delivered), its receipt latencies and the destinations' depths are not
// all zero.
func traffic(t *testing.T, c *testCluster, rounds int) {
	t.Helper()
	n1, n2 := c.nodes[0], c.nodes[1]
	prod := n1.dial(t)
	queues := []string{c.queueOwnedBy(t, "orders", n1), c.queueOwnedBy(t, "invoices", n1), c.queueOwnedBy(t, "audit", n2)}
	var subs []*stomp.Subscription // of queues[0]
	for _, q := range queues[:1] {
		sub, err := c.nodes[2].dial(t).Subscribe(q, stomp.AckAuto)
		if err != nil {
			t.Fatal(err)
		}
		subs = append(subs, sub)
	}
	for r := 0; r < rounds; r++ {
		start := time.Now()
		sent := make([]int, len(queues))
		for i := 0; i < 30+20*(r%4); i++ {
			q := i % len(queues)
			if err := prod.Send(queues[q], "text/plain", []byte("order "+strconv.Itoa(i)), stomp.SendOpt.Receipt); err != nil {
				t.Fatal(err)
			}
			sent[q]++
		}
		for q, sub := range subs {
			for i := 0; i < sent[q]; i++ {
				receiveTCP(t, sub, "traffic on "+queues[q])
			}
		}
		time.Sleep(time.Second - time.Since(start))
	}
}

// mustScreenshot captures the tab's viewport as a PNG and checks that it
// decodes.
func mustScreenshot(t *testing.T, tb *tab) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(tb.ctx, actionTimeout)
	defer cancel()
	shot, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	img, err := png.Decode(bytes.NewReader(shot))
	if err != nil {
		t.Fatalf("the screenshot is no PNG: %v", err)
	}
	if r := img.Bounds(); r.Dx() < 1000 || r.Dy() < 600 {
		t.Errorf("screenshot is %dx%d, want about 1280x800", r.Dx(), r.Dy())
	}
	return shot
}

// head is the first bytes of b, for messages.
func head(b []byte) []byte {
	if len(b) > 16 {
		return b[:16]
	}
	return b
}
