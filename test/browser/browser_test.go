package browser

// The browser side: finding chromium and the stompjs bundle, starting
// headless chromium with chromedp, serving the test page, and running
// JavaScript in a tab.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// browserBudget bounds the whole browser session of one test: chromium is
// killed when it ends, and every action fails.
const browserBudget = 4 * time.Minute

// actionTimeout bounds one action in a tab (an evaluation, a navigation).
const actionTimeout = 20 * time.Second

// requirements returns the chromium binary and the stompjs UMD bundle. A
// missing one skips the test, or fails it when CI is "true" (test/run.sh
// installs both).
func requirements(t *testing.T) (chromium, bundle string) {
	t.Helper()
	missing := func(what string) {
		t.Helper()
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s (CI=true: test/run.sh installs it, so it must be there)", what)
		}
		t.Skipf("%s; test/run.sh installs it", what)
	}
	for _, name := range []string{"chromium", "chromium-browser", "/usr/bin/chromium"} {
		if p, err := exec.LookPath(name); err == nil {
			chromium = p
			break
		}
	}
	if chromium == "" {
		missing("no chromium on PATH (Debian package chromium)")
	}
	bundle = os.Getenv("STOMPJS_BUNDLE")
	if bundle == "" {
		missing("STOMPJS_BUNDLE is not set: the path of @stomp/stompjs 7's bundles/stomp.umd.min.js")
	}
	if fi, err := os.Stat(bundle); err != nil || fi.Size() == 0 {
		missing(fmt.Sprintf("STOMPJS_BUNDLE=%s: no stompjs bundle there (%v)", bundle, err))
	}
	return chromium, bundle
}

// servePage serves testdata/page.html at / and the stompjs bundle at
// /stomp.umd.min.js on a loopback port until the test ends.
func servePage(t *testing.T, bundle string) *httptest.Server {
	t.Helper()
	html, err := os.ReadFile("testdata/page.html")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(html)
	})
	mux.HandleFunc("GET /stomp.umd.min.js", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/javascript; charset=utf-8")
		http.ServeFile(w, r, bundle)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

// browser is one headless chromium process.
type browser struct {
	ctx context.Context // the browser's first tab; children are new tabs
}

// startBrowser starts headless chromium (the exec at path) for at most
// browserBudget; it is stopped, and its profile directory removed, when
// the test ends.
func startBrowser(t *testing.T, path string) *browser {
	t.Helper()
	budget, cancelBudget := context.WithTimeout(context.Background(), browserBudget)
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.Flag("headless", "new"),
		chromedp.NoSandbox, // CI runs as root, where chromium refuses its sandbox
		chromedp.DisableGPU,
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.WindowSize(1280, 800),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(budget, opts...)
	ctx, cancelCtx := chromedp.NewContext(allocCtx, chromedp.WithLogf(t.Logf))
	t.Cleanup(func() {
		cancelCtx()
		cancelAlloc() // waits for chromium to exit and removes its profile
		cancelBudget()
	})
	if err := chromedp.Do(ctx); err != nil { // starts chromium
		t.Fatalf("start %s: %v", path, err)
	}
	return &browser{ctx: ctx}
}

// tab is one tab of the browser, with what its pages logged.
type tab struct {
	b   *browser
	ctx context.Context

	mu         sync.Mutex
	console    []string // console calls and uncaught exceptions, in order
	exceptions []string
}

// open opens a new tab on url, 1280x800, and waits until the page loaded.
// What the page logs to its console and its uncaught exceptions are shown
// if the test fails.
func (b *browser) open(t *testing.T, url string) *tab {
	t.Helper()
	ctx, cancel := chromedp.NewContext(b.ctx)
	t.Cleanup(cancel)
	tb := &tab{b: b, ctx: ctx}
	if err := chromedp.Do(ctx); err != nil { // opens the tab
		t.Fatalf("open a tab: %v", err)
	}
	if err := chromedp.Listen(ctx, tb.record); err != nil {
		t.Fatalf("listen to the tab: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			tb.mu.Lock()
			defer tb.mu.Unlock()
			t.Logf("tab %s console:\n  %s", url, strings.Join(tb.console, "\n  "))
		}
	})
	tb.do(t, chromedp.EmulateViewport(1280, 800), chromedp.Navigate(url))
	return tb
}

func (tb *tab) record(ev any) {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	switch e := ev.(type) {
	case *runtime.EventConsoleAPICalled:
		var args []string
		for _, a := range e.Args {
			if a.Value != nil {
				args = append(args, string(a.Value))
			} else {
				args = append(args, a.Description)
			}
		}
		tb.console = append(tb.console, string(e.Type)+": "+strings.Join(args, " "))
	case *runtime.EventExceptionThrown:
		s := e.ExceptionDetails.Text
		if e.ExceptionDetails.Exception != nil {
			s += " " + e.ExceptionDetails.Exception.Description
		}
		tb.console = append(tb.console, "uncaught: "+s)
		tb.exceptions = append(tb.exceptions, s)
	}
}

// uncaught returns the page's uncaught exceptions so far.
func (tb *tab) uncaught() []string {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return append([]string(nil), tb.exceptions...)
}

// do runs actions in the tab within actionTimeout, failing the test on an
// error.
func (tb *tab) do(t testing.TB, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(tb.ctx, actionTimeout)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		t.Fatalf("in the browser: %v", err)
	}
}

// eval evaluates expr in the tab (awaiting a promise) within
// actionTimeout and decodes its JSON value.
func eval[T any](tb *tab, expr string) (T, error) {
	ctx, cancel := context.WithTimeout(tb.ctx, actionTimeout)
	defer cancel()
	return chromedp.Run(ctx, chromedp.Evaluate[T](expr, chromedp.EvalAwaitPromise))
}

// mustEval is eval that fails the test on an error.
func mustEval[T any](t testing.TB, tb *tab, expr string) T {
	t.Helper()
	v, err := eval[T](tb, expr)
	if err != nil {
		var ex *chromedp.ExceptionError
		if errors.As(err, &ex) {
			t.Fatalf("in the page, %s: %v", expr, err)
		}
		t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// call is the JavaScript expression fn(args...), each argument as JSON.
func call(fn string, args ...any) string {
	parts := make([]string, len(args))
	for i, a := range args {
		b, err := json.Marshal(a)
		if err != nil {
			panic(err) // the test's own arguments: always encodable
		}
		parts[i] = string(b)
	}
	return fn + "(" + strings.Join(parts, ", ") + ")"
}
