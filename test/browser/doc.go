// Package browser holds brokerd's tests in a real browser: headless
// Chromium, driven by chromedp, runs a page that uses @stomp/stompjs 7
// over STOMP-over-WebSocket against a 3-node cluster of real brokerd
// processes, and loads the cluster page of a node's admin address.
//
// The tests need Debian's chromium and the stompjs UMD bundle, whose path
// STOMPJS_BUNDLE names; test/run.sh installs both. Without either they
// skip, unless CI is "true", where they fail. BROKERD_SCREENSHOT=path
// writes the cluster page's screenshot there (docs/cluster-page.png).
//
// The package has no code besides its tests.
package browser
